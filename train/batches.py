"""The [main] stages of the training data pipeline (the list is in ``train/stages.py``): the workers' lists of
samples become padded, normalised batches in the training process."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds

from shards.dataset import ShardDataset
from train.inputs import GEOM_DIM, DataError, feature_dims
from train.stages import BAD, GEOM_INPUT, STD_FLOOR

log = logging.getLogger(__name__)


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


class DropBad:
    """Stage (main process): count, log and drop bad-sample markers; ``errors`` lists this epoch's messages."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def __call__(self, samples: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        self.errors.clear()
        for sample in samples:
            if BAD in sample:
                self.errors.append(sample[BAD])
                log.warning("skipped bad sample (%d so far): %s", len(self.errors), sample[BAD])
                continue
            yield sample


class Equalise:
    """Stage (main process): exactly ``n`` batches; a rank that runs short (bad samples skipped) repeats its first."""

    def __init__(self, n: int, keep: int = 4) -> None:
        self.n, self.keep = n, keep

    def __call__(self, batches: Iterable[list[dict[str, Any]]]) -> Iterator[list[dict[str, Any]]]:
        first: list[list[dict[str, Any]]] = []
        count, source = 0, iter(batches)
        while count < self.n:  # never pull more than n batches: the rest of the rank's data is not read
            batch = next(source, None)
            if batch is None:
                break
            if len(first) < self.keep:
                first.append(batch)
            count += 1
            yield batch
        if count < self.n:
            if not first:
                raise DataError(f"this rank produced no batch but {self.n} are needed to match the other ranks")
            log.warning("rank ran %d batches short (bad samples skipped); repeating its first batches", self.n - count)
            for i in range(self.n - count):
                yield first[i % len(first)]


def collate(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stage: model-input samples → one batch: every ``x`` with an ``x_mask`` padded with zeros to the longest.

    Returns torch tensors ``x`` (B, T, ...) and ``x_mask`` (B, T) bool (False on padding), ``label`` (B,)
    float32 (or (B, K) for (K,) multilabel sample labels) and ``key`` (list of str).
    """
    if not samples:
        raise DataError("cannot collate an empty batch")
    first = samples[0]
    batch: dict[str, Any] = {"key": [str(s["key"]) for s in samples]}
    batch["label"] = _stack_labels(samples)
    for name in first:
        if name.startswith("__") or name.endswith("_mask") or name in ("key", "label"):
            continue
        if f"{name}_mask" not in first:
            raise DataError(f"input {name!r} has no {name}_mask; every sequence input needs a mask")
        arrays = [np.asarray(s[name]) for s in samples]
        length = max(len(a) for a in arrays)
        values = np.zeros((len(arrays), length, *arrays[0].shape[1:]), arrays[0].dtype)
        mask = np.zeros((len(arrays), length), bool)
        for i, (a, s) in enumerate(zip(arrays, samples, strict=True)):
            values[i, : len(a)] = a
            mask[i, : len(a)] = s[f"{name}_mask"]
        tensor = torch.from_numpy(values)
        batch[name] = tensor.float() if tensor.dtype == torch.float16 else tensor
        batch[f"{name}_mask"] = torch.from_numpy(mask)
    if GEOM_INPUT in batch:  # video = landmarks then the 4 geometry features, as feature_dims declares
        batch["video"] = torch.cat([batch["video"], batch.pop(GEOM_INPUT).float()], -1)
        batch.pop(f"{GEOM_INPUT}_mask")
    return batch


def _stack_labels(samples: Sequence[Mapping[str, Any]]) -> torch.Tensor:
    labels = [np.asarray(s["label"], np.float32) for s in samples]
    for s, label in zip(samples, labels, strict=True):
        if label.shape != labels[0].shape:
            raise DataError(
                f"samples {samples[0]['key']} and {s['key']} have labels of shapes {labels[0].shape} and "
                f"{label.shape}; the samples of a batch need labels of one shape (one number, or K multilabel values)"
            )
    return torch.from_numpy(np.stack(labels))


class Normalise:
    """Stage: ``(x - mean) / std`` per feature dimension at valid positions; masked positions stay 0.

    Statistics are dataset.json's train-split ones; a std below ``STD_FLOOR`` divides by 1. The 4 video
    geometry features have no stored statistics and pass unchanged.
    """

    def __init__(self, mean: Mapping[str, np.ndarray], std: Mapping[str, np.ndarray]) -> None:
        self.mean = {m: torch.as_tensor(np.asarray(v, np.float32)) for m, v in mean.items()}
        self.std = {
            m: torch.as_tensor(np.where(np.asarray(v) < STD_FLOOR, 1.0, v).astype(np.float32)) for m, v in std.items()
        }

    @classmethod
    def from_dataset(
        cls, dataset: ShardDataset | str | Path, modalities: Sequence[str], video_geom: bool | None = None
    ) -> Normalise:
        """Train-split statistics of ``modalities`` from dataset.json; a clear error when any are missing."""
        ds = ShardDataset.of(dataset)
        dims = feature_dims(ds, modalities, video_geom)
        mean, std = {}, {}
        for m in modalities:
            member = ds.feature_member(m)
            stats = ds.train_stats(member)
            if stats is None or not stats.count:
                raise DataError(
                    f"dataset.json has no train-split statistics for {member}: the shards need a train split with "
                    f"{m} features to normalise, or set normalise=False"
                )
            mu, sd = stats.mean, stats.std
            extra = dims[m] - len(mu)
            if extra == GEOM_DIM and m == "video":
                mu, sd = np.concatenate([mu, np.zeros(GEOM_DIM)]), np.concatenate([sd, np.ones(GEOM_DIM)])
            elif extra:
                raise DataError(f"statistics of {member} have width {len(mu)} but {m} inputs have {dims[m]}")
            mean[m], std[m] = mu, sd
        return cls(mean, std)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        for m, mean in self.mean.items():
            if m in batch:
                x, valid = batch[m], batch[f"{m}_mask"].unsqueeze(-1)
                batch[m] = torch.where(valid, (x - mean) / self.std[m], torch.zeros((), dtype=x.dtype))
        return batch
