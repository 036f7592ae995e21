"""Run a command the way a person does: in a pseudo-terminal (its controlling terminal, 120 columns, Ctrl-C
typed on the keyboard), with its output piped, or with stdout piped and stderr still on the terminal."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).parent / "mmfuse"  # the console script a user types
MMFUSE = [str(SCRIPT)] if SCRIPT.is_file() else [sys.executable, "-m", "mmfuse"]
CTRL_C = b"\x03"
# A drawn tqdm bar: "extract:  50%|████▌    | 2/4 [00:06<00:06,  3.18s/clip]"
BAR = re.compile(r"(?P<desc>[\w ./-]+): +(?P<pct>\d+)%\|[^|\n]*\| *(?P<n>\d+)/(?P<total>\d+) \[")
NATIVE = re.compile(r"^(?:[IWE]\d{4} \d\d:\d\d:\d\d|INFO: |WARNING: All log messages)|XNNPACK|absl::", re.M)


@dataclass
class Run:
    returncode: int
    terminal: str  # what the terminal showed (CR LF turned into LF; bare CR kept: it redraws a bar)
    stdout: str  # stdout when it was piped, else ""
    interrupted: bool = False

    @property
    def text(self) -> str:
        return self.terminal + self.stdout

    def bars(self, desc: str) -> list[re.Match]:
        return [m for m in BAR.finditer(self.terminal) if m["desc"].strip() == desc]

    def finished_bar(self, desc: str) -> bool:
        """A bar named ``desc`` was drawn and reached its total."""
        return any(m["n"] == m["total"] and m["pct"] == "100" for m in self.bars(desc))

    def lines(self) -> list[str]:
        """The lines left on the screen (each bar redraw replaces the line's text)."""
        return [line.rsplit("\r", 1)[-1] for line in self.text.split("\n")]


def run_mmfuse(args: list[str], mode: str = "terminal", **options: Any) -> Run:
    """``mmfuse ARGS`` with ``mode``: ``terminal`` (stdin, stdout and stderr on a pseudo-terminal), ``no-progress``
    (the same with ``--no-progress``), ``piped`` (stdout and stderr each a pipe) or ``stdout-piped`` (stdout a
    pipe, stdin and stderr the terminal). ``options`` go to ``run_command`` (``cwd``, ``timeout``, ``env``,
    ``interrupt_when``)."""
    argv = [*MMFUSE, *args, *(["--no-progress"] if mode == "no-progress" else [])]
    return run_command(argv, "terminal" if mode == "no-progress" else mode, **options)


def run_command(
    argv: list[str],
    mode: str = "terminal",
    *,
    cwd: Path = ROOT,
    timeout: float = 300.0,
    interrupt_when: str | None = None,
    env: dict[str, str] | None = None,
) -> Run:
    """``argv`` in ``mode`` (``terminal``, ``piped`` or ``stdout-piped``, as for ``run_mmfuse``).
    ``interrupt_when``: a regex; once the terminal shows it, Ctrl-C is typed (once)."""
    env = {**os.environ, **(env or {})}
    env.pop("MMFUSE_NATIVE_LOGS", None)
    if mode == "piped":
        proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        return Run(proc.returncode, proc.stderr, proc.stdout)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    stdout = subprocess.PIPE if mode == "stdout-piped" else slave
    proc = subprocess.Popen(
        argv, cwd=cwd, env=env, stdin=slave, stdout=stdout, stderr=slave, start_new_session=True,
        preexec_fn=_take_terminal,
    )  # fmt: skip
    os.close(slave)
    screen, piped, interrupted = bytearray(), bytearray(), False
    streams = {master: screen, **({proc.stdout.fileno(): piped} if proc.stdout else {})}
    deadline = time.monotonic() + timeout
    try:
        while streams and time.monotonic() < deadline:
            ready, _, _ = select.select(list(streams), [], [], 0.5)
            for fd in ready:
                try:
                    data = os.read(fd, 65536)
                except OSError:  # EIO: nothing holds the terminal's other side any more
                    data = b""
                if not data:
                    del streams[fd]
                    continue
                streams[fd] += data
            if interrupt_when and not interrupted and re.search(interrupt_when, screen.decode(errors="replace")):
                os.write(master, CTRL_C)  # the terminal turns it into SIGINT for the foreground process group
                interrupted = True
        if streams:
            os.killpg(proc.pid, signal.SIGKILL)
            raise TimeoutError(f"{' '.join(argv)} ran past {timeout:.0f} s; it showed:\n{screen.decode()[-3000:]}")
        code = proc.wait(timeout=60)
    finally:
        os.close(master)
        if proc.stdout:
            proc.stdout.close()
    text = screen.decode(errors="replace").replace("\r\n", "\n")
    return Run(code, text, piped.decode(errors="replace"), interrupted)


def _take_terminal() -> None:
    """In the child, after setsid: make the pseudo-terminal (its stdin) the controlling terminal, so the child's
    process group is the terminal's foreground group and Ctrl-C reaches it as a person's would. SIGINT starts as
    a shell starts a command (default handling, unblocked), whatever state the test process left it in: an
    ignored or blocked disposition is inherited across exec."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)
