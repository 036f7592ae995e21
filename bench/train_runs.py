"""What ``mmfuse bench train`` and its sweep share: the sweep's points, the work directory, a run's settings,
the machine description and the command line that reproduces a report."""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.sweep import spell

SWEEP, QUICK_SWEEP = ((0, 1, 2, 3), (4, 8, 16, 32)), ((0, 1), (2, 4))  # (worker counts, batch sizes)


@contextmanager
def workdir(args: argparse.Namespace) -> Iterator[Path]:
    """``--workdir``, kept; else a temporary directory, removed afterwards."""
    work = args.workdir or Path(tempfile.mkdtemp(prefix="mmfuse-bench-train-"))
    try:
        yield work
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


def run_overrides(args: argparse.Namespace, *, batch_size: int, workers: int, mode: str = "frozen") -> list[str]:
    """The training-config overrides of a benchmark run with ``batch_size``, ``workers`` (DataLoader) and ``mode``.
    The device is not among them: ``bench.train_steps.timed_training`` sets the one the run is timed on (a setting
    given twice in one layer is refused)."""
    base = [f"batch_size={batch_size}", f"num_workers={workers}", "seed=0"]
    base.append(f"shuffle_buffer={args.shuffle_buffer}")
    base += ["model.hidden=12", "model.num_layers=1"] if args.quick else []
    return [*base, f"mode={mode}"]


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this report (every setting spelled out)."""
    parts = ["mmfuse bench train", f"--model {args.model}", f"--samples {args.samples}"]
    parts += [f"--batch-size {args.batch_size}", f"--steps {args.steps}", f"--warmup {args.warmup}"]
    parts += [
        f"--workers {args.workers}",
        f"--shuffle-buffer {args.shuffle_buffer}",
        f"--threads {args.threads}",
        f"--repeats {args.repeats}",
    ]
    parts += ["--quick"] if args.quick else []
    if args.sweep:
        parts += ["--sweep", f"--sweep-workers {spell(args.sweep_workers)}"]
        parts += [f"--sweep-batch-sizes {spell(args.sweep_batch_sizes)}"]
    parts += [f"--out {args.out.name}"] if args.out is not None else []
    parts += [f"--plot {args.plot}"] if args.plot is not None else []
    return " ".join(parts)


def machine(threads: int) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        names = [ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    import torch

    return f"{cpu}, {os.cpu_count()} cores, {threads} torch thread(s) per process, torch {torch.__version__}, CPU only"
