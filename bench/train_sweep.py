"""``mmfuse bench train --sweep``: frozen training throughput against DataLoader workers and batch size.

One synthetic shard directory of ``--samples`` samples, the shapes of ``mmfuse bench train``. Each point is
frozen-feature training streamed from the shards (``make_loader``) in a fresh process (``bench.train_steps.run_child``
running ``timed_training``: ``--warmup`` untimed steps, then ``--steps`` timed ones), once per ``--sweep-workers``
count at ``--batch-size`` and once per ``--sweep-batch-sizes`` value at ``--workers`` (the setting on both lines
runs once). The same training from the same tensors held in memory (``InMemorySource``, read before the clock
starts) is measured in a fresh process once per batch size, just before that batch size's first streamed point:
it is the reference line of both panels, the speed without data loading.

A point reads ``(warmup + steps) × batch / samples`` epochs; each new epoch starts new DataLoader workers, as
``fit`` does, so pick ``--samples`` of at least ``(warmup + steps) × largest batch`` to keep worker start-up out
of the timed steps. The table reports the epochs each point reads.

The plot (``bench.sweep.plot_sweep``) goes to ``--plot``, else to ``docs/bench/train-sweep.png`` beside
``--out``, whose ``bench-train-sweep`` section gets the command, the table and the image. ``--quick``: the tiny
data, encoders and step counts of ``--quick``, workers 0,1 and batch sizes 2,4.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from functools import partial
from pathlib import Path
from typing import Any

from bench.markdown import markers, replace_section
from bench.sweep import image_link, measure_points, plot_path, plot_sweep, points_table, shared_note, spell
from bench.train_runs import QUICK_SWEEP, SWEEP, command_line, machine, run_overrides, workdir
from bench.train_steps import (
    bench_data,
    run_child,
    write_dataset,
)
from train.config import TrainConfigError

log = logging.getLogger(__name__)
NAME, PNG = "bench-train-sweep", "train-sweep.png"
BEGIN, END = markers(NAME)
write_section = partial(replace_section, name=NAME)  # (path, body)
COLUMNS = (
    ("streamed samples/s", "samples_per_s", ".1f"),
    ("s/step", "s_per_step", ".3f"),
    ("data wait s/step", "data_wait_s_per_step", ".3f"),
    ("in memory samples/s", "memory_samples_per_s", ".1f"),
    ("streamed / in memory", "stream_over_memory", ".2f"),
    ("epochs read", "epochs", ".2f"),
    ("peak RSS main MiB", "rss_main_mib", ".0f"),
    ("largest worker MiB", "rss_worker_mib", ".0f"),
)


def run_sweep(args: argparse.Namespace) -> int:
    """Make the data, measure every point (see the module docstring); print the table (or the JSON report);
    write the PNG and the ``bench-train-sweep`` section when asked to."""
    workers, sizes = QUICK_SWEEP if args.quick else SWEEP
    args.sweep_workers = args.sweep_workers if args.sweep_workers is not None else workers
    args.sweep_batch_sizes = args.sweep_batch_sizes if args.sweep_batch_sizes is not None else sizes
    largest = max(*args.sweep_batch_sizes, args.batch_size)
    if args.samples < largest:
        raise TrainConfigError(f"--samples {args.samples} gives no batch of {largest}: use at least {largest}")
    with workdir(args) as work:
        report = sweep(args, work)
    png = plot_path(args.out, args.plot, PNG)
    if png is not None:
        report["plot"] = str(plot_sweep(report, png))
    print(json.dumps(report, indent=1, sort_keys=True) if args.json else format_table(report))
    if args.out is not None:
        write_section(args.out, section(report, args.out, png))
        log.info("wrote the %s section of %s and %s", NAME, args.out, png)
    return 0


def sweep(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Write the shards under ``work``, run every point, and return the report (``bench.sweep``'s keys + setup)."""
    started = time.perf_counter()
    shards = work / "shards-1x"
    shapes, _, fset, shard_size = bench_data(work, args.quick)
    written = write_dataset(shards, args.samples, shapes, fset, shard_size=shard_size)
    data_s = time.perf_counter() - started
    run = partial(measure_point, args, shards, work, {})
    with args.progress("bench train sweep", "run") as bar:
        points = measure_points(args.sweep_workers, args.sweep_batch_sizes, args.workers, args.batch_size, run, bar)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    setup = {
        "command": command_line(args),
        "machine": machine(args.threads),
        "cores": cores,
        "samples": args.samples,
        "shards": len(written["shards"]),
        "shard_mb": sum(s["bytes"] for s in written["shards"]) / 1e6,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "steps": args.steps,
        "warmup_steps": args.warmup,
        "shuffle_buffer": args.shuffle_buffer,
        "torch_threads": args.threads,
        "model": args.model,
        "shapes": {k: getattr(shapes, k) for k in ("tokens", "seconds", "dt", "da")},
        "data_write_s": data_s,
        "sweep_workers": list(args.sweep_workers),
        "sweep_batch_sizes": list(args.sweep_batch_sizes),
        "workdir": str(work),
    }
    title = (
        f"mmfuse frozen training, model {args.model}: {args.samples} samples (text dim {shapes.dt}, audio dim "
        f"{shapes.da}, FaceMesh)\n{args.warmup} + {args.steps} steps per point; {cores} cores, "
        f"{args.threads} torch thread(s), CPU"
    )
    return {
        "setup": setup,
        "title": title,
        "metric": "samples_per_s",
        "unit": "samples/s",
        "label": "streamed",
        "reference": {"metric": "memory_samples_per_s", "label": "in memory (no data loading)"},
        "points": points,
        "plot": None,
    }


