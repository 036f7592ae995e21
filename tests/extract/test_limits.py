"""The decode memory limit: a process that decodes media cannot take more than its budget, and a file opened in
a limited child first cannot take the parent's memory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import MEDIA, ROOT

from extract import worker
from extract.decode import DecodeError
from extract.limits import DECODE_HEADROOM, decode_budget


def test_the_budget_is_the_headroom_plus_the_longest_clips_audio():
    assert decode_budget(0) == DECODE_HEADROOM == 900 << 20
    assert decode_budget(3600) - DECODE_HEADROOM == 3600 * 16000 * 10  # 576 MB for a one-hour clip


def test_a_limited_process_cannot_allocate_past_its_budget():
    code = (
        "import numpy as np; from extract.limits import limit_address_space\n"
        "assert limit_address_space(256 << 20)\n"
        "small = np.ones(64 << 20, np.uint8)\n"
        "try:\n    np.ones(1 << 30, np.uint8)\nexcept MemoryError:\n    print('refused')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "refused", done.stderr


def test_a_file_is_probed_in_a_limited_child_and_nothing_reaches_the_parent(monkeypatch):
    """In a process without the limit (decoding inline), the probe runs in a forked child under it: a probe that
    allocates 4 GB fails there, in the child's memory, and the clip's reason says so."""

    def greedy(path: Path):
        return np.ones(4 << 30, np.uint8)

    monkeypatch.setattr(worker, "_LIMITED", False)
    real = worker.probe_media(MEDIA / "grid" / "bbaf2n.mpg", 10.0)
    assert (real.has_video, real.has_audio, real.fps) == (True, True, 25.0)
    monkeypatch.setattr(worker, "probe", greedy)
    with pytest.raises(DecodeError, match=r"opening it needs over 900 MiB of memory"):
        worker.probe_media(MEDIA / "grid" / "bbaf2n.mpg", 1.0)


def test_a_child_that_dies_is_a_reason_not_a_crash(monkeypatch):
    monkeypatch.setattr(worker, "_LIMITED", False)
    monkeypatch.setattr(worker, "probe", lambda path: os.kill(os.getpid(), signal.SIGKILL))
    with pytest.raises(DecodeError, match=r"cannot open bbaf2n.mpg: opening it took over \d+ MiB .* \(signal 9\)"):
        worker.probe_media(MEDIA / "grid" / "bbaf2n.mpg", 1.0)
