"""Turn a shard's decoded clips into samples (batched encoders), write the tar and its sidecar atomically."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from extract.config import ExtractConfig
from extract.extractors.base import DecodedClip, ExtractionError, Extractor, ModalityFailure
from shards.dataset import DATASET_JSON, STATUS_JSONL, read_sidecar
from shards.io import DiskFullError, ShardWriter, atomic_write_json
from shards.schema import FEATURE_MEMBERS, MASK_MEMBERS, MODALITIES, SAMPLE_RATE, SCHEMA_VERSION
from shards.stats import RunningStats

log = logging.getLogger(__name__)


def is_complete(out: Path, name: str, keys: list[str], fs_hash: str, raw: bool) -> bool:
    """A shard is done when its sidecar (the commit marker) matches this plan, feature set and raw setting."""
    side = read_sidecar(out / f"{name}.json")
    return (
        side is not None
        and (out / f"{name}.tar").is_file()
        and side.get("feature_set_hash") == fs_hash
        and side.get("planned") == keys
        and side.get("raw_wave") == raw
    )


def clean_stale(out: Path, planned: set[str], remove_all: bool) -> None:
    """Remove temporary files of interrupted writes, shards outside the current plan, or (``--overwrite``) all."""
    for path in out.iterdir():
        stem = path.name.split(".")[0]
        ours = path.suffix in (".tar", ".json") or ".tmp-" in path.name
        if not ours or path.name == DATASET_JSON:
            if remove_all and path.name in (DATASET_JSON, STATUS_JSONL):
                path.unlink(missing_ok=True)
            continue
        is_shard = len(stem.split("-")) == 2 and stem.split("-")[1].isdigit()
        if ".tmp-" in path.name or (is_shard and (remove_all or stem not in planned)):
            log.info("removing %s", path.name)
            path.unlink(missing_ok=True)


def modality_status(d: DecodedClip, modality: str, cfg: ExtractConfig, result: Any) -> dict[str, Any]:
    if modality not in cfg.modalities:
        return {"status": "absent", "error": None}
    if isinstance(result, ModalityFailure):
        return {**d.status.get(modality, {}), "status": "failed", "error": result.error}
    return {**d.status.get(modality, {}), "status": "ok", "error": None}


def write_shard(
    out: Path, plan: Any, decoded: list[DecodedClip], extractors: dict[str, Extractor], fs_hash: str, cfg: ExtractConfig
) -> int:
    """Encode, validate and write one shard plus its sidecar; return the number of samples written."""
    tic = time.perf_counter()
    live = [d for d in decoded if "skipped" not in d.info]
    results: dict[str, list[Any]] = {}
    timings = {"decode_s": sum(sum(d.timings.values()) for d in decoded)}
    for modality in ("text", "audio"):
        if modality in extractors:
            t = time.perf_counter()
            results[modality] = extractors[modality](live) if live else []
            timings[f"{modality}_s"] = time.perf_counter() - t
    if "video" in extractors:
        results["video"] = [
            d.video if d.video is not None else ModalityFailure(d.status["video"]["error"]) for d in live
        ]
    stats: dict[str, RunningStats] = {}
    records, index = [], {id(d): k for k, d in enumerate(live)}
    writer = ShardWriter(out / f"{plan.name}.tar")
    try:
        for d in decoded:
            c = d.clip
            record = {"key": c.key, "video_id": c.video_id, "clip_id": c.clip_id, "split": c.split, "row": c.row}
            record["shard"] = f"{plan.name}.tar"
            if "skipped" in d.info:
                records.append({**record, "status": "skipped", "error": d.info["skipped"], "modalities": {}})
                continue
            k = index[id(d)]
            per = {m: results[m][k] if m in results else None for m in MODALITIES}
            mods = {m: modality_status(d, m, cfg, per[m]) for m in MODALITIES}
            sample: dict[str, Any] = {"__key__": c.key, "meta.json": sample_meta(d, mods, fs_hash, cfg)}
            for m in MODALITIES:
                if mods[m]["status"] == "ok":
                    sample.update(per[m])
            writer.write(sample)
            if c.split == "train":
                _accumulate(stats, sample)
            requested_ok = all(mods[m]["status"] == "ok" for m in cfg.modalities)
            records.append({**record, "status": "ok" if requested_ok else "partial", "modalities": mods})
        writer.commit()
    except DiskFullError as exc:
        writer.abort()
        raise ExtractionError(
            f"disk full while writing {plan.name}.tar ({exc.strerror}). Completed shards are kept; free space "
            "and rerun the same command to resume."
        ) from exc
    except BaseException:
        writer.abort()
        raise
    timings["wall_s"] = time.perf_counter() - tic
    sidecar = {
        "schema_version": SCHEMA_VERSION,
        "shard": f"{plan.name}.tar",
        "split": plan.split,
        "index": plan.index,
        "rank": cfg.rank,
        "feature_set_hash": fs_hash,
        "raw_wave": cfg.raw,
        "planned": [c.key for c in plan.clips],
        "keys": writer.keys,
        "bytes": (out / f"{plan.name}.tar").stat().st_size,
        "clips": records,
        "dims": {k: v for e in extractors.values() for k, v in e.provenance().get("dims", {}).items()},
        "stats": {m: s.to_json() for m, s in stats.items()},
        "timings": {k: round(v, 4) for k, v in timings.items()},
        "audio_seconds": round(sum(len(d.wave) for d in live if d.wave is not None) / SAMPLE_RATE, 3),
        "host": os.uname().nodename,
    }
    try:
        atomic_write_json(out / f"{plan.name}.json", sidecar)
    except DiskFullError as exc:
        raise ExtractionError(
            f"disk full while writing {plan.name}.json; free space and rerun the same command to resume"
        ) from exc
    return len(writer.keys)


def sample_meta(d: DecodedClip, mods: dict[str, Any], fs_hash: str, cfg: ExtractConfig) -> dict[str, Any]:
    c = d.clip
    return {
        "schema_version": SCHEMA_VERSION,
        "key": c.key,
        "video_id": c.video_id,
        "clip_id": c.clip_id,
        "split": c.split,
        "row": c.row,
        "text": c.text,
        "labels": c.labels,
        "words": c.words,
        "media": c.media,
        "start": c.start,
        "end": c.end,
        "duration": round(d.duration, 6),
        "sample_rate": SAMPLE_RATE,
        "fps": d.info.get("fps"),
        "modalities": mods,
        "feature_set_hash": fs_hash,
        "text_truncated_from": d.info.get("text_truncated_from"),
    }


def _accumulate(stats: dict[str, RunningStats], sample: dict[str, Any]) -> None:
    for modality, member in FEATURE_MEMBERS.items():
        if member not in sample:
            continue
        rows = sample[member]
        mask_member = MASK_MEMBERS.get(modality)
        if mask_member is not None:
            rows = rows[np.asarray(sample[mask_member], dtype=bool)]
        stats.setdefault(member, RunningStats()).update(rows)
