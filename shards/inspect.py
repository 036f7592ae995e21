"""Summarise a shard directory (counts, coverage, dims, provenance) and, on request, verify every sample."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from shards import Progress
from shards.contract import ModalityContract, member_table, read_contracts
from shards.dataset import STATUS_JSONL, load_dataset_json
from shards.guard import ShardLimits, iter_raw_samples, load_json
from shards.io import decode_sample
from shards.schema import MODALITIES, SchemaError, validate_sample
from shards.sidecar import ShardCheck, dataset_problems

STATUS_LINE_MAX_BYTES = 1 << 20  # one clip's record (key, statuses, errors): capped as a meta.json is


def read_status(root: Path) -> list[dict[str, Any]]:
    """The records of ``root``'s status.jsonl ([] without one), read line by line through the JSON guard: each
    line at most ``STATUS_LINE_MAX_BYTES`` and ``JSON_MAX_DEPTH`` deep, a mapping with a string ``key`` and
    ``status`` and, if present, ``modalities`` mapping each modality to a mapping with a string ``status``.
    A line that is not is a ``SchemaError`` naming the file and the line."""
    path = root / STATUS_JSONL
    if not path.is_file():
        return []
    records = []
    with open(path, "rb") as f:
        for number, line in enumerate(iter(lambda: f.readline(STATUS_LINE_MAX_BYTES + 1), b""), 1):
            if not line.strip():
                continue
            try:
                if len(line) > STATUS_LINE_MAX_BYTES:
                    raise SchemaError(f"a line over {STATUS_LINE_MAX_BYTES} bytes")
                records.append(_status_record(load_json(line, STATUS_LINE_MAX_BYTES)))
            except (SchemaError, ValueError) as exc:
                raise SchemaError(f"{path} line {number}: {exc}") from exc
    return records


def _status_record(record: Any) -> dict[str, Any]:
    """``record`` when it has the fields the readers use (ValueError naming the first that is wrong)."""
    if not isinstance(record, dict):
        raise ValueError("a record must be a JSON object")
    for name in ("key", "status"):
        if not isinstance(record.get(name), str):
            raise ValueError(f"a record needs a string {name!r}")
    modalities = record.get("modalities", {})
    if not isinstance(modalities, dict) or not all(
        isinstance(entry, dict) and isinstance(entry.get("status"), str) for entry in modalities.values()
    ):
        raise ValueError("'modalities' must map each modality to an object with a string 'status'")
    return record


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
        "complete": ds.get("complete", True),
        "missing_shards": ds.get("missing_shards", []),
        "samples": ds.get("samples", sum(s["samples"] for s in ds["shards"])),
        "shards": len(ds["shards"]),
        "bytes": sum(s.get("bytes", 0) for s in ds["shards"]),
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

    dataset.json is checked against the sidecars (:func:`shards.sidecar.dataset_problems`), then each shard goes
    through ``shards.guard`` with the member caps of ``ds`` (a refused shard is one problem) and every sample is
    checked against its sidecar (:class:`shards.sidecar.ShardCheck`: every member's digest, the member set, the
    key list, the split) and the schema. A sidecar without digests (written before they were recorded) is a
    warning, not a problem: its members are checked against everything but digests."""
    problems: list[str] = dataset_problems(root, ds)
    warnings: list[str] = []
    limits = ShardLimits.of_dataset(ds)
    contracts = read_contracts(ds)  # which member is each modality's feature, and its width
    entries = list({entry["name"]: entry for entry in ds["shards"]}.values())  # a shard listed twice is read once
    listed, samples = sum(entry["samples"] for entry in entries), 0
    if progress is not None:
        progress(0, listed)
    for entry in entries:
        try:
            check = ShardCheck.load(root / entry["name"], entry["split"])
        except SchemaError as exc:
            problems.append(f"{entry['name']}: {exc}")
            continue
        if check.digests is None:
            warnings.append(f"{check.side_name} records no member digests (an older extraction): not checked")
        count = 0
        try:
            for count, raw in enumerate(iter_raw_samples(root / entry["name"], limits, entry["name"]), 1):
                if progress is not None:
                    progress(samples + count, listed)
                problems.extend(check.sample(count - 1, raw))
                problems.extend(_sample_problems(raw, entry, ds, contracts))
        except SchemaError as exc:
            problems.append(str(exc))
        else:
            problems.extend(p for p in [check.end(count)] if p)
        samples += count
    return {
        "shards_checked": len(entries),
        "samples_checked": samples,
        "problems": problems,
        "warnings": warnings,
        "ok": not problems,
    }


def _sample_problems(
    raw: dict[str, Any], entry: dict[str, Any], ds: dict[str, Any], contracts: dict[str, ModalityContract]
) -> list[str]:
    """Problems of one sample read back (members as bytes): decoding, the schema (the members of the shards'
    records), feature set, split, and each record's feature width."""
    where = f"{entry['name']}: sample {raw['__key__']}"
    try:
        sample = decode_sample(raw, entry["name"])
        validate_sample(sample, members=member_table(contracts))
    except SchemaError as exc:
        return [f"{entry['name']}: {exc}" if entry["name"] not in str(exc) else str(exc)]
    meta, problems = sample["meta.json"], []
    if meta["feature_set_hash"] != ds["feature_set_hash"]:
        problems.append(f"{where} has another feature-set hash")
    if meta["split"] != entry["split"]:
        problems.append(f"{where}: meta.json says split {meta['split']!r} but it is in a {entry['split']} shard")
    for c in contracts.values():
        feat = sample.get(c.feature)
        if feat is not None and len(feat) and feat[0].size != c.width:
            problems.append(f"{where} {c.feature} width {feat[0].size}, but dataset.json records {c.width}")
    return problems


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
        lines.extend(f"    warning: {w}" for w in v.get("warnings", [])[:20])
    return "\n".join(lines)
