"""Manifest formats (MMSA label.csv, JSONL, optional columns) and the command-line contract."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import MEDIA, ROOT, write_manifest

from extract.config import ConfigError, make_config
from extract.manifest import ManifestError, load_manifest

MMSA_COLUMNS = ["video_id", "clip_id", "text", "label", "label_T", "label_A", "label_V", "annotation", "mode"]


def test_mmsa_label_csv_as_is(tmp_path):
    rows = [
        {"video_id": "grid", "clip_id": "bbaf2n", "text": "bin blue", "label": "-0.6", "label_T": "-1", "label_A": "",
         "label_V": "0.2", "annotation": "Negative", "mode": "train"},
        {"video_id": "faces", "clip_id": "face_noface", "text": "hi", "label": "1.2", "annotation": "Positive", "mode": "test"},
    ]  # fmt: skip
    clips = load_manifest(write_manifest(tmp_path / "label.csv", rows, MMSA_COLUMNS), MEDIA)
    assert [c.key for c in clips] == ["grid__bbaf2n", "faces__face_noface"]
    assert clips[0].path == (MEDIA / "grid" / "bbaf2n.mpg").resolve()  # other extensions than .mp4 found
    assert clips[1].media == "faces/face_noface.mov"
    assert clips[0].labels == {"label": -0.6, "label_T": -1.0, "label_V": 0.2, "annotation": "Negative"}
    assert [c.split for c in clips] == ["train", "test"] and clips[0].row == 2


def test_jsonl_with_optional_columns(tmp_path):
    lines = [
        {"video_id": "g", "clip_id": "1", "text": "set white", "split": "dev", "path": "grid/id2_vcd_swwp2s.mpg",
         "start": 0.5, "end": 2.2, "labels": {"happy": 1, "sad": 0}, "words": [["set", 0.49, 0.77], ["white", 0.77, 1.09]]},
    ]  # fmt: skip
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    (clip,) = load_manifest(tmp_path / "m.jsonl", MEDIA)
    assert clip.split == "valid" and (clip.start, clip.end) == (0.5, 2.2)
    assert clip.labels == {"happy": 1, "sad": 0} and clip.words == [("set", 0.49, 0.77), ("white", 0.77, 1.09)]


def test_missing_columns_and_bad_jsonl(tmp_path):
    with pytest.raises(ManifestError, match=r"missing column\(s\) \['text'\]"):
        load_manifest(write_manifest(tmp_path / "m.csv", [{"video_id": "a", "clip_id": "b"}]), MEDIA)
    (tmp_path / "bad.jsonl").write_text('{"video_id": "a"}\nnot json\n[1]\n')
    with pytest.raises(ManifestError) as err:
        load_manifest(tmp_path / "bad.jsonl", MEDIA)
    assert "line 2: not valid JSON" in str(err.value) and "line 3: expected a JSON object" in str(err.value)


def test_config_collects_every_problem(tmp_path):
    (tmp_path / "c.yaml").write_text("shard_size: 0\nfps: -3\nbogus: 1\nworkers: many\n")
    with pytest.raises(ConfigError) as err:
        make_config(tmp_path / "c.yaml")
    msg = str(err.value)
    assert "unknown setting 'bogus'" in msg and "workers:" in msg
    with pytest.raises(ConfigError) as err:
        make_config(None, shard_size=0, fps=-3, modalities="text,smell", rank=2, world_size=2)
    msg = str(err.value)
    for needle in ("shard_size: must be >= 1", "fps: must be > 0", "subset of ['text', 'audio', 'video']", "rank: 2"):
        assert needle in msg
    assert make_config(None, modalities="text, audio").modalities == ("text", "audio")


def run_cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "mmfuse", *args], cwd=ROOT, capture_output=True, text=True, **kw)


def test_cli_exit_codes_and_help(tmp_path):
    res = run_cli("extract", "--help")
    assert res.returncode == 0 and "examples:" in res.stdout and "--world-size" in res.stdout
    assert run_cli("inspect", "--help").returncode == 0
    assert run_cli("extract").returncode == 2  # usage
    assert run_cli("frobnicate").returncode == 2
    res = run_cli("extract", str(tmp_path / "none.csv"), "--media-root", str(MEDIA), "--out", str(tmp_path / "o"))
    assert res.returncode == 1 and "does not exist" in res.stderr and "Traceback" not in res.stderr
    res = run_cli("inspect", str(tmp_path))
    assert res.returncode == 1 and "dataset.json not found" in res.stderr


def test_cli_inspect_json_and_verify(bundled_dataset):
    res = run_cli("inspect", str(bundled_dataset), "--verify", "--json")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["samples"] == 4 and summary["verify"]["ok"] and summary["verify"]["samples_checked"] == 4
    assert summary["verify"]["warnings"] == []  # extraction records every member's digest in the sidecars
    assert summary["coverage"]["text"] == {"failed": 1, "ok": 3}


def test_cli_verify_reports_damaged_shard(bundled_dataset, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(bundled_dataset, copy)
    data = (copy / "train-000000.tar").read_bytes()
    (copy / "train-000000.tar").write_bytes(data[: len(data) // 3])
    res = run_cli("inspect", str(copy), "--verify")
    assert res.returncode == 1 and "train-000000.tar" in res.stdout and "PROBLEM" in res.stdout
