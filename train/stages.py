"""The stages of the training data pipeline, in pipeline order: shard list → padded, normalised batch.

``train.data.make_loader`` chains them; [worker] stages run in every DataLoader worker (in the training process
with ``num_workers=0``), [main] ones in the training process. Stage, what it yields, callable::

    shard list       this rank's shards in epoch order (train.data.plan_shards)      ShardList         [worker]
    split by worker  this worker's share of them                                     wds.split_by_worker [worker]
    read             samples, members as bytes, with their shard's name              ReadShards        [worker]
    select           only the members of the modalities (and raw inputs) in use      SelectModalities  [worker]
    decode           .npy / .json members decoded, never unpickled                   SafeDecode        [worker]
    validate         schema-checked samples (bad: SchemaError, or a BAD marker)      Validate          [worker]
    align words      one audio / video step per word (align_words; train/align.py)   AlignWords        [worker]
    shuffle          samples in a seeded buffer order (training)                     ShuffleSamples    [worker]
    to inputs        (T, D) features + masks, raw inputs, label, key                 ToInputs          [worker]
    batch            lists of model-input samples                                    wds.batched       [worker]
    worker batches   the workers' lists, round robin                                 WorkerBatches     [main]
    drop bad         BAD markers counted, logged and dropped                         DropBad           [main]
    rebatch          lists of exactly batch_size samples                             wds.batched       [main]
    equalise         the same number of batches on every rank (training)             Equalise          [main]
    skip             batches from ``skip_batches`` on (resume mid-epoch)             wds.slice         [main]
    collate          padded torch tensors and masks                                  collate           [main]
    normalise        features standardised with dataset.json's train mean/std        Normalise         [main]

The batch format is the contract with ``fusion`` (see ``fusion/base.py``): per modality ``m`` in use, ``m``
(B, T, D) float32 and ``m_mask`` (B, T) bool, True = valid step; a sample lacking the modality has an all-False
mask (one zero row if it has no steps at all), it is never dropped. With ``raw=True`` also ``text_ids`` (B, T)
int64 and ``audio_wave`` (B, N) float32 in [-1, 1], each with its ``_mask``. ``label`` (B,) float32, or (B, K)
float32 0/1 for multilabel targets (NaN = no label), and ``key`` (list of B sample keys) complete it.
"""

from __future__ import annotations

import logging
import tarfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

from shards.dataset import IMPORTED_VIDEO, ShardDataset
from shards.io import decode_member
from shards.schema import FEATURE_MEMBERS, MASK_MEMBERS, MODALITIES, SchemaError, validate_sample
from train.inputs import GEOM_DIM, DataError, binary_labels, feature_dims, label_keys, scalar_label

if TYPE_CHECKING:
    from train.data import ShardTask

log = logging.getLogger(__name__)

RAW_MEMBERS = {"text": "text_ids.npy", "audio": "audio_wave.npy"}
RAW_INPUTS = {"text": "text_ids", "audio": "audio_wave"}
GEOM_INPUT = "video_geom"  # ToInputs' separate geometry input, joined onto "video" by collate
STD_FLOOR = 1e-6  # a feature whose train std is below this is only centred (divided by 1)
BAD = "__bad__"  # marker member of a sample that failed decoding or validation (with skip_bad_samples)


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


class SelectModalities:
    """Stage: drop the members of modalities (and raw inputs) the model does not use."""

    def __init__(self, modalities: Sequence[str], raw: bool) -> None:
        self.modalities, self.raw = tuple(modalities), raw

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        if BAD in sample:
            return sample
        keep = {}
        for name, value in sample.items():
            modality = name.split("_", 1)[0]
            if modality in MODALITIES and (modality not in self.modalities or (not self.raw and _is_raw(name))):
                continue
            keep[name] = value
        return keep


def _is_raw(name: str) -> bool:
    return name in RAW_MEMBERS.values()


class SafeDecode:
    """Stage: ``.npy`` / ``.json`` members decoded with ``shards.io.decode_member`` (no pickle)."""

    def __init__(self, skip_bad: bool) -> None:
        self.skip_bad = skip_bad

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        if BAD in sample:
            return sample
        out = {k: v for k, v in sample.items() if k.startswith("__")}
        for name, data in sample.items():
            if name.startswith("__"):
                continue
            try:
                out[name] = decode_member(name, data)
            except (ValueError, OSError, UnicodeDecodeError) as exc:
                msg = f"shard {sample['__shard__']}: member {sample['__key__']}.{name} cannot be decoded ({exc})"
                return _bad(sample, SchemaError(msg), self.skip_bad)
        return out


