"""Turn decoded clips into samples (batched encoders) and write each shard's tar and sidecar atomically."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from extract.clip import make_sample, run_extractors
from extract.config import ExtractConfig
from extract.extractors.base import DecodedClip, ExtractionError
from shards.contract import declared_table
from shards.dataset import read_sidecar
from shards.io import DiskFullError, ShardWriter, atomic_write_json
from shards.schema import MODALITIES, SAMPLE_RATE, SCHEMA_VERSION, MemberSpec
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


class ShardBuilder:
    """One shard, built as its clips arrive: encoders run on each group of ``group`` decoded clips (so they
    overlap the decoding of later clips in the workers), samples stream into the temporary tar in plan order,
    and :meth:`finish` commits the tar and then its sidecar (the commit marker).

    Clips must be added in the plan's order. An exception, or :meth:`abort`, removes the temporary tar.
    """

    def __init__(
        self, out: Path, plan: Any, extractors: dict[str, Any], fs_hash: str, cfg: ExtractConfig, group: int
    ) -> None:
        self.out, self.plan, self.extractors, self.fs_hash, self.cfg = out, plan, extractors, fs_hash, cfg
        self.group = max(1, group)
        outputs = {m: e.output_spec() for m, e in extractors.items() if m in MODALITIES}  # each member by role
        self.writer = ShardWriter(out / f"{plan.name}.tar", rank=cfg.rank, members=declared_table(outputs))
        self.features = {m: feature_and_mask(spec) for m, spec in outputs.items()}
        self.pending: list[DecodedClip] = []
        self.records: list[dict[str, Any]] = []
        self.stats: dict[str, RunningStats] = {}
        encoders = [m for m in MODALITIES if m in extractors and extractors[m].runs_in == "encoder"]
        self.timings = {"decode_s": 0.0, **{f"{m}_s": 0.0 for m in encoders}}
        self.audio_seconds = 0.0
        self.added = 0  # clips added so far
        self.flushed = 0  # clips encoded and written to the temporary tar so far
        self.tic = time.perf_counter()

    def add(self, decoded: DecodedClip) -> None:
        """Queue one decoded clip; encode and write the queue once it holds ``group`` clips to encode."""
        if self.added >= len(self.plan.clips) or decoded.clip.key != self.plan.clips[self.added].key:
            raise ExtractionError(f"{self.plan.name}: clip {decoded.clip.key} arrived out of plan order")
        self.added += 1
        self.pending.append(decoded)
        if sum("skipped" not in d.info for d in self.pending) >= self.group:
            self.flush()

    def finish(self) -> int:
        """Encode and write what is queued, commit the tar, write the sidecar; return the samples written."""
        if self.added != len(self.plan.clips):
            raise ExtractionError(f"{self.plan.name}: {self.added} of {len(self.plan.clips)} clips were added")
        self.flush()
        self._guard(self.writer.commit, "tar")
        self.timings["wall_s"] = time.perf_counter() - self.tic
        cfg = self.cfg
        sidecar = {
            "schema_version": SCHEMA_VERSION,
            "shard": f"{self.plan.name}.tar",
            "split": self.plan.split,
            "index": self.plan.index,
            "rank": cfg.rank,
            "feature_set_hash": self.fs_hash,
            "raw_wave": cfg.raw,
            "planned": [c.key for c in self.plan.clips],
            "keys": self.writer.keys,
            "digests": self.writer.digests,
            "bytes": (self.out / f"{self.plan.name}.tar").stat().st_size,
            "clips": self.records,
            "dims": {k: v for e in self.extractors.values() for k, v in e.provenance().get("dims", {}).items()},
            "stats": {m: s.to_json() for m, s in self.stats.items()},
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
            "audio_seconds": round(self.audio_seconds, 3),
            "host": os.uname().nodename,
        }
        self._guard(lambda: atomic_write_json(self.out / f"{self.plan.name}.json", sidecar, cfg.rank), "json")
        return len(self.writer.keys)

    def abort(self) -> None:
        """Drop the temporary tar (an interrupted shard is redone by the next run)."""
        self.writer.abort()

    def _guard(self, write: Any, what: str) -> None:
        try:
            write()
        except DiskFullError as exc:
            self.writer.abort()
            raise ExtractionError(
                f"disk full while writing {self.plan.name}.{what} ({exc.strerror}). Completed shards are kept; "
                "free space and rerun the same command to resume."
            ) from exc
        except BaseException:
            self.writer.abort()
            raise

    def flush(self) -> None:
        """Encode the queued clips and write their samples now, however few (:meth:`add` does it once ``group``
        are queued)."""
        batch, self.pending = self.pending, []
        if not batch:
            return
        live = [d for d in batch if "skipped" not in d.info]
        self.timings["decode_s"] += sum(sum(d.timings.values()) for d in batch)
        self.audio_seconds += sum(len(d.wave) for d in live if d.wave is not None) / SAMPLE_RATE
        results = run_extractors(live, self.extractors, self.timings)
        index = {id(d): k for k, d in enumerate(live)}
        self._guard(lambda: self._write(batch, index, results), "tar")
        self.flushed += len(batch)

    def _write(self, batch: list[DecodedClip], index: dict[int, int], results: dict[str, list[Any]]) -> None:
        cfg = self.cfg
        for d in batch:
            c = d.clip
            record = {"key": c.key, "video_id": c.video_id, "clip_id": c.clip_id, "split": c.split, "row": c.row}
            record["shard"] = f"{self.plan.name}.tar"
            if "skipped" in d.info:
                self.records.append({**record, "status": "skipped", "error": d.info["skipped"], "modalities": {}})
                continue
            sample = make_sample(d, {m: r[index[id(d)]] for m, r in results.items()}, cfg.modalities, self.fs_hash, cfg)
            mods = sample["meta.json"]["modalities"]
            self.writer.write(sample)
            if c.split == "train":
                _accumulate(self.stats, sample, self.features)
            requested_ok = all(mods[m]["status"] == "ok" for m in cfg.modalities)
            self.records.append({**record, "status": "ok" if requested_ok else "partial", "modalities": mods})


def write_shard(
    out: Path, plan: Any, decoded: list[DecodedClip], extractors: dict[str, Any], fs_hash: str, cfg: ExtractConfig
) -> int:
    """Encode, validate and write one shard whose clips are all decoded; return the number of samples written."""
    builder = ShardBuilder(out, plan, extractors, fs_hash, cfg, group=len(decoded) or 1)
    try:
        for d in decoded:
            builder.add(d)
    except BaseException:
        builder.abort()
        raise
    return builder.finish()


def feature_and_mask(outputs: dict[str, MemberSpec]) -> tuple[str | None, str | None]:
    """The members of role ``feature`` and ``mask`` of an extractor's output spec (None where it has none)."""
    roles = {spec.role: name for name, spec in outputs.items()}
    return roles.get("feature"), roles.get("mask")


def _accumulate(
    stats: dict[str, RunningStats], sample: dict[str, Any], features: dict[str, tuple[str | None, str | None]]
) -> None:
    """Add a train sample's valid feature rows (``features``: modality -> its feature and mask members) to the
    shard's statistics, by feature member."""
    for member, mask_member in features.values():
        if member is None or member not in sample:
            continue
        rows = sample[member]
        if mask_member is not None and mask_member in sample:
            rows = rows[np.asarray(sample[mask_member], dtype=bool)]
        stats.setdefault(member, RunningStats()).update(rows)
