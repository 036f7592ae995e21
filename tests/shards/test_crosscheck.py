"""dataset.json checked across every sidecar: train statistics equal to the sidecars' merged, sample keys unique
across the directory, and each sidecar's recorded shard name equal to its file's."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from shards import SchemaError, ShardDataset, build_dataset
from shards.sidecar import ShardCheck
from tests.shards import test_tamper
from tests.shards.test_tamper import LAYOUT, rewrite_dataset_json, train_cli, verify
from tests.train.test_data import FEATURE_SET

PLANNED = [(split, i) for split, sizes in LAYOUT.items() for i in range(len(sizes))]


pristine, shards = test_tamper.pristine, test_tamper.shards  # the tamper tests' fixtures: a fresh copy each


def record_shard_names(root: Path) -> None:
    """Each sidecar records its shard's file name, as `mmfuse extract` writes it."""
    for side_path in root.glob("*-*.json"):
        side = json.loads(side_path.read_text())
        side["shard"] = side_path.with_suffix(".tar").name
        side_path.write_text(json.dumps(side))


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda stats: stats["text_feat.npy"].update(mean=[m + 100 for m in stats["text_feat.npy"]["mean"]]),
            r"stats.text_feat.npy.mean \(text\) differs from what the train shards' sidecars record in 5 of 5 "
            r"dimensions \(dimension 0: 100.5 in dataset.json, 0.5 from the sidecars\)",
        ),
        (
            lambda stats: stats["audio_feat.npy"].update(std=[1e-3] * len(stats["audio_feat.npy"]["std"])),
            r"stats.audio_feat.npy.std \(audio\) differs from what the train shards' sidecars record in 7 of 7 "
            r"dimensions \(dimension \d: 0.001 in dataset.json, 0.\d+ from the sidecars\)",
        ),
        (
            lambda stats: stats["video_lmk.npy"].update(count=stats["video_lmk.npy"]["count"] + 1),
            r"stats.video_lmk.npy.count \(video\) is \d+, but the train shards' sidecars record \d+ rows",
        ),
        (
            lambda stats: stats.pop("audio_feat.npy"),
            r"stats.audio_feat.npy \(audio\) is missing, but the train shards' sidecars record \d+ rows of it",
        ),
    ],
    ids=["text-mean+100", "audio-std-1e-3", "count", "member-removed"],
)
def test_edited_train_statistics_are_refused(shards: Path, tmp_path: Path, capsys, edit, message) -> None:
    rewrite_dataset_json(shards, lambda ds: edit(ds["stats"]))
    with pytest.raises(SchemaError, match=message):
        ShardDataset.load(shards)
    rc, out = verify(shards, capsys)
    assert rc == 1 and re.search(message, out) and "Traceback" not in out
    rc, out = train_cli(shards, tmp_path / "run", capsys)
    assert rc == 1 and re.search(message, out) and not (tmp_path / "run").exists()


def test_statistics_within_rounding_are_accepted(shards: Path, capsys) -> None:
    """dataset.json's statistics differ from the sidecars' merged by rounding only: no false alarm."""

    def nudge(ds: dict) -> None:
        for entry in ds["stats"].values():
            entry["mean"] = [m * (1 + 1e-9) for m in entry["mean"]]
            entry["std"] = [s * (1 - 1e-9) for s in entry["std"]]

    rewrite_dataset_json(shards, nudge)
    assert ShardDataset.load(shards).train_stats("text_feat.npy") is not None
    assert verify(shards, capsys)[0] == 0


def test_edited_sidecar_statistics_are_refused_too(shards: Path) -> None:
    side = json.loads((shards / "train-000001.json").read_text())
    side["stats"]["text_feat.npy"]["m2"][2] *= 50
    (shards / "train-000001.json").write_text(json.dumps(side))
    with pytest.raises(SchemaError, match=r"stats.text_feat.npy.std \(text\) differs .* in 1 of 5 dimensions"):
        ShardDataset.load(shards)
    side["stats"]["text_feat.npy"]["m2"] = "lots"
    (shards / "train-000001.json").write_text(json.dumps(side))
    with pytest.raises(SchemaError, match=r"sidecar train-000001.json: the statistics of text_feat.npy cannot be used"):
        ShardDataset.load(shards)


def copy_shard(root: Path, source: str, target: str) -> None:
    """``source``'s tar and sidecar copied to ``target`` and dataset.json rebuilt to list it, counts and statistics
    included (what a careless merge of two extractions, or a hostile edit, leaves)."""
    for suffix in (".tar", ".json"):
        shutil.copyfile(root / f"{source}{suffix}", root / f"{target}{suffix}")
    split, index = target.rsplit("-", 1)
    build_dataset(root, [*PLANNED, (split, int(index))], FEATURE_SET)


@pytest.mark.parametrize("target", ["train-000002", "test-000001"])
def test_copied_shard_is_refused(shards: Path, tmp_path: Path, capsys, target: str) -> None:
    copy_shard(shards, "train-000000", target)
    assert len(ShardDataset.from_json(json.loads((shards / "dataset.json").read_text())).shards) == 5
    message = (
        f"sample train0__c0 is in both train-000000.tar and {target}.tar (and 2 more they share); sample keys must be "
        "unique across the directory"
    )
    with pytest.raises(SchemaError, match=re.escape(message)):
        ShardDataset.load(shards)
    rc, out = verify(shards, capsys)
    assert rc == 1 and message in out
    rc, out = train_cli(shards, tmp_path / "run", capsys)
    assert rc == 1 and message in out and not (tmp_path / "run").exists()


def test_sidecars_record_their_shard_and_a_copy_says_so(shards: Path, capsys) -> None:
    assert verify(shards, capsys)[0] == 0  # sidecars without their shard's name (older ones) keep loading
    record_shard_names(shards)
    assert ShardDataset.load(shards).split_samples("train") == 5 and verify(shards, capsys)[0] == 0
    copy_shard(shards, "train-000000", "train-000002")
    named = (
        "its sidecar train-000002.json records shard 'train-000000.tar', but it lies beside train-000002.tar; "
        "it is a copy of another shard (or of its sidecar): remove it"
    )
    with pytest.raises(SchemaError, match=re.escape(named)):
        ShardDataset.load(shards)
    rc, out = verify(shards, capsys)
    assert rc == 1 and named in out and "sample train0__c0 is in both train-000000.tar and train-000002.tar" in out
    with pytest.raises(SchemaError, match=re.escape(named)):  # the check each training worker makes per shard
        ShardCheck.load(shards / "train-000002.tar", "train", "meta")
    side = json.loads((shards / "train-000001.json").read_text())
    side["shard"] = 7
    (shards / "train-000001.json").write_text(json.dumps(side))
    with pytest.raises(SchemaError, match="sidecar train-000001.json: 'shard' is 7, not its shard's file name"):
        ShardCheck.load(shards / "train-000001.tar", "train")
