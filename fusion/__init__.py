"""Information-theoretic multimodal fusion models and the mutual-information estimators they share.

This package depends only on torch. ``MODELS`` maps a name to a model class (each with its typed
``Config``); ``build_model(name, **settings)`` validates the settings and builds it. The batch / output
interface every model follows is documented in :mod:`fusion.base`; shared estimators live in
:mod:`fusion.estimators`.
"""

from __future__ import annotations

from typing import Any

from fusion.base import MODALITIES, TASKS, FusionConfig, FusionConfigError, FusionModel, FusionOutput, make_config
from fusion.models.bc_pmjrs import BCPMJRS
from fusion.models.early import EarlyFusion
from fusion.models.ithp import ITHP
from fusion.models.late import LateFusion
from fusion.models.mim import MIM
from fusion.models.mult import MulT
from fusion.models.tcmax import TCMax

MODELS: dict[str, type[FusionModel]] = {
    "late": LateFusion,
    "bc_pmjrs": BCPMJRS,
    "mult": MulT,
    "mim": MIM,
    "ithp": ITHP,
    "early": EarlyFusion,
    "tcmax": TCMax,
}


class UnknownModelError(KeyError, ValueError):
    """Raised for a model name not in ``MODELS``; the message lists the valid names."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def get_model_class(name: str) -> type[FusionModel]:
    """The class registered as ``name``; an unknown name raises ``UnknownModelError`` listing valid names."""
    if name not in MODELS:
        raise UnknownModelError(f"unknown model {name!r}; valid models: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def build_model(name: str, **settings: Any) -> FusionModel:
    """Build model ``name`` from plain settings (its ``Config`` fields); every bad key or value is reported."""
    cls = get_model_class(name)
    return cls(make_config(cls.Config, settings))


__all__ = [
    "MODALITIES",
    "MODELS",
    "TASKS",
    "FusionConfig",
    "FusionConfigError",
    "FusionModel",
    "FusionOutput",
    "UnknownModelError",
    "build_model",
    "get_model_class",
    "make_config",
]
