"""The ``mmfuse`` package: version, ``python -m mmfuse``, lazy stable names, progress bars and the native-log
filter (unit level; tests/mmfuse/test_cli_terminal.py runs every command in a real pseudo-terminal)."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap

import pytest
from ttyrun import ROOT

import mmfuse
from mmfuse.terminal import Progress, ProgressFactory, is_native_log_line

NATIVE_LINES = [
    b"W0000 00:00:1795969944.861712    4154 inference_feedback_manager.cc:114] Feedback manager requires a model\n",
    b"W0000 00:00:1795969944.982966    4155 landmark_projection_calculator.cc:186] Using NORM_RECT without\n",
    b"I1129 16:40:00.123456 12345 gl_context.cc:357] GL version: 3.2\n",
    b"E0000 00:00:1795969944.1    77 calculator_graph.cc:887] an error the pipeline records itself\n",
    b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n",
    b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n",
]
OTHER_LINES = [
    b"16:37:18 INFO extract.pipeline: 4 clips in 3 shards\n",  # our own logging
    b"F0000 00:00:1795969944.1    77 graph.cc:1] a fatal native error stays visible\n",
    b"Traceback (most recent call last):\n",
    b"wrote 4 samples in 3 shards\n",
    b"/x/y.py:3: UserWarning: INFO: not at the start of the line\n",
]


def test_native_log_lines_are_told_apart_from_everything_else() -> None:
    assert [is_native_log_line(line) for line in NATIVE_LINES] == [True] * len(NATIVE_LINES)
    assert [is_native_log_line(line) for line in OTHER_LINES] == [False] * len(OTHER_LINES)


def test_filter_drops_native_lines_of_the_process_and_its_children_and_keeps_the_rest() -> None:
    """Descriptor-level writes, as C++ code does them, from the process and from a child it starts."""
    child = f"import os; os.write(2, {NATIVE_LINES[0]!r}); os.write(2, b'child says hello\\n')"
    script = textwrap.dedent(
        f"""
        import os, subprocess, sys
        from mmfuse.terminal import native_logs_filtered
        with native_logs_filtered():
            for line in {NATIVE_LINES + OTHER_LINES!r}:
                os.write(2, line)
            subprocess.run([sys.executable, "-c", {child!r}], check=True)
            print("python's own stderr", file=sys.stderr)
        os.write(2, b"after the filter\\n")
        os.write(2, {NATIVE_LINES[1]!r})
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines(keepends=True)
    expected = [*OTHER_LINES, b"child says hello\n", b"python's own stderr\n", b"after the filter\n", NATIVE_LINES[1]]
    assert sorted(lines) == sorted(expected)  # the forwarding thread may pass a line on after a direct write
    assert lines[-2:] == expected[-2:]  # once the filter is gone, descriptor 2 is the original stream again


def test_bar_with_unknown_total_then_known(monkeypatch) -> None:
    screen = io.StringIO()
    monkeypatch.setattr(sys, "stderr", screen)
    bar = Progress("extract", "clip", enabled=True)
    bar(0, None)  # the total is not known yet: still a bar
    bar(2, None)
    bar(2, 5)
    bar(5, 5)
    bar.close()
    shown = screen.getvalue()
    assert "extract: 0clip [" in shown  # drawn as a counter while the total is unknown
    assert "extract: 100%|" in shown and "5/5" in shown


def test_no_bar_when_switched_off(monkeypatch) -> None:
    screen = io.StringIO()
    monkeypatch.setattr(sys, "stderr", screen)
    with ProgressFactory(enabled=False)("train", "step") as bar:
        bar(0, 10)
        bar(10, 10)
    assert screen.getvalue() == ""


def test_version_and_python_dash_m() -> None:
    version = subprocess.run([sys.executable, "-m", "mmfuse", "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.strip() == f"mmfuse {mmfuse.__version__}"
    assert mmfuse.__version__ == "0.1.0"
    usage = subprocess.run([sys.executable, "-m", "mmfuse", "--help"], capture_output=True, text=True)
    commands = {"extract", "inspect", "report", "import-mmsa", "train", "eval", "predict", "bench"}
    assert usage.returncode == 0 and commands <= set(usage.stdout.split())


def test_import_is_light_and_the_stable_names_resolve() -> None:
    probe = "import sys, mmfuse, mmfuse.cli; print(sorted(m for m in ('torch', 'tqdm') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True)
    assert proc.stdout.strip() == "[]", proc.stderr
    from extract import EXTRACTORS
    from fusion import MODELS
    from fusion.estimators import ESTIMATORS
    from shards.schema import SCHEMA_VERSION, validate_sample
    from train.metrics import sentiment_metrics

    assert mmfuse.EXTRACTORS is EXTRACTORS and mmfuse.MODELS is MODELS and mmfuse.ESTIMATORS is ESTIMATORS
    assert mmfuse.SCHEMA_VERSION == SCHEMA_VERSION and mmfuse.validate_sample is validate_sample
    assert mmfuse.sentiment_metrics is sentiment_metrics
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        _ = mmfuse.nothing
