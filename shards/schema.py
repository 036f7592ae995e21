"""The shard sample schema (version 1), declared once and used by the writer and every reader.

A sample is a dict of members keyed by their file suffix inside the tar (``"meta.json"``, ``"text_feat.npy"``, ...)
plus ``"__key__"``. Arrays are NumPy arrays (or objects with ``.dtype``/``.shape``/``.numpy()``, such as torch
tensors coming out of a DataLoader).

The mask convention, the one used everywhere (shards, the training batches, every fusion layer and estimator):
a mask is boolean and ``True`` means valid. In a shard, ``audio_mask`` (Ta,) is True where a frame covers real
audio and ``video_mask`` (Tv,) where the frame has a face. In a batch, ``m_mask`` (B, T) is True on a sample's
real steps and False on padding, and a sample whose ``m_mask`` is all False lacks modality ``m``; a pooled
mask (B,) is True where a sample has the modality. The one inversion, ``key_padding_mask`` of
``nn.MultiheadAttention`` (True = ignore), is made in ``fusion.layers`` and nowhere else.

Which members a sample must carry follows from ``meta["modalities"]``: a modality whose status is ``ok`` carries all
its required members; ``failed`` or ``absent`` modalities carry none of them.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mmfuse.errors import MmfuseError

SCHEMA_VERSION = 1

MODALITIES = ("text", "audio", "video")
STATUSES = ("ok", "failed", "absent")
SPLITS = ("train", "valid", "test")
N_LANDMARKS = 478
SAMPLE_RATE = 16000


ROLES = ("feature", "mask", "time", "raw", "extra")


class SchemaError(MmfuseError, ValueError):
    """A sample, shard or dataset does not match the shard schema."""


@dataclass(frozen=True)
class MemberSpec:
    """One array member: dtype and shape, with symbolic dims shared across members of a sample, and its role for
    the training side (:data:`ROLES`: the modality's ``feature``, its ``mask``, its ``time`` stamps, a ``raw``
    input for end-to-end training, or an ``extra`` array)."""

    dtype: str
    shape: tuple[str | int, ...]
    modality: str
    required: bool
    doc: str = field(compare=False)  # what the member holds, for readers; not part of what it is
    role: str = "extra"


MEMBERS: dict[str, MemberSpec] = {
    "text_ids.npy": MemberSpec(
        "int32",
        ("Tt",),
        "text",
        False,
        "tokenizer ids incl. special tokens (absent for imported features that have none)",
        "raw",
    ),
    "text_feat.npy": MemberSpec("float16", ("Tt", "Dt"), "text", True, "encoder hidden states", "feature"),
    "audio_wave.npy": MemberSpec("int16", ("N",), "audio", False, "16 kHz mono waveform on the clip clock", "raw"),
    "audio_feat.npy": MemberSpec("float16", ("Ta", "Da"), "audio", True, "wav2vec 2.0 frames", "feature"),
    "audio_mask.npy": MemberSpec("bool", ("Ta",), "audio", True, "frame covers real audio", "mask"),
    "audio_time.npy": MemberSpec("float32", ("Ta",), "audio", True, "frame centre time, seconds", "time"),
    "video_lmk.npy": MemberSpec("float16", ("Tv", N_LANDMARKS, 3), "video", True, "normalised landmarks", "feature"),
    "video_mask.npy": MemberSpec("bool", ("Tv",), "video", True, "face present per frame", "mask"),
    "video_time.npy": MemberSpec("float32", ("Tv",), "video", True, "frame time stamp, seconds", "time"),
    "video_norm.npy": MemberSpec("float32", ("Tv", 4), "video", False, "centre x, y, z and inter-ocular px"),
    "video_geom.npy": MemberSpec("float32", ("Tv", 4), "video", False, "mouth, left/right eye openness, yaw"),
    "video_feat.npy": MemberSpec(
        "float16",
        ("Tv", "Dv"),
        "video",
        False,
        "pre-computed visual features (imported, e.g. Facet / OpenFace), in place of landmarks",
        "feature",
    ),
}
# A required member may be replaced by its alternative (imported corpora carry features, not landmarks).
ALTERNATIVES = {"video_lmk.npy": "video_feat.npy"}

# The built-in extractors' members by role: what dataset.json's per-modality record (shards.contract) says for
# shards of FaceMesh and the bundled encoders, and what a dataset.json written before the record existed is read as.
# Readers take the member names from the record (shards.dataset.ShardDataset.contracts), not from these tables.
FEATURE_MEMBERS = {"text": "text_feat.npy", "audio": "audio_feat.npy", "video": "video_lmk.npy"}
STATS_MEMBERS = (*FEATURE_MEMBERS.values(), "video_feat.npy")
MASK_MEMBERS = {"audio": "audio_mask.npy", "video": "video_mask.npy"}

META_REQUIRED = ("schema_version", "key", "video_id", "clip_id", "split", "modalities", "feature_set_hash")
# meta.json's ``labels``: name -> a number float32 holds (training makes labels float32), a boolean, a text (a class
# name) or null (no label). Times in seconds (a manifest's start / end, word timings) are finite, >= 0 and at most
# MAX_SECONDS (about 11.6 days), so they fit every clock and index computed from them.
FLOAT32_MAX = float(np.finfo(np.float32).max)
MAX_SECONDS = 1e6
SHOWN_CHARS = 40  # a value quoted in a message is cut to this many characters

_UNSAFE = re.compile(r"[^\w\-]", re.UNICODE)


def make_key(video_id: str, clip_id: str) -> str:
    """Sample key ``<video_id>__<clip_id>`` with dots, slashes and other unsafe characters replaced by ``_``.

    Dots must go because webdataset splits a member name at its first dot; slashes because a key is a file name.
    """
    parts = []
    for part in (str(video_id), str(clip_id)):
        part = unicodedata.normalize("NFC", part)
        parts.append(_UNSAFE.sub("_", part))
    return f"{parts[0]}__{parts[1]}"


def _np(value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "numpy"):  # torch tensors through a DataLoader
        return value.detach().cpu().numpy() if hasattr(value, "detach") else value.numpy()
    raise SchemaError(f"expected an array, got {type(value).__name__}")


def validate_meta(meta: Any, key: str | None = None) -> None:
    """Check ``meta.json`` of one sample; raise :class:`SchemaError` listing every problem."""
    if not isinstance(meta, Mapping):
        raise SchemaError(f"meta.json must be an object, got {type(meta).__name__}")
    problems = [f"meta.json lacks '{name}'" for name in META_REQUIRED if name not in meta]
    if problems:
        raise SchemaError(f"sample {key or meta.get('key')}: " + "; ".join(problems))
    if meta["schema_version"] != SCHEMA_VERSION:
        raise SchemaError(
            f"sample {meta['key']}: schema version {meta['schema_version']} but this mmfuse reads "
            f"version {SCHEMA_VERSION}; re-extract the corpus or use a matching mmfuse release"
        )
    if key is not None and meta["key"] != key:
        problems.append(f"meta.json key {meta['key']!r} differs from the tar key {key!r}")
    if meta["split"] not in SPLITS:
        problems.append(f"split {meta['split']!r} is not one of {list(SPLITS)}")
    mods = meta["modalities"]
    if not isinstance(mods, Mapping) or set(mods) != set(MODALITIES):
        problems.append(f"meta.json 'modalities' must have exactly the keys {list(MODALITIES)}")
    else:
        for name, entry in mods.items():
            if not isinstance(entry, Mapping) or entry.get("status") not in STATUSES:
                problems.append(f"modality {name}: status must be one of {list(STATUSES)}, got {entry!r}")
    problems += label_problems(meta.get("labels"))
    words = words_problem(meta.get("words"))
    if words is not None:
        problems.append(f"meta.json 'words' {words}")
    if problems:
        raise SchemaError(f"sample {meta['key']}: " + "; ".join(problems))


def shown(value: Any) -> str:
    """``repr(value)`` cut to :data:`SHOWN_CHARS` characters, for messages (a label may be 400 digits long)."""
    if isinstance(value, int) and value.bit_length() > 128:  # repr of a 5000-digit int is an error
        digits = int(value.bit_length() * math.log10(2)) + 1
        return f"an integer of {digits - (10 ** (digits - 1) > abs(value))} digits"
    try:
        text = repr(value)
    except ValueError:  # an int of over 4300 digits inside a list
        return f"a {type(value).__name__}"
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 3] + "..."


def label_problem(value: Any) -> str | None:
    """Why ``value`` cannot be a label (see :data:`FLOAT32_MAX`), or ``None`` when it can."""
    if value is None or isinstance(value, (bool, str)):
        return None
    if isinstance(value, (int, float)):
        try:
            x = float(value)
        except OverflowError:  # an int of more than 308 digits
            x = math.inf
        return None if abs(x) <= FLOAT32_MAX else "is not a finite float32 number (labels are at most 3.4e38)"
    return f"is a {type(value).__name__}; a label is a number, a boolean, a text (a class name) or null"


def label_problems(labels: Any) -> list[str]:
    """Every problem of a ``labels`` object (``None``: the sample has no labels), each naming the label."""
    if labels is None:
        return []
    if not isinstance(labels, Mapping):
        return [f"meta.json 'labels' must be an object (label name -> value), got a {type(labels).__name__}"]
    found = ((name, label_problem(value), value) for name, value in labels.items())
    return [f"label {shown(name)} = {shown(value)} {problem}" for name, problem, value in found if problem]


def seconds_problem(value: Any) -> str | None:
    """Why ``value`` cannot be a time in seconds (see :data:`MAX_SECONDS`), or ``None`` when it can."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{shown(value)} is not a number of seconds"
    try:
        ok = 0 <= float(value) <= MAX_SECONDS
    except OverflowError:
        ok = False
    return None if ok else f"{shown(value)} is not a time in seconds in [0, {MAX_SECONDS:.0f}]"


