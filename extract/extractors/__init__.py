"""Extractors, one module each, behind the interface in :mod:`extract.extractors.base`."""

from extract.extractors.base import (
    DecodedClip,
    ExtractionError,
    Extractor,
    ExtractorResult,
    ModalityFailure,
    ModelNotFoundError,
)

__all__ = ["DecodedClip", "ExtractionError", "Extractor", "ExtractorResult", "ModalityFailure", "ModelNotFoundError"]
