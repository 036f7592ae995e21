"""The stages of the training data pipeline, in pipeline order: shard list → padded, normalised batch.

``train.data.make_loader`` chains them; [worker] stages run in every DataLoader worker (in the training process
with ``num_workers=0``), [main] ones in the training process, [device] in the network on its device. Stage, what
it yields, callable::

    shard list       this rank's shards in epoch order (train.data.plan_shards)      ShardList         [worker]
    split by worker  this worker's share of them                                     wds.split_by_worker [worker]
    read             samples, members as bytes, with their shard's name              ReadShards        [worker]
    select           only the members of the modalities (and raw inputs) in use      SelectModalities  [worker]
    decode           .npy / .json members decoded, never unpickled                   SafeDecode        [worker]
    validate         schema-checked samples (bad: SchemaError, or a BAD marker)      Validate          [worker]
    align words      one audio / video step per word (align_words; train/align.py)   AlignWords        [worker]
    shuffle          samples in a seeded buffer order (training)                     ShuffleSamples    [worker]
    to inputs        (T, D) features + masks, raw inputs, label, key                 ToInputs          [worker]
    batch            padded tensors of batch_size samples, bad markers apart         collate_chunk     [worker]
    worker batches   the workers' chunks via shared memory (pinned on CUDA)          PooledBatches     [main]
    rebatch          exactly batch_size samples; bad samples counted and logged      Rebatch           [main]
    equalise         the same number of batches on every rank (training)             Equalise          [main]
    skip             batches from ``skip_batches`` on (resume mid-epoch)             wds.slice         [main]
    normalise        float32 features, standardised with dataset.json's train stats  Normalise         [device]

The [device] stage runs in ``FusionPipeline.forward`` (``train/pipeline.py``); [main] and [worker] stages live in
``train/batches.py``, ``train/workers.py`` (the workers, kept across epochs) and here. A loader batch holds
features as stored (float16) and ``video_geom`` (B, T, 4) float32 apart from ``video``; after Normalise the
batch format is the contract with ``fusion`` (see ``fusion/base.py``): per modality ``m`` in use, ``m``
(B, T, D) float32 and ``m_mask`` (B, T) bool in the mask convention of shards/schema.py; a sample lacking the
modality has an all-False mask (one zero row if it has no steps at all), it is never dropped. With ``raw=True``
also ``text_ids`` (B, T) int64 and ``audio_wave`` (B, N) float32 in [-1, 1], each with its ``_mask``. ``label``
(B,) float32, or (B, K) float32 0/1 for multilabel targets (NaN = no label), and ``key`` (list of B sample
keys) complete it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds

from shards.contract import ModalityContract, builtin_contracts
from shards.dataset import ShardDataset
from shards.guard import ShardLimits, iter_raw_samples
from shards.io import decode_sample
from shards.schema import MODALITIES, SchemaError, validate_sample
from shards.sidecar import ShardCheck
from train.inputs import DataError, binary_labels, label_keys, scalar_label

log = logging.getLogger(__name__)

RAW_INPUTS = {"text": "text_ids", "audio": "audio_wave"}  # the inputs the end-to-end encoders take
GEOM_INPUT = "video_geom"  # ToInputs' video extra inputs (FaceMesh's geometry), joined onto "video" by Normalise
STD_FLOOR = 1e-6  # a feature whose train std is below this is only centred (divided by 1)
BAD = "__bad__"  # marker member of a sample that failed decoding or validation (with skip_bad_samples)


@dataclass(frozen=True)
class ShardTask:
    """One shard for one rank: keep the samples at positions ``j`` with ``j % every == phase``. ``split`` is the
    split it is read as (its sidecar's and every sample's must agree; empty: not checked)."""

    name: str
    path: str
    samples: int
    every: int = 1
    phase: int = 0
    split: str = ""

    @property
    def count(self) -> int:
        return max(0, math.ceil((self.samples - self.phase) / self.every))


class ShardList:
    """Stage: the pipeline's source, this rank's shard tasks in epoch order."""

    def __init__(self, tasks: Sequence[ShardTask]) -> None:
        self.tasks = list(tasks)

    def __call__(self) -> Iterator[ShardTask]:
        return iter(self.tasks)


class ReadShards:
    """Stage: shard tasks → samples with members as bytes, plus ``__shard__`` (the shard's file name).

    Shards are read through ``shards.guard.iter_raw_samples`` with the member caps of the dataset.json beside
    them (or ``limits``), and checked against their sidecars (``shards.sidecar.ShardCheck``: its split, each
    sample's key at its place in the key list, its member set and ``meta.json``'s digest; feature digests are
    left to ``mmfuse inspect --verify``, hashing them would cost about half of decoding them). A sample that
    disagrees is a SchemaError naming shard and sample, or with ``skip_bad`` a bad sample. A shard the guard
    refuses (compressed, a link or other non-file member, a member over its cap), a corrupt one, one whose sidecar
    is missing or records another split, or one holding another number of samples than its sidecar lists stops
    training, or with ``skip_bad`` ends that shard with one bad sample.
    """

    def __init__(self, skip_bad: bool, limits: ShardLimits | None = None) -> None:
        self.skip_bad, self.limits = skip_bad, limits
        self._beside: dict[str, ShardLimits] = {}

    def _limits(self, path: str) -> ShardLimits:
        if self.limits is not None:
            return self.limits
        folder = str(Path(path).parent)
        if folder not in self._beside:
            self._beside[folder] = ShardLimits.beside(path)
        return self._beside[folder]

    def __call__(self, tasks: Iterable[ShardTask]) -> Iterator[dict[str, Any]]:
        for task in tasks:
            j = -1
            try:
                check = ShardCheck.load(task.path, task.split, "meta", task.name) if task.split else None
                for j, sample in enumerate(iter_raw_samples(task.path, self._limits(task.path), task.name)):
                    if j % task.every != task.phase:
                        continue
                    problems = check.sample(j, sample) if check is not None else []
                    if problems:
                        yield _bad(sample | {"__shard__": task.name}, SchemaError("; ".join(problems)), self.skip_bad)
                    else:
                        yield {**sample, "__shard__": task.name}
                if check is not None and check.end(j + 1):
                    raise SchemaError(check.end(j + 1))
            except SchemaError as exc:
                if not self.skip_bad:
                    raise
                error = exc
            except OSError as exc:
                error = SchemaError(f"shard {task.name}: unreadable ({reason(exc)})")
                if not self.skip_bad:
                    raise error from exc
            else:
                continue
            yield {"__key__": f"{task.name}#{j + 1}", "__shard__": task.name, BAD: str(error)}


class SelectModalities:
    """Stage: drop the members of modalities (and raw inputs) the model does not use. A member belongs to the
    modality its name starts with (``video_...``); raw inputs are the records' ``raw`` members (``contracts``,
    by default the built-in extractors')."""

    def __init__(
        self, modalities: Sequence[str], raw: bool, contracts: Mapping[str, ModalityContract] | None = None
    ) -> None:
        self.modalities, self.raw = tuple(modalities), raw
        found = builtin_contracts() if contracts is None else contracts
        self.raw_members = frozenset(c.raw for c in found.values() if c.raw)

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        if BAD in sample:
            return sample
        keep = {}
        for name, value in sample.items():
            modality = name.split("_", 1)[0]
            if modality in MODALITIES and (
                modality not in self.modalities or (not self.raw and name in self.raw_members)
            ):
                continue
            keep[name] = value
        return keep


class SafeDecode:
    """Stage: ``.npy`` / ``.json`` members decoded with ``shards.io.decode_sample`` (no pickle); arrays are read-only
    views of the member bytes (no copy: the stages after only read them, and collate copies them into the batch)."""

    def __init__(self, skip_bad: bool) -> None:
        self.skip_bad = skip_bad

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        if BAD in sample:
            return sample
        try:
            return decode_sample(sample, sample["__shard__"], copy=False)  # collate copies them into the batch
        except SchemaError as exc:
            return _bad(sample, exc, self.skip_bad)


class Validate:
    """Stage: ``validate_sample`` with widths and feature-set hash pinned to dataset.json's and meta.json's split to
    the split being read (``split``; None: not checked); errors name the shard. With ``text_vocab`` (end to end:
    the text encoder's vocabulary size) ``text_ids`` must lie in [0, text_vocab): an id outside would index past
    the embedding (an IndexError on a CPU, a device-side assert that ends the process on CUDA)."""

    def __init__(
        self,
        dataset: ShardDataset,
        skip_bad: bool,
        modalities: Sequence[str] | None = None,
        split: str | None = None,
        text_vocab: int | None = None,
    ) -> None:
        self.members = dataset.members  # the member table of the shards' extractors (shards.contract)
        widths = {axis for spec in self.members.values() for axis in spec.shape[1:] if isinstance(axis, str)}
        self.dims = {k: int(v) for k, v in dataset.dims.items() if k in widths}
        self.fs_hash, self.skip_bad, self.split = dataset.feature_set_hash, skip_bad, split
        self.modalities = tuple(modalities) if modalities is not None else None
        self.text_vocab = text_vocab

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        if BAD in sample:
            return sample
        try:
            validate_sample(sample, self.dims, self.modalities, self.members)
            got = sample["meta.json"]["feature_set_hash"]
            if self.fs_hash is not None and got != self.fs_hash:
                raise SchemaError(
                    f"sample {sample['__key__']}: meta.json feature_set_hash {got} differs from dataset.json's "
                    f"{self.fs_hash}; the shard comes from another extraction: re-extract it or remove it"
                )
            if self.split is not None and sample["meta.json"]["split"] != self.split:
                raise SchemaError(
                    f"sample {sample['__key__']}: meta.json says split {sample['meta.json']['split']!r} but it is "
                    f"read as split {self.split!r}"
                )
            ids = sample.get("text_ids.npy")
            if self.text_vocab is not None and ids is not None and len(ids):
                bad = out_of_vocab(ids, self.text_vocab)
                if bad is not None:
                    raise SchemaError(vocab_message(sample["__key__"], bad, self.text_vocab))
        except SchemaError as exc:
            return _bad(sample, SchemaError(f"shard {sample['__shard__']}: {exc}"), self.skip_bad)
        return sample


def out_of_vocab(ids: np.ndarray, vocab: int) -> int | None:
    """The first token id of ``ids`` outside [0, vocab), or None (one min and one max when all are inside)."""
    ids = np.asarray(ids)
    if ids.min() >= 0 and ids.max() < vocab:
        return None
    return int(ids[(ids < 0) | (ids >= vocab)][0])


def vocab_message(key: str, token: int, vocab: int) -> str:
    return (
        f"sample {key}: text_ids holds token id {token}, outside the text encoder's vocabulary of {vocab} ids "
        f"(0 to {vocab - 1}); the shard was not tokenised by this feature set's text model: re-extract it, or "
        "train with mode=frozen"
    )


def reason(exc: BaseException) -> str:
    return str(exc.args[0]) if exc.args else type(exc).__name__


def _bad(sample: Mapping[str, Any], error: SchemaError, skip: bool) -> dict[str, Any]:
    if not skip:
        raise error
    return {"__key__": sample["__key__"], "__shard__": sample["__shard__"], BAD: str(error)}


class ShuffleSamples:
    """Stage: a shuffle buffer of ``size`` samples seeded by (seed, epoch, rank, worker), so the order is
    reproducible. It yields as soon as it holds ``initial`` samples and then grows to ``size`` while yielding
    (two samples in per sample out, ``wds.shuffle``), so a worker's first batch never waits for a full buffer."""

    def __init__(self, size: int, seed: int, epoch: int, rank: int, initial: int | None = None) -> None:
        self.size, self.seed, self.epoch, self.rank = size, seed, epoch, rank
        self.initial = size if initial is None else max(1, min(initial, size))

    def __call__(self, samples: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        seed = f"{self.seed}-{self.epoch}-{self.rank}-{info.id if info else 0}"
        return wds.shuffle(self.size, self.initial, seed=seed)(iter(samples))


def _steps(feat: np.ndarray | None, mask: np.ndarray | None, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(T, D) features (float16 as stored: half the bytes between worker, trainer and device; ``Normalise`` makes
    them float32) and (T,) bool mask, or one zero row with a False mask when missing."""
    if feat is None or len(feat) == 0:
        return np.zeros((1, width), np.float16), np.zeros(1, bool)
    feat = np.asarray(feat)
    feat = (feat if feat.dtype.kind == "f" else feat.astype(np.float32)).reshape(len(feat), -1)
    mask = np.ones(len(feat), bool) if mask is None else np.asarray(mask, bool)
    return feat, mask


class ToInputs:
    """Stage: a validated shard sample → model inputs (NumPy): features, masks, raw inputs, label, key.

    Which member is each modality's feature, mask, raw input and extra inputs comes from the records
    (``contracts``: dataset.json's, :attr:`shards.dataset.ShardDataset.contracts`; by default the built-in
    extractors'). The label is the number under ``label_key``, or with ``multilabel`` the (K,) 0/1 vector of its
    comma-separated keys (see :func:`train.inputs.label_keys`). With ``video_geom`` the video record's extra
    inputs (FaceMesh's 4 geometry features) travel as ``video_geom`` (T, E) float32, zeros where a sample lacks
    them, and ``dims["video"]`` counts them.
    """

    def __init__(
        self,
        modalities: Sequence[str],
        dims: Mapping[str, int],
        raw: bool,
        label_key: str,
        video_geom: bool,
        multilabel: bool = False,
        contracts: Mapping[str, ModalityContract] | None = None,
    ) -> None:
        self.modalities, self.dims, self.raw = tuple(modalities), dict(dims), raw
        self.label_key, self.video_geom, self.multilabel = label_key, video_geom, multilabel
        self.contracts = dict(builtin_contracts(dims) if contracts is None else contracts)
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
            c = self.contracts.get(m)
            ok = c is not None and meta["modalities"][m]["status"] == "ok"
            feat = sample.get(c.feature) if ok else None
            mask = sample.get(c.mask) if ok and c.mask else None
            extras = c.extra if c is not None and m == "video" and self.video_geom else {}
            out[m], out[f"{m}_mask"] = _steps(feat, mask, self.dims[m] - sum(extras.values()))
            if extras:  # float32, kept apart so features can travel as float16; Normalise joins them
                out[GEOM_INPUT] = _extras(sample if feat is not None and len(feat) else {}, extras, len(out[m]))
                out[f"{GEOM_INPUT}_mask"] = out[f"{m}_mask"]
            if self.raw and m in RAW_INPUTS:
                member = c.raw if c is not None else None
                out.update(self._raw(m, sample.get(member) if ok and member else None))
        return out

    @staticmethod
    def _raw(modality: str, value: np.ndarray | None) -> dict[str, np.ndarray]:
        name = RAW_INPUTS[modality]
        if value is None or len(value) == 0:
            values = np.zeros(1, np.int64 if modality == "text" else np.float32)
            return {name: values, f"{name}_mask": np.zeros(1, bool)}
        values = value.astype(np.int64) if modality == "text" else value.astype(np.float32) / 32768.0
        return {name: values, f"{name}_mask": np.ones(len(values), bool)}


def _extras(sample: Mapping[str, Any], extras: Mapping[str, int], steps: int) -> np.ndarray:
    """(T, E) float32: the ``extras`` members (member -> width) side by side, zeros for one the sample lacks."""
    parts = []
    for name, width in extras.items():
        value = sample.get(name)
        parts.append(np.zeros((steps, width), np.float32) if value is None else np.asarray(value, np.float32))
    return parts[0].reshape(steps, -1) if len(parts) == 1 else np.concatenate([p.reshape(steps, -1) for p in parts], 1)
