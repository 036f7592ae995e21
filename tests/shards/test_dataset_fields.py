"""Numbers in dataset.json are type- and range-checked where it is read (one SchemaError naming the field and its
value, never a traceback), and extraction refuses settings that would record out-of-range ones."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from conftest import MEDIA, write_manifest

from extract.config import ConfigError, make_config
from extract.outdir import recorded_max_duration
from mmfuse.cli import main
from shards import SchemaError, ShardDataset, iter_shard, load_dataset_json
from shards.guard import ShardLimits
from tests.shards import test_tamper
from tests.shards.test_tamper import rewrite_dataset_json, train_cli, verify

pristine, shards = test_tamper.pristine, test_tamper.shards  # the tamper tests' fixtures: a fresh copy each


def put(path: str, value):
    """An edit of dataset.json setting the field at ``path`` (``shards/0/samples``) to ``value``."""

    def edit(ds: dict) -> None:
        *parents, last = path.split("/")
        for part in parents:
            ds = ds[int(part)] if isinstance(ds, list) else ds[part]
        ds[int(last) if isinstance(ds, list) else last] = value

    return edit


CASES = {
    "max_duration_s": (put("max_duration_s", 1e308), r"'max_duration_s' is 1e\+308, outside \(0, 86400\]"),
    "fps": (put("feature_set/fps", 1e308), r"'feature_set.fps' is 1e\+308, outside \(0, 240\]"),
    "nan": (put("max_duration_s", math.nan), r"'max_duration_s' is nan, not a finite number"),
    "count-text": (put("counts/train/ok", "5"), r"'counts.train.ok' is '5', not an integer"),
    "count-negative": (put("counts/valid/ok", -3), r"'counts.valid.ok' is -3, outside \[0, 9007199254740992\]"),
    "entry-samples": (put("shards/0/samples", -1), r"'shards\[0\].samples' is -1, outside \[0, "),
    "entry-bytes": (put("shards/2/bytes", 1.5), r"'shards\[2\].bytes' is 1.5, not an integer"),
    "total": (put("samples", 1e308), r"'samples' is 1e\+308, not an integer"),
    "width": (put("dims/Dt", 10**12), r"'dims.Dt' is 1000000000000, outside \[1, 65536\]"),
    "sample-rate": (put("feature_set/sample_rate", 8000), r"'feature_set.sample_rate' is 8000; it must be 16000"),
    "feature-set-inf": (
        put("feature_set/extractors/text/layer", math.inf),
        r"'feature_set.extractors.text.layer' is inf",
    ),
    "stats-count": (put("stats/text_feat.npy/count", "many"), r"'stats.text_feat.npy.count' is 'many', not an integer"),
    "stats-std": (put("stats/audio_feat.npy/std/0", -1.0), r"'stats.audio_feat.npy.std' holds a negative standard"),
    "counts-shape": (put("counts/test", 3), r"'counts.test' is 3, not an object of counts by status"),
    "missing": (put("missing_shards", 12), r"'missing_shards' is 12, not a list of shard names"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_out_of_range_numbers_in_dataset_json_are_one_clear_error(shards: Path, tmp_path: Path, capsys, case) -> None:
    edit, message = CASES[case]
    rewrite_dataset_json(shards, edit)
    with pytest.raises(SchemaError, match=message):
        load_dataset_json(shards)
    with pytest.raises(SchemaError, match=message):
        ShardDataset.load(shards)
    for argv in (["inspect", str(shards)], ["report", str(shards), "--out", str(tmp_path / "report")]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert re.search(message, err) and "Traceback" not in err
    rc, out = verify(shards, capsys)
    assert rc == 1 and re.search(message, out)
    rc, out = train_cli(shards, tmp_path / "run", capsys)
    assert rc == 1 and re.search(message, out) and not (tmp_path / "run").exists()


def test_a_huge_value_is_quoted_cut_short(shards: Path) -> None:
    rewrite_dataset_json(shards, put("counts/train/ok", "9" * 100_000))
    with pytest.raises(SchemaError) as info:
        load_dataset_json(shards)
    assert "'counts.train.ok' is '99999" in str(info.value) and len(str(info.value)) < 600


def test_member_caps_refuse_out_of_range_rates_and_a_shard_alone_still_reads(shards: Path) -> None:
    with pytest.raises(SchemaError, match=r"dataset.json: 'max_duration_s' is 1e\+308, outside \(0, 86400\]"):
        ShardLimits.derive({"Dt": 5}, {"fps": 25}, max_duration_s=1e308)
    with pytest.raises(SchemaError, match=r"'feature_set.fps' is nan, not a finite number"):
        ShardLimits.of_dataset({"feature_set": {"fps": math.nan}})
    rewrite_dataset_json(shards, put("feature_set/fps", 1e308))
    # a shard read on its own falls back to the default caps when the dataset.json beside it is unusable
    assert ShardLimits.beside(shards / "valid-000000.tar") == ShardLimits.derive()
    assert [s["__key__"] for s in iter_shard(shards / "valid-000000.tar")] == ["valid0__c0", "valid0__c1", "valid0__c2"]


@pytest.mark.parametrize(
    "setting, value, message",
    [
        ("max_duration_s", "1e308", "max_duration_s: must be > 0 and <= 86400, got 1e+308"),
        ("max_duration_s", ".nan", "max_duration_s: nan is not a finite number"),
        ("fps", "1e308", "fps: must be > 0 and <= 240, got 1e+308"),
        ("audio_chunk_s", "1e308", "audio.chunk_s: must be >= 1 and <= 600, got 1e+308"),
        ("min_detection_confidence", "2", "facemesh.min_detection_confidence: must be >= 0 and <= 1, got 2.0"),
    ],
)
def test_extraction_settings_are_bounded(tmp_path: Path, capsys, setting: str, value: str, message: str) -> None:
    (tmp_path / "c.yaml").write_text(f"{setting}: {value}\n")
    with pytest.raises(ConfigError, match=re.escape(message)):
        make_config(tmp_path / "c.yaml")
    manifest = write_manifest(tmp_path / "m.csv", [{"video_id": "grid", "clip_id": "bbaf2n", "text": "hi"}])
    out = tmp_path / "out"
    rc = main(
        ["extract", str(manifest), "--media-root", str(MEDIA), "--out", str(out), "--config", str(tmp_path / "c.yaml")]
    )
    err = capsys.readouterr().err
    assert rc == 1 and message in err and "Traceback" not in err and not (out / "dataset.json").exists()


def test_an_edited_max_duration_is_not_carried_into_the_next_dataset_json(tmp_path: Path) -> None:
    for old, expected in ((1e308, 600.0), (math.nan, 600.0), (7200.0, 7200.0), (86400.0, 86400.0)):
        (tmp_path / "dataset.json").write_text(json.dumps({"max_duration_s": old}))
        assert recorded_max_duration(tmp_path, 600.0) == expected
