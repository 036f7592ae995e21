"""Peak resident memory of a process and of its descendants, measured so that inherited peaks do not count.

``getrusage``'s ``ru_maxrss`` is the wrong tool for a process started by another one: Linux carries the
high-water mark across ``exec`` (a child started by ``subprocess`` from a 5 GB parent reports 5 GB before it
allocates anything), and a forked worker starts with its parent's resident size as its high-water mark.
``VmHWM`` in ``/proc/<pid>/status`` is the peak of the process's current address space only: it starts
afresh at ``exec``. Forked workers (DataLoader) still count the copy-on-write pages they share with their
parent, as any resident-set figure does.
"""

from __future__ import annotations

import os
import resource
import threading
from pathlib import Path


def vm_hwm_mib(pid: int | str = "self") -> float | None:
    """``VmHWM`` of ``pid`` in MiB, or None when it cannot be read (process gone, not Linux)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def own_peak_mib() -> float:
    """This process's own peak resident set (``VmHWM``), ``ru_maxrss`` where /proc is missing."""
    peak = vm_hwm_mib()
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def descendants(pid: int | None = None) -> set[int]:
    """Every live descendant of ``pid`` (default: this process), from ``/proc/<pid>/task/*/children``."""
    todo, found = [pid or os.getpid()], set()
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except (OSError, ValueError):
                continue
            for kid in kids:
                if kid not in found:
                    found.add(kid)
                    todo.append(kid)
    return found


class ChildPeaks:
    """Context manager: polls the ``VmHWM`` of every descendant started while the block runs (processes that
    were already there, such as multiprocessing's resource tracker from earlier work, are not counted);
    :attr:`largest_mib` is the biggest single one (0 when there were none).

    ``VmHWM`` is itself a high-water mark, so each process's last reading is its peak (up to the last poll
    before it exits). The last reading, not the largest: between ``fork`` and ``exec`` a child still shows
    its parent's address space.
    """

    def __init__(self, every_s: float = 0.1) -> None:
        self.every_s = every_s
        self.peaks: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._before: set[int] = set()

    def __enter__(self) -> ChildPeaks:
        self._before = set(descendants())
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> None:
        for pid in descendants():
            if pid in self._before:
                continue
            peak = vm_hwm_mib(pid)
            if peak is not None:
                self.peaks[pid] = peak

    @property
    def largest_mib(self) -> float:
        return max(self.peaks.values(), default=0.0)

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.every_s)
