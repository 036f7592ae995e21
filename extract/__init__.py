"""Raw video corpus -> WebDataset shards: manifest, decoding, extractors, the extraction pipeline.

``EXTRACTORS`` (kept in :mod:`extract.registry`) maps a name to a builder: a :class:`Registered` entry,
called with the extractor's keyword arguments. An entry imports its extractor's module only when it builds one,
so decoding workers never load torch, and it states what the extractor is (provenance name, modality, where it
runs, members written) without importing anything. The pipeline fills each modality with the extractor
registered for it.

``extract_clip`` (:func:`extract.clip.extract_clip`) extracts one clip into the sample dict a shard would hold.
"""

from __future__ import annotations

from typing import Any

from extract.extractors.base import ExtractionError, Extractor, ModelNotFoundError
from extract.manifest import Clip, ManifestError, load_manifest
from extract.registry import DEFAULT_EXTRACTORS, EXTRACTORS, Registered, extractor_for, get_extractor, registered_as


def __getattr__(name: str) -> Any:
    if name == "extract_clip":  # on first use: extract.clip imports the decoder, which `import extract` need not
        from extract.clip import extract_clip

        return extract_clip
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_EXTRACTORS",
    "EXTRACTORS",
    "Clip",
    "ExtractionError",
    "Extractor",
    "ManifestError",
    "ModelNotFoundError",
    "Registered",
    "extract_clip",
    "extractor_for",
    "get_extractor",
    "load_manifest",
    "registered_as",
]
