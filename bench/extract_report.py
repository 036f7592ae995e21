"""The figures of ``mmfuse bench extract`` (``bench/extract.py``) from its variants' measurements: rates, the CPU
floor, CPU-seconds, start-up, peak RSS and the targets' verdicts; with ``--repeat``, each figure's median over
the interleaved rounds (ratios taken within a round) and each round's ratios."""

from __future__ import annotations

import argparse
import statistics
from typing import Any

from bench.extract_runs import command, machine

TARGET_SPEEDUP, TARGET_CEILING, TARGET_RSS_GROWTH, SPEC_FLOOR = 2.0, 1.3, 1.10, 1.15
TARGET_DEFAULTS_SPEEDUP = 1.4  # wall time over the naive loop at the defaults (2 cores)


ROUND_RUNS = ("stages", "naive", "pipeline", "naive_every_core")  # the runs of each --repeat round, in turn
ROUND_KEYS = (
    "pipeline_s", "naive_s", "floor_s", "pipeline_over_floor", "speedup_vs_naive", "speedup_vs_naive_whole",
    "pipeline_cpu_s", "naive_cpu_s", "cpu_pipeline_over_naive", "floor_at_once_s", "pipeline_over_floor_at_once",
    "naive_every_core_s", "speedup_vs_naive_every_core",
)  # fmt: skip


