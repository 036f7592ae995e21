"""What the model gets from a shard directory: the input width of each modality and the label of each sample.

Widths come from dataset.json (:class:`shards.dataset.ShardDataset`) alone, so a model can be built before a
shard is read; labels come from a sample's ``meta.json`` ``labels``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from shards.dataset import ShardDataset
from shards.schema import MODALITIES, SchemaError
from train.config import label_keys  # noqa: F401 (its home before train.config; read by train.stages, train.data)
from train.errors import DataError


def has_video_geom(dataset: ShardDataset | str | Path) -> bool:
    """Whether the shards' video record names extra inputs (FaceMesh's ``video_geom.npy``) to join after the
    feature, decided from dataset.json alone (:attr:`shards.dataset.ShardDataset.contracts`)."""
    c = ShardDataset.of(dataset).contracts.get("video")
    return c is not None and bool(c.extra)


def feature_dims(
    dataset: ShardDataset | str | Path, modalities: Sequence[str] = MODALITIES, video_geom: bool | None = None
) -> dict[str, int]:
    """Input width per modality, for ``FusionConfig.dims``, from dataset.json's records (loaded, or the shard dir).

    Each modality's record ``width`` (text Dt, audio Da, video 478 * 3 landmark coordinates for FaceMesh, Dv for
    imported features, whatever its extractor declares otherwise), plus for video the widths of the record's
    ``extra`` inputs (FaceMesh's 4 geometry features) when ``video_geom``, by default when the record names any.
    """
    ds = ShardDataset.of(dataset)
    out: dict[str, int] = {}
    for m in modalities:
        if m not in MODALITIES:
            raise DataError(f"unknown modality {m!r}; valid: {', '.join(MODALITIES)}")
        try:
            c = ds.contract(m)
        except SchemaError as exc:
            raise DataError(f"dataset.json has no width for {m}: {exc}") from None
        geom = has_video_geom(ds) if video_geom is None else video_geom
        out[m] = c.width + (c.extra_width if m == "video" and geom else 0)
    return out


def scalar_label(meta: Mapping[str, Any], label_key: str) -> float:
    """The sample's number under ``label_key`` (regression, classification); NaN when it has none."""
    value = (meta.get("labels") or {}).get(label_key)
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(
            f"sample {meta.get('key')}: label {label_key!r} is {value!r}, not a number; choose a numeric "
            f"label_key (this sample has {sorted(meta.get('labels') or {})})"
        )
    return float(value)


def binary_labels(meta: Mapping[str, Any], keys: Sequence[str]) -> np.ndarray:
    """(K,) float32 multilabel target in the order of ``keys``: 0/1 (booleans count), NaN where a key is absent,
    which leaves the whole sample out of losses and metrics."""
    labels = meta.get("labels") or {}
    out = np.full(len(keys), np.nan, np.float32)
    for k, key in enumerate(keys):
        value = labels.get(key)
        if value is None:
            continue
        if not isinstance(value, (bool, int, float)) or value not in (0, 1):
            raise DataError(
                f"sample {meta.get('key')}: label {key!r} is {value!r}, not 0/1 or a boolean; task=multilabel needs "
                f"a binary label under every key of label_key (this sample has {sorted(labels)})"
            )
        out[k] = float(value)
    return out
