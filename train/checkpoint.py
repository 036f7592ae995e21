"""Checkpoints: everything needed to resume a run or to run the model on new data, and nothing executable.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, saved with ``torch.save`` and
read with ``torch.load(weights_only=True)``, so loading one never runs code. It holds the network state
(fusion model and, end to end, the encoders), optimiser, scheduler, gradient scaler, every rank's RNG state,
the step and data position, the resolved training config, the fusion model's config, input dims, and the feature set
(with its hash, per-modality records and train-split statistics) the shards were extracted with.
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mmfuse.errors import MmfuseError
from shards.contract import CONTRACT_KEY
from shards.dataset import ShardDataset
from train.config_record import MODEL, read_record

CHECKPOINT_VERSION = 1
# Model settings added after checkpoints had been written, with the value those older checkpoints were trained
# with (a checkpoint whose saved model config lacks the key predates it): TCMax regression used the plain bins.
LEGACY_SETTINGS: dict[str, dict[str, Any]] = {"tcmax": {"regression": "bins"}}
# Setting values renamed since (model -> key -> old value -> new value): the same network under its new name.
RENAMED_VALUES: dict[str, dict[str, dict[Any, Any]]] = {"tcmax": {"regression": {"gaussian": "constant_normaliser"}}}


# Sentences of torch's refusal that advise loading the file anyway (weights_only off, allowlisting a global) or
# point elsewhere: left out of ours, which keeps only what the file holds.
TORCH_ADVICE = ("weights only", "weights_only", "trust", "file an issue", "documentation", "allowlist", "safe_globals")
TORCH_ADVICE += ("still be loaded",)


class CheckpointError(MmfuseError, RuntimeError):
    """A checkpoint is missing, unreadable, or not an mmfuse checkpoint."""


def save_checkpoint(
    path: Path,
    net,
    optimizer,
    scheduler,
    state: dict[str, Any],
    config,
    dataset: ShardDataset,
    dims,
    rngs,
    scaler: torch.amp.GradScaler | None = None,
) -> None:
    """Write atomically (temporary file + rename): an interrupted save never leaves a half checkpoint. The
    GradScaler's state (its loss scale; empty when it is off) is kept so an fp16 resume continues at its scale."""
    obj = {
        "mmfuse_checkpoint": CHECKPOINT_VERSION,
        "model": net.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "state": state,
        "rng": rngs,
        "config": config.to_dict(),
        "model_name": config.model,
        "model_config": dataclasses.asdict(net.fusion.config),
        "dims": dict(dims),
        "feature_set_hash": dataset.feature_set_hash,
        "feature_set": dataset.feature_set,
        "stats": dataset.stats,
        CONTRACT_KEY: {m: c.to_json() for m, c in dataset.contracts.items()},  # which member is each feature
        "torch_version": str(torch.__version__),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path | str) -> dict[str, Any]:
    """Read a checkpoint without executing anything (``weights_only=True``); clear errors otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        with warnings.catch_warnings():  # torch's note on a foreign pickle protocol: the error below says enough
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for corrupt or foreign files
        raise CheckpointError(load_error(path, exc)) from None
    if not isinstance(obj, dict) or obj.get("mmfuse_checkpoint") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} is not an mmfuse checkpoint (version {CHECKPOINT_VERSION})")
    return _with_legacy_settings(obj)


def load_error(path: Path, exc: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` refused ``path``, in one line. A file the safe unpickler refuses (a
    pickled object or global, an opcode it does not take) is refused as such, without torch's advice to retry with
    weights_only off or to allowlist the global: for a hostile file that advice runs its code, and a checkpoint
    mmfuse wrote never needs it."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # torch's bold type
    if "Weights only load failed" not in text:
        return f"cannot read checkpoint {path}: {type(exc).__name__}: {' '.join(text.split())[:300]}"
    sentences = re.split(r"(?<=[.!?:])\s+|\n+", text.replace("WeightsUnpickler error:", "\n"))
    kept = [x for x in sentences if x.strip() and not any(a in x.lower() for a in TORCH_ADVICE)]
    reason = " ".join(" ".join(kept).split())[:200].rstrip(".") or "refused by the safe unpickler"
    return (
        f"refused to read checkpoint {path}: it is not made only of tensors and plain values ({reason}). mmfuse "
        "checkpoints are, so this file is damaged, altered or not from mmfuse; loading it any other way could run "
        "code it carries"
    )


def checkpoint_dataset(ckpt: Mapping[str, Any]) -> ShardDataset:
    """The feature set, its hash, the per-modality records and the train statistics a checkpoint records, as a
    dataset without shards (what the network and the input stages need from dataset.json). A checkpoint saved
    before the records were gets those its feature set and statistics imply (``shards.contract.legacy_contracts``)."""
    recorded = {
        "feature_set": ckpt["feature_set"],
        "feature_set_hash": ckpt["feature_set_hash"],
        "stats": ckpt["stats"],
    }
    if CONTRACT_KEY in ckpt:
        recorded[CONTRACT_KEY] = ckpt[CONTRACT_KEY]
    return ShardDataset.from_json(recorded)


def _with_legacy_settings(obj: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's training config as it is recorded now (dotted keys, :func:`train.config_record.read_record`,
    whatever form it was saved in); a model setting that did not exist when the checkpoint was written gets its old
    value (``LEGACY_SETTINGS``) and a renamed setting value its new name (``RENAMED_VALUES``), so it rebuilds the
    network it was trained as."""
    saved = obj.get("model_config") or {}
    config = read_record(obj["config"]) if isinstance(obj.get("config"), dict) else None
    if config is not None:
        obj["config"] = config
        for key, value in LEGACY_SETTINGS.get(obj.get("model_name", ""), {}).items():
            if key not in saved:
                config.setdefault(f"{MODEL}{key}", value)
    for key, names in RENAMED_VALUES.get(obj.get("model_name", ""), {}).items():
        for place, name in ((saved, key), (config or {}, f"{MODEL}{key}")):
            if isinstance(place, dict) and place.get(name) in names:
                place[name] = names[place[name]]
    return obj
