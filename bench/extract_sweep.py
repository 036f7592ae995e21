"""``mmfuse bench extract --sweep``: the pipeline's throughput against its worker count and its batch size.

Only variant (a) runs: ``run_pipeline`` (``bench/extract_variants.py``) on the same N tiled clips, each point in
a fresh interpreter through ``bench.extract.measure``, once per ``--sweep-workers`` count at ``--batch-size`` and
once per ``--sweep-batch-sizes`` value at ``--workers`` (the setting on both lines runs once). Each point
reports clips/s and audio-seconds/s over the run without model loading (``run_s``; the setup, ``load_s``, is
reported apart; the decode workers start during it, as in (a)), and the peak RSS of the encoder process and of its
largest worker (``VmHWM``).

The plot (``bench.sweep.plot_sweep``) goes to ``--plot``, else to ``docs/bench/extract-sweep.png`` beside
``--out``, whose ``bench-extract-sweep`` section gets the command, the table and the image. ``--quick``: tiny
models, 2 clips, workers 0,1 and batch sizes 1,2, ``--batch-size`` capped at the 2 clips.
"""

from __future__ import annotations

import argparse
import json
import logging
from functools import partial
from pathlib import Path
from typing import Any

from bench.extract_runs import MEDIA, QUICK_SWEEP, SWEEP, command, machine, measure, tile_manifest
from bench.markdown import markers, replace_section
from bench.sweep import image_link, measure_points, plot_path, plot_sweep, points_table, shared_note, spell
from extract.decode import clip_window, probe
from extract.manifest import load_manifest
from shards.schema import SAMPLE_RATE

log = logging.getLogger(__name__)
NAME, PNG = "bench-extract-sweep", "extract-sweep.png"
BEGIN, END = markers(NAME)
write_section = partial(replace_section, name=NAME)  # (path, body)
COLUMNS = (
    ("time s", "run_s", ".2f"),
    ("clips/s", "clips_per_s", ".2f"),
    ("audio-s/s", "audio_s_per_s", ".2f"),
    ("setup s", "load_s", ".2f"),
    ("peak RSS main MiB", "rss_main_mib", ".0f"),
    ("largest worker MiB", "rss_worker_mib", ".0f"),
)


def run_sweep(args: argparse.Namespace, base: dict[str, Any], tmp: Path) -> int:
    """Measure every point (see the module docstring); print the table (or the JSON report); write the PNG and
    the ``bench-extract-sweep`` section when asked to."""
    workers, sizes = QUICK_SWEEP if args.quick else SWEEP
    args.sweep_workers = args.sweep_workers if args.sweep_workers is not None else workers
    args.sweep_batch_sizes = args.sweep_batch_sizes if args.sweep_batch_sizes is not None else sizes
    if args.quick:  # a batch larger than the clips encodes them all at once: it would repeat batch size N
        args.batch_size = base["batch_size"] = min(args.batch_size, args.clips)
    if max(args.sweep_batch_sizes) > args.clips:
        log.warning("batch sizes above --clips %d encode all %d clips at once", args.clips, args.clips)
    manifest = tile_manifest(tmp / "tiled.csv", args.clips)
    audio_s = audio_seconds(manifest)
    run = partial(measure_point, base, manifest, tmp, args.clips, audio_s)
    with args.progress("bench extract sweep", "run") as bar:
        points = measure_points(args.sweep_workers, args.sweep_batch_sizes, args.workers, args.batch_size, run, bar)
    report = make_report(args, base, points, audio_s)
    png = plot_path(args.out, args.plot, PNG)
    if png is not None:
        report["plot"] = str(plot_sweep(report, png))
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    if args.out is not None:
        write_section(args.out, section(report, args.out, png))
        log.info("wrote the %s section of %s and %s", NAME, args.out, png)
    return 0


def audio_seconds(manifest: Path) -> float:
    """Seconds of audio in the clips of ``manifest``: each clip's window, where its file has an audio stream."""
    total = 0.0
    for clip in load_manifest(manifest, MEDIA):
        p = probe(clip.path)
        if p.has_audio:
            t0, t1 = clip_window(p, clip.start, clip.end)
            total += round((t1 - t0) * SAMPLE_RATE) / SAMPLE_RATE  # the samples decoding gives
    return total


