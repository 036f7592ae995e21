"""The extractor registry: ``EXTRACTORS`` maps a name to a :class:`Registered` entry (re-exported as
``extract.EXTRACTORS``). An entry states what its extractor is (provenance name, modality, where it runs,
members written) without importing it, and builds it on call. A new extractor is one module plus one line here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from extract.extractors.base import ExtractionError, Extractor, RunsIn, read_settings


@dataclass(frozen=True)
class Registered:
    """A registry entry: ``entry(**kwargs)`` builds the extractor ``cls`` (``"module:Class"``, imported then,
    or the class itself). ``name``, ``modality``, ``runs_in`` and ``members`` repeat the class's attributes so
    they can be read without importing it; building checks that they agree."""

    cls: str | type[Extractor]
    name: str
    modality: str
    runs_in: RunsIn
    members: tuple[str, ...]

    def load(self) -> type[Extractor]:
        if not isinstance(self.cls, str):
            return self.cls
        module, _, attr = self.cls.partition(":")
        return getattr(importlib.import_module(module), attr)

    def __call__(self, **kwargs: Any) -> Extractor:
        return self._checked(self.load()(**kwargs))

    def settings(self, config: Any, key: str) -> Any:
        """The extractor's ``Settings`` read from an ``ExtractConfig``: its own fields from the section of its
        registry name ``key``, its shared ones from the general settings."""
        return read_settings(self.load().Settings, config, key)

    def build(self, settings: Any) -> Extractor:
        """The extractor for its ``Settings``."""
        return self._checked(self.load().from_settings(settings))

    def _checked(self, ex: Extractor) -> Extractor:
        declared = (self.name, self.modality, self.runs_in, tuple(self.members))
        actual = (ex.name, ex.modality, ex.runs_in, tuple(ex.members))
        if declared != actual:
            raise ExtractionError(
                f"registry entry for {self.cls} declares (name, modality, runs_in, members) {declared} but the "
                f"extractor has {actual}; make the entry in extract/__init__.py match the class"
            )
        return ex


EXTRACTORS: dict[str, Registered] = {
    "text": Registered(
        "extract.extractors.text:TextExtractor", name="text-transformer", modality="text", runs_in="encoder",
        members=("text_ids.npy", "text_feat.npy"),
    ),
    "audio": Registered(
        "extract.extractors.audio:AudioExtractor", name="speech-ssl", modality="audio", runs_in="encoder",
        members=("audio_feat.npy", "audio_mask.npy", "audio_time.npy", "audio_wave.npy"),
    ),
    "facemesh": Registered(
        "extract.extractors.facemesh:FaceMeshExtractor", name="mediapipe-facemesh", modality="video", runs_in="worker",
        members=("video_lmk.npy", "video_mask.npy", "video_time.npy", "video_norm.npy", "video_geom.npy"),
    ),
    # Speech recognition: with asr.model set, transcripts for clips whose manifest text is empty (the text
    # extractor then reads them); it fills no modality of its own.
    "asr": Registered(
        "extract.extractors.asr:WhisperTranscriber", name="whisper-asr", modality="transcript", runs_in="encoder",
        members=(),
    ),
}  # fmt: skip
DEFAULT_EXTRACTORS = {"text": "text", "audio": "audio", "video": "facemesh"}  # when several fill one modality


def get_extractor(name: str, **kwargs: Any) -> Extractor:
    """Build a registered extractor; an unknown name lists the valid ones."""
    if name not in EXTRACTORS:
        raise KeyError(f"unknown extractor {name!r}; valid names: {sorted(EXTRACTORS)}")
    return EXTRACTORS[name](**kwargs)


def extractor_for(modality: str) -> str:
    """The registry name of the extractor that fills ``modality``: the one registered for it or, when several
    are, the default one (``DEFAULT_EXTRACTORS``)."""
    names = [n for n, e in EXTRACTORS.items() if e.modality == modality]
    if len(names) == 1:
        return names[0]
    if DEFAULT_EXTRACTORS.get(modality) in names:
        return DEFAULT_EXTRACTORS[modality]
    raise ExtractionError(
        f"{len(names)} extractors registered for the {modality} modality ({names}) and none is its default "
        f"({DEFAULT_EXTRACTORS.get(modality)!r}); registered: {sorted(EXTRACTORS)}"
    )


def default_extractor(modality: str) -> str:
    """The extractor that fills ``modality`` unless the settings choose another (``extractors.video=NAME``):
    :func:`extractor_for`'s, else the ``DEFAULT_EXTRACTORS`` entry (which the settings' check then reports)."""
    try:
        return extractor_for(modality)
    except ExtractionError:
        return DEFAULT_EXTRACTORS.get(modality, "")


def registered_as(name: str | None, modality: str | None = None) -> str | None:
    """The registry key of the extractor with provenance name ``name`` (as dataset.json records it) that fills
    ``modality`` (any, when None), if one is registered."""
    return next((k for k, e in EXTRACTORS.items() if e.name == name and modality in (None, e.modality)), None)