def measure_point(
    args: argparse.Namespace, shards: Path, work: Path, memory: dict[int, dict], workers: int, batch_size: int
) -> dict[str, float]:
    """Streamed training with ``workers`` and ``batch_size`` in a fresh process, beside the in-memory rate at
    ``batch_size`` (measured on first use and kept in ``memory``)."""
    timing = {"steps": args.steps, "warmup": args.warmup}
    if batch_size not in memory:
        log.info("bench train --sweep: in memory, batch size %d", batch_size)
        overrides = run_overrides(args, batch_size=batch_size, workers=0)
        memory[batch_size] = run_child(
            work / f"memory-b{batch_size}", shards, overrides, args, 1, source="memory", **timing
        )
    log.info("bench train --sweep: streamed, %d workers, batch size %d", workers, batch_size)
    overrides = run_overrides(args, batch_size=batch_size, workers=workers)
    got = run_child(work / f"stream-w{workers}-b{batch_size}", shards, overrides, args, 1, **timing)
    reference = memory[batch_size]["samples_per_s"]
    result = {
        "samples_per_s": got["samples_per_s"],
        "s_per_step": got["s_per_step"],
        "data_wait_s_per_step": got["data_wait_s_per_step"],
        "memory_samples_per_s": reference,
        "stream_over_memory": got["samples_per_s"] / reference,
        "epochs": (args.warmup + args.steps) * batch_size / args.samples,
        "rss_main_mib": got["main_rss_mb"],
        "rss_worker_mib": got["worker_rss_mb"],
    }
    return {k: round(float(v), 4) for k, v in result.items()}


def format_table(report: dict[str, Any]) -> str:
    """The points as a Markdown table, one row per point, under a line saying what was run."""
    s = report["setup"]
    head = (
        f"{s['samples']} samples; workers {spell(s['sweep_workers'])} at batch {s['batch_size']}, batch sizes "
        f"{spell(s['sweep_batch_sizes'])} with {s['workers']} worker(s); {s['warmup_steps']} + {s['steps']} steps"
    )
    note = shared_note(report["points"])
    return "\n".join([head, "", *points_table(report["points"], COLUMNS), *(["", note] if note else [])])


def section(report: dict[str, Any], out: Path, png: Path | None) -> str:
    """The BENCHMARKS.md section: command, machine and data, the table, the plot."""
    s = report["setup"]
    lines = [
        "## Training throughput vs workers and batch size (`mmfuse bench train --sweep`)",
        "",
        f"Command: `{s['command']}`",
        "",
        f"Machine: {s['machine']}. Data: {s['samples']} synthetic train samples in {s['shards']} shards "
        f"({s['shard_mb']:.0f} MB), the shapes of `mmfuse bench train` (text {s['shapes']['dt']}-d, audio "
        f"{s['shapes']['da']}-d, FaceMesh landmarks). Model `{s['model']}` (its preset), frozen features. Each "
        f"point is a fresh process: {s['warmup_steps']} warm-up steps excluded, then {s['steps']} timed steps of "
        f"`fit`'s kind (next batch, forward, backward, clip, AdamW); streamed with the given DataLoader workers "
        f"(0: read in the training process), shuffle buffer {s['shuffle_buffer']} per worker. In memory: the same "
        "tensors read before the clock starts, at the same batch size (no data loading). A new epoch starts new "
        "workers, as in `fit`; 'epochs read' says how many each point spans. Peak RSS is `VmHWM`: main = the "
        "training process, worker = the largest single DataLoader worker.",
        "",
        format_table(report),
    ]
    if png is not None:
        lines += ["", image_link(out, png, "Training samples/s vs DataLoader workers and vs batch size")]
    return "\n".join(lines)
