"""``mmfuse bench extract --engine ray``: the Ray engine beside the local engine on the same N tiled clips.

Both run the pipeline with K decode workers (Ray: K decoder actors and one encoder actor, on a local Ray
started by the run) and the same models, batch size and shard size, each in a fresh interpreter. Set-up is
excluded from both times: the local engine's is model loading, its decode workers starting meanwhile; Ray's is
starting the local cluster (reported apart: a cluster is started once for many runs) and its actors, the encoder
loading its models while the decoders start. Both include waiting for the first decoded clip. The ratio of the
two times is Ray's overhead on this machine (target: at most 1.25×).
"""

from __future__ import annotations

import argparse
import json
import logging
from functools import partial
from pathlib import Path
from typing import Any

from bench.extract_runs import command, machine, measure_all, tile_manifest
from bench.markdown import replace_section
from extract.extractors.base import ExtractionError

log = logging.getLogger(__name__)

write_section = partial(replace_section, name="bench-extract-ray")  # (path, body)
TARGET_RATIO = 1.25


def run_engines(args: argparse.Namespace, base: dict[str, Any], tmp: Path) -> int:
    """Run the local and the Ray engine on the same clips; print (and with ``--out`` record) their ratio."""
    if args.sweep:
        raise ExtractionError("--engine ray compares the two engines once: leave out --sweep")
    manifest = tile_manifest(tmp / "tiled-n.csv", args.clips)
    plan = [("pipeline", "pipeline", manifest), ("ray", "ray", manifest)]  # the local engine, then Ray
    runs = measure_all(args, "bench extract --engine ray", plan, base, tmp)
    report = make_report(args, base, runs)
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    if args.out is not None:
        write_section(args.out, section(report))
        log.info("wrote the bench-extract-ray section of %s", args.out)
    return 0


def make_report(args: argparse.Namespace, base: dict[str, Any], runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    local, ray = runs["pipeline"], runs["ray"]
    if local["samples"] != ray["samples"]:
        raise ExtractionError(f"the engines wrote {local['samples']} and {ray['samples']} samples: they must agree")
    r = {
        "clips": args.clips,
        "local_s": local["run_s"],
        "ray_s": ray["run_s"],
        "local_clips_per_s": args.clips / local["run_s"],
        "ray_clips_per_s": args.clips / ray["run_s"],
        "ray_over_local": ray["run_s"] / local["run_s"],
        "local_setup_s": local["load_s"],
        "ray_setup_s": ray["load_s"],
        "ray_start_s": ray["ray_start_s"],
        "local_first_clip_s": local["first_clip_s"],
        "ray_first_clip_s": ray["first_clip_s"],
        "local_decode_wait_s": local["decode_wait_s"],
        "ray_decode_wait_s": ray["decode_wait_s"],
    }
    settings = {k: v for k, v in base.items() if k != "media_root"} | {"clips": args.clips}
    return {
        "command": command(args).replace("mmfuse bench extract", "mmfuse bench extract --engine ray", 1),
        "machine": machine(),
        "settings": settings,
        "results": {k: round(float(v), 4) for k, v in r.items()},
        "targets": {
            f"ray_within_{TARGET_RATIO}x_of_local": {
                "value": r["ray_over_local"],
                "met": r["ray_over_local"] <= TARGET_RATIO,
            }
        },
    }


def format_table(report: dict[str, Any]) -> str:
    r, s = report["results"], report["settings"]
    k = s["workers"]
    t = report["targets"][f"ray_within_{TARGET_RATIO}x_of_local"]
    return "\n".join(
        [
            f"N = {r['clips']:.0f} clips, batch {s['batch_size']}, shard size {s['shard_size']}",
            "",
            "| engine | how | time s | clips/s | first clip s | encoder waited s |",
            "|---|---|---|---|---|---|",
            f"| local | {k} workers + encoder process | {r['local_s']:.2f} | {r['local_clips_per_s']:.2f} | "
            f"{r['local_first_clip_s']:.2f} | {r['local_decode_wait_s']:.2f} |",
            f"| ray | {max(k, 1)} decoder actors + 1 encoder actor, local Ray | {r['ray_s']:.2f} | "
            f"{r['ray_clips_per_s']:.2f} | {r['ray_first_clip_s']:.2f} | {r['ray_decode_wait_s']:.2f} |",
            "",
            f"- ray / local time: **{r['ray_over_local']:.2f}×** (target ≤ {TARGET_RATIO}×: "
            f"{'met' if t['met'] else '**not met**'})",
            f"- not in the times: set-up (local: model loading, {r['local_setup_s']:.2f} s; ray: "
            f"{r['ray_setup_s']:.2f} s, of which {r['ray_start_s']:.2f} s starting the local Ray, the rest its actors "
            "with the encoder's model loading)",
        ]
    )


def section(report: dict[str, Any]) -> str:
    m = report["machine"]
    return "\n".join(
        [
            "## Extraction on Ray against the local engine",
            "",
            f"Command: `{report['command']}`",
            "",
            f"Machine: {m['cpu_model']}, {m['cores']} cores available, GPU: {m['gpu'] or 'none'}, 1-minute load "
            f"average at the end {m['load_avg_1min_at_end']}. Each engine runs in a fresh process; timings are "
            "only comparable within this run (shared machine).",
            "",
            format_table(report),
        ]
    )
