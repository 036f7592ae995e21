"""Raw video corpus -> WebDataset shards: manifest, decoding, extractors, the extraction pipeline.

``EXTRACTORS`` maps a name to a builder; builders import their model code only when called, so decoding workers
never load torch.
"""

from __future__ import annotations

from typing import Any

from extract.extractors.base import ExtractionError, Extractor, ModelNotFoundError
from extract.manifest import Clip, ManifestError, load_manifest


def _text(**kwargs: Any) -> Extractor:
    from extract.extractors.text import TextExtractor

    return TextExtractor(**kwargs)


def _audio(**kwargs: Any) -> Extractor:
    from extract.extractors.audio import AudioExtractor

    return AudioExtractor(**kwargs)


def _facemesh(**kwargs: Any) -> Extractor:
    from extract.extractors.facemesh import FaceMeshExtractor

    return FaceMeshExtractor(**kwargs)


EXTRACTORS = {"text": _text, "audio": _audio, "facemesh": _facemesh}


def get_extractor(name: str, **kwargs: Any) -> Extractor:
    """Build a registered extractor; an unknown name lists the valid ones."""
    if name not in EXTRACTORS:
        raise KeyError(f"unknown extractor {name!r}; valid names: {sorted(EXTRACTORS)}")
    return EXTRACTORS[name](**kwargs)


__all__ = [
    "EXTRACTORS",
    "Clip",
    "ExtractionError",
    "Extractor",
    "ManifestError",
    "ModelNotFoundError",
    "get_extractor",
    "load_manifest",
]
