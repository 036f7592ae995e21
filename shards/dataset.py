"""A shard directory as a dataset: per-shard sidecars, ``status.jsonl`` and ``dataset.json``.

Layout of ``OUT/``::

    {split}-{index:06d}.tar     samples (committed by rename)
    {split}-{index:06d}.json    sidecar: keys, sizes, per-clip statuses, timings, train statistics
    status.jsonl                one line per clip of the manifest (rebuilt from the sidecars)
    dataset.json                schema version, feature set + hash, per-modality records (shards.contract),
                                counts, shard list, train mean/std

A shard is complete when its sidecar exists: the sidecar is renamed into place after the tar, so it is the
commit marker. ``dataset.json`` and ``status.jsonl`` are derived from the sidecars and can be rebuilt at any
time, by any rank, without coordination.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmfuse.settings import quoted
from shards.contract import CONTRACT_KEY, IMPORTED, ModalityContract, member_table, read_contracts, stats_members
from shards.dataset_fields import dataset_field_problems
from shards.io import atomic_write_bytes, atomic_write_json
from shards.schema import ALTERNATIVES, SCHEMA_VERSION, MemberSpec, SchemaError
from shards.sidecar import dataset_problems, read_json_file, read_sidecar
from shards.stats import RunningStats

DATASET_JSON = "dataset.json"
STATUS_JSONL = "status.jsonl"


class FeatureSetMismatch(SchemaError):
    """Shards, checkpoint or request were made with different feature sets."""


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}"


def feature_set_hash(feature_set: Mapping[str, Any]) -> str:
    """Stable short hash of a feature-set description (canonical JSON, sha256, 16 hex digits)."""
    blob = json.dumps(feature_set, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


DATASET_MAX_BYTES = 64 << 20  # dataset.json: statistics of a few thousand dims and a shard list; far below this


def load_dataset_json(root: Path | str) -> dict[str, Any]:
    """Read ``dataset.json`` of a shard directory with clear errors for missing or foreign files.

    It is read like a shard member (:func:`shards.guard.load_json`): at most :data:`DATASET_MAX_BYTES`, nesting
    checked before parsing; a file that is not JSON, lacks a field every reader needs, or has a field of the wrong
    type or a number out of its range (:func:`shards.dataset_fields.dataset_field_problems`) is a SchemaError
    naming dataset.json, the field and its value."""
    path = Path(root) / DATASET_JSON
    if not path.is_file():
        raise SchemaError(f"{path} not found: is {root} a directory written by `mmfuse extract`?")
    try:
        obj = read_json_file(path, DATASET_MAX_BYTES)
    except OSError as exc:
        raise SchemaError(f"{path} cannot be read ({exc.strerror or exc})") from exc
    version = obj.get("schema_version") if isinstance(obj, dict) else None
    if type(version) is not int or version != SCHEMA_VERSION:
        raise SchemaError(
            f"{path} has schema version {quoted(version)}; this mmfuse reads version {SCHEMA_VERSION}. "
            "Re-extract the corpus with this release."
        )
    problems = dataset_field_problems(obj)
    if problems:
        more = f"; and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise SchemaError(f"{path}: " + "; ".join(problems[:10]) + more + "; extract the corpus again")
    return obj


def check_dataset_json(root: Path | str, ds: Mapping[str, Any]) -> None:
    """SchemaError listing where dataset.json disagrees with the shards beside it (see
    :func:`shards.sidecar.dataset_problems`): readers plan from the sidecars, never from a count that disagrees."""
    problems = dataset_problems(root, ds)
    if problems:
        more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise SchemaError(
            "; ".join(problems[:5]) + more + "; rebuild dataset.json from the sidecars (`mmfuse extract` resumes) "
            "or extract the corpus again"
        )


@dataclass(frozen=True)
class ShardEntry:
    """One complete shard as ``dataset.json`` lists it."""

    name: str  # file name in the shard directory, e.g. "train-000000.tar"
    split: str
    samples: int
    bytes: int = 0


@dataclass(frozen=True)
class MemberStats:
    """Train-split statistics of one feature member: ``count`` valid rows, (D,) float64 ``mean`` and ``std``."""

    count: int
    mean: np.ndarray
    std: np.ndarray


@dataclass(frozen=True)
class ShardDataset:
    """``dataset.json`` of a shard directory, read once (:meth:`load`) and passed to whatever reads the shards.

    ``feature_set`` and ``stats`` are kept as stored (checkpoints record them unchanged); ``dims`` maps the width
    symbols (``Dt``, ``Da``, ``Dv``, ``landmarks``) to ints. ``contracts`` holds each extracted modality's record
    (:class:`shards.contract.ModalityContract`: its feature member, width, mask, time, raw and extra members), as
    dataset.json records it or, for one written before it did, as :func:`shards.contract.legacy_contracts`
    derives it. A dataset with ``root=None`` has no shards to read: it is the feature set, records and statistics
    a checkpoint records (see :meth:`from_json`).
    """

    root: Path | None
    feature_set: dict[str, Any]
    feature_set_hash: str | None
    dims: dict[str, int] = field(default_factory=dict)
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    shards: tuple[ShardEntry, ...] = ()
    missing_shards: tuple[str, ...] = ()
    complete: bool = True
    contracts: dict[str, ModalityContract] = field(default_factory=dict)

    @classmethod
    def load(cls, root: Path | str) -> ShardDataset:
        """Read ``root/dataset.json`` (the errors of :func:`load_dataset_json`: fields of the wrong type, numbers
        out of range, train statistics that are not finite), checked against the shards and their sidecars
        (:func:`check_dataset_json`: no shard listed twice, no sample key in two shards, every count and the
        train statistics equal to what the sidecars record)."""
        obj = load_dataset_json(root)
        check_dataset_json(root, obj)
        return cls.from_json(obj, root)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any], root: Path | str | None = None) -> ShardDataset:
        """From a ``dataset.json`` dict; absent keys read as empty (a checkpoint records only the feature set,
        its hash, the per-modality records and the statistics; an older one no records, which are then derived)."""
        shards = tuple(
            ShardEntry(s["name"], s["split"], int(s["samples"]), int(s.get("bytes", 0))) for s in obj.get("shards", [])
        )
        return cls(
            root=None if root is None else Path(root),
            feature_set=dict(obj.get("feature_set", {})),
            feature_set_hash=obj.get("feature_set_hash"),
            dims=dict(obj.get("dims", {})),
            stats=dict(obj.get("stats", {})),
            counts=dict(obj.get("counts", {})),
            shards=shards,
            missing_shards=tuple(obj.get("missing_shards", ())),
            complete=bool(obj.get("complete", True)),
            contracts=read_contracts(obj),
        )

    @classmethod
    def of(cls, dataset: ShardDataset | Path | str) -> ShardDataset:
        """``dataset`` itself, or the dataset of the shard directory it names."""
        return dataset if isinstance(dataset, ShardDataset) else cls.load(dataset)

    @property
    def splits(self) -> list[str]:
        """The splits that have complete shards, sorted."""
        return sorted({s.split for s in self.shards})

    def split_shards(self, split: str) -> list[ShardEntry]:
        """The complete shards of ``split`` in name order (empty when there are none)."""
        return sorted((s for s in self.shards if s.split == split), key=_entry_name)

    def split_samples(self, split: str) -> int:
        """Samples in the complete shards of ``split``."""
        return sum(s.samples for s in self.shards if s.split == split)

    def path(self, shard: ShardEntry) -> Path:
        """Where ``shard`` lies (an error for a dataset without a shard directory)."""
        if self.root is None:
            raise SchemaError(f"no shard directory to read {shard.name} from (a checkpoint's feature record)")
        return self.root / shard.name

    @property
    def extractors(self) -> dict[str, dict[str, Any]]:
        """Provenance of each modality's extractor (model, layer, weights hash...), by modality."""
        return dict(self.feature_set.get("extractors", {}))

    @property
    def video_extractor(self) -> str | None:
        """Provenance name of the video extractor (e.g. ``mediapipe-facemesh``); None when the set names none."""
        return self.extractors.get("video", {}).get("name")

    @property
    def imported_video(self) -> bool:
        """Whether the video features are imported pre-computed ones: the record's extractor is ``imported`` (or,
        in a record derived from an older dataset.json, the feature is the landmarks' alternative)."""
        c = self.contracts.get("video")
        return c is not None and (c.extractor == IMPORTED or c.feature == ALTERNATIVES["video_lmk.npy"])

    @property
    def members(self) -> dict[str, MemberSpec]:
        """The members a sample of these shards may carry, as the schema checks them (see
        :func:`shards.contract.member_table`)."""
        return member_table(self.contracts)

    def contract(self, modality: str) -> ModalityContract:
        """The record of ``modality``; a SchemaError saying which modalities the shards hold when it has none."""
        if modality not in self.contracts:
            raise SchemaError(
                f"the shards hold no {modality} features (dataset.json records {sorted(self.contracts) or 'none'}): "
                f"extract the corpus with {modality}, or leave {modality} out of the modalities"
            )
        return self.contracts[modality]

    def feature_member(self, modality: str) -> str:
        """The member holding ``modality``'s features, e.g. ``text_feat.npy`` (the record's ``feature``)."""
        return self.contract(modality).feature

    def feature_width(self, modality: str) -> int | None:
        """Width per step of the stored features of ``modality`` (landmarks flattened: 478 * 3), from its record;
        None when there is none."""
        c = self.contracts.get(modality)
        return None if c is None else c.width

    def train_stats(self, member: str) -> MemberStats | None:
        """Train-split statistics of ``member`` (e.g. ``audio_feat.npy``); None when dataset.json has none."""
        entry = self.stats.get(member)
        if not entry:
            return None
        mean, std = np.asarray(entry["mean"], np.float64), np.asarray(entry["std"], np.float64)
        return MemberStats(int(entry.get("count", 0)), mean, std)


