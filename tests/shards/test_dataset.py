"""dataset.json read once into ShardDataset: its errors, shards per split, widths, train statistics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from shards import SCHEMA_VERSION, FeatureSetMismatch, SchemaError, ShardDataset, check_feature_set


def write(root: Path, **over) -> Path:
    obj = {
        "schema_version": SCHEMA_VERSION,
        "feature_set": {"extractors": {"video": {"name": "mediapipe-facemesh"}, "text": {"model": "t", "layer": 3}}},
        "feature_set_hash": "f00d",
        "dims": {"Dt": 11, "landmarks": 478},
        "counts": {"train": {"ok": 7}, "valid": {"ok": 2}},
        "shards": [
            {"name": "train-000001.tar", "split": "train", "samples": 3, "bytes": 30},
            {"name": "valid-000000.tar", "split": "valid", "samples": 2, "bytes": 20},
            {"name": "train-000000.tar", "split": "train", "samples": 4, "bytes": 40},
        ],
        "missing_shards": [],
        "complete": True,
        "stats": {"audio_feat.npy": {"count": 9, "mean": [1.0, 2.0, 3.0], "std": [0.5, 0.25, 2.0]}},
        **over,
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps(obj))
    # the train statistics as the first train shard's sidecar records them (count, mean, sum of squared deviations)
    first_train = {m: {"count": s["count"], "mean": s["mean"], "m2": [d * d * s["count"] for d in s["std"]]}
                   for m, s in obj["stats"].items()}  # fmt: skip
    for entry in obj["shards"]:  # each listed shard with a sidecar listing as many samples (the tar left empty)
        (root / entry["name"]).touch()
        keys = [f"{entry['name']}-{i}" for i in range(entry["samples"])]
        side = {"schema_version": SCHEMA_VERSION, "split": entry["split"], "keys": keys, "shard": entry["name"]}
        side["stats"], first_train = (first_train, {}) if entry["split"] == "train" else ({}, first_train)
        (root / entry["name"]).with_suffix(".json").write_text(json.dumps(side))
    return root


def test_load_reads_shards_widths_and_statistics(tmp_path: Path) -> None:
    ds = ShardDataset.load(write(tmp_path))
    assert ds.root == tmp_path and ds.feature_set_hash == "f00d" and ds.complete
    assert ds.splits == ["train", "valid"]
    assert [s.name for s in ds.split_shards("train")] == ["train-000000.tar", "train-000001.tar"]  # name order
    assert ds.split_samples("train") == 7 and ds.split_samples("test") == 0 and ds.split_shards("test") == []
    assert ds.path(ds.split_shards("valid")[0]) == tmp_path / "valid-000000.tar"
    assert ds.video_extractor == "mediapipe-facemesh" and ds.extractors["text"]["layer"] == 3
    assert ds.feature_width("text") == 11 and ds.feature_width("video") == 478 * 3
    assert ds.feature_width("audio") == 3  # no Da: the width of its train statistics
    stats = ds.train_stats("audio_feat.npy")
    assert stats is not None and stats.count == 9
    np.testing.assert_array_equal(stats.mean, [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(stats.std, [0.5, 0.25, 2.0])
    assert ds.train_stats("text_feat.npy") is None
    assert ShardDataset.of(ds) is ds and ShardDataset.of(tmp_path) == ds


def test_imported_video_features_use_dv_and_video_feat(tmp_path: Path) -> None:
    ds = ShardDataset.load(write(tmp_path, dims={"Dt": 11, "Dv": 35}))
    assert ds.imported_video and ds.feature_width("video") == 35 and ds.feature_member("video") == "video_feat.npy"
    assert ds.feature_member("text") == "text_feat.npy"
    assert ShardDataset.load(write(tmp_path / "b")).feature_member("video") == "video_lmk.npy"


def test_missing_foreign_or_broken_dataset_json_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SchemaError, match="dataset.json not found: is .* a directory written by `mmfuse extract`"):
        ShardDataset.load(tmp_path)
    (tmp_path / "dataset.json").write_text("{")
    with pytest.raises(SchemaError, match="is not valid JSON"):
        ShardDataset.load(tmp_path)
    with pytest.raises(SchemaError, match="has schema version 0; this mmfuse reads version"):
        ShardDataset.load(write(tmp_path, schema_version=0))


def test_a_checkpoint_record_has_no_shards_to_read(tmp_path: Path) -> None:
    ds = ShardDataset.from_json({"feature_set": {}, "feature_set_hash": "f00d", "stats": {}})
    assert ds.root is None and ds.shards == () and ds.video_extractor is None and ds.feature_width("text") is None
    entry = ShardDataset.load(write(tmp_path)).shards[0]
    with pytest.raises(SchemaError, match="no shard directory"):
        ds.path(entry)
    check_feature_set("f00d", ds)
    with pytest.raises(FeatureSetMismatch, match="expects features beef but the shards hold f00d"):
        check_feature_set("beef", ds)
