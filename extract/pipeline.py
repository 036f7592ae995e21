"""The extraction pipeline: manifest -> plan -> decode + worker extractors (FaceMesh) -> batched encoders -> shards.

Each configured modality is filled by the extractor the registry (``extract.EXTRACTORS``) holds for it, built
from its ``Settings`` read from the config. Decoding, and the extractors that run on decoded frames
(``runs_in = "worker"``), run ahead in worker processes while the main process encodes each group of
``batch_size`` decoded clips with the others (``"encoder"``) and streams the samples into the shard's
temporary tar.

Clips go to shards deterministically (per split, in manifest order, ``shard_size`` each), shards to ranks
round-robin, so any rerun, on any number of machines, rebuilds the same plan: complete shards are skipped,
incomplete ones redone, and every clip ends up exactly once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from extract.auto import describe
from extract.clip import ASR, decode_settings, transcribes
from extract.config import ExtractConfig, resolved
from extract.decode import AUDIO_DOWNMIX
from extract.devices import resolve_device
from extract.manifest import Clip, load_manifest
from extract.outdir import (
    DATASET_LOCK,
    ShardLock,
    check_feature_set,
    check_out_dir,
    claim_shards,
    clean_stale,
    recorded_max_duration,
    refuse_live_writers,
)
from extract.pool import DecodePool, decode_clips
from extract.registry import EXTRACTORS
from extract.worker import DecodeSettings
from extract.writer import ShardBuilder
from shards import Progress
from shards.contract import ModalityContract
from shards.dataset import build_dataset, feature_set_hash, shard_name
from shards.schema import MODALITIES, SAMPLE_RATE, SCHEMA_VERSION, SPLITS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardPlan:
    split: str
    index: int
    clips: tuple[Clip, ...]

    @property
    def name(self) -> str:
        return shard_name(self.split, self.index)


def plan_shards(clips: Sequence[Clip], shard_size: int) -> list[ShardPlan]:
    """Deterministic assignment: per split (train, valid, test), manifest order, ``shard_size`` clips a shard."""
    plans = []
    for split in SPLITS:
        members = [c for c in clips if c.split == split]
        for index, lo in enumerate(range(0, len(members), shard_size)):
            plans.append(ShardPlan(split, index, tuple(members[lo : lo + shard_size])))
    return plans


def build_extractors(cfg: ExtractConfig) -> dict[str, Any]:
    """The configured extractors by modality (the one ``cfg.extractors`` chooses for each, built from its
    ``Settings`` read from ``cfg``, resolved: :func:`extract.config.resolved`) set up on ``cfg.device``, and when
    ``cfg`` transcribes (:func:`transcribes`) the registered speech recogniser ``"asr"`` under its name. Worker
    extractors are built here too, for their provenance; the decode workers build their own."""
    cfg = resolved(cfg)
    found: dict[str, Any] = {}
    for modality in MODALITIES:
        if modality in cfg.modalities:
            found[modality] = EXTRACTORS[cfg.chosen(modality)].build(cfg.section(cfg.chosen(modality)))
    if transcribes(cfg):
        found[ASR] = EXTRACTORS[ASR].build(cfg.section(ASR))
    for ex in found.values():  # worker extractors are here for their provenance: the decode workers set up theirs
        if getattr(ex, "runs_in", "encoder") != "worker":
            ex.setup(cfg.device)
    return found


def describe_feature_set(cfg: ExtractConfig, extractors: dict[str, Any]) -> dict[str, Any]:
    """Everything that determines the features' values; its hash binds shards to checkpoints. A speech
    recogniser (``--asr``) makes text features, so it is part of it when used."""
    described = {
        "schema_version": SCHEMA_VERSION,
        "modalities": [m for m in MODALITIES if m in cfg.modalities],
        "sample_rate": SAMPLE_RATE,
        "fps": cfg.fps if cfg.fps is not None else "native (capped at 30)",
        "extractors": {m: extractors[m].provenance() for m in MODALITIES if m in extractors},
    }
    if "audio" in cfg.modalities:
        described["audio_downmix"] = AUDIO_DOWNMIX
    if ASR in extractors:
        described[ASR] = extractors[ASR].provenance()
    return described


def describe_contracts(
    cfg: ExtractConfig, extractors: dict[str, Any], feature_set: dict[str, Any]
) -> dict[str, ModalityContract]:
    """dataset.json's record of each extracted modality (:mod:`shards.contract`): which member its extractor
    writes as the feature, its width, mask, time, raw and extra members, and the extractor's settings. Widths come
    from the provenance already in ``feature_set``."""
    recorded = feature_set.get("extractors", {})
    return {
        m: extractors[m].contract(cfg.section(cfg.chosen(m)), recorded.get(m)) for m in MODALITIES if m in extractors
    }


def check_device(device: str) -> None:
    """Refuse ``--device`` when this machine lacks it (:func:`extract.devices.resolve_device`'s one line)."""
    resolve_device(device, auto=False)


@dataclass
class ExtractionJob:
    """This rank's share of an extraction, with its extractors built: what :func:`run_extract` then writes."""

    clips: list[Clip]
    plans: list[ShardPlan]
    mine: list[ShardPlan]  # this rank's shards
    todo: list[ShardPlan]  # ... that are not complete yet, locked by this run
    extractors: dict[str, Any]
    feature_set: dict[str, Any]
    fs_hash: str
    settings: DecodeSettings
    tic: float  # when setup began (after reading the manifest)
    locks: list[ShardLock]  # of the shards in todo
    held: list[str]  # this rank's incomplete shards another live writer holds (left to it)
    contracts: dict[str, ModalityContract] = field(default_factory=dict)  # dataset.json's records, by modality


def run_extract(
    manifest: Path | str,
    media_root: Path | str | None,
    out: Path | str,
    cfg: ExtractConfig,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Extract every clip of ``manifest`` assigned to ``cfg.rank`` into ``out``; return a summary.

    ``progress(done, total)`` is called with this rank's clip count once the plan is made (clips of complete
    shards count as done), then each time a group of clips has been written."""
    import torch

    check_device(cfg.device)
    cfg = resolved(cfg.validate())  # workers, batch_size, threads and precision left to auto chosen, once
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(out)
    settings = decode_settings(cfg)
    # Decode workers start while the models load (their start-up on the cores the loading leaves idle).
    with DecodePool(settings, cfg.workers) if settings.modalities and cfg.workers else nullcontext() as pool:
        job = prepare(manifest, media_root, out, cfg, pool)
        total = sum(len(p.clips) for p in job.mine)
        done = total - sum(len(p.clips) for p in job.todo)
        if progress is not None:
            progress(done, total)
        setup_s = time.perf_counter() - job.tic
        try:
            written, waits = encode_and_write(job, out, cfg, progress, done, total, pool)
        except BaseException:
            for lock in job.locks:
                lock.release()
            raise
    return finish_run(job, manifest, media_root, out, cfg, written, {"setup_s": setup_s, **waits})


def finish_run(
    job: ExtractionJob,
    manifest: Path | str,
    media_root: Path | str | None,
    out: Path,
    cfg: ExtractConfig,
    written: int,
    timings: dict[str, float],
) -> dict[str, Any]:
    """Rebuild ``status.jsonl`` and ``dataset.json`` from every committed sidecar and return the run's summary
    (whichever engine wrote the shards). ``timings``: ``setup_s`` and where the time went. The run's shard locks
    (``job.locks``) are released here, once ``dataset.lock`` is held: until ``dataset.json`` names this run's
    feature set, a writer of another one finds them (``extract.outdir.check_feature_set``)."""
    # Serialised, so the last rank or run to get here sees every committed shard and writes the complete one.
    try:
        dataset_lock = ShardLock.claim(out / DATASET_LOCK, cfg.rank, wait=True)
    finally:
        for lock in job.locks:
            lock.release()
    try:
        dataset = build_dataset(
            out,
            [(p.split, p.index) for p in job.plans],
            job.feature_set,
            extra={
                "manifest": str(Path(manifest).resolve()),
                "media_root": str(Path(media_root).resolve()) if media_root else None,
                "max_duration_s": recorded_max_duration(out, cfg.max_duration_s),  # caps shard readers' members
            },
            contracts=job.contracts,
        )
    finally:
        if dataset_lock is not None:
            dataset_lock.release()
    return {
        "out": str(out),
        "clips": len(job.clips),
        "clips_unlabelled": sum(1 for c in job.clips if c.unlabelled),  # rows left without a label on purpose
        "shards_total": len(job.plans),
        "shards_this_rank": len(job.mine),
        "shards_written": len(job.todo),
        "shards_held_elsewhere": job.held,
        "samples_written": written,
        "feature_set_hash": job.fs_hash,
        "complete": dataset["complete"],
        "counts": dataset["counts"],
        **{k: round(v, 3) for k, v in timings.items()},
        "wall_s": round(time.perf_counter() - job.tic, 3),
    }


def prepare(
    manifest: Path | str, media_root: Path | str | None, out: Path, cfg: ExtractConfig, pool: DecodePool | None = None
) -> ExtractionJob:
    """Read the manifest, build the extractors and their feature set, plan the shards, check and clean ``out``,
    and find this rank's incomplete shards. ``pool``: decode workers to start once the inputs are checked, before
    the models load."""
    settings = decode_settings(cfg)
    need_text = "text" in cfg.modalities and not transcribes(cfg)  # with --asr, empty transcripts are recognised
    clips = load_manifest(manifest, media_root, need_media=bool(settings.modalities), need_text=need_text)
    check_out_dir(out, cfg.overwrite)
    if cfg.overwrite and cfg.rank == 0:  # rank 0 removes the old shards: never those a live run is writing
        refuse_live_writers(out)
    tic = time.perf_counter()
    if pool is not None and clips:
        pool.start()
    extractors = build_extractors(cfg)
    feature_set = describe_feature_set(cfg, extractors)
    fs_hash = feature_set_hash(feature_set)
    plans = plan_shards(clips, cfg.shard_size)
    mine = [p for k, p in enumerate(plans) if k % cfg.world_size == cfg.rank]
    # One writer at a time checks who else writes to out, and claims its shards (its locks record its feature set)
    dataset_lock = ShardLock.claim(out / DATASET_LOCK, cfg.rank, wait=True)
    try:
        check_feature_set(out, feature_set, cfg.overwrite)
        clean_stale(out, {p.name for p in plans}, remove_all=cfg.overwrite and cfg.rank == 0)
        todo, held, locks = claim_shards(out, mine, feature_set, cfg.rank, cfg.raw)
    finally:
        if dataset_lock is not None:
            dataset_lock.release()
    log.info(
        "%d clips in %d shards; rank %d/%d owns %d shards, %d already complete, %d being written by another writer",
        len(clips), len(plans), cfg.rank, cfg.world_size, len(mine), len(mine) - len(todo) - len(held), len(held),
    )  # fmt: skip
    if held:
        log.warning("left to the writers that hold them: %s", ", ".join(held))
    log.info(describe(cfg.workers, cfg.batch_size, cfg.precision, cfg.auto, cfg.auto_reason, cfg.threads))
    contracts = describe_contracts(cfg, extractors, feature_set)
    return ExtractionJob(
        clips, plans, mine, todo, extractors, feature_set, fs_hash, settings, tic, locks, held, contracts
    )  # fmt: skip


def encode_and_write(
    job: ExtractionJob,
    out: Path,
    cfg: ExtractConfig,
    progress: Progress | None,
    done: int,
    total: int,
    pool: DecodePool | None = None,
) -> tuple[int, dict[str, float]]:
    """Decode the clips of ``job.todo`` (ahead, in workers) and encode and write them shard by shard; return the
    samples written and where the time went: waiting for decoded clips (the first wait includes worker start-up)
    or encoding and writing them. Little waiting means the encoders are the bottleneck.

    Clips are encoded in groups of ``batch_size``, or fewer when the next clip is not decoded yet: the encoders
    then work instead of waiting for the group to fill (on a CPU, batches of 1 and 2 cost the same per clip),
    and the last clip's encoding after the workers finish is one clip's, not a group's. A clip's features do not
    depend on its batch mates (``extract.extractors.audio``)."""
    written = 0
    builder: ShardBuilder | None = None
    waits, first = {"first_clip_s": 0.0, "decode_wait_s": 0.0}, True
    media = bool(job.settings.modalities)
    clips_in = decode_clips(job.todo, job.settings, cfg.workers, media, window=2 * cfg.batch_size, pool=pool)
    try:
        while True:
            asked = time.perf_counter()
            item = next(clips_in, None)
            waited = time.perf_counter() - asked
            waits["decode_wait_s"] += waited
            if first:
                waits["first_clip_s"], first = waited, False
            if item is None:
                break
            plan, decoded = item
            if builder is None:
                builder = ShardBuilder(out, plan, job.extractors, job.fs_hash, cfg, group=encode_group(cfg, media))
            before = builder.flushed
            builder.add(decoded)
            complete = builder.added == len(plan.clips)
            if complete:
                written += builder.finish()
            elif builder.pending and pool is not None and not pool.next_ready():
                builder.flush()  # the next clip is still decoding: encode those queued rather than wait
            if progress is not None and builder.flushed > before:
                done += builder.flushed - before
                progress(done, total)
            if complete:
                builder = None
    except BaseException:
        if builder is not None:
            builder.abort()
        raise
    finally:
        clips_in.close()  # shuts the decode pool down, also on errors
    return written, waits


TEXT_GROUP = 256  # transcripts encoded together when there is no media (sorted by length, batch_size a batch)


def encode_group(cfg: ExtractConfig, media: bool) -> int:
    """Clips handed to the encoders at once. With media, ``batch_size``: each group is encoded as soon as it is
    decoded, so encoding overlaps decoding. Text only (nothing to decode), up to ``TEXT_GROUP`` transcripts, so
    the text encoder sorts many by length before cutting its batches of ``batch_size``: groups of one batch
    padded every transcript to the longest of 16 random ones."""
    return cfg.batch_size if media else max(cfg.batch_size, TEXT_GROUP)
