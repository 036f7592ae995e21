"""The one interface every extractor implements, and the decoded clip it works on.

An extractor has a ``name``, a ``version``, the ``modality`` it fills, an output spec (the members it writes,
each with its role: the modality's ``feature``, ``mask``, ``time``, ``raw`` input or an ``extra`` array; the
schema's own members by default, or members of its own declared with their dtype and shape), where it runs
(``runs_in``), a ``Settings`` dataclass declaring the extraction settings it reads (its own knobs are the config's
section named by its registry name, ``facemesh.max_faces``; fields declared :func:`shared` are general settings,
``batch_size``), ``setup(device)`` to load its model once, and ``__call__`` on a batch of decoded clips returning, per
clip, either a dict of named arrays matching the spec or a :class:`ModalityFailure` saying why not. Its output
spec becomes dataset.json's record of the modality (:meth:`Extractor.contract`, see :mod:`shards.contract`),
which is all the training side reads of it: a new extractor is one module plus one registry line.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any, ClassVar, Literal

import numpy as np

from extract.errors import ExtractionError, ModelNotFoundError  # noqa: F401 (their home before extract.errors)
from mmfuse.settings import NOT_A_SETTING
from shards.contract import ModalityContract, declare
from shards.schema import MEMBERS, MemberSpec


@dataclass(frozen=True)
class ModalityFailure:
    """Why one modality of one clip has no features; recorded in status.jsonl and meta.json."""

    error: str


@dataclass
class DecodedClip:
    """One clip after decoding, on the clip clock (t = 0 at the clip start).

    ``wave`` is int16 ``(N,)`` at 16 kHz with silence where the audio stream has no samples; ``audio_span`` is
    the real part in seconds. ``frames`` is a lazy frame source (``extract.video.VideoFrames``) in the worker
    and ``None`` once the worker's extractors have run: frames never leave the worker. ``features`` holds, by
    modality, what the worker's extractors computed. ``status`` maps a modality to ``{"status", "error"}``.
    """

    clip: Any  # extract.manifest.Clip
    duration: float = 0.0
    wave: np.ndarray | None = None
    audio_span: tuple[float, float] | None = None
    frames: Any = None
    features: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    status: dict[str, dict[str, Any]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


ExtractorResult = dict[str, np.ndarray] | ModalityFailure


@dataclass(frozen=True)
class NoSettings:
    """The settings of an extractor that reads none."""


RunsIn = Literal["worker", "encoder"]
SHARED = {**NOT_A_SETTING, "shared": True}  # Settings field metadata: a general extraction setting, not the section's


def shared(default: Any) -> Any:
    """A ``Settings`` field that is a general extraction setting of the same name (``batch_size``, ``precision``,
    ``raw``, ``fps``): read from the config's general settings, not from the extractor's section."""
    return field(default=default, metadata=SHARED)


class Extractor(ABC):
    """Base class: a batch of decoded clips in, named arrays matching :meth:`output_spec` out.

    ``runs_in`` says where: ``"worker"`` in the decode worker processes, one decoded clip at a time while its
    frames are at hand, without torch (FaceMesh); ``"encoder"`` in the main process on groups of decoded clips
    (text, audio). ``Settings`` is a frozen dataclass (the decode workers key their extractors by it) with a default
    for every field: its own fields are the extractor's section of the extraction settings, its :func:`shared`
    fields general settings; ``SETTING_ALIASES`` on it maps older flat names to its fields and an optional
    ``problems(config)`` returns what is wrong with its values. :meth:`from_settings` builds the extractor from one.
    """

    name: str = ""
    version: str = ""
    modality: str = ""
    members: tuple[str, ...] = ()
    runs_in: ClassVar[RunsIn] = "encoder"
    Settings: ClassVar[type] = NoSettings
    joined: ClassVar[tuple[str, ...]] = ()  # extra members the model may take after the feature (FaceMesh's geometry)

    @classmethod
    def from_settings(cls, settings: Any) -> Extractor:
        """The extractor for ``settings``; by default its fields are the constructor's keyword arguments."""
        return cls(**asdict(settings))

    def output_spec(self) -> dict[str, MemberSpec]:
        """Each member it writes with its dtype, shape and role; by default the schema's (:data:`MEMBERS`). An
        extractor writing a member the schema does not declare overrides this, returning a ``MemberSpec`` of its
        modality (named ``<modality>_<name>.npy``) with the role it plays, e.g. ``role="feature"``."""
        return {m: MEMBERS[m] for m in self.members}

    def contract(self, settings: Any = None, provenance: Mapping[str, Any] | None = None) -> ModalityContract:
        """dataset.json's record of the modality it fills: its output spec by role, the feature's width (symbolic
        widths from its provenance's ``dims``), its ``joined`` extra inputs and ``settings`` (its ``Settings``)."""
        prov = self.provenance() if provenance is None else provenance
        values = asdict(settings) if is_dataclass(settings) and not isinstance(settings, type) else {}
        return declare(self.modality, self.name, self.output_spec(), prov.get("dims", {}), values, self.joined)

    def setup(self, device: str = "cpu") -> None:  # noqa: B027 - optional hook
        """Load models onto ``device``; called once before the first batch."""

    @abstractmethod
    def __call__(self, clips: Sequence[DecodedClip]) -> list[ExtractorResult]:
        """One result per clip, in order."""

    def provenance(self) -> dict[str, Any]:
        """What identifies this extractor's output in the feature set (name, version, model, weights, dims)."""
        return {"name": self.name, "version": self.version}


