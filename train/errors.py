"""Errors of training that the settings (:mod:`train.config`) raise as well as the pipeline, in a leaf module, so
that reading the settings loads no pipeline code. The modules that raise them import them from here or from their
old home (``train.inputs.DataError``)."""

from __future__ import annotations

from mmfuse.errors import MmfuseError


class DataError(MmfuseError, ValueError):
    """The data pipeline cannot be built or fed as asked (config, split, labels, statistics)."""
