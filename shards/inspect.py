"""Summarise a shard directory (counts, coverage, dims, provenance) and, on request, verify every sample."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from shards import Progress
from shards.dataset import STATUS_JSONL, load_dataset_json, read_sidecar
from shards.guard import ShardLimits
from shards.io import iter_shard
from shards.schema import MODALITIES, SchemaError


def read_status(root: Path) -> list[dict[str, Any]]:
    path = root / STATUS_JSONL
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def inspect_dataset(root: Path | str, verify: bool = False, progress: Progress | None = None) -> dict[str, Any]:
    """Summary dict of ``root``; with ``verify`` also reads and validates every sample of every shard, calling
    ``progress(samples read, samples listed)`` as it goes."""
    root = Path(root)
    ds = load_dataset_json(root)
    status = read_status(root)
    coverage: dict[str, Counter] = {m: Counter() for m in MODALITIES}
    for rec in status:
        for m, entry in rec.get("modalities", {}).items():
            coverage[m][entry["status"]] += 1
    skipped = [{"key": r["key"], "error": r.get("error")} for r in status if r["status"] == "skipped"]
    extractors = ds["feature_set"].get("extractors", {})
    summary: dict[str, Any] = {
        "root": str(root),
        "schema_version": ds["schema_version"],
        "feature_set_hash": ds["feature_set_hash"],
        "complete": ds["complete"],
        "missing_shards": ds["missing_shards"],
        "samples": ds["samples"],
        "shards": len(ds["shards"]),
        "bytes": sum(s["bytes"] for s in ds["shards"]),
        "counts": ds["counts"],
        "modalities": ds["feature_set"].get("modalities", []),
        "coverage": {m: dict(c) for m, c in coverage.items() if c},
        "dims": ds["dims"],
        "models": {
            m: {k: e.get(k) for k in ("model", "pretrained", "weights_sha256", "layer") if k in e}
            for m, e in extractors.items()
        },
        "fps": ds["feature_set"].get("fps"),
        "skipped": skipped,
    }
    if verify:
        summary["verify"] = verify_dataset(root, ds, progress)
    return summary


def verify_dataset(root: Path, ds: dict[str, Any], progress: Progress | None = None) -> dict[str, Any]:
    """Read every sample of every listed shard; report problems instead of stopping at the first.

    Shards go through ``shards.guard`` with the member caps of ``ds``: a refused shard is one problem."""
    problems: list[str] = []
    limits = ShardLimits.of_dataset(ds)
    samples = 0
    listed = sum(entry["samples"] for entry in ds["shards"])
    if progress is not None:
        progress(0, listed)
    for entry in ds["shards"]:
        path = root / entry["name"]
        side = read_sidecar(path.with_suffix(".json"))
        if side is None:
            problems.append(f"{entry['name']}: sidecar missing or unreadable")
            continue
        keys = []
        try:
            for sample in iter_shard(path, validate=True, limits=limits):
                keys.append(sample["__key__"])
                if progress is not None:
                    progress(samples + len(keys), listed)
                if sample["meta.json"]["feature_set_hash"] != ds["feature_set_hash"]:
                    problems.append(f"{entry['name']}: sample {sample['__key__']} has another feature-set hash")
                for name, width in (("text_feat.npy", "Dt"), ("audio_feat.npy", "Da")):
                    if name in sample and width in ds["dims"] and sample[name].shape[-1] != ds["dims"][width]:
                        problems.append(f"{entry['name']}: {sample['__key__']} {name} width {sample[name].shape[-1]}")
        except SchemaError as exc:
            problems.append(str(exc))
        samples += len(keys)
        if keys != side["keys"]:
            missing = sorted(set(side["keys"]) - set(keys))
            extra = sorted(set(keys) - set(side["keys"]))
            problems.append(f"{entry['name']}: keys differ from its sidecar (missing {missing[:5]}, extra {extra[:5]})")
    return {"shards_checked": len(ds["shards"]), "samples_checked": samples, "problems": problems, "ok": not problems}


def format_summary(s: dict[str, Any]) -> str:
    """Human-readable text for ``mmfuse inspect``."""
    lines = [
        f"{s['root']}: {s['samples']} samples in {s['shards']} shards ({s['bytes'] / 1e6:.1f} MB), "
        f"schema v{s['schema_version']}, feature set {s['feature_set_hash']}"
        + ("" if s["complete"] else f", INCOMPLETE: missing {s['missing_shards']}"),
    ]
    for split, counts in s["counts"].items():
        lines.append(f"  {split:<6} " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    for m, cov in s["coverage"].items():
        lines.append(f"  {m:<6} " + ", ".join(f"{k} {v}" for k, v in sorted(cov.items())))
    for m, info in s["models"].items():
        lines.append(f"  {m} model: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    lines.append(f"  dims: {s['dims']}, fps: {s['fps']}")
    for item in s["skipped"][:20]:
        lines.append(f"  skipped {item['key']}: {item['error']}")
    if "verify" in s:
        v = s["verify"]
        verdict = "OK" if v["ok"] else f"{len(v['problems'])} PROBLEM(S)"
        lines.append(f"  verify: {v['samples_checked']} samples in {v['shards_checked']} shards read back: {verdict}")
        lines.extend(f"    {p}" for p in v["problems"][:50])
    return "\n".join(lines)
