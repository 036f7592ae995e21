"""``mmfuse bench train --quick``: the report's fields, the generated shards, the BENCHMARKS.md section."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ttyrun import NATIVE, run_mmfuse

from bench.train import BEGIN, END, write_section
from bench.train_steps import QUICK, make_feature_set, write_dataset
from shards.inspect import inspect_dataset

RESULTS = {
    "stream_samples_per_s", "stream_s_per_step", "stream_data_wait_s_per_step", "memory_samples_per_s",
    "memory_s_per_step", "memory_load_s", "stream_over_memory", "e2e_samples_per_s", "e2e_s_per_step",
    "e2e_data_wait_s_per_step", "frozen_over_e2e", "ddp1_samples_per_s", "ddp1_s_per_step", "ddp2_samples_per_s",
    "ddp2_s_per_step", "ddp2_over_ddp1", "rss_1x_main_mb", "rss_1x_worker_mb", "rss_4x_main_mb", "rss_4x_worker_mb",
    "rss_1x_steps", "rss_4x_steps", "rss_4x_over_1x_main", "rss_4x_over_1x_worker",
}  # fmt: skip
STAGES = ("read", "decode", "validate", "select", "to_inputs", "collate", "handoff", "normalise")


@pytest.mark.integration
def test_quick_report_has_every_field(tmp_path: Path) -> None:
    """Run in a terminal with --no-progress and stdout redirected: no bar on the screen, the JSON report on stdout."""
    out = tmp_path / "BENCHMARKS.md"
    argv = ["bench", "train", "--quick", "--json", "--workdir", str(tmp_path / "work"), "--out", str(out)]
    run = run_mmfuse([*argv, "--no-progress"], "stdout-piped")
    assert run.returncode == 0, run.terminal[-3000:]
    assert "\r" not in run.terminal and "Traceback" not in run.terminal and NATIVE.search(run.terminal) is None
    report = json.loads(run.stdout)
    assert set(report["results"]) == RESULTS
    for name, value in report["results"].items():
        assert value > 0, name
    assert set(report["profile"]) == {f"{s}_ms_per_batch" for s in STAGES}
    assert all(v > 0 for v in report["profile"].values())
    assert set(report["targets"]) == {"stream_ge_0.9x_memory", "rss_growth_lt_10pct"}
    setup = report["setup"]
    assert setup["command"].startswith("mmfuse bench train") and "--quick" in setup["command"]
    assert setup["samples"] == 48 and setup["steps"] == 3 and setup["warmup_steps"] == 1
    assert report["results"]["rss_1x_steps"] == 12 and report["results"]["rss_4x_steps"] == 48  # one epoch each
    text = out.read_text()
    assert text.count(BEGIN) == 1 and setup["command"] in text and "| frozen, streamed |" in text
    for n in (1, 4):  # the generated shard directories read back and validate
        summary = inspect_dataset(tmp_path / "work" / f"shards-{n}x", verify=True)
        assert summary["verify"]["ok"], summary["verify"]["problems"]
        assert summary["samples"] == 48 * n


def test_generated_shards_verify_and_tile(tmp_path: Path) -> None:
    fset = make_feature_set("text-model", "audio-model", QUICK)
    one = write_dataset(tmp_path / "a", 10, QUICK, fset, shard_size=4)
    tiled = write_dataset(tmp_path / "b", 20, QUICK, fset, shard_size=4, pool=10)
    assert [s["samples"] for s in one["shards"]] == [4, 4, 2] and tiled["samples"] == 20
    assert one["dims"] == {"Dt": QUICK.dt, "Da": QUICK.da, "landmarks": 478}
    assert one["stats"]["video_lmk.npy"]["count"] > 0
    for root in (tmp_path / "a", tmp_path / "b"):
        summary = inspect_dataset(root, verify=True)
        assert summary["verify"]["ok"], summary["verify"]["problems"]


def test_write_section_twice_keeps_one_section_and_the_others(tmp_path: Path) -> None:
    path = tmp_path / "BENCHMARKS.md"
    others = "<!-- bench-extract:begin -->\nextraction\n<!-- bench-extract:end -->\n\n<!-- synthetic:begin -->\nsyn\n"
    path.write_text(
        "# Benchmarks\n\nFirst paragraph,\nstill first.\n\n## Reading\n\n" + others + "<!-- synthetic:end -->\n"
    )
    write_section(path, "first run")
    text = path.read_text()
    assert text.index("still first.") < text.index(BEGIN) < text.index("## Reading")  # after the first paragraph
    write_section(path, "second run")
    text = path.read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1
    assert "second run" in text and "first run" not in text
    assert others in text and "<!-- synthetic:end -->" in text and "## Reading" in text


def test_timed_training_splits_each_step_into_wait_and_compute(tmp_path: Path) -> None:
    from bench.train_steps import save_tiny_encoders, timed_training

    fset = make_feature_set(*save_tiny_encoders(tmp_path), QUICK)
    write_dataset(tmp_path / "shards", 16, QUICK, fset, shard_size=8)
    overrides = ["batch_size=4", "num_workers=0", "model.hidden=12", "model.num_layers=1", "shuffle_buffer=8"]
    result = timed_training(tmp_path / "shards", "late", overrides, source="stream", steps=3, warmup=1)
    assert result["device"] == "cpu"
    assert result["data_wait_s_per_step"] > 0 and result["compute_s_per_step"] > 0
    total = result["data_wait_s_per_step"] + result["compute_s_per_step"]
    assert total == pytest.approx(result["s_per_step"], rel=1e-9)
    assert result["s_per_step"] * result["steps"] == pytest.approx(result["seconds"])


def test_device_clock_waits_for_cuda_work(monkeypatch) -> None:
    import torch

    from bench.train_steps import device_clock

    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", synced.append)
    device_clock(torch.device("cpu"))
    assert synced == []
    device_clock(torch.device("cuda:0"))
    assert synced == [torch.device("cuda:0")]


def test_the_ranks_times_are_reduced_on_the_ranks_device(monkeypatch) -> None:
    """NCCL reduces GPU tensors only: ``bench train --device cuda`` on 2 GPUs reduced a CPU tensor and failed."""
    import torch
    import torch.distributed as dist

    from bench.train_steps import slowest_rank
    from train.runtime import Dist

    class Reduced(Exception):
        pass

    seen = []

    def on_a_gpu(tensor, op):  # the tensor NCCL would be handed (a meta device stands in for the GPU)
        seen.append((tensor.device, tensor.dtype, op))
        raise Reduced

    monkeypatch.setattr(dist, "all_reduce", on_a_gpu)
    result = {"seconds": 2.0, "steps": 4, "s_per_step": 0.5, "samples_per_s": 48.0}
    with pytest.raises(Reduced):
        slowest_rank(dict(result), Dist(0, 2, 0, torch.device("meta"), enabled=True))
    assert seen == [(torch.device("meta"), torch.float64, dist.ReduceOp.MAX)]

    def slower_rank_took_3_s(tensor, op):
        tensor.fill_(max(float(tensor), 3.0))

    monkeypatch.setattr(dist, "all_reduce", slower_rank_took_3_s)
    slowest_rank(result, Dist(0, 2, 0, torch.device("cpu"), enabled=True))
    assert result == {"seconds": 3.0, "steps": 4, "s_per_step": 0.75, "samples_per_s": 32.0}
    alone = {"seconds": 2.0, "steps": 4}
    slowest_rank(alone, Dist())  # one process: nothing to reduce
    assert alone == {"seconds": 2.0, "steps": 4}


@pytest.mark.gpu
def test_timed_training_on_cuda(tmp_path: Path) -> None:
    from bench.train_steps import save_tiny_encoders, timed_training

    fset = make_feature_set(*save_tiny_encoders(tmp_path), QUICK)
    write_dataset(tmp_path / "shards", 16, QUICK, fset, shard_size=8)
    overrides = ["batch_size=4", "num_workers=0", "model.hidden=12", "model.num_layers=1", "shuffle_buffer=8"]
    for mode in ("frozen", "end_to_end"):
        result = timed_training(
            tmp_path / "shards", "late", [*overrides, f"mode={mode}"], source="memory", steps=3, warmup=1, device="cuda"
        )
        assert result["device"].startswith("cuda") and result["compute_s_per_step"] > 0
        total = result["data_wait_s_per_step"] + result["compute_s_per_step"]
        assert total == pytest.approx(result["s_per_step"], rel=1e-9)


def test_benchmark_children_keep_the_callers_import_path(tmp_path: Path, monkeypatch) -> None:
    """On the GPU image the carried wheels are on PYTHONPATH: a child run sees them after the tree."""
    import argparse
    import subprocess

    import bench.train_steps

    seen = {}

    def fake_run(cmd, *, env, **kwargs):
        seen.update(env)
        (tmp_path / "child" / "rank0.json").write_text("{}")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(bench.train_steps.subprocess, "run", fake_run)
    monkeypatch.setenv("PYTHONPATH", "/carried/site")
    args = argparse.Namespace(model="late", threads=1)
    bench.train_steps.run_child(tmp_path / "child", tmp_path, [], args, 1, steps=1, warmup=0)
    assert seen["PYTHONPATH"].split(":") == [str(bench.train_steps.ROOT), "/carried/site"]


def test_a_timed_step_ends_when_the_next_one_asks_for_its_batches() -> None:
    """``fit`` asks for a step's ``grad_accum`` batches, then computes; the step ends when the next one asks. The
    last step (no next one) is not timed."""
    from bench.train_steps import TimedBatches

    timed = TimedBatches("stream")
    timed.asked, timed.got = [0.0, 1.0, 10.0, 11.0, 20.0, 21.0], [0.5, 2.0, 10.5, 12.0, 20.5, 22.0]
    assert timed.step_split(2) == ([1.5, 1.5], [8.0, 8.0])
    with pytest.raises(ValueError, match="source must be stream or memory, got 'disk'"):
        TimedBatches("disk")
