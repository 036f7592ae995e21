"""mmfuse: raw talking-face video -> WebDataset shards -> multimodal fusion models.

This package is the command line (``mmfuse``, ``python -m mmfuse``) and the stable names other code relies on
(SPEC section 11), re-exported from the packages that own them and imported only when first used, so that
``import mmfuse`` (which every spawned extraction worker pays) does not load torch:

    mmfuse.SCHEMA_VERSION, mmfuse.validate_sample, mmfuse.SchemaError   (shards.schema)
    mmfuse.EXTRACTORS                                                   (extract)
    mmfuse.MODELS                                                       (fusion)
    mmfuse.ESTIMATORS                                                   (fusion.estimators)
    mmfuse.sentiment_metrics                                            (train.metrics)
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("mmfuse")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

_EXPORTS = {
    "SCHEMA_VERSION": "shards.schema",
    "validate_sample": "shards.schema",
    "SchemaError": "shards.schema",
    "EXTRACTORS": "extract",
    "MODELS": "fusion",
    "ESTIMATORS": "fusion.estimators",
    "sentiment_metrics": "train.metrics",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mmfuse' has no attribute {name!r}")