def _entry_name(shard: ShardEntry) -> str:
    return shard.name


def check_feature_set(expected: str, dataset: ShardDataset, what: str = "the checkpoint") -> None:
    """Refuse shards whose feature-set hash differs from ``expected``."""
    got = dataset.feature_set_hash
    if got != expected:
        raise FeatureSetMismatch(
            f"feature-set mismatch: {what} expects features {expected} but the shards hold {got}. "
            "Extract the corpus again with the checkpoint's feature set (see `mmfuse inspect`), "
            "or train a new model on these shards."
        )


def build_dataset(
    out: Path,
    planned: Iterable[tuple[str, int]],
    feature_set: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
    contracts: Mapping[str, ModalityContract] | None = None,
) -> dict[str, Any]:
    """Rebuild ``status.jsonl`` and ``dataset.json`` from the sidecars of the planned shards.

    ``planned`` lists every ``(split, index)`` of the whole extraction (all ranks), so ``complete`` says whether
    anything is still missing. Statistics are merged from train shards only. ``contracts``: the extractors'
    per-modality records, stored under ``modalities`` (without them, readers derive the built-in ones).
    """
    fs_hash = feature_set_hash(feature_set)
    shards, status_lines, missing = [], [], []
    counts: dict[str, Counter] = {}
    stats: dict[str, RunningStats] = {}
    dims: dict[str, int] = {}
    for split, index in planned:
        name = shard_name(split, index)
        side = read_sidecar(out / f"{name}.json")
        if side is None or not (out / f"{name}.tar").is_file() or side.get("feature_set_hash") != fs_hash:
            missing.append(name)
            continue
        shards.append({"name": f"{name}.tar", "split": split, "samples": len(side["keys"]), "bytes": side["bytes"]})
        for rec in side["clips"]:
            status_lines.append(json.dumps(rec, ensure_ascii=False, sort_keys=True))
            counts.setdefault(split, Counter())[rec["status"]] += 1
        dims.update(side.get("dims", {}))
        if split == "train":
            for member, obj in side.get("stats", {}).items():
                stats.setdefault(member, RunningStats()).merge(RunningStats.from_json(obj))
    status_blob = ("\n".join(status_lines) + "\n") if status_lines else ""
    atomic_write_bytes(out / STATUS_JSONL, status_blob.encode("utf-8"))
    dataset = {
        "schema_version": SCHEMA_VERSION,
        "feature_set": dict(feature_set),
        "feature_set_hash": fs_hash,
        "dims": dims,
        "counts": {split: dict(sorted(c.items())) for split, c in sorted(counts.items())},
        "samples": sum(s["samples"] for s in shards),
        "shards": shards,
        "missing_shards": missing,
        "complete": not missing,
        "stats": {
            m: {"count": s.count, "mean": s.mean.tolist(), "std": s.std.tolist()}
            for m, s in sorted(stats.items())
            if m in stats_members(contracts or {})
        },
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **dict(extra or {}),
    }
    if contracts:
        dataset[CONTRACT_KEY] = {m: c.to_json() for m, c in contracts.items()}
    atomic_write_json(out / DATASET_JSON, dataset)
    return dataset