def make_report(args: argparse.Namespace, base: dict[str, Any], runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Every figure, units in the names; ``results`` holds the numbers (with ``--repeat``, each one's median over
    the rounds, ratios taken within each round), ``rounds`` each round's ratios, ``targets`` the verdicts."""
    mach = machine()
    cores_used = min(mach["cores"], args.workers + args.threads)
    per = [
        _results(
            {name: runs[f"{name}@{k}"] for name in ROUND_RUNS} | {"pipeline_4n": runs["pipeline_4n"]}, args, cores_used
        )
        for k in range(args.repeat)
    ]
    r = {key: statistics.median(p[key] for p in per) for key in per[0]}
    settings = {k: v for k, v in base.items() if k != "media_root"} | {"clips": r["clips"], "cores_used": cores_used}
    return {
        "command": command(args),
        "machine": mach,
        "settings": settings | {"repeat": args.repeat},
        "results": {k: round(float(v), 4) for k, v in r.items()},
        "rounds": [{k: round(float(p[k]), 4) for k in ROUND_KEYS} for p in per],
        "targets": _targets(r),
    }


def _results(runs: dict[str, dict[str, Any]], args: argparse.Namespace, cores_used: int) -> dict[str, float]:
    """The figures of one round from its runs (``ROUND_RUNS``, and the 4N pipeline ``pipeline_4n``)."""
    st, nv, pl, p4 = runs["stages"], runs["naive"], runs["pipeline"], runs["pipeline_4n"]
    n = st["clips"]
    r: dict[str, float] = {"clips": n, "clips_4n": 4 * n, "audio_total_s": st["audio_s"], "video_frames": st["frames"]}
    r.update(_rates(st, nv, runs["naive_every_core"], pl, p4))
    r.update(_cpu(st, nv, runs["naive_every_core"], pl, cores_used))
    r.update(_start_up_and_memory(nv, pl, p4, args.workers))
    return r


def _rates(st: dict, nv: dict, every: dict, pl: dict, p4: dict) -> dict[str, float]:
    """Wall time and rates of each variant, and the pipeline's speed-ups over the naive loops (``every``: on
    torch's default threads) and the ceiling."""
    n, r = st["clips"], {}
    for name, secs in (
        ("pipeline", pl["run_s"]),
        ("naive", nv["run_s"]),
        ("naive_every_core", every["run_s"]),
        ("decode", st["decode_wall_s"]),
        ("ceiling", st["decode_facemesh_wall_s"]),
    ):
        r[f"{name}_s"] = secs
        r[f"{name}_clips_per_s"] = n / secs
        r[f"{name}_audio_s_per_s"] = st["audio_s"] / secs
        r[f"{name}_frames_per_s"] = st["frames"] / secs
    r["pipeline_whole_s"] = pl["load_s"] + pl["run_s"]  # set-up (model loading, workers starting) + run
    r["naive_whole_s"] = nv["load_s"] + nv["run_s"]
    r["speedup_vs_naive_whole"] = r["naive_whole_s"] / r["pipeline_whole_s"]
    r["pipeline_4n_s"] = p4["run_s"]
    r["pipeline_4n_clips_per_s"] = 4 * n / p4["run_s"]
    r["pipeline_marginal_clips_per_s"] = 3 * n / (p4["run_s"] - pl["run_s"])
    r["speedup_vs_naive"] = nv["run_s"] / pl["run_s"]
    r["speedup_vs_naive_every_core"] = every["run_s"] / pl["run_s"]
    r["speedup_vs_naive_marginal"] = r["pipeline_marginal_clips_per_s"] / r["naive_clips_per_s"]
    r["pipeline_over_ceiling"] = pl["run_s"] / st["decode_facemesh_wall_s"]
    r["ceiling_over_pipeline"] = st["decode_facemesh_wall_s"] / pl["run_s"]
    return r


def _cpu(st: dict, nv: dict, every: dict, pl: dict, cores_used: int) -> dict[str, float]:
    """Each stage's CPU-seconds alone, the floor they give on ``cores_used`` cores, and the CPU the variants spent."""
    stage_cpu = {
        "decode": st["decode_cpu_s"],
        "facemesh": st["decode_facemesh_cpu_s"] - st["decode_cpu_s"],
        "text": st["text_cpu_s"],
        "audio": st["audio_cpu_s"],
    }
    floor_s = sum(stage_cpu.values()) / cores_used
    r = {f"{k}_cpu_s": v for k, v in stage_cpu.items()}
    r["floor_s"] = floor_s
    r["no_overlap_estimate_s"] = st["decode_facemesh_wall_s"] + st["text_wall_s"] + st["audio_wall_s"]
    r["pipeline_over_floor"] = pl["run_s"] / floor_s
    # (e): the same stages with the pipeline's two sides running at once
    r["audio_cpu_at_once_s"] = st["audio_cpu_at_once_s"]
    r["decode_facemesh_cpu_at_once_s"] = st["decode_facemesh_cpu_at_once_s"]
    r["audio_at_once_over_alone"] = st["audio_cpu_at_once_s"] / st["audio_cpu_s"]
    r["decode_facemesh_at_once_over_alone"] = st["decode_facemesh_cpu_at_once_s"] / st["decode_facemesh_cpu_s"]
    r["floor_at_once_s"] = (
        st["decode_facemesh_cpu_at_once_s"] + st["text_cpu_s"] + st["audio_cpu_at_once_s"]
    ) / cores_used
    r["pipeline_over_floor_at_once"] = pl["run_s"] / r["floor_at_once_s"]
    r["naive_over_floor"] = nv["run_s"] / floor_s
    r["naive_every_core_over_floor"] = every["run_s"] / floor_s  # the best speed-up any schedule has over (b′)
    r["floor_over_ceiling"] = floor_s / st["decode_facemesh_wall_s"]  # the best (a)/(d) on these cores
    r["pipeline_cpu_s"] = pl["cpu_main_s"] + pl["cpu_workers_s"]
    r["naive_cpu_s"] = nv["cpu_main_s"]
    r["cpu_pipeline_over_naive"] = r["pipeline_cpu_s"] / r["naive_cpu_s"]
    r["naive_every_core_cpu_s"] = every["cpu_main_s"]
    r["cpu_pipeline_over_naive_every_core"] = r["pipeline_cpu_s"] / r["naive_every_core_cpu_s"]
    r["naive_audio_cpu_s"] = nv["stage_cpu_s"]["audio"]
    r["naive_text_cpu_s"] = nv["stage_cpu_s"]["text"]
    for stage, secs in nv["stage_wall_s"].items():
        r[f"naive_{stage}_share"] = secs / nv["run_s"]
    return r


def _start_up_and_memory(nv: dict[str, Any], pl: dict[str, Any], p4: dict[str, Any], workers: int) -> dict[str, float]:
    """Model loading, the pipeline's set-up and decode waits, and peak RSS at N and 4N clips."""
    r = {
        "model_load_s": nv["load_s"],
        "pipeline_setup_s": pl["load_s"],
        "pipeline_first_clip_s": pl["first_clip_s"],
        "pipeline_decode_wait_s": pl["decode_wait_s"],
        "pipeline_encoder_busy_share": 1 - pl["decode_wait_s"] / pl["run_s"],
        "naive_rss_main_mib": nv["rss_main_mib"],
    }
    for key, run_ in (("pipeline", pl), ("pipeline_4n", p4)):
        r[f"{key}_rss_main_mib"] = run_["rss_main_mib"]
        r[f"{key}_rss_worker_mib"] = run_["rss_worker_mib"]
    r["rss_main_4n_over_n"] = p4["rss_main_mib"] / pl["rss_main_mib"]
    r["rss_worker_4n_over_n"] = p4["rss_worker_mib"] / pl["rss_worker_mib"] if workers else 1.0
    return r


def _targets(r: dict[str, float]) -> dict[str, dict[str, Any]]:
    """Each target's value and verdict; ``best_possible``, where known, is the value at the stage floor: what no
    schedule on these cores can beat."""
    growth = max(r["rss_main_4n_over_n"], r["rss_worker_4n_over_n"])
    return {
        "speedup_vs_naive_at_least_1.4x": {
            "value": r["speedup_vs_naive"],
            "met": r["speedup_vs_naive"] >= TARGET_DEFAULTS_SPEEDUP,
            "best_possible": r["naive_over_floor"],
        },
        "speedup_vs_naive_every_core_at_least_1.4x": {
            "value": r["speedup_vs_naive_every_core"],
            "met": r["speedup_vs_naive_every_core"] >= TARGET_DEFAULTS_SPEEDUP,
            "best_possible": r["naive_every_core_over_floor"],
        },
        "speedup_vs_naive_at_least_2x": {
            "value": r["speedup_vs_naive"],
            "met": r["speedup_vs_naive"] >= TARGET_SPEEDUP,
            "best_possible": r["naive_over_floor"],
        },
        "within_1.3x_of_ceiling": {
            "value": r["pipeline_over_ceiling"],
            "met": r["pipeline_over_ceiling"] <= TARGET_CEILING,
            "best_possible": r["floor_over_ceiling"],
        },
        "rss_growth_n_to_4n_under_10pct": {"value": growth, "met": growth < TARGET_RSS_GROWTH},
        "spec_within_1.15x_of_floor": {
            "value": r["pipeline_over_floor"],
            "met": r["pipeline_over_floor"] <= SPEC_FLOOR,
        },
        "cpu_seconds_at_most_naive": {"value": r["cpu_pipeline_over_naive"], "met": r["cpu_pipeline_over_naive"] <= 1},
    }
