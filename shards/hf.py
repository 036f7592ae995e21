"""Loading shard directories with Hugging Face ``datasets`` (its "webdataset" builder), with explicit features.

The builder infers column types from the first samples of the first tar, so a split whose samples differ in
which modalities they carry (a failed transcript, a clip without audio) would not load. ``hf_features``
declares every schema member (missing members become None) and the union of all ``meta.json`` fields, so any
shard directory loads. The builder decodes ``.npy`` members with ``allow_pickle=False``; before it reads a shard,
:func:`hf_features` has read every shard through ``shards.guard`` (via ``iter_shard``), so a compressed tar, a
link or a member over its cap is a SchemaError naming the shard and member, never handed to the builder.

``datasets`` is an optional dependency (``pip install 'mmfuse[hf]'``); it is imported only here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shards.dataset import ShardDataset
from shards.guard import ShardLimits
from shards.io import iter_shard

DTYPES = {"float16": "float16", "float32": "float32", "int64": "int64", "int32": "int32", "int16": "int16"}
DTYPES |= {"uint8": "uint8", "bool": "bool"}


def _datasets() -> Any:
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError("loading shards with Hugging Face datasets needs `pip install 'mmfuse[hf]'`") from exc
    return datasets


def hf_features(root: Path | str) -> Any:
    """``datasets.Features`` for every member of the schema (and those the records of ``root``'s dataset.json
    declare, see :mod:`shards.contract`) and every meta.json field of ``root``'s shards."""
    datasets = _datasets()
    import pyarrow as pa

    root = Path(root)
    metas = [s["meta.json"] for tar in sorted(root.glob("*.tar")) for s in iter_shard(tar, validate=False)]
    features: dict[str, Any] = {
        "__key__": datasets.Value("string"),
        "__url__": datasets.Value("string"),
        "meta.json": dict(datasets.Features.from_arrow_schema(pa.Table.from_pylist(metas).schema)),
    }
    for name, spec in ShardLimits.beside(root / "dataset.json").members.items():
        feature: Any = datasets.Value(DTYPES[spec.dtype])
        for _ in spec.shape:
            feature = datasets.List(feature)
        features[name] = feature
    return datasets.Features(features)


def load_hf_dataset(root: Path | str, splits: tuple[str, ...] | None = None, cache_dir: str | None = None) -> Any:
    """A ``datasets.DatasetDict`` with one split per shard split of ``root`` (or the given ``splits``); dataset.json
    is checked against the shards first (:meth:`shards.dataset.ShardDataset.load`)."""
    datasets = _datasets()
    root = Path(root)
    dataset = ShardDataset.load(root)  # dataset.json checked against the sidecars: no shard listed twice
    wanted = splits or tuple(dataset.splits)
    files = {split: [str(dataset.path(s)) for s in dataset.split_shards(split)] for split in wanted}
    return datasets.load_dataset(
        "webdataset", data_files={k: v for k, v in files.items() if v}, features=hf_features(root), cache_dir=cache_dir
    )
