"""A shard directory as a dataset: per-shard sidecars, ``status.jsonl`` and ``dataset.json``.

Layout of ``OUT/``::

    {split}-{index:06d}.tar     samples (committed by rename)
    {split}-{index:06d}.json    sidecar: keys, sizes, per-clip statuses, timings, train statistics
    status.jsonl                one line per clip of the manifest (rebuilt from the sidecars)
    dataset.json                schema version, feature set + hash, counts, shard list, train mean/std

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
from pathlib import Path
from typing import Any

from shards.io import atomic_write_bytes, atomic_write_json
from shards.schema import SCHEMA_VERSION, STATS_MEMBERS, SchemaError
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


def read_sidecar(path: Path) -> dict[str, Any] | None:
    """The sidecar at ``path``, or ``None`` if it is absent or unreadable (the shard is then incomplete)."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) and obj.get("schema_version") == SCHEMA_VERSION else None


def load_dataset_json(root: Path | str) -> dict[str, Any]:
    """Read ``dataset.json`` of a shard directory with clear errors for missing or foreign files."""
    path = Path(root) / DATASET_JSON
    if not path.is_file():
        raise SchemaError(f"{path} not found: is {root} a directory written by `mmfuse extract`?")
    try:
        obj = json.loads(path.read_text())
    except ValueError as exc:
        raise SchemaError(f"{path} is not valid JSON ({exc})") from exc
    version = obj.get("schema_version") if isinstance(obj, dict) else None
    if version != SCHEMA_VERSION:
        raise SchemaError(
            f"{path} has schema version {version!r}; this mmfuse reads version {SCHEMA_VERSION}. "
            "Re-extract the corpus with this release."
        )
    return obj


def check_feature_set(expected: str, dataset: Mapping[str, Any], what: str = "the checkpoint") -> None:
    """Refuse shards whose feature-set hash differs from ``expected``."""
    got = dataset.get("feature_set_hash")
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
) -> dict[str, Any]:
    """Rebuild ``status.jsonl`` and ``dataset.json`` from the sidecars of the planned shards.

    ``planned`` lists every ``(split, index)`` of the whole extraction (all ranks), so ``complete`` says whether
    anything is still missing. Statistics are merged from train shards only.
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
            if m in STATS_MEMBERS
        },
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **dict(extra or {}),
    }
    atomic_write_json(out / DATASET_JSON, dataset)
    return dataset