def read_settings(settings_type: type, config: Any, section: str) -> Any:
    """A settings dataclass filled from ``config`` (an ``ExtractConfig``): its :func:`shared` fields from the general
    settings, the others from the config's section for registry name ``section`` (its defaults when the config has
    no such section)."""
    own = getattr(config, section_name(section), None)
    return settings_type(
        **{
            f.name: getattr(config if f.metadata.get("shared") else own, f.name)
            for f in fields(settings_type)
            if f.init and (f.metadata.get("shared") or own is not None)
        }
    )


def range_problem(key: str, value: Any, low: float, high: float, open_low: bool = False) -> str | None:
    """Why setting ``key`` (a number) is outside ``[low, high]`` (``(low, high]`` with ``open_low``; NaN is
    outside), or None."""
    inside = low < value <= high if open_low else low <= value <= high  # False for NaN
    return None if inside else f"{key}: must be {'>' if open_low else '>='} {low:g} and <= {high:g}, got {value!r}"


def section_name(key: str) -> str:
    """The settings section of the extractor registered as ``key`` (``my-faces`` -> ``my_faces``)."""
    return key.replace("-", "_")


def check_finite(out: dict[str, np.ndarray]) -> ExtractorResult:
    """Turn NaN/inf in any float output into a recorded failure instead of a poisoned shard."""
    for name, arr in out.items():
        if arr.dtype.kind == "f" and arr.size and not np.isfinite(arr).all():
            return ModalityFailure(f"{name} has {int((~np.isfinite(arr)).sum())} NaN/inf values")
    return out


def precision_context(device: str, precision: str) -> Any:
    """The context an encoder's forward runs in at ``precision``: nothing for fp32, else autocast to bf16 or
    fp16 on ``device``'s type (matrix products in the low precision, norms and softmax kept in fp32)."""
    if precision == "fp32":
        return nullcontext()
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device_type="cuda" if str(device).startswith("cuda") else "cpu", dtype=dtype)


def precision_provenance(precision: str) -> dict[str, str]:
    """What an encoder adds to its provenance for ``precision``: nothing at fp32 (so feature sets extracted
    before precision was a setting keep their hash), else ``{"precision": ...}``."""
    return {} if precision == "fp32" else {"precision": precision}


def to_device(tensor: Any, device: str) -> Any:
    """A CPU tensor on ``device``: on CUDA through pinned memory with a non-blocking copy, so the host side
    of the next batch overlaps the transfer."""
    if device.startswith("cuda"):
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
