"""Streaming one split of a shard directory into padded, masked batches for the fusion models.

The pipeline, one small named stage each (worker stages run in every DataLoader worker)::

    shard list     dataset.json's complete shards of the split, in name order
    shuffle        per-epoch permutation seeded by (seed, epoch); none for evaluation
    split by rank  deterministic, sample-count-balanced assignment of shards to ranks
    split by worker  this DataLoader worker's share of the rank's shards (webdataset's split_by_worker)
    read           tar members as bytes, with the shard name              [worker]
    decode         .npy / .json members, never unpickled                  [worker]
    validate       shards.schema.validate_sample (bad → SchemaError, or a counted marker)   [worker]
    select         members of unused modalities dropped                   [worker]
    shuffle        seeded sample buffer (training only)                   [worker]
    to inputs      (T, D) float32 features + masks, raw inputs, label, key   [worker]
    batch          lists of samples                                       [worker]
    rebatch        exact batch size across workers; bad-sample markers counted and dropped   [main]
    equalise       the same number of batches on every rank (training)    [main]
    skip           the first ``skip_batches`` batches, to resume mid-epoch [main]
    collate        padded torch tensors and masks (train/collate.py)      [main]
    normalise      train-split mean/std from dataset.json, valid positions only   [main]

Equal batches per rank (training): every rank yields exactly ``floor(min_r samples_r / batch_size)`` full
batches, so up to that many samples per rank are left out of an epoch (different ones each epoch, since the
shard and sample orders change) — as ``DistributedSampler(drop_last=True)``. Evaluation yields every sample of
the split exactly once across ranks × workers, in a fixed order, with a final partial batch; ranks may then
yield different numbers of batches, so gather evaluation results once at the end, not per batch.

Resume: the batch sequence is a pure function of (shards, config — seed, batch_size, num_workers,
shuffle_buffer —, epoch, rank, world_size), so ``make_loader(..., epoch=e, skip_batches=k)`` yields exactly
batches ``k, k+1, ...`` of the epoch (the skipped ones are still read, not collated). The sample shuffle runs
before "to inputs" so its buffer holds the compact float16 members.
"""

from __future__ import annotations

import logging
import math
import random
import tarfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

from shards.dataset import load_dataset_json
from shards.schema import MODALITIES, SchemaError
from train.align import AlignWords
from train.collate import (
    BAD,
    DataError,
    DropBad,
    Equalise,
    Normalise,
    SafeDecode,
    SelectModalities,
    ToInputs,
    Validate,
    collate,
    feature_dims,
    has_video_geom,
    label_keys,
    reason,
)

log = logging.getLogger(__name__)

__all__ = ["DataConfig", "DataError", "InMemorySource", "ShardLoader", "feature_dims", "make_loader", "num_batches"]


