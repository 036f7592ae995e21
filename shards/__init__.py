"""The shard schema and shard I/O (no model code): what `mmfuse extract` writes and training reads."""

from collections.abc import Callable

from shards.dataset import (
    DATASET_JSON,
    STATUS_JSONL,
    FeatureSetMismatch,
    MemberStats,
    ShardDataset,
    ShardEntry,
    build_dataset,
    check_feature_set,
    feature_set_hash,
    load_dataset_json,
    read_sidecar,
    shard_name,
)
from shards.io import DiskFullError, ShardWriter, decode_member, encode_member, iter_shard
from shards.schema import MEMBERS, MODALITIES, SCHEMA_VERSION, SchemaError, make_key, validate_sample

# How every long-running function of the project reports progress: ``progress(done, total)``, items done so far
# and items in all (None while unknown). The command line turns it into a bar (mmfuse.terminal).
Progress = Callable[[int, int | None], None]

__all__ = [
    "DATASET_JSON",
    "MEMBERS",
    "MODALITIES",
    "Progress",
    "SCHEMA_VERSION",
    "STATUS_JSONL",
    "DiskFullError",
    "FeatureSetMismatch",
    "MemberStats",
    "SchemaError",
    "ShardDataset",
    "ShardEntry",
    "ShardWriter",
    "build_dataset",
    "check_feature_set",
    "decode_member",
    "encode_member",
    "feature_set_hash",
    "iter_shard",
    "load_dataset_json",
    "make_key",
    "read_sidecar",
    "shard_name",
    "validate_sample",
]