class Validate:
    """Stage: ``validate_sample`` with widths and feature-set hash pinned to dataset.json's; errors name the shard."""

    def __init__(self, dataset: ShardDataset, skip_bad: bool, modalities: Sequence[str] | None = None) -> None:
        self.dims = {k: int(v) for k, v in dataset.dims.items() if k in ("Dt", "Da", "Dv")}
        self.fs_hash, self.skip_bad = dataset.feature_set_hash, skip_bad
        self.modalities = tuple(modalities) if modalities is not None else None

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        if BAD in sample:
            return sample
        try:
            validate_sample(sample, self.dims, self.modalities)
            got = sample["meta.json"]["feature_set_hash"]
            if self.fs_hash is not None and got != self.fs_hash:
                raise SchemaError(
                    f"sample {sample['__key__']}: meta.json feature_set_hash {got} differs from dataset.json's "
                    f"{self.fs_hash}; the shard comes from another extraction: re-extract it or remove it"
                )
        except SchemaError as exc:
            return _bad(sample, SchemaError(f"shard {sample['__shard__']}: {exc}"), self.skip_bad)
        return sample


def reason(exc: BaseException) -> str:
    return str(exc.args[0]) if exc.args else type(exc).__name__


def _bad(sample: Mapping[str, Any], error: SchemaError, skip: bool) -> dict[str, Any]:
    if not skip:
        raise error
    return {"__key__": sample["__key__"], "__shard__": sample["__shard__"], BAD: str(error)}


class ShuffleSamples:
    """Stage: a shuffle buffer seeded by (seed, epoch, rank, worker), so the order is reproducible."""

    def __init__(self, size: int, seed: int, epoch: int, rank: int) -> None:
        self.size, self.seed, self.epoch, self.rank = size, seed, epoch, rank

    def __call__(self, samples: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        seed = f"{self.seed}-{self.epoch}-{self.rank}-{info.id if info else 0}"
        return wds.shuffle(self.size, self.size, seed=seed)(iter(samples))


def _steps(feat: np.ndarray | None, mask: np.ndarray | None, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(T, D) features (float16 as stored: half the bytes between worker and trainer; ``collate`` makes them
    float32) and (T,) bool mask, or one zero row with a False mask when missing."""
    if feat is None or len(feat) == 0:
        return np.zeros((1, width), np.float16), np.zeros(1, bool)
    feat = np.asarray(feat)
    feat = (feat if feat.dtype.kind == "f" else feat.astype(np.float32)).reshape(len(feat), -1)
    mask = np.ones(len(feat), bool) if mask is None else np.asarray(mask, bool)
    return feat, mask


class ToInputs:
    """Stage: a validated shard sample → model inputs (NumPy): features, masks, raw inputs, label, key.

    The label is the number under ``label_key``, or with ``multilabel`` the (K,) 0/1 vector of its
    comma-separated keys (see :func:`train.inputs.label_keys`).
    """

    def __init__(
        self,
        modalities: Sequence[str],
        dims: Mapping[str, int],
        raw: bool,
        label_key: str,
        video_geom: bool,
        multilabel: bool = False,
    ) -> None:
        self.modalities, self.dims, self.raw = tuple(modalities), dict(dims), raw
        self.label_key, self.video_geom, self.multilabel = label_key, video_geom, multilabel
        self.keys = label_keys(label_key)
        if not multilabel and len(self.keys) > 1:
            raise DataError(
                f"label_key {label_key!r} names {len(self.keys)} keys ({', '.join(self.keys)}); several keys make "
                "a multilabel target: pass multilabel=True (task=multilabel)"
            )

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        if BAD in sample:
            return sample
        meta = sample["meta.json"]
        label = binary_labels(meta, self.keys) if self.multilabel else scalar_label(meta, self.label_key)
        out: dict[str, Any] = {"key": meta["key"], "label": label}
        for m in self.modalities:
            ok = meta["modalities"][m]["status"] == "ok"
            feat = sample.get(FEATURE_MEMBERS[m], sample.get(IMPORTED_VIDEO)) if ok else None
            mask = sample.get(MASK_MEMBERS[m]) if ok and m in MASK_MEMBERS else None
            geom = None
            if m == "video" and feat is not None and IMPORTED_VIDEO not in sample:
                feat = feat.reshape(len(feat), -1)
                if self.video_geom:  # float32, kept apart so landmarks can travel as float16; collate joins them
                    geom = sample.get("video_geom.npy", np.zeros((len(feat), GEOM_DIM), np.float32))
            width = self.dims[m] - (GEOM_DIM if m == "video" and self.video_geom else 0)
            out[m], out[f"{m}_mask"] = _steps(feat, mask, width)
            if m == "video" and self.video_geom:
                out[GEOM_INPUT] = np.zeros((len(out[m]), GEOM_DIM), np.float32) if geom is None else geom
                out[f"{GEOM_INPUT}_mask"] = out[f"{m}_mask"]
            if self.raw and m in RAW_INPUTS:
                out.update(self._raw(m, sample.get(RAW_MEMBERS[m]) if ok else None))
        return out

    @staticmethod
    def _raw(modality: str, value: np.ndarray | None) -> dict[str, np.ndarray]:
        name = RAW_INPUTS[modality]
        if value is None or len(value) == 0:
            values = np.zeros(1, np.int64 if modality == "text" else np.float32)
            return {name: values, f"{name}_mask": np.zeros(1, bool)}
        values = value.astype(np.int64) if modality == "text" else value.astype(np.float32) / 32768.0
        return {name: values, f"{name}_mask": np.ones(len(values), bool)}


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
