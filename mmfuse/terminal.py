"""What the command line does for a person at a terminal: progress bars, and native libraries' log lines kept off
the screen.

Library functions report progress through a plain callback, ``progress(done, total)`` (items done so far, items
in all or None while unknown), and never import tqdm; the commands turn it into a bar here. A bar is drawn only
when stderr is a terminal and neither ``--no-progress`` nor ``-q`` was given; piped output stays free of
carriage returns.

MediaPipe and TF Lite log from C++ (absl / glog lines such as ``W0000 00:00:... inference_feedback_manager.cc:
114] ...`` and ``INFO: Created TensorFlow Lite XNNPACK delegate``) straight to file descriptor 2, in the main
process and in every process started from it. ``native_logs_filtered`` sends descriptor 2 through a pipe that
drops those lines (fatal ones excepted) and passes everything else through; Python's own ``sys.stderr`` writes
to the terminal directly. ``--log-level DEBUG`` leaves descriptor 2 alone, so the native lines appear.
"""

from __future__ import annotations

import os
import re
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

# absl / glog: "I1129 16:40:00.123456 12345 file.cc:12] message", and before absl::InitializeLog (MediaPipe) with a
# zero date and the epoch seconds: "W0000 00:00:1732634456.123456   12345 file.cc:114] message". F (fatal) is kept.
# TF Lite and absl before InitializeLog: "INFO: ...", "WARNING: ...", "ERROR: ...".
NATIVE_LOG_LINE = re.compile(
    rb"^(?:[IWE]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [^\s\]]+:\d+\] |(?:INFO|WARNING|ERROR|VERBOSE): )"
)


def is_native_log_line(line: bytes) -> bool:
    """True for a log line written by a native library (absl, glog, TF Lite) that the CLI keeps off the screen."""
    return NATIVE_LOG_LINE.match(line) is not None


class Progress:
    """``progress(done, total)`` callback drawing one tqdm bar, created on the first call; a no-op when off."""

    def __init__(self, desc: str, unit: str, enabled: bool) -> None:
        self.desc, self.unit, self.enabled = desc, unit, enabled
        self._bar: Any = None

    def __call__(self, done: int, total: int | None = None) -> None:
        if not self.enabled:
            return
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(desc=self.desc, unit=self.unit, total=total, dynamic_ncols=True, file=sys.stderr)
        elif total is not None and total != self._bar.total:
            self._bar.total = total
            self._bar.refresh()
        if done != self._bar.n:
            self._bar.update(done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class ProgressFactory:
    """``args.progress``: ``with args.progress("extract", "clip") as bar: run(..., progress=bar)``. While a bar
    is open, log records are written above it instead of through it."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    @contextmanager
    def __call__(self, desc: str, unit: str = "it") -> Iterator[Progress]:
        bar = Progress(desc, unit, self.enabled)
        if not self.enabled:
            yield bar
            return
        from tqdm.contrib.logging import logging_redirect_tqdm

        try:
            with logging_redirect_tqdm():
                yield bar
        finally:
            bar.close()


def bars_wanted(no_progress: bool, quiet: bool) -> bool:
    """Progress bars only for a person watching: stderr is a terminal, and not switched off."""
    return not (no_progress or quiet) and sys.stderr.isatty()


@contextmanager
def native_logs_filtered(enabled: bool = True) -> Iterator[None]:
    """Route file descriptor 2 through a filter that drops native libraries' log lines (see the module docstring).

    Does nothing when ``enabled`` is false or when something else (a test harness) has replaced ``sys.stderr``.
    On exit descriptor 2 points at the original stream again and what is still in the pipe is forwarded.
    """
    if not enabled or sys.stderr is not sys.__stderr__ or sys.stderr is None:
        yield
        return
    sys.stderr.flush()
    screen = os.dup(2)  # stays open: logging handlers made meanwhile keep writing to it
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    python_stderr = sys.stderr
    sys.stderr = open(  # noqa: SIM115 - lives as long as the process may still write to it
        screen, "w", buffering=1, encoding=python_stderr.encoding, errors="backslashreplace", closefd=False
    )
    forwarder = threading.Thread(target=_forward, args=(read_end, screen), name="native-log-filter", daemon=True)
    forwarder.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(screen, 2)  # drops this process's write end of the pipe
        forwarder.join(timeout=2.0)  # children still holding it (they should not) keep the thread alive
        sys.stderr = python_stderr


def _forward(read_end: int, screen: int) -> None:
    with open(read_end, "rb") as pipe:
        for line in pipe:
            if not is_native_log_line(line):
                os.write(screen, line)