def words_problem(words: Any) -> str | None:
    """Why ``words`` is not a list of ``[word, start, end]`` timings (a text and two times in seconds, start <= end),
    or ``None`` when it is (``None`` too: no timings)."""
    if words is None:
        return None
    if not isinstance(words, (list, tuple)):
        return f"must be a list of [word, start, end], got a {type(words).__name__}"
    for i, item in enumerate(words):
        if not isinstance(item, (list, tuple)) or len(item) != 3 or not isinstance(item[0], str):
            return f"item {i} ({shown(item)}) is not [word, start, end] with the word a text"
        problem = seconds_problem(item[1]) or seconds_problem(item[2])
        if problem is not None:
            return f"item {i} ({shown(item)}): {problem}"
        if item[2] < item[1]:
            return f"item {i} ({shown(item)}): the word ends before it starts"
    return None


def validate_sample(
    sample: Mapping[str, Any],
    dims: Mapping[str, int] | None = None,
    modalities: Sequence[str] | None = None,
    members: Mapping[str, MemberSpec] | None = None,
) -> None:
    """Check one decoded sample against the schema; raise :class:`SchemaError` naming the sample and member.

    ``dims`` optionally pins feature widths (``{"Dt": 384, "Da": 768}``) to those declared in dataset.json.
    ``modalities`` restricts the member checks to those modalities (a reader that dropped the others before
    decoding); meta.json is always checked whole. Float members must be finite. ``members``: the member table of
    the shards' extractors (``shards.contract.member_table``: :data:`MEMBERS` with each modality's members as its
    extractor declares them); by default :data:`MEMBERS`.
    """
    members = MEMBERS if members is None else members
    key = sample.get("__key__")
    if "meta.json" not in sample:
        raise SchemaError(f"sample {key}: no meta.json member")
    meta = sample["meta.json"]
    validate_meta(meta, key)
    key = meta["key"]
    problems: list[str] = []
    unknown = sorted(k for k in sample if not k.startswith("__") and k != "meta.json" and k not in members)
    if unknown:
        problems.append(f"unknown members {unknown}")
    bound: dict[str, int] = dict(dims or {})
    for name, spec in members.items():
        if modalities is not None and spec.modality not in modalities:
            continue
        status = meta["modalities"][spec.modality]["status"]
        present = name in sample
        if status != "ok":
            if present:
                problems.append(f"{name} present but modality {spec.modality} is {status}")
            continue
        if not present:
            if spec.required and ALTERNATIVES.get(name) not in sample:
                problems.append(f"{name} missing for modality {spec.modality} with status ok")
            continue
        problems.extend(_check_array(name, spec, _np(sample[name]), bound))
    if problems:
        raise SchemaError(f"sample {key}: " + "; ".join(problems))


