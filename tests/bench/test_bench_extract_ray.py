"""``mmfuse bench extract --engine ray``: the report of the two engines' runs, its ratio and verdict."""

from __future__ import annotations

import argparse

import pytest

from bench.extract_ray import format_table, make_report, run_engines, section
from extract.extractors.base import ExtractionError

BASE = {"text_model": "t", "audio_model": "a", "workers": 2, "threads": 1, "batch_size": 8, "shard_size": 16}
BASE |= {"fps": None, "device": "cpu", "media_root": "/media"}


def args(**kw) -> argparse.Namespace:
    base = {"clips": 16, "workers": 2, "threads": 1, "batch_size": 8, "device": "cpu", "shard_size": None}
    base |= {"fps": None, "text_model": None, "audio_model": None, "quick": False, "json": False, "sweep": False}
    return argparse.Namespace(**{**base, "out": None, "plot": None, **kw})


def run(run_s: float, **kw) -> dict:
    return {"load_s": 5.0, "run_s": run_s, "samples": 16, "first_clip_s": 1.5, "decode_wait_s": 2.0, **kw}


def test_report_gives_ray_over_local_and_its_verdict() -> None:
    report = make_report(args(), BASE, {"pipeline": run(8.0), "ray": run(9.2, ray_start_s=6.0)})
    r = report["results"]
    assert r["ray_over_local"] == 1.15 and r["local_clips_per_s"] == 2.0 and r["ray_start_s"] == 6.0
    assert report["targets"] == {"ray_within_1.25x_of_local": {"value": pytest.approx(1.15), "met": True}}
    assert report["command"].startswith("mmfuse bench extract --engine ray --clips 16 --workers 2")
    table = format_table(report)
    assert "| local | 2 workers + encoder process | 8.00 | 2.00 |" in table
    assert "| ray | 2 decoder actors + 1 encoder actor, local Ray | 9.20 | 1.74 |" in table
    assert "ray / local time: **1.15×** (target ≤ 1.25×: met)" in table
    slow = make_report(args(), BASE, {"pipeline": run(8.0), "ray": run(12.0, ray_start_s=6.0)})
    assert not slow["targets"]["ray_within_1.25x_of_local"]["met"]
    assert "**1.50×** (target ≤ 1.25×: **not met**)" in section(slow)


def test_engines_that_disagree_or_a_sweep_are_refused(tmp_path) -> None:
    with pytest.raises(ExtractionError, match="the engines wrote 16 and 15 samples"):
        make_report(args(), BASE, {"pipeline": run(8.0), "ray": run(9.0, ray_start_s=1.0, samples=15)})
    with pytest.raises(ExtractionError, match="--engine ray compares the two engines once: leave out --sweep"):
        run_engines(args(sweep=True), BASE, tmp_path)
