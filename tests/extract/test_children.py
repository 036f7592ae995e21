"""Every child process is joined before ``mmfuse extract`` exits: its process group is empty right after."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import MEDIA, ROOT, bundled_rows, write_manifest


def group_members(pgid: int) -> list[str]:
    """``pid (name) state`` of every process whose process group is ``pgid``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = open(f"/proc/{entry}/stat").read()
        except OSError:  # gone meanwhile
            continue
        name_end = stat.rindex(")")
        fields = stat[name_end + 2 :].split()  # state, ppid, pgrp, ...
        if int(fields[2]) == pgid:
            found.append(f"{stat[: name_end + 1]} {fields[0]}")
    return found


@pytest.mark.integration
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_no_process_of_the_group_outlives_extract(tmp_path, tiny_audio_model):
    manifest = write_manifest(tmp_path / "m.csv", bundled_rows()[:2])
    cmd = [sys.executable, "-m", "mmfuse", "extract", str(manifest), "--media-root", str(MEDIA)]
    cmd += ["--out", str(tmp_path / "out"), "--modalities", "audio,video", "--audio-model", str(tiny_audio_model)]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    proc = subprocess.Popen(
        [*cmd, "--workers", "2", "--no-progress"],
        cwd=ROOT,
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = proc.communicate(timeout=300)
    left = group_members(proc.pid)  # at once: a helper still exiting, or a zombie nobody reaped, shows here
    assert proc.returncode == 0, err
    assert left == []
    threads = max(1, len(os.sched_getaffinity(0)) - 2)  # the cores the two workers leave
    assert f"workers=2 batch_size=2 threads={threads} precision=fp32 (batch_size, threads, precision auto:" in err