# An IEEE float is NaN or inf when its exponent bits are all set: as a signed integer of its width a positive one is
# at least the exponent mask, and as an unsigned one a negative one is at least sign | mask. Two integer maxima
# (no temporary array) tell whether all are finite, several times faster than np.isfinite on float16.
_FLOAT_BITS = {
    2: (np.int16, np.uint16, 0x7C00, 0x8000),
    4: (np.int32, np.uint32, 0x7F80_0000, 0x8000_0000),
    8: (np.int64, np.uint64, 0x7FF0_0000_0000_0000, 0x8000_0000_0000_0000),
}


def all_finite(arr: np.ndarray) -> bool:
    """Whether every value of a float array is finite (no NaN, no inf); True for other dtypes and empty arrays."""
    if arr.dtype.kind != "f" or arr.size == 0:
        return True
    bits = _FLOAT_BITS.get(arr.dtype.itemsize)
    if bits is None or not arr.dtype.isnative:
        return bool(np.isfinite(arr).all())
    signed, unsigned, exponent, sign = bits
    return int(arr.view(signed).max()) < exponent and int(arr.view(unsigned).max()) < (sign | exponent)


def _check_array(name: str, spec: MemberSpec, arr: np.ndarray, bound: dict[str, int]) -> list[str]:
    if arr.dtype != np.dtype(spec.dtype):
        return [f"{name} has dtype {arr.dtype}, expected {spec.dtype}"]
    if arr.ndim != len(spec.shape):
        return [f"{name} has shape {arr.shape}, expected {len(spec.shape)} dims {spec.shape}"]
    problems = []
    for axis, (size, want) in enumerate(zip(arr.shape, spec.shape, strict=True)):
        if isinstance(want, int):
            if size != want:
                problems.append(f"{name} axis {axis} is {size}, expected {want}")
        elif bound.setdefault(want, size) != size:
            problems.append(f"{name} axis {axis} ({want}) is {size}, expected {bound[want]} as in the other members")
    if not all_finite(arr):
        bad = int((~np.isfinite(arr)).sum())
        problems.append(f"{name} has {bad} NaN/inf values")
    return problems


def modality_available(meta: Mapping[str, Any], modality: str) -> bool:
    """Whether a sample carries usable features for ``modality``."""
    return meta["modalities"][modality]["status"] == "ok"
