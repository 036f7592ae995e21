"""Crash safety and scale-out: kill -9 mid-run then rerun; two ranks; feature-set hash sensitivity."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter

import pytest
from conftest import MEDIA, ROOT, bundled_rows, write_manifest

from extract.pipeline import run_extract
from shards import iter_shard, load_dataset_json, read_sidecar
from shards.io import host_name

CLIPS = ["grid/bbaf2n.mpg", "grid/pwij3p.mpg", "grid/id2_vcd_swwp2s.mpg"]


def many_rows(n: int) -> list[dict]:
    splits = ["train", "train", "valid", "test"]
    return [
        {
            "video_id": f"v{i % 3}",
            "clip_id": f"c{i}",
            "text": f"clip number {i}",
            "mode": splits[i % 4],
            "path": CLIPS[i % 3],
        }
        for i in range(n)
    ]


def keys_in_shards(out) -> Counter:
    found = Counter()
    for tar in sorted(out.glob("*.tar")):
        found.update(s["__key__"] for s in iter_shard(tar))
    return found


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "mmfuse", *args]


@pytest.mark.integration
def test_kill_mid_run_then_rerun_gives_every_clip_once(tmp_path, tiny_text_model, tiny_audio_model):
    import webdataset as wds

    manifest = write_manifest(tmp_path / "m.csv", many_rows(8))
    out = tmp_path / "out"
    args = cli(
        "extract", str(manifest), "--media-root", str(MEDIA), "--out", str(out), "--shard-size", "1",
        "--workers", "1", "--text-model", str(tiny_text_model), "--audio-model", str(tiny_audio_model), "-q",
    )  # fmt: skip
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300  # generous: a loaded machine starts the workers slowly
    while time.time() < deadline and len(list(out.glob("*-*.json"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = {p.stem for p in out.glob("*-*.json")}
    assert 2 <= len(done_before) < 8, "the kill should land mid-run"
    mtimes = {name: (out / f"{name}.tar").stat().st_mtime_ns for name in done_before}
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert not list(out.glob("*.tmp-*"))
    for name in done_before:  # complete shards were skipped, not rewritten
        assert (out / f"{name}.tar").stat().st_mtime_ns == mtimes[name]
    counts = keys_in_shards(out)
    expected = {f"v{i % 3}__c{i}" for i in range(8)}
    assert set(counts) == expected and set(counts.values()) == {1}
    for tar in out.glob("*.tar"):
        with tarfile.open(tar) as t:
            assert len(t.getnames()) > 0
    wds_keys = [s["__key__"] for s in wds.WebDataset([str(p) for p in sorted(out.glob("*.tar"))], shardshuffle=False)]
    assert sorted(wds_keys) == sorted(expected)
    ds = load_dataset_json(out)
    assert ds["complete"] and ds["samples"] == 8


def extract_args(manifest, out, text_model, audio_model, *extra: str) -> list[str]:
    return cli(
        "extract", str(manifest), "--media-root", str(MEDIA), "--out", str(out), "--shard-size", "2",
        "--workers", "0", "--modalities", "text,audio", "--text-model", str(text_model),
        "--audio-model", str(audio_model), "--no-progress", *extra,
    )  # fmt: skip


def assert_complete_once(out, n: int) -> None:
    counts = keys_in_shards(out)
    assert set(counts) == {f"v{i % 3}__c{i}" for i in range(n)} and set(counts.values()) == {1}
    ds = load_dataset_json(out)
    assert ds["complete"] and ds["samples"] == n and not ds["missing_shards"]
    assert not list(out.glob("*.tmp-*")) and not list(out.glob("*.lock"))


@pytest.mark.integration
def test_second_rank_started_later_leaves_the_first_ranks_work_alone(tmp_path, tiny_text_model, tiny_audio_model):
    manifest = write_manifest(tmp_path / "m.csv", many_rows(16))
    out = tmp_path / "out"
    args = [extract_args(manifest, out, tiny_text_model, tiny_audio_model, "--rank", str(r), "--world-size", "2")
            for r in (0, 1)]  # fmt: skip
    first = subprocess.Popen(args[0], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list(out.glob("*.tmp-r0-*")) and first.poll() is None:
        time.sleep(0.02)
    assert first.poll() is None, "rank 0 should still be writing"
    second = subprocess.run(args[1], cwd=ROOT, capture_output=True, text=True, timeout=300)
    out0, err0 = first.communicate(timeout=300)
    assert first.returncode == 0 and second.returncode == 0, err0 + second.stderr
    assert_complete_once(out, 16)


@pytest.mark.integration
def test_two_whole_runs_at_once_write_every_clip_once(tmp_path, tiny_text_model, tiny_audio_model):
    manifest = write_manifest(tmp_path / "m.csv", many_rows(12))
    out = tmp_path / "out"
    args = extract_args(manifest, out, tiny_text_model, tiny_audio_model)
    runs = [subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]  # fmt: skip
    results = [run.communicate(timeout=300) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], results
    assert_complete_once(out, 12)
    written = [int(re.search(r"wrote (\d+) samples", stdout)[1]) for stdout, _ in results]
    assert sum(written) == 12  # no clip extracted twice


def test_partial_shard_is_redone(tmp_path, tiny_cfg):
    manifest = write_manifest(tmp_path / "m.csv", many_rows(4))
    out = tmp_path / "out"
    cfg = tiny_cfg(shard_size=2, modalities=("text", "audio"))
    run_extract(manifest, MEDIA, out, cfg)
    # Simulate a crash: one shard half-written under a temp name, another committed tar without its sidecar.
    (out / "train-000000.json").unlink()
    (out / "train-000000.tar").write_bytes(b"garbage")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = out / f"valid-000000.tar.tmp-r0-p{int(gone.stdout)}-{host_name()}"  # its writer has exited
    stale.write_bytes(b"partial")
    before = (out / "test-000000.tar").stat().st_mtime_ns
    summary = run_extract(manifest, MEDIA, out, cfg)
    assert summary["shards_written"] == 1 and summary["complete"]
    assert (out / "test-000000.tar").stat().st_mtime_ns == before
    assert not stale.exists()
    assert set(keys_in_shards(out).values()) == {1} and sum(keys_in_shards(out).values()) == 4


def test_two_ranks_write_disjoint_shards_covering_the_manifest(tmp_path, tiny_cfg):
    rows = many_rows(10)
    manifest = write_manifest(tmp_path / "m.csv", rows)
    out = tmp_path / "out"
    s0 = run_extract(manifest, MEDIA, out, tiny_cfg(shard_size=2, rank=0, world_size=2, modalities=("text", "audio")))
    assert not s0["complete"]
    rank0 = {p.name for p in out.glob("*.tar")}
    s1 = run_extract(manifest, MEDIA, out, tiny_cfg(shard_size=2, rank=1, world_size=2, modalities=("text", "audio")))
    assert s1["complete"]
    rank1 = {p.name for p in out.glob("*.tar")} - rank0
    assert rank0 and rank1 and not rank0 & rank1
    assert {read_sidecar(out / n.replace(".tar", ".json"))["rank"] for n in rank1} == {1}
    counts = keys_in_shards(out)
    assert set(counts) == {f"v{i % 3}__c{i}" for i in range(10)} and set(counts.values()) == {1}
    assert load_dataset_json(out)["samples"] == 10


def test_rank_defaults_from_torchrun_and_slurm():
    from extract.config import rank_from_env

    assert rank_from_env({"RANK": "3", "WORLD_SIZE": "4"}) == (3, 4)
    assert rank_from_env({"SLURM_PROCID": "1", "SLURM_NTASKS": "2"}) == (1, 2)
    assert rank_from_env({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "8"}) == (5, 8)
    # an array that starts at 1 (--array=1-8) or steps (--array=0-14:2) still gives ranks 0..7
    assert rank_from_env({"SLURM_ARRAY_TASK_ID": "8", "SLURM_ARRAY_TASK_COUNT": "8", "SLURM_ARRAY_TASK_MIN": "1"}) == (
        7,
        8,
    )
    stepped = {"SLURM_ARRAY_TASK_ID": "6", "SLURM_ARRAY_TASK_COUNT": "8", "SLURM_ARRAY_TASK_MIN": "0"}
    assert rank_from_env({**stepped, "SLURM_ARRAY_TASK_STEP": "2"}) == (3, 8)
    assert rank_from_env({}) == (0, 1)


def test_cuda_under_torchrun_takes_the_local_rank_gpu(monkeypatch):
    import torch

    from extract.config import local_device

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert local_device("cuda", {"LOCAL_RANK": "2"}) == "cuda:2"
    assert local_device("cuda", {"LOCAL_RANK": "5"}) == "cuda:1"  # more ranks than GPUs: shared round robin
    assert local_device("cuda", {}) == "cuda"  # not under torchrun
    assert local_device("cuda:3", {"LOCAL_RANK": "1"}) == "cuda:3"  # an explicit index wins
    assert local_device("cpu", {"LOCAL_RANK": "1"}) == "cpu"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert local_device("cuda", {"LOCAL_RANK": "1"}) == "cuda"  # left to the CUDA check


def test_extract_command_passes_the_local_rank_gpu(monkeypatch, tmp_path):
    import torch

    import extract.pipeline
    from mmfuse.cli import main

    seen = {}

    def fake_run_extract(manifest, media_root, out, cfg, progress=None):
        seen["cfg"] = cfg
        return {
            "samples_written": 0,
            "shards_written": 0,
            "shards_this_rank": 0,
            "out": out,
            "wall_s": 0.0,
            "counts": {},
            "complete": True,
        }

    monkeypatch.setattr(extract.pipeline, "run_extract", fake_run_extract)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    for name, value in {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3"}.items():
        monkeypatch.setenv(name, value)
    assert main(["extract", "m.csv", "--out", str(tmp_path), "--device", "cuda", "-q", "--no-progress"]) == 0
    assert (seen["cfg"].device, seen["cfg"].rank, seen["cfg"].world_size) == ("cuda:3", 3, 8)


def test_feature_set_hash_changes_with_model_and_fps(tmp_path, tiny_cfg, tiny_text_model):
    from extract.pipeline import build_extractors, describe_feature_set
    from shards.dataset import feature_set_hash

    def fs_hash(**kw):
        cfg = tiny_cfg(modalities=("text", "video"), **kw)
        return feature_set_hash(describe_feature_set(cfg, build_extractors(cfg)))

    base = fs_hash()
    assert fs_hash() == base
    assert fs_hash(fps=25) != base
    assert fs_hash(fps=25) != fs_hash(fps=15)
    assert fs_hash(text_layer=0) != base
    assert fs_hash(text_model="all-MiniLM-L6-v2") != base


def test_refuses_other_feature_set_without_overwrite(tmp_path, tiny_cfg):
    from extract import ExtractionError

    manifest = write_manifest(tmp_path / "m.csv", many_rows(2))
    out = tmp_path / "out"
    run_extract(manifest, MEDIA, out, tiny_cfg(modalities=("text",)))
    with pytest.raises(ExtractionError, match="another feature set.*--overwrite"):
        run_extract(manifest, MEDIA, out, tiny_cfg(modalities=("text",), text_layer=0))
    summary = run_extract(manifest, MEDIA, out, tiny_cfg(modalities=("text",), text_layer=0, overwrite=True))
    assert summary["complete"] and summary["samples_written"] == 2


def test_sigint_is_left_alone_once_the_decode_workers_are_started(tmp_path, tiny_cfg, monkeypatch):
    """SIGINT is ignored only while a submit may start a decode worker (so a worker inherits it); any later
    Ctrl-C reaches the parent, which stops the run with one line (a Ctrl-C was lost when every submit ignored it)."""
    from contextlib import contextmanager

    import extract.pool as pool
    from extract.clip import decode_settings
    from extract.manifest import load_manifest
    from extract.pipeline import plan_shards

    windows = []

    @contextmanager
    def counted():
        windows.append(1)
        yield

    monkeypatch.setattr(pool, "_sigint_ignored", counted)
    rows = [
        {**r, "clip_id": f"{r['clip_id']}-{k}"} for k in range(3) for r in bundled_rows() if r["video_id"] == "grid"
    ]
    clips = load_manifest(write_manifest(tmp_path / "m.csv", rows), MEDIA, need_text=False)
    cfg = tiny_cfg(modalities="audio", workers=2)
    decoded = list(pool.decode_clips(plan_shards(clips, 4), decode_settings(cfg), 2, True))
    assert len(decoded) == len(clips) == 9
    assert len(windows) == 2  # one per worker started, not one per clip