@dataclass
class DataConfig:
    """How batches are streamed; the defaults suit frozen-feature training."""

    batch_size: int = 32  # samples per batch, per rank
    num_workers: int = 2  # DataLoader worker processes per rank (0 = read in the training process)
    shuffle_buffer: int = 256  # samples held by each worker's shuffle buffer (training); memory grows with it
    modalities: tuple[str, ...] = MODALITIES  # modalities to load; others are dropped right after validation
    raw: bool = False  # also yield text_ids / audio_wave for end-to-end fine-tuning
    normalise: bool = True  # standardise features with the train-split mean/std of dataset.json
    label_key: str = "label"  # key of meta.json's "labels" used as the (B,) label; "label" = MMSA sentiment
    multilabel: bool = False  # labels are (B, K) 0/1: one column per comma-separated key of label_key
    seed: int = 0  # shard and sample shuffles depend only on (seed, epoch, rank, worker)
    skip_bad_samples: bool = False  # count and log samples failing decode/validation instead of raising
    drop_last: bool = True  # training: drop the last partial batch
    equalise: bool = True  # training: same number of (full) batches on every rank, as DDP needs
    video_geom: bool | None = None  # append the 4 video_geom features; None = when the shards store them
    prefetch_factor: int = 2  # batches each worker prepares ahead
    align_words: bool = False  # average audio / video frames per word of the manifest's timings (train/align.py)

    def check(self) -> None:
        """Raise :class:`DataError` listing every invalid setting."""
        problems = []
        if self.batch_size < 1:
            problems.append(f"batch_size: must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            problems.append(f"num_workers: must be >= 0, got {self.num_workers}")
        if self.shuffle_buffer < 1:
            problems.append(f"shuffle_buffer: must be >= 1, got {self.shuffle_buffer}")
        unknown = [m for m in self.modalities if m not in MODALITIES]
        if not self.modalities or unknown:
            problems.append(f"modalities: a non-empty subset of {list(MODALITIES)}, got {list(self.modalities)}")
        keys = label_keys(self.label_key)
        if not all(keys):
            problems.append(f"label_key: {self.label_key!r} has an empty key")
        elif len(keys) > 1 and not self.multilabel:
            problems.append(f"label_key: {len(keys)} keys ({', '.join(keys)}) need multilabel=True")
        if problems:
            raise DataError("invalid data config: " + "; ".join(problems))


@dataclass(frozen=True)
class ShardTask:
    """One shard for one rank: keep the samples at positions ``j`` with ``j % every == phase``."""

    name: str
    path: str
    samples: int
    every: int = 1
    phase: int = 0

    @property
    def count(self) -> int:
        return max(0, math.ceil((self.samples - self.phase) / self.every))


def split_shards(dataset: Mapping[str, Any], split: str) -> list[dict[str, Any]]:
    """The complete shards of ``split`` in name order (a clear error when there are none)."""
    shards = sorted((s for s in dataset["shards"] if s["split"] == split), key=_shard_name)
    if not shards:
        have = sorted({s["split"] for s in dataset["shards"]})
        raise DataError(f"no complete shards for split {split!r}; the shard directory has {have}")
    if not dataset.get("complete", True):
        log.warning("shard directory is incomplete (%s missing); using the complete shards", dataset["missing_shards"])
    return shards


def _shard_name(shard: Mapping[str, Any]) -> str:
    return shard["name"]


def plan_shards(
    dataset: Mapping[str, Any],
    root: str | Path,
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
    sizes = [int(s["samples"]) for s in shards]
    if len(shards) < world_size:
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int)
        return [
            ShardTask(s["name"], str(Path(root) / s["name"]), n, world_size, (rank - int(o)) % world_size)
            for s, n, o in zip(shards, sizes, offsets, strict=True)
        ]
    loads, owner = [0] * world_size, [0] * len(shards)
    for i in sorted(range(len(shards)), key=sizes.__getitem__, reverse=True):  # stable: ties keep epoch order
        owner[i] = min(range(world_size), key=loads.__getitem__)
        loads[owner[i]] += sizes[i]
    return [
        ShardTask(s["name"], str(Path(root) / s["name"]), n)
        for s, n, r in zip(shards, sizes, owner, strict=True)
        if r == rank
    ]


def num_batches(
    shards_dir: str | Path,
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
    dataset = load_dataset_json(shards_dir)
    plan = dict(train=train, seed=config.seed, epoch=epoch, world_size=world_size)

    def samples(r: int) -> int:
        return sum(t.count for t in plan_shards(dataset, shards_dir, split, rank=r, **plan))

    if not train:
        return math.ceil(samples(rank) / config.batch_size)
    if config.equalise:
        return min(samples(r) for r in range(world_size)) // config.batch_size
    rounding = math.floor if config.drop_last else math.ceil
    return int(rounding(samples(rank) / config.batch_size))


class ShardList:
    """Stage: the pipeline's source, this rank's shard tasks in epoch order."""

    def __init__(self, tasks: Sequence[ShardTask]) -> None:
        self.tasks = list(tasks)

    def __call__(self) -> Iterator[ShardTask]:
        return iter(self.tasks)


class ReadShards:
    """Stage: shard tasks → samples with members as bytes, plus ``__shard__`` (the shard's file name)."""

    def __init__(self, skip_bad: bool) -> None:
        self.skip_bad = skip_bad

    def __call__(self, tasks: Iterable[ShardTask]) -> Iterator[dict[str, Any]]:
        for task in tasks:
            j = -1
            try:
                with open(task.path, "rb") as stream:
                    files = tar_file_expander([{"url": task.path, "stream": stream}])
                    for j, sample in enumerate(group_by_keys(files)):
                        if j % task.every == task.phase:
                            yield {**sample, "__shard__": task.name}
            except (tarfile.TarError, OSError, ValueError) as exc:
                error = SchemaError(f"shard {task.name}: truncated or corrupt tar after sample {j + 1} ({reason(exc)})")
                if not self.skip_bad:
                    raise error from exc
                yield {"__key__": f"{task.name}#{j + 1}", "__shard__": task.name, BAD: str(error)}


class ShuffleSamples:
    """Stage: a shuffle buffer seeded by (seed, epoch, rank, worker), so the order is reproducible."""

    def __init__(self, size: int, seed: int, epoch: int, rank: int) -> None:
        self.size, self.seed, self.epoch, self.rank = size, seed, epoch, rank

    def __call__(self, samples: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        seed = f"{self.seed}-{self.epoch}-{self.rank}-{info.id if info else 0}"
        return wds.shuffle(self.size, self.size, seed=seed)(iter(samples))


class WorkerBatches:
    """Stage (main process): worker batches from DataLoader workers, shut down as soon as the epoch ends or fails.

    ``batch_size=None`` with :func:`keep_batch` turns auto-collation off, so NumPy arrays stay NumPy (the
    default would convert them to tensors) and batching stays in the pipeline.
    """

    def __init__(self, dataset: wds.DataPipeline, num_workers: int, prefetch_factor: int) -> None:
        self.dataset, self.num_workers, self.prefetch_factor = dataset, num_workers, prefetch_factor

    def __call__(self) -> Iterator[list[dict[str, Any]]]:
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=None,
            collate_fn=keep_batch,
            num_workers=self.num_workers,
            prefetch_factor=self.prefetch_factor,
        )
        batches = iter(loader)
        try:
            yield from batches
        finally:  # an error's traceback would otherwise keep the workers alive until garbage collection
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()


def keep_batch(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """DataLoader collate_fn: pass worker batches through as they are (NumPy stays NumPy, no auto-collation)."""
    return batch


def sample_stages(dataset: Mapping[str, Any], config: DataConfig, *, train: bool, epoch: int, rank: int) -> list[Any]:
    """The per-sample worker stages, from raw tar samples to model inputs."""
    skip = config.skip_bad_samples
    geom = has_video_geom(dataset) if config.video_geom is None else config.video_geom
    dims = feature_dims(dataset, config.modalities, geom)
    to_inputs = ToInputs(config.modalities, dims, config.raw, config.label_key, geom, config.multilabel)
    return [
        ReadShards(skip),  # samples with members as bytes and their shard name
        wds.map(SelectModalities(config.modalities, config.raw)),  # only the members the model uses, still bytes
        wds.map(SafeDecode(skip)),  # members decoded without pickle
        wds.map(Validate(dataset, skip, config.modalities)),  # schema-checked samples (or bad markers)
        wds.map(AlignWords(config.modalities)) if config.align_words else None,  # one audio/video step per word
        ShuffleSamples(config.shuffle_buffer, config.seed, epoch, rank) if train else None,  # seeded sample order
        wds.map(to_inputs),  # float32 inputs + masks, label (a number or a (K,) 0/1 vector)
    ]


class ShardLoader:
    """Iterable over one epoch's batches of one rank; ``len()`` is known in advance (see :func:`num_batches`)."""

    def __init__(self, pipeline: wds.DataPipeline, length: int, bad: DropBad) -> None:
        self.pipeline, self.length, self._bad = pipeline, length, bad

    def __iter__(self) -> Iterator[dict[str, Any]]:
        batches = iter(self.pipeline)
        try:
            yield from batches
        finally:  # leaving the epoch early closes the stages, which stops the DataLoader workers
            close = getattr(batches, "close", None)
            if close is not None:
                close()

    def __len__(self) -> int:
        return self.length

    @property
    def bad_samples(self) -> list[str]:
        """Error messages of the samples skipped so far this epoch (``skip_bad_samples=True``)."""
        return list(self._bad.errors)


def make_loader(
    shards_dir: str | Path,
    split: str,
    config: DataConfig,
    *,
    train: bool,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    skip_batches: int = 0,
) -> ShardLoader:
    """Batches of ``split`` for rank ``rank`` of ``world_size`` in ``epoch`` (see the module docstring).

    Training shuffles shards and samples and equalises batch counts across ranks; evaluation (``train=False``)
    yields every sample once across ranks and workers, unshuffled. ``skip_batches`` resumes mid-epoch.
    """
    config.check()
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is not in [0, world_size={world_size})")
    root = Path(shards_dir)
    dataset = load_dataset_json(root)
    tasks = plan_shards(
        dataset, root, split, train=train, seed=config.seed, epoch=epoch, rank=rank, world_size=world_size
    )
    geom = has_video_geom(dataset) if config.video_geom is None else config.video_geom
    normalise = Normalise.from_dataset(dataset, config.modalities, geom) if config.normalise else None
    total = num_batches(root, split, config, train=train, epoch=epoch, rank=rank, world_size=world_size)
    worker = wds.DataPipeline(
        ShardList(tasks),  # this rank's shards in epoch order
        wds.split_by_worker,  # this worker's share of them
        *sample_stages(dataset, config, train=train, epoch=epoch, rank=rank),
        wds.batched(config.batch_size, collation_fn=None, partial=True),  # lists of model-input samples
    )
    source: Any = worker
    if config.num_workers > 0:
        source = WorkerBatches(worker, config.num_workers, config.prefetch_factor)
    bad = DropBad()
    equalise = train and config.equalise
    pipeline = wds.DataPipeline(
        source,
        wds.filters.unlisted(),  # samples in the workers' round-robin order
        bad,  # bad-sample markers counted and dropped
        wds.batched(config.batch_size, collation_fn=None, partial=not (train and (config.drop_last or equalise))),
        Equalise(total) if equalise else None,  # the same number of batches on every rank
        wds.slice(skip_batches, None),  # resume: the first skip_batches batches are dropped
        wds.map(collate),  # padded tensors and masks
        wds.map(normalise) if normalise else None,  # train-split standardisation
    )
    return ShardLoader(pipeline, max(0, total - skip_batches), bad)


class InMemorySource:
    """Batches in the loader's format from memory: model-input samples or an already padded dict of tensors.

    ``data`` is either a list of samples as :class:`train.collate.ToInputs` makes them (``key``, ``label`` — a
    number, or a (K,) 0/1 array for multilabel —, and ``x`` with ``x_mask`` arrays per input), padded per batch,
    or a dict of (N, ...) tensors sliced into batches (``label`` (N,) or (N, K); a ``key`` list is optional).
    Shuffling uses ``Random(f"{seed}-{epoch}")``; call :meth:`set_epoch`.
    """

    def __init__(
        self,
        data: Sequence[Mapping[str, Any]] | Mapping[str, Any],
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        normalise: Normalise | None = None,
    ) -> None:
        self.data, self.batch_size, self.shuffle, self.seed = data, batch_size, shuffle, seed
        self.drop_last, self.normalise, self.epoch = drop_last, normalise, 0
        if isinstance(data, Mapping):
            self.size = len(data["label"]) if "label" in data else len(next(iter(data.values())))
        else:
            self.size = len(data)

    @classmethod
    def from_shards(
        cls, shards_dir: str | Path, split: str, config: DataConfig, *, shuffle: bool = False
    ) -> InMemorySource:
        """Every sample of ``split`` read once into memory, with the same stages and normalisation as streaming."""
        config.check()
        dataset = load_dataset_json(shards_dir)
        tasks = plan_shards(dataset, shards_dir, split, train=False, seed=0, epoch=0, rank=0, world_size=1)
        pipeline = wds.DataPipeline(
            ShardList(tasks), *sample_stages(dataset, config, train=False, epoch=0, rank=0), DropBad()
        )
        geom = has_video_geom(dataset) if config.video_geom is None else config.video_geom
        normalise = Normalise.from_dataset(dataset, config.modalities, geom) if config.normalise else None
        drop = config.drop_last and shuffle
        return cls(
            list(pipeline), config.batch_size, shuffle=shuffle, seed=config.seed, drop_last=drop, normalise=normalise
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        rounding = math.floor if self.drop_last else math.ceil
        return int(rounding(self.size / self.batch_size))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        order = list(range(self.size))
        if self.shuffle:
            random.Random(f"{self.seed}-{self.epoch}").shuffle(order)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            index = order[start : start + self.batch_size]
            batch = self._batch(index)
            yield self.normalise(batch) if self.normalise else batch

    def _batch(self, index: list[int]) -> dict[str, Any]:
        if not isinstance(self.data, Mapping):
            return collate([self.data[i] for i in index])
        idx = torch.tensor(index, dtype=torch.long)
        batch = {k: v[idx] for k, v in self.data.items() if isinstance(v, torch.Tensor)}
        keys = self.data.get("key")
        batch["key"] = [str(keys[i]) for i in index] if keys is not None else [str(i) for i in index]
        return batch