def measure_point(
    base: dict[str, Any], manifest: Path, tmp: Path, clips: int, audio_s: float, workers: int, batch_size: int
) -> dict[str, float]:
    """Variant (a) with ``workers`` and ``batch_size`` in a fresh interpreter; its rates over ``run_s``."""
    name = f"pipeline-w{workers}-b{batch_size}"
    log.info("bench extract --sweep: %d workers, batch size %d", workers, batch_size)
    spec = {**base, "workers": workers, "batch_size": batch_size, "variant": "pipeline"}
    got = measure({**spec, "manifest": str(manifest), "out": str(tmp / f"out-{name}")}, tmp / f"{name}.json")
    result = {
        "run_s": got["run_s"],
        "load_s": got["load_s"],
        "clips_per_s": clips / got["run_s"],
        "audio_s_per_s": audio_s / got["run_s"],
        "samples": got["samples"],
        "cpu_s": got["cpu_main_s"] + got["cpu_workers_s"],
        "rss_main_mib": got["rss_main_mib"],
        "rss_worker_mib": got["rss_worker_mib"],
    }
    return {k: round(float(v), 4) for k, v in result.items()}


def make_report(
    args: argparse.Namespace, base: dict[str, Any], points: list[dict[str, Any]], audio_s: float
) -> dict[str, Any]:
    """The sweep report (``bench.sweep``'s keys plus command, machine and settings)."""
    mach = machine()
    settings = {k: v for k, v in base.items() if k != "media_root"} | {
        "clips": args.clips,
        "audio_total_s": round(audio_s, 4),
        "sweep_workers": list(args.sweep_workers),
        "sweep_batch_sizes": list(args.sweep_batch_sizes),
    }
    models = f"text {Path(base['text_model']).name}, audio {Path(base['audio_model']).name}, FaceMesh"
    title = (
        f"mmfuse extraction pipeline: N = {args.clips} clips ({audio_s:.0f} audio-s), fps {base['fps'] or 'native'}"
        f"\n{models}; {mach['cores']} cores, device {base['device']}"
    )
    return {
        "command": command(args),
        "machine": mach,
        "settings": settings,
        "title": title,
        "metric": "clips_per_s",
        "unit": "clips/s",
        "points": points,
        "plot": None,
    }


def format_table(report: dict[str, Any]) -> str:
    """The points as a Markdown table, one row per point, under a line saying what was run."""
    s = report["settings"]
    head = (
        f"N = {s['clips']} clips, {s['audio_total_s']:.1f} audio-seconds; workers {spell(s['sweep_workers'])} at "
        f"batch {s['batch_size']}, batch sizes {spell(s['sweep_batch_sizes'])} with {s['workers']} worker(s)"
    )
    note = shared_note(report["points"])
    return "\n".join([head, "", *points_table(report["points"], COLUMNS), *(["", note] if note else [])])


def section(report: dict[str, Any], out: Path, png: Path | None) -> str:
    """The BENCHMARKS.md section: command, machine and settings, the table, the plot."""
    m, s = report["machine"], report["settings"]
    lines = [
        "## Extraction throughput vs workers and batch size (`mmfuse bench extract --sweep`)",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Machine: {m['cpu_model']}, {m['cores']} cores available, torch {m['torch']} with {s['threads']} intra-op "
        f"thread(s) per encoder process, OMP_NUM_THREADS={m['omp_num_threads']}, GPU: {m['gpu'] or 'none'}, "
        f"1-minute load average at the end {m['load_avg_1min_at_end']}; device {s['device']}. Models: text "
        f"`{s['text_model']}`, audio `{s['audio_model']}`, MediaPipe FaceMesh; fps {s['fps'] or 'native'}; shard "
        f"size {s['shard_size']}. Each point is the pipeline, (a) of the extraction benchmark, in a fresh process "
        "on the same tiled clips: model loading and planning (setup) are excluded from the time; the decode "
        "workers start during setup. Workers are the decode + FaceMesh processes (0: all in the encoder "
        "process); the batch is the pipeline's `--batch-size` (clips per text and audio encoder call). Peak RSS "
        "is `VmHWM`: main = the encoder process, worker = the largest single worker (at 0 workers: the largest "
        "helper process that library imports start, such as `lscpu`).",
        "",
        format_table(report),
    ]
    if png is not None:
        lines += ["", image_link(out, png, "Extraction clips/s vs workers and vs batch size")]
    return "\n".join(lines)
