"""The batch stages of the training data pipeline (the list is in ``train/stages.py``): workers collate their
lists of samples into padded tensors, the training process only re-cuts them into batches, and the network
(``train/pipeline.py``) makes them float32 and standardises them on the device (:class:`Normalise`)."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from shards.dataset import ShardDataset
from shards.schema import SchemaError
from train.inputs import DataError, feature_dims
from train.stages import BAD, GEOM_INPUT, STD_FLOOR

log = logging.getLogger(__name__)


class DropBad:
    """Stage: count, log and drop bad-sample markers; ``errors`` lists this epoch's messages."""

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

    def __call__(self, batches: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        first: list[dict[str, Any]] = []
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
                yield dict(first[i % len(first)])  # a new dict: a consumer may replace entries of the one it got


def collate(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stage: model-input samples → one batch: every ``x`` with an ``x_mask`` padded with zeros to the longest.

    Returns torch tensors ``x`` (B, T, ...) in the samples' dtype (features stay float16 as stored: half the
    bytes to the device, where :class:`Normalise` makes them float32) and ``x_mask`` (B, T) bool (False on
    padding), ``video_geom`` (B, T, 4) float32 apart from ``video`` (Normalise joins them), ``label`` (B,) float32
    (or (B, K) for (K,) multilabel sample labels) and ``key`` (list of str).
    """
    return collate_chunk(samples)["batch"]


def collate_chunk(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stage (worker): a worker's list of samples → a chunk: ``batch`` (:func:`collate` of its good samples, None
    when it has none), ``lengths`` (per padded tensor, (B,) int64 sample lengths, so :class:`Rebatch` can join
    chunks exactly) and ``errors`` (the messages of its bad-sample markers, in order).

    Each padded tensor is written once: every sample's rows are copied into it and its padding zeroed, its mask is
    made in one step from the lengths and the samples' masks; in a DataLoader worker the tensors are made in shared
    memory, so handing the chunk to the training process copies nothing more."""
    good = [s for s in samples if BAD not in s]
    chunk: dict[str, Any] = {"batch": None, "lengths": {}, "errors": [s[BAD] for s in samples if BAD in s]}
    if not good:
        if not chunk["errors"]:
            raise DataError("cannot collate an empty batch")
        return chunk
    first = good[0]
    batch: dict[str, Any] = {"key": [str(s["key"]) for s in good], "label": _stack_labels(good)}
    shared = torch.utils.data.get_worker_info() is not None
    for name in first:
        if name.startswith("__") or name.endswith("_mask") or name in ("key", "label"):
            continue
        if f"{name}_mask" not in first:
            raise DataError(f"input {name!r} has no {name}_mask; every sequence input needs a mask")
        arrays = [np.asarray(s[name]) for s in good]
        lengths = np.array([len(a) for a in arrays], np.int64)
        steps = int(lengths.max())
        tensor = _empty((len(arrays), steps, *arrays[0].shape[1:]), arrays[0].dtype, shared)
        values = tensor.numpy()
        for i, a in enumerate(arrays):
            values[i, : len(a)] = a
            values[i, len(a) :] = 0
        batch[name] = tensor
        chunk["lengths"][name] = torch.from_numpy(lengths)
        if name != GEOM_INPUT:  # the geometry shares video's mask
            mask = np.zeros((len(arrays), steps), bool)
            mask[np.arange(steps) < lengths[:, None]] = np.concatenate([s[f"{name}_mask"] for s in good])
            batch[f"{name}_mask"] = torch.from_numpy(mask)
    chunk["batch"] = batch
    return chunk


def _empty(shape: tuple[int, ...], dtype: np.dtype, shared: bool) -> torch.Tensor:
    """An uninitialised tensor of ``shape`` and the NumPy ``dtype``; in shared memory when ``shared`` (as the
    DataLoader's own collate makes its batches in a worker)."""
    kind = torch.from_numpy(np.empty(0, dtype)).dtype
    if not shared:
        return torch.empty(shape, dtype=kind)
    storage = torch.empty(0, dtype=kind)._typed_storage()._new_shared(math.prod(shape), device="cpu")
    return torch.empty(0, dtype=kind).new(storage).view(shape)


def _stack_labels(samples: Sequence[Mapping[str, Any]]) -> torch.Tensor:
    labels = [np.asarray(s["label"], np.float32) for s in samples]
    for s, label in zip(samples, labels, strict=True):
        if label.shape != labels[0].shape:
            raise DataError(
                f"samples {samples[0]['key']} and {s['key']} have labels of shapes {labels[0].shape} and "
                f"{label.shape}; the samples of a batch need labels of one shape (one number, or K multilabel values)"
            )
    return torch.from_numpy(np.stack(labels))


class Rebatch:
    """Stage (main process): the workers' chunks → batches of exactly ``batch_size`` samples (the last one partial
    when ``partial``), the samples in the order the chunks bring them; ``errors`` lists this epoch's bad samples.

    A worker yields ``batch_size`` samples per chunk, less only at the end of its shards or where bad samples were
    dropped. A full chunk arriving on a sample boundary passes through untouched (no per-element work); otherwise
    its tensors are sliced, trimmed to the longest sample of the new batch and concatenated: the result equals
    :func:`collate` of the same samples.
    """

    def __init__(self, batch_size: int, partial: bool) -> None:
        self.batch_size, self.partial = batch_size, partial
        self.errors: list[str] = []

    def __call__(self, chunks: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        self.errors.clear()
        pieces: list[tuple[dict[str, Any], int, int]] = []  # (chunk, start, stop) not yet in a batch
        held = 0
        for chunk in chunks:
            for error in chunk["errors"]:
                self.errors.append(error)
                log.warning("skipped bad sample (%d so far): %s", len(self.errors), error)
            size = 0 if chunk["batch"] is None else len(chunk["batch"]["key"])
            if size == self.batch_size and not pieces:
                yield chunk["batch"]
                continue
            if size:
                pieces.append((chunk, 0, size))
                held += size
            while held >= self.batch_size:
                yield join_pieces(take(pieces, self.batch_size))
                held -= self.batch_size
        if pieces and self.partial:
            yield join_pieces(pieces)


def take(pieces: list[tuple[dict[str, Any], int, int]], n: int) -> list[tuple[dict[str, Any], int, int]]:
    """Remove the first ``n`` samples from ``pieces`` and return them as pieces."""
    out = []
    while n:
        chunk, start, stop = pieces[0]
        k = min(n, stop - start)
        out.append((chunk, start, start + k))
        if start + k == stop:
            pieces.pop(0)
        else:
            pieces[0] = (chunk, start + k, stop)
        n -= k
    return out


def join_pieces(pieces: Sequence[tuple[dict[str, Any], int, int]]) -> dict[str, Any]:
    """One batch of the samples ``start:stop`` of each piece's chunk, in order, as :func:`collate` pads them."""
    if len(pieces) == 1 and pieces[0][1] == 0 and pieces[0][2] == len(pieces[0][0]["batch"]["key"]):
        return pieces[0][0]["batch"]
    first = pieces[0][0]
    batch: dict[str, Any] = {"key": [k for c, lo, hi in pieces for k in c["batch"]["key"][lo:hi]]}
    for name in first["batch"]:
        if name == "key":
            continue
        base = name.removesuffix("_mask")
        if base not in first["lengths"]:  # label: no time axis
            batch[name] = torch.cat([c["batch"][name][lo:hi] for c, lo, hi in pieces])
            continue
        length = max(int(c["lengths"][base][lo:hi].max()) for c, lo, hi in pieces)
        parts = []
        for c, lo, hi in pieces:
            part = c["batch"][name][lo:hi, :length]
            if part.shape[1] < length:
                part = torch.cat([part, part.new_zeros((hi - lo, length - part.shape[1], *part.shape[2:]))], 1)
            parts.append(part)
        batch[name] = torch.cat(parts)
    return batch


class Normalise(nn.Module):
    """The step from a loader batch to the models' inputs (on the device, in ``FusionPipeline.forward``): float16
    features become float32, ``video_geom`` is joined onto ``video`` (the feature then the video record's extra
    inputs, e.g. FaceMesh's 4 geometry features, as ``feature_dims`` declares), and features are standardised
    ``(x - mean) / std`` per feature dimension at valid positions; masked positions stay 0.

    Statistics are dataset.json's train-split ones of each record's feature member; a std below ``STD_FLOOR``
    divides by 1. The extra inputs have no stored statistics and pass unchanged; without statistics
    (``normalise=False``) features are only made float32. Only features still as stored (float16) are
    standardised, so the step is idempotent: a batch it already made (float32) passes unchanged. Mean and std are
    non-persistent buffers: they follow the module to its device and stay out of checkpoints.
    """

    def __init__(self, mean: Mapping[str, np.ndarray], std: Mapping[str, np.ndarray]) -> None:
        super().__init__()
        self.modalities = tuple(mean)
        for m, v in mean.items():
            sd = np.asarray(std[m])
            self.register_buffer(f"{m}_mean", torch.as_tensor(np.asarray(v, np.float32)), persistent=False)
            self.register_buffer(
                f"{m}_std", torch.as_tensor(np.where(sd < STD_FLOOR, 1.0, sd).astype(np.float32)), persistent=False
            )

    @classmethod
    def from_dataset(
        cls,
        dataset: ShardDataset | str | Path,
        modalities: Sequence[str],
        video_geom: bool | None = None,
        dims: Mapping[str, int] | None = None,
    ) -> Normalise:
        """Train-split statistics of ``modalities`` from dataset.json; a clear error when any are missing.
        ``dims``: the input widths (default ``feature_dims``; a checkpoint's dataset has no shards to tell)."""
        ds = ShardDataset.of(dataset)
        dims = feature_dims(ds, modalities, video_geom) if dims is None else dims
        mean, std = {}, {}
        for m in modalities:
            try:
                c = ds.contract(m)
            except SchemaError as exc:
                raise DataError(str(exc)) from None
            stats = ds.train_stats(c.feature)
            if stats is None or not stats.count:
                raise DataError(
                    f"dataset.json has no train-split statistics for {c.feature}: the shards need a train split with "
                    f"{m} features to normalise, or set normalise=False"
                )
            mu, sd = stats.mean, stats.std
            extra = dims[m] - len(mu)
            if extra and extra == c.extra_width and m == "video":  # the extra inputs pass unchanged
                mu, sd = np.concatenate([mu, np.zeros(extra)]), np.concatenate([sd, np.ones(extra)])
            elif extra:
                raise DataError(f"statistics of {c.feature} have width {len(mu)} but {m} inputs have {dims[m]}")
            mean[m], std[m] = mu, sd
        return cls(mean, std)

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(batch)
        stored = {name for name, v in batch.items() if isinstance(v, torch.Tensor) and v.dtype == torch.float16}
        for name in stored:
            out[name] = batch[name].float()
        if GEOM_INPUT in out:
            out["video"] = torch.cat([out["video"].float(), out.pop(GEOM_INPUT).float()], -1)
        for m in self.modalities:
            if m in stored:
                x, valid = out[m], out[f"{m}_mask"].unsqueeze(-1)
                mean, std = getattr(self, f"{m}_mean"), getattr(self, f"{m}_std")
                out[m] = torch.where(valid, (x - mean) / std, torch.zeros((), dtype=x.dtype, device=x.device))
        return out
