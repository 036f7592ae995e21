"""The output directory: only our files are removed, temporaries belong to their writer, shard locks, bad --out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import MEDIA, write_manifest

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


def run_cli(tmp_path, out, capsys):
    manifest = write_manifest(tmp_path / "m.csv", [{"video_id": "v", "clip_id": "c", "text": "hi", "mode": "train"}])
    # A model that does not exist: the --out error must come first, before any model is loaded.
    args = ["extract", str(manifest), "--media-root", str(MEDIA), "--out", str(out), "--modalities", "text"]
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
