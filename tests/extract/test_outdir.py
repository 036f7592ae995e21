"""The output directory: only our files are removed, temporaries belong to their writer, shard locks, bad --out."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
from conftest import MEDIA, ROOT, write_manifest

from extract.outdir import FOREIGN_LEASE_S, ShardLock, clean_stale, owner_gone
from mmfuse.cli import main
from shards.io import host_name

USER_FILES = ["photos-2023.tar", "draft.tmp-old.txt", "notes.json", "train-1.tar", "train-0000001.json", "x.lock"]


def dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def fill(out, names):
    out.mkdir(exist_ok=True)
    for name in names:
        (out / name).write_bytes(b"user data")


@pytest.mark.parametrize("overwrite", [False, True])
def test_files_that_only_look_like_ours_are_never_removed(tmp_path, overwrite):
    out = tmp_path / "out"
    ours = ["train-000000.tar", "train-000000.json", "dataset.json", "status.jsonl"]
    outside_plan = ["test-000007.tar", "test-000007.json"]
    fill(out, USER_FILES + ours + outside_plan)
    clean_stale(out, {"train-000000"}, remove_all=overwrite)
    left = {p.name for p in out.iterdir()}
    assert set(USER_FILES) <= left  # never touched, --overwrite or not
    if overwrite:
        assert not left & set(ours + outside_plan)
    else:
        assert set(ours + outside_plan) <= left  # shards outside the plan are left too


def test_temporary_files_are_removed_only_once_their_writer_is_gone(tmp_path):
    out = tmp_path / "out"
    me, host = os.getpid(), host_name()
    live = f"train-000000.tar.tmp-r0-p{me}-{host}"
    dead = f"train-000001.tar.tmp-r1-p{dead_pid()}-{host}"
    foreign_fresh = "valid-000000.json.tmp-r0-p1-some-other.host"
    foreign_old = "dataset.json.tmp-r2-p1-some-other.host"
    fill(out, [live, dead, foreign_fresh, foreign_old])
    old = time.time() - FOREIGN_LEASE_S - 60
    os.utime(out / foreign_old, (old, old))
    assert not owner_gone(out / live) and owner_gone(out / dead)
    clean_stale(out, {"train-000000", "train-000001", "valid-000000"}, remove_all=True)
    assert {p.name for p in out.iterdir()} == {live, foreign_fresh}


def test_a_shard_lock_has_one_holder_and_is_freed_when_its_holder_dies(tmp_path):
    path = tmp_path / "train-000000.lock"
    first = ShardLock.claim(path, rank=0)
    assert first is not None and json.loads(path.read_text())["pid"] == os.getpid()
    assert ShardLock.claim(path, rank=1) is None
    first.release()
    assert not path.exists()
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import fcntl, time; f = open({str(path)!r}, 'w'); fcntl.flock(f, fcntl.LOCK_EX); "
         "print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        assert ShardLock.claim(path) is None
    finally:
        holder.kill()
        holder.wait()
    again = ShardLock.claim(path)  # its holder died: the lock is free
    assert again is not None
    again.release()


def run_cli(tmp_path, out, capsys, *extra):
    manifest = write_manifest(tmp_path / "m.csv", [{"video_id": "v", "clip_id": "c", "text": "hi", "mode": "train"}])
    # A model that does not exist: the --out error must come first, before any model is loaded.
    args = ["extract", str(manifest), "--media-root", str(MEDIA), "--out", str(out), "--modalities", "text", *extra]
    code = main([*args, "--text-model", str(tmp_path / "no-model"), "-q", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and "no-model" not in err
    return err


def test_out_that_is_a_file_is_a_clear_error(tmp_path, capsys):
    out = tmp_path / "out"
    out.write_text("a file")
    assert "is a file, not a directory" in run_cli(tmp_path, out, capsys)


def test_read_only_out_is_a_clear_error(tmp_path, capsys):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        if os.access(out, os.W_OK):  # root writes anywhere: use a directory nobody can create files in
            out = tmp_path.parent / "/proc/self"
        assert "cannot be written" in run_cli(tmp_path, out, capsys)
    finally:
        (tmp_path / "ro").chmod(0o755)


@pytest.mark.parametrize("content", ["{}", '{"schema_version": 1}', "[1, 2]", "not json"])
def test_foreign_dataset_json_is_a_clear_error(tmp_path, capsys, content):
    out = tmp_path / "out"
    fill(out, [])
    (out / "dataset.json").write_text(content)
    err = run_cli(tmp_path, out, capsys)
    assert "dataset.json" in err and "--overwrite" in err


class LockHolder:
    """Another process holding our locks on ``names`` in ``out`` (as a live extraction does while it writes)."""

    def __init__(self, out, names) -> None:
        code = (
            "import sys, time; from pathlib import Path; from extract.outdir import ShardLock; "
            f"locks = [ShardLock.claim(Path({str(out)!r}) / n) for n in {list(names)!r}]; "
            "print('held' if all(locks) else 'taken', flush=True); time.sleep(120)"
        )
        self.proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)

    def __enter__(self) -> subprocess.Popen:
        assert self.proc.stdout.readline().strip() == "held"
        return self.proc

    def __exit__(self, *exc) -> None:
        self.proc.kill()
        self.proc.wait()


def test_overwrite_while_another_extraction_writes_is_refused_before_any_model_loads(tmp_path, capsys):
    out = tmp_path / "out"
    committed = ["train-000000.tar", "train-000000.json", "dataset.json", "status.jsonl"]
    fill(out, committed)
    with LockHolder(out, ["train-000001.lock"]) as holder:
        err = run_cli(tmp_path, out, capsys, "--overwrite")
        assert (
            f"another extraction (pid {holder.pid}, host {host_name()}) is writing to {out} (it holds "
            "train-000001.lock); wait for it or stop it. --overwrite would delete the shards it is writing, so "
            "nothing was removed."
        ) in err
        assert set(committed) <= {p.name for p in out.iterdir()}
        # A run that started after that check (while models loaded) keeps the shards it holds as well.
        fill(out, ["train-000001.tar", "train-000001.json"])
        clean_stale(out, {"train-000000", "train-000001"}, remove_all=True)
        assert {p.name for p in out.iterdir()} == {"train-000001.lock", "train-000001.tar", "train-000001.json"}


def test_a_run_that_finds_every_shard_held_says_it_left_them_to_the_other_run(
    tmp_path, capsys, tiny_text_model, tiny_audio_model
):
    rows = [{"video_id": "v", "clip_id": f"c{i}", "text": "hi", "mode": s} for i, s in enumerate(["train", "test"])]
    manifest = write_manifest(tmp_path / "m.csv", rows)
    out = tmp_path / "out"
    out.mkdir()
    args = ["extract", str(manifest), "--out", str(out), "--modalities", "text", "--text-model", str(tiny_text_model)]
    with LockHolder(out, ["train-000000.lock", "test-000000.lock"]) as holder:
        assert main([*args, "--audio-model", str(tiny_audio_model), "--workers", "0", "--no-progress"]) == 0
    line = capsys.readouterr().out.strip()
    who = f"rank 0, pid {holder.pid} on {host_name()}"
    assert re.fullmatch(
        rf"wrote 0 samples in 0 shards \(0 already complete\) to {re.escape(str(out))} in [\d.]+ s; 2 of this "
        rf"run's 2 shards were left to another extraction that is writing them \(train-000000 \({who}\), "
        rf"test-000000 \({who}\)\): dataset.json is complete once it finishes",
        line,
    ), line
    assert not list(out.glob("*.tar"))


def test_dataset_json_records_the_longest_max_duration_of_the_runs_that_wrote_it(tmp_path, tiny_cfg):
    from extract.pipeline import run_extract
    from shards import load_dataset_json

    manifest = write_manifest(tmp_path / "m.csv", [{"video_id": "v", "clip_id": "c", "text": "hi", "mode": "train"}])
    out = tmp_path / "out"
    run_extract(manifest, None, out, tiny_cfg(modalities=("text",), max_duration_s=600))
    assert load_dataset_json(out)["max_duration_s"] == 600.0
    run_extract(manifest, None, out, tiny_cfg(modalities=("text",), max_duration_s=7200))
    assert load_dataset_json(out)["max_duration_s"] == 7200.0
    run_extract(manifest, None, out, tiny_cfg(modalities=("text",), max_duration_s=60))  # its shards are kept
    assert load_dataset_json(out)["max_duration_s"] == 7200.0


def test_no_file_is_written_through_a_link_planted_in_the_output(tmp_path) -> None:
    """A lock file, or a temporary name, that is a symbolic link to another file must never write into that file:
    a link at a lock's name is refused naming it, a link at a temporary name is replaced by a new file."""
    from extract.extractors.base import ExtractionError
    from extract.outdir import ShardLock, is_held
    from shards.io import ShardWriter, atomic_write_json, temp_path

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    for name in ("train-000000.lock", "dataset.lock"):
        (out / name).symlink_to(victim)
        with pytest.raises(ExtractionError, match=rf"{name} is a symbolic link: remove it"):
            ShardLock.claim(out / name, rank=0)
        assert not is_held(out / name)
    (out / "valid-000000.lock").mkdir()
    with pytest.raises(ExtractionError, match="valid-000000.lock is not a regular file"):
        ShardLock.claim(out / "valid-000000.lock", rank=0)
    target = out / "dataset.json"
    temp_path(target).symlink_to(victim)
    atomic_write_json(target, {"ok": True})
    assert json.loads(target.read_text()) == {"ok": True} and not target.is_symlink()
    shard = out / "train-000001.tar"
    temp_path(shard).symlink_to(victim)
    writer = ShardWriter(shard, validate=False)
    writer.commit()
    assert shard.is_file() and not shard.is_symlink()
    assert victim.read_text() == "precious"


