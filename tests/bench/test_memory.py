"""Peak-memory measurement: a child's own peak, not the peak inherited from the process that started it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT

from bench.memory import ChildPeaks, own_peak_mib, vm_hwm_mib

CHILD = """
import json, resource, time
from bench.memory import own_peak_mib
block = bytearray(60 * 2**20)
block[::4096] = b"x" * len(block[::4096])
time.sleep(0.4)
print(json.dumps({"own": own_peak_mib(), "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


@pytest.mark.skipif(vm_hwm_mib() is None, reason="needs /proc (Linux)")
def test_child_peak_is_its_own_not_its_parents():
    ballast = bytearray(400 * 2**20)
    ballast[::4096] = b"x" * len(ballast[::4096])  # make the pages resident
    assert own_peak_mib() > 400
    earlier = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # a child from before
    try:
        with ChildPeaks(every_s=0.05) as peaks:
            done = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, capture_output=True, text=True, check=True)
    finally:
        earlier.kill()
        earlier.wait()
    assert earlier.pid not in peaks.peaks  # only processes started while the block runs count
    child = json.loads(done.stdout)
    assert child["ru_maxrss"] > 400  # what getrusage would have reported: the parent's peak, carried over exec
    assert 60 < child["own"] < 250  # its own allocation plus the interpreter
    assert len(peaks.peaks) == 1 and 60 < peaks.largest_mib < 250
    assert abs(peaks.largest_mib - child["own"]) < 20
    del ballast


def test_the_command_line_starts_without_torch():
    """Every `mmfuse` command, and every spawned decode worker (which re-imports mmfuse.cli), would otherwise
    pay about two seconds of torch import before doing anything."""
    code = (
        "import sys; from mmfuse.cli import build_parser; build_parser().parse_args(['bench', 'train', '--quick']); "
        "heavy = sorted(m for m in ('torch', 'transformers', 'mediapipe', 'matplotlib') if m in sys.modules); "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
