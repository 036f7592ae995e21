"""Fault injection: SIGKILL at random moments, then rerun; nothing is lost, nothing is duplicated.

Extraction: each trial kills the extraction twice at random moments and then lets a third run finish. Every
clip must end up exactly once, every tar must read back with schema validation, ``status.jsonl`` must hold
one line per manifest row agreeing with the shards, and no temporary file may remain. Two trials run in the
default tier, ten more in the slow tier.

Training: a run killed with SIGKILL after a few checkpoints and resumed with ``--resume`` logs the same loss
at every step as an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import MEDIA, ROOT, write_manifest

from shards import iter_shard, load_dataset_json

CLIPS = ["grid/bbaf2n.mpg", "grid/pwij3p.mpg", "grid/id2_vcd_swwp2s.mpg", "faces/face_noface.mov"]
N_CLIPS = 8
KILL_WITHIN_S = 8.0  # the latest moment a kill may land, inside a whole run's time
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def rows() -> list[dict]:
    splits = ["train", "train", "valid", "test"]
    return [
        {"video_id": f"v{i % 3}", "clip_id": f"c{i}", "text": f"clip {i}", "mode": splits[i % 4], "path": CLIPS[i % 4]}
        for i in range(N_CLIPS)
    ]


def extract_cmd(manifest: Path, out: Path, text_model: Path, audio_model: Path) -> list[str]:
    return [
        sys.executable, "-m", "mmfuse", "extract", str(manifest), "--media-root", str(MEDIA), "--out", str(out),
        "--shard-size", "1", "--workers", "1", "--text-model", str(text_model), "--audio-model", str(audio_model), "-q",
    ]  # fmt: skip


def children(pid: int) -> set[int]:
    """Direct child processes of ``pid`` (Linux /proc)."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found.update(int(c) for c in (task / "children").read_text().split())
        except OSError:
            pass
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def kill_after(cmd: list[str], delay: float) -> int | None:
    """Start ``cmd``, SIGKILL it after ``delay`` seconds (unless it finished); its return code, None if killed.
    The decode workers it had must exit on their own within a few seconds (no orphans)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        return proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        workers = children(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 30  # a worker may still be importing on a loaded machine when its parent dies
        while time.time() < deadline and any(alive(w) for w in workers):
            time.sleep(0.1)
        assert not [w for w in workers if alive(w)], "decode workers outlived their killed parent"
        return None


def check_extraction_invariants(out: Path) -> None:
    expected = {f"v{i % 3}__c{i}" for i in range(N_CLIPS)}
    counts: Counter[str] = Counter()
    for tar in sorted(out.glob("*.tar")):
        counts.update(sample["__key__"] for sample in iter_shard(tar, validate=True))
    assert set(counts) == expected and set(counts.values()) == {1}, counts
    leftovers = [p.name for p in out.iterdir() if ".tmp" in p.name]
    assert not leftovers, leftovers
    status = [json.loads(line) for line in (out / "status.jsonl").read_text().splitlines()]
    assert sorted(s["key"] for s in status) == sorted(expected)
    by_key = {s["key"]: s for s in status}
    for tar in out.glob("*.tar"):
        for sample in iter_shard(tar):
            assert by_key[sample["__key__"]]["shard"] == tar.name
            assert by_key[sample["__key__"]]["modalities"] == sample["meta.json"]["modalities"]
    dataset = load_dataset_json(out)
    assert dataset["complete"] and dataset["samples"] == N_CLIPS


def run_trial(seed: int, tmp_path: Path, text_model: Path, audio_model: Path) -> list[int | None]:
    rng = random.Random(seed)
    manifest = write_manifest(tmp_path / "m.csv", rows())
    out = tmp_path / "out"
    cmd = extract_cmd(manifest, out, text_model, audio_model)
    # Two kills at random moments inside a run (a whole run of these 8 clips takes about 10 s on 2 cores, now
    # that the decode workers start while the models load: moments up to 12 s could both come after its end).
    outcomes = [kill_after(cmd, rng.uniform(1.0, KILL_WITHIN_S)) for _ in range(2)]
    assert None in outcomes, "at least one kill must land before the run ends"
    final = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr[-2000:]
    check_extraction_invariants(out)
    return outcomes


@pytest.mark.integration
@pytest.mark.parametrize("seed", [0, 1])
def test_extraction_killed_at_random_moments(seed: int, tmp_path: Path, tiny_text_model, tiny_audio_model) -> None:
    run_trial(seed, tmp_path, tiny_text_model, tiny_audio_model)


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("seed", range(2, 12))
def test_extraction_killed_at_random_moments_slow(seed: int, tmp_path: Path, tiny_text_model, tiny_audio_model) -> None:
    run_trial(seed, tmp_path, tiny_text_model, tiny_audio_model)


def train_cmd(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "mmfuse", "train", "--shards", str(shards), "--model", "late", "--run-dir",
        str(run_dir), "batch_size=1", "num_workers=0", "log_every=1", "checkpoint_every=1", "epochs=12",
        "model.hidden=12", "model.num_heads=3", "model.dropout=0.3", "device=cpu", "-q", *extra,
    ]  # fmt: skip


def logged_losses(run_dir: Path) -> dict[int, float]:
    """Step -> loss; a step logged twice (before a kill and again after resuming) keeps its last value."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


@pytest.mark.integration
def test_training_killed_and_resumed_gives_the_same_losses(bundled_dataset: Path, tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    done = subprocess.run(train_cmd(bundled_dataset, straight), cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    expected = logged_losses(straight)
    assert len(expected) == 24

    killed = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(bundled_dataset, killed), cwd=ROOT, env=ENV, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        metrics = killed / "metrics.jsonl"
        if metrics.is_file() and len(logged_losses(killed)) >= 7:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 7 <= len(logged_losses(killed)) < 24, "the kill should land mid-run"
    resumed = subprocess.run(
        train_cmd(bundled_dataset, killed, "--resume"), cwd=ROOT, env=ENV, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    got = logged_losses(killed)
    assert got.keys() == expected.keys()
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, abs=1e-6), step
