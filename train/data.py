"""Streaming one split of a shard directory into padded, masked batches for the fusion models.

``make_loader`` chains the stages of ``train/stages.py`` (listed there, in order, with where each runs) behind
the shard plan of this module: dataset.json's complete shards of the split in name order, permuted per epoch by
(seed, epoch) for training, then assigned to ranks (``plan_shards``) and split between DataLoader workers.

Equal batches per rank (training): every rank yields exactly ``floor(min_r samples_r / batch_size)`` full
batches, so up to that many samples per rank are left out of an epoch (different ones each epoch, since the
shard and sample orders change) — as ``DistributedSampler(drop_last=True)``. Evaluation yields every sample of
the split exactly once across ranks × workers, in a fixed order, with a final partial batch; ranks may then
yield different numbers of batches, so gather evaluation results once at the end, not per batch.

Resume: the batch sequence is a pure function of (shards, config — seed, batch_size, num_workers,
shuffle_buffer —, epoch, rank, world_size), so ``make_loader(..., epoch=e, skip_batches=k)`` yields exactly
batches ``k, k+1, ...`` of the epoch (the skipped ones are still read and collated by the workers, then
dropped). The sample shuffle runs before "to inputs" so its buffer holds the compact float16 members.

Work per batch in the training process: none per element. Workers collate (``collate_chunk``) into tensors in
shared memory, features stay float16 and masks bool; the main process only re-cuts chunks into exact batches
(``Rebatch``: a pass-through unless a worker's shards ended mid-batch or bad samples were dropped), and
``FusionPipeline`` makes features float32 and standardises them on the device. Workers persist across epochs
(``train/workers.py``): the trainer makes a new loader per epoch, which finds the workers of the previous one and
tells them the epoch; each builds that epoch's pipeline (``worker_pipeline``: shard plan and shuffle seeds follow
from the epoch) without a fork. The sample shuffle yields while its buffer fills, so no epoch starts with a stall.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import math
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds

from shards.dataset import ShardDataset, ShardEntry
from train.align import AlignWords
from train.batches import Equalise, Normalise, Rebatch, collate_chunk
from train.config import DataConfig
from train.inputs import DataError, feature_dims, has_video_geom
from train.stages import (
    ReadShards,
    SafeDecode,
    SelectModalities,
    ShardList,
    ShardTask,
    ShuffleSamples,
    ToInputs,
    Validate,
)
from train.workers import PooledBatches

log = logging.getLogger(__name__)

# DataConfig is the data section of the training settings (train.config), named here for the loaders' callers
__all__ = ["DataConfig", "ShardLoader", "make_loader", "num_batches", "plan_shards"]


def split_shards(dataset: ShardDataset, split: str) -> list[ShardEntry]:
    """The complete shards of ``split`` in name order (a clear error when there are none)."""
    shards = dataset.split_shards(split)
    if not shards:
        raise DataError(f"no complete shards for split {split!r}; the shard directory has {dataset.splits}")
    if not dataset.complete:
        missing = list(dataset.missing_shards)
        log.warning("shard directory is incomplete (%s missing); using the complete shards", missing)
    return shards


def plan_shards(
    dataset: ShardDataset,
    split: str,
    *,
    train: bool,
    seed: int,
    epoch: int,
    rank: int,
    world_size: int,
) -> list[ShardTask]:
    """The shards rank ``rank`` reads this epoch, in reading order.

    Training permutes the shards with ``Random(f"{seed}-{epoch}")``. With at least as many shards as ranks,
    shards go whole to ranks, largest first to the rank with the fewest samples (ties: lowest rank), which
    balances the per-rank sample counts; with fewer shards than ranks every rank reads every shard and keeps
    every ``world_size``-th sample, so a split with one shard still spreads over all ranks exactly once.
    """
    shards = split_shards(dataset, split)
    if train:
        random.Random(f"{seed}-{epoch}").shuffle(shards)
    sizes = [s.samples for s in shards]
    if len(shards) < world_size:
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int)
        return [
            ShardTask(s.name, str(dataset.path(s)), n, world_size, (rank - int(o)) % world_size, split)
            for s, n, o in zip(shards, sizes, offsets, strict=True)
        ]
    loads, owner = [0] * world_size, [0] * len(shards)
    for i in sorted(range(len(shards)), key=sizes.__getitem__, reverse=True):  # stable: ties keep epoch order
        owner[i] = min(range(world_size), key=loads.__getitem__)
        loads[owner[i]] += sizes[i]
    return [
        ShardTask(s.name, str(dataset.path(s)), n, split=split)
        for s, n, r in zip(shards, sizes, owner, strict=True)
        if r == rank
    ]


def num_batches(
    shards: ShardDataset | str | Path,
    split: str,
    config: DataConfig,
    *,
    train: bool,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> int:
    """Batches rank ``rank`` yields in ``epoch`` (before ``skip_batches``), from dataset.json's sample counts.

    Exact unless ``skip_bad_samples`` drops samples (evaluation and unequalised training then yield fewer).
    """
    dataset = ShardDataset.of(shards)
    plan = dict(train=train, seed=config.seed, epoch=epoch, world_size=world_size)

    def samples(r: int) -> int:
        return sum(t.count for t in plan_shards(dataset, split, rank=r, **plan))

    if not train:
        return math.ceil(samples(rank) / config.batch_size)
    if config.equalise:
        return min(samples(r) for r in range(world_size)) // config.batch_size
    rounding = math.floor if config.drop_last else math.ceil
    return int(rounding(samples(rank) / config.batch_size))


def sample_stages(
    dataset: ShardDataset, config: DataConfig, *, train: bool, epoch: int, rank: int, split: str | None = None
) -> list[Any]:
    """The per-sample worker stages, from raw tar samples to model inputs (``split``: the split read, which every
    sample's meta.json must name)."""
    skip = config.skip_bad_samples
    geom = has_video_geom(dataset) if config.video_geom is None else config.video_geom
    dims = feature_dims(dataset, config.modalities, geom)
    contracts = dataset.contracts  # which member is each modality's feature, mask, raw and extra inputs
    to_inputs = ToInputs(config.modalities, dims, config.raw, config.label_key, geom, config.multilabel, contracts)
    text_vocab = config.text_vocab if config.raw else None
    return [
        ReadShards(skip),  # samples with members as bytes and their shard name
        wds.map(SelectModalities(config.modalities, config.raw, contracts)),  # only the members in use, still bytes
        wds.map(SafeDecode(skip)),  # members decoded without pickle
        wds.map(Validate(dataset, skip, config.modalities, split, text_vocab)),  # schema-checked samples (or bad)
        wds.map(AlignWords(config.modalities, contracts)) if config.align_words else None,  # a step per word
        ShuffleSamples(config.shuffle_buffer, config.seed, epoch, rank, config.batch_size) if train else None,  # seeded
        wds.map(to_inputs),  # float32 inputs + masks, label (a number or a (K,) 0/1 vector)
    ]


class ShardLoader:
    """Iterable over one epoch's batches of one rank; ``len()`` is known in advance (see :func:`num_batches`).

    Batches are as :func:`train.batches.collate` makes them (features float16, as stored); ``normalise`` (the
    config's :class:`train.batches.Normalise`, which ``FusionPipeline`` applies on the device) turns one into the
    models' float32, standardised inputs.
    """

    def __init__(self, pipeline: wds.DataPipeline, length: int, bad: Rebatch, normalise: Normalise) -> None:
        self.pipeline, self.length, self._bad, self.normalise = pipeline, length, bad, normalise

    def __iter__(self) -> Iterator[dict[str, Any]]:
        batches = iter(self.pipeline)
        try:
            yield from batches
        finally:  # leaving the epoch early closes the stages (kept workers wait for the next epoch)
            close = getattr(batches, "close", None)
            if close is not None:
                close()

    def __len__(self) -> int:
        return self.length

    @property
    def bad_samples(self) -> list[str]:
        """Error messages of the samples skipped so far this epoch (``skip_bad_samples=True``)."""
        return list(self._bad.errors)


def worker_pipeline(
    dataset: ShardDataset, split: str, config: DataConfig, train: bool, rank: int, world_size: int, epoch: int
) -> wds.DataPipeline:
    """What each DataLoader worker (or, without workers, the training process) runs in ``epoch``: this rank's
    shards of the epoch, this worker's share of them, the sample stages and the batching."""
    tasks = plan_shards(dataset, split, train=train, seed=config.seed, epoch=epoch, rank=rank, world_size=world_size)
    return wds.DataPipeline(
        ShardList(tasks),  # this rank's shards in epoch order
        wds.split_by_worker,  # this worker's share of them
        *sample_stages(dataset, config, train=train, epoch=epoch, rank=rank, split=split),
        wds.batched(config.batch_size, collation_fn=collate_chunk, partial=True),  # padded tensors, bad samples apart
    )


def make_loader(
    shards: ShardDataset | str | Path,
    split: str,
    config: DataConfig,
    *,
    train: bool,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    skip_batches: int = 0,
) -> ShardLoader:
    """Batches of ``split`` for rank ``rank`` of ``world_size`` in ``epoch`` (see the module docstring), from the
    shard directory's dataset (loaded, or its path).

    Training shuffles shards and samples and equalises batch counts across ranks; evaluation (``train=False``)
    yields every sample once across ranks and workers, unshuffled. ``skip_batches`` resumes mid-epoch.
    """
    config.check()
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is not in [0, world_size={world_size})")
    dataset = ShardDataset.of(shards)
    geom = has_video_geom(dataset) if config.video_geom is None else config.video_geom
    normalise = Normalise.from_dataset(dataset, config.modalities, geom) if config.normalise else Normalise({}, {})
    total = num_batches(dataset, split, config, train=train, epoch=epoch, rank=rank, world_size=world_size)
    build = functools.partial(worker_pipeline, dataset, split, dataclasses.replace(config), train, rank, world_size)
    source: Any = build(epoch)  # made here too, so a setting its stages refuse is an error here, not in a worker
    if config.num_workers > 0:
        pin = torch.cuda.is_available() if config.pin_memory is None else config.pin_memory
        # the same dataset.json content (loaded once, or again from its directory), split, rank and settings
        key = (hashlib.sha256(repr(dataset).encode()).hexdigest(), split, train, rank, world_size, repr(config))
        workers = (config.num_workers, config.prefetch_factor, pin)
        source = PooledBatches(key, build, epoch, workers, config.persistent_workers)
    equalise = train and config.equalise
    rebatch = Rebatch(config.batch_size, partial=not (train and (config.drop_last or equalise)))
    pipeline = wds.DataPipeline(
        source,
        rebatch,  # exactly batch_size samples, in the workers' round-robin order; bad samples counted
        Equalise(total) if equalise else None,  # the same number of batches on every rank
        wds.slice(skip_batches, None),  # resume: the first skip_batches batches are dropped
    )
    return ShardLoader(pipeline, max(0, total - skip_batches), rebatch, normalise)