@pytest.mark.parametrize("second", ["run", "rank"])
def test_a_second_writer_with_another_feature_set_is_refused_naming_both(tmp_path, tiny_cfg, second) -> None:
    """Two writers on one --out with different feature sets, the second starting while the first writes: a whole
    run used to find every shard held, write nothing and exit 0 ("dataset.json is complete once it finishes"),
    and a rank of its own shards used to write them beside the first's (a mixed directory, both exit 0). The
    first writer's shard locks record its feature set from before its first shard, so the second is refused,
    naming both feature sets and what differs."""
    from extract.extractors.base import ExtractionError
    from extract.pipeline import run_extract
    from shards import load_dataset_json
    from shards.sidecar import read_sidecar

    rows = [{"video_id": "v", "clip_id": f"c{i}", "text": "hi there", "mode": "train"} for i in range(4)]
    manifest = write_manifest(tmp_path / "m.csv", rows)
    out = tmp_path / "out"
    ranks = [{"rank": 0, "world_size": 2}, {"rank": 1, "world_size": 2}] if second == "rank" else [{}, {}]
    first = tiny_cfg(modalities="text", shard_size=2, **ranks[0])
    other = tiny_cfg(modalities="text", shard_size=2, text_layer=0, **ranks[1])
    refused: list[str] = []

    def start_the_other_writer(done: int, total: int) -> None:  # the first holds its shard locks by now
        if not refused:
            with pytest.raises(ExtractionError) as err:
                run_extract(manifest, None, out, other)
            refused.append(str(err.value))

    summary = run_extract(manifest, None, out, first, progress=start_the_other_writer)
    theirs = summary["feature_set_hash"]
    match = re.fullmatch(
        rf"another extraction \(rank 0, pid {os.getpid()} on {re.escape(host_name())}\) is writing shards of feature "
        rf"set {theirs} to {re.escape(str(out))} \(it holds train-000000.lock\); this run's feature set is "
        r"([0-9a-f]{16}): they differ in extractors.text.layer \(-1 there, 0 here\)\. Shards of two feature sets "
        r"cannot share one directory: choose another --out, or wait for that extraction to finish and pass "
        r"--overwrite\.",
        refused[0],
    )
    assert match and match[1] != theirs, refused
    sidecars = [read_sidecar(p) for p in sorted(out.glob("*.json")) if p.name != "dataset.json"]
    assert [s["feature_set_hash"] for s in sidecars] == [theirs] * summary["shards_this_rank"]  # nothing of the other
    assert load_dataset_json(out)["feature_set_hash"] == theirs
    with pytest.raises(ExtractionError, match=r"holds shards of another feature set .*: they differ in extractors"):
        run_extract(manifest, None, out, other)  # once the first has finished, dataset.json names its feature set
