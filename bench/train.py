"""``mmfuse bench train``: training throughput on one synthetic shard directory of realistic shapes.

    mmfuse bench train --samples 512 --steps 60 --out BENCHMARKS.md

Variants, all the same model, batch and number of timed steps (the first ``--warmup`` steps are not timed):

1. frozen features streamed from the shards (``make_loader``, ``--workers`` workers) vs the same tensors held in
   memory (``InMemorySource.from_shards``): data loading must not be the bottleneck (target: >= 0.9x);
2. frozen vs end to end (text ids through BERT, waveform through wav2vec 2.0, with gradients), streamed;
3. 1 vs 2 processes under ``torchrun`` (gloo on CPU), total samples/s;
4. peak RSS of one streaming epoch over 1x and 4x the samples, each in a fresh process (target: < 10 % growth):
   the main process's ``VmHWM`` and the largest DataLoader worker's (``bench.memory``: ``ru_maxrss`` would
   report the peak of the process that started them).

Every run reports its step time split into the wait for data and the compute (``step_split``). ``--device``
(default cpu, so the numbers compare with BENCHMARKS.md) runs them on a GPU, clocks read after the device's
queued work.

Per-stage costs of the data pipeline (ms per batch, measured in the main process) are reported beside them.
The encoders are the bundled all-MiniLM-L6-v2 and ``random:wav2vec2-small`` (``--quick``: tiny ones).

``--sweep`` runs instead frozen, streamed samples/s against the DataLoader worker count and the batch size, with
in-memory samples/s as the reference, and plots them (``bench/train_sweep.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.markdown import markers, replace_section
from bench.sweep import add_sweep_arguments, stray_sweep_flags, ticker
from bench.train_runs import QUICK_SWEEP, SWEEP, command_line, machine, run_overrides, workdir

if TYPE_CHECKING:  # the command line imports this module at start-up: no shards (numpy) here
    from shards import Progress

BEGIN, END = markers("bench-train")
write_section = partial(replace_section, name="bench-train")  # (path, body)
STREAM_TARGET, RSS_TARGET = 0.9, 1.10
QUICK_ARGS = {"shuffle_buffer": 8, "samples": 48, "batch_size": 4, "steps": 3, "warmup": 1, "workers": 1, "repeats": 1}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = __doc__.split("\n\n")[0]
    p.add_argument("--model", default="late", help="fusion model (fusion.MODELS), with its preset")
    p.add_argument("--samples", type=int, default=512, help="samples in the 1x shard directory")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=60, help="timed training steps per variant")
    p.add_argument("--warmup", type=int, default=4, help="untimed steps before the clock starts")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers per process when streaming")
    p.add_argument(
        "--shuffle-buffer", type=int, default=64, help="samples per worker's shuffle buffer (training default 256)"
    )
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per training process")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto for the timed runs (default cpu)")
    p.add_argument("--repeats", type=int, default=2, help="alternating stream / in-memory runs; the best is kept")
    p.add_argument("--quick", action="store_true", help="tiny data, encoders and step counts (a smoke test)")
    p.add_argument("--workdir", type=Path, default=None, help="keep the generated shards here (default: a temp dir)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument(
        "--data-only",
        action="store_true",
        help="instead: the data path alone, mmfuse's loader vs a plain webdataset + np.load loop (bench/train_data.py)",
    )
    p.add_argument("--out", type=Path, default=None, help="BENCHMARKS.md whose bench-train section is replaced")
    add_sweep_arguments(p, "frozen streamed samples/s", SWEEP, QUICK_SWEEP, "train-sweep.png")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.quick:
        for key, value in QUICK_ARGS.items():
            setattr(args, key, value)
    if stray_sweep_flags(args):
        from train.config import TrainConfigError

        raise TrainConfigError(f"{', '.join(stray_sweep_flags(args))} only apply with --sweep: add it")
    import torch  # here, not at import: `mmfuse --help` must not pay for torch

    from extract.devices import resolve_device

    args.device = resolve_device(args.device)  # a GPU asked for but absent: one line, exit 1
    torch.set_num_threads(args.threads)
    if args.sweep:
        from bench.train_sweep import run_sweep

        return run_sweep(args)
    if args.data_only:
        from bench.train_data import run_data_only

        return run_data_only(args)
    with workdir(args) as work, args.progress("bench train", "run") as bar:
        report = benchmark(args, work, bar)
    if args.json:
        print(json.dumps(report, indent=1, sort_keys=True))
    else:
        print(format_section(report))
    if args.out is not None:
        write_section(args.out, format_section(report))
    return 0


def benchmark(args: argparse.Namespace, work: Path, progress: Progress | None = None) -> dict[str, Any]:
    """Make the data, run every variant, and return the report (see the module docstring).
    ``progress(runs done, runs in all)`` follows the runs (the data and the stage profile count as one each)."""
    from bench.train_steps import bench_data, run_child, timed_training, write_dataset

    tick = ticker(progress, 2 * args.repeats + 7)
    shapes, encoders, fset, shard_size = bench_data(work, args.quick)
    started = time.perf_counter()
    one = write_dataset(work / "shards-1x", args.samples, shapes, fset, shard_size=shard_size)
    write_dataset(work / "shards-4x", 4 * args.samples, shapes, fset, shard_size=shard_size, pool=args.samples)
    data_s = time.perf_counter() - started
    tick()
    frozen = run_overrides(args, batch_size=args.batch_size, workers=args.workers)
    end_to_end = run_overrides(args, batch_size=args.batch_size, workers=args.workers, mode="end_to_end")
    timing = dict(steps=args.steps, warmup=args.warmup, device=args.device)
    shards = work / "shards-1x"

    memory, stream = [], []
    for _ in range(args.repeats):  # alternating, so load from other jobs on the machine hits both alike
        memory.append(timed_training(shards, args.model, frozen, source="memory", **timing))
        tick()
        stream.append(timed_training(shards, args.model, frozen, source="stream", **timing))
        tick()
    e2e = timed_training(shards, args.model, end_to_end, source="stream", **timing)
    tick()
    ddp, rss = {}, {}
    for n in (1, 2):
        ddp[n] = run_child(work / f"ddp{n}", shards, frozen, args, n, steps=args.steps, warmup=args.warmup)
        tick()
    epoch = {n: args.samples * n // args.batch_size for n in (1, 4)}
    for n in (1, 4):
        # fit trains one step past the timed ones (it ends the last): 1 + (epoch - 2) + 1 steps, one epoch
        rss[n] = run_child(work / f"rss{n}x", work / f"shards-{n}x", frozen, args, 1, steps=epoch[n] - 2, warmup=1)
        tick()

    data = _config(args, frozen).data
    profile = stage_profile(shards, data, batches=min(16, args.samples // args.batch_size))
    tick()
    best = {"memory": max(memory, key=_rate), "stream": max(stream, key=_rate), "e2e": e2e}
    results = _results(best["memory"], best["stream"], e2e, ddp, rss)
    setup = _setup_record(args, work, one, (shapes, encoders), data_s, memory, stream)
    targets = {
        "stream_ge_0.9x_memory": results["stream_over_memory"] >= STREAM_TARGET,
        "rss_growth_lt_10pct": max(results["rss_4x_over_1x_main"], results["rss_4x_over_1x_worker"]) < RSS_TARGET,
    }
    split = {name: step_split(r) for name, r in best.items()}
    return {"setup": setup, "results": results, "profile": profile, "targets": targets, "step_split": split}


def step_split(result: dict[str, Any]) -> dict[str, float]:
    """A timed run's seconds per step: waiting for data, computing (on its device), and both."""
    keys = ("data_wait_s_per_step", "compute_s_per_step", "s_per_step")
    return {k: result[k] for k in keys}


def _results(
    memory_best: dict[str, Any],
    stream_best: dict[str, Any],
    e2e: dict[str, Any],
    ddp: dict[int, Any],
    rss: dict[int, Any],
) -> dict[str, float]:
    """The report's figures from the best in-memory and streamed runs, the end-to-end run, the DDP and RSS children."""
    results = {
        "stream_samples_per_s": stream_best["samples_per_s"],
        "stream_s_per_step": stream_best["s_per_step"],
        "stream_data_wait_s_per_step": stream_best["data_wait_s_per_step"],
        "memory_samples_per_s": memory_best["samples_per_s"],
        "memory_s_per_step": memory_best["s_per_step"],
        "memory_load_s": memory_best["load_s"],
        "stream_over_memory": stream_best["samples_per_s"] / memory_best["samples_per_s"],
        "e2e_samples_per_s": e2e["samples_per_s"],
        "e2e_s_per_step": e2e["s_per_step"],
        "e2e_data_wait_s_per_step": e2e["data_wait_s_per_step"],
        "frozen_over_e2e": stream_best["samples_per_s"] / e2e["samples_per_s"],
        "ddp1_samples_per_s": ddp[1]["samples_per_s"],
        "ddp1_s_per_step": ddp[1]["s_per_step"],
        "ddp2_samples_per_s": ddp[2]["samples_per_s"],
        "ddp2_s_per_step": ddp[2]["s_per_step"],
        "ddp2_over_ddp1": ddp[2]["samples_per_s"] / ddp[1]["samples_per_s"],
    }
    for n in (1, 4):
        results[f"rss_{n}x_main_mb"] = rss[n]["main_rss_mb"]
        results[f"rss_{n}x_worker_mb"] = rss[n]["worker_rss_mb"]
        results[f"rss_{n}x_steps"] = rss[n]["steps"] + rss[n]["warmup_steps"] + 1  # and the step that ends them
    results["rss_4x_over_1x_main"] = rss[4]["main_rss_mb"] / rss[1]["main_rss_mb"]
    results["rss_4x_over_1x_worker"] = rss[4]["worker_rss_mb"] / rss[1]["worker_rss_mb"]
    return results


def _setup_record(
    args: argparse.Namespace,
    work: Path,
    one: dict[str, Any],
    data: tuple[Any, tuple[str, str]],
    data_s: float,
    memory: list[dict[str, Any]],
    stream: list[dict[str, Any]],
) -> dict[str, Any]:
    """How the report was made: command, machine, data shapes and encoders, settings, every run's rate."""
    shapes, encoders = data
    setup = {
        "command": command_line(args) + ("" if args.device == "cpu" else f" --device {args.device}"),
        "device": args.device,
        "machine": machine(args.threads),
        "samples": args.samples,
        "shards": len(one["shards"]),
        "shard_mb": sum(s["bytes"] for s in one["shards"]) / 1e6,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup_steps": args.warmup,
        "workers": args.workers,
        "shuffle_buffer": args.shuffle_buffer,
        "torch_threads": args.threads,
        "repeats": args.repeats,
        "model": args.model,
        "encoders": {"text": encoders[0], "audio": encoders[1]},
        "shapes": {k: getattr(shapes, k) for k in ("tokens", "seconds", "dt", "da")},
        "data_write_s": data_s,
        "workdir": str(work),
        "all_runs_samples_per_s": {"memory": [_rate(r) for r in memory], "stream": [_rate(r) for r in stream]},
    }
    return setup


def _rate(result: dict[str, Any]) -> float:
    return result["samples_per_s"]


def _config(args: argparse.Namespace, overrides: list[str]):
    from train.config import make_train_config

    return make_train_config(args.model, overrides=overrides)


def stage_profile(shards: Path, data: Any, batches: int) -> dict[str, float]:
    """Milliseconds per batch of each data stage, run one after another in this process (no workers).

    Worker stages: read, decode, validate, select, to_inputs, collate (``collate_chunk``: padded tensors);
    ``handoff`` is one round trip of that chunk through the DataLoader queue's pickler (tensors move to shared
    memory, without the pipe); ``normalise`` is the network's first step (on the training device; here the CPU).
    """
    from multiprocessing.reduction import ForkingPickler

    from shards.dataset import ShardDataset
    from train.batches import Normalise, collate_chunk
    from train.data import plan_shards
    from train.inputs import feature_dims, has_video_geom
    from train.stages import ReadShards, SafeDecode, SelectModalities, ToInputs, Validate

    dataset = ShardDataset.load(shards)
    tasks = plan_shards(dataset, "train", train=False, seed=0, epoch=0, rank=0, world_size=1)
    geom = has_video_geom(dataset)
    dims = feature_dims(dataset, data.modalities, geom)
    stages = {
        "decode": SafeDecode(False),
        "validate": Validate(dataset, False),
        "select": SelectModalities(data.modalities, data.raw),
        "to_inputs": ToInputs(data.modalities, dims, data.raw, "label", geom),
    }
    normalise = Normalise.from_dataset(dataset, data.modalities, geom, dims)
    spent = dict.fromkeys(["read", *stages, "collate", "handoff", "normalise"], 0.0)
    reader = ReadShards(False)(tasks)
    for _ in range(batches):
        items = []
        for _ in range(data.batch_size):
            last = time.perf_counter()
            sample = next(reader)
            spent["read"] += time.perf_counter() - last
            for name, stage in stages.items():
                last = time.perf_counter()
                sample = stage(sample)
                spent[name] += time.perf_counter() - last
            items.append(sample)
        clock = [time.perf_counter()]
        chunk = collate_chunk(items)
        clock.append(time.perf_counter())
        chunk = pickle.loads(ForkingPickler.dumps(chunk))
        clock.append(time.perf_counter())
        normalise(chunk)
        clock.append(time.perf_counter())
        for name, lo, hi in zip(("collate", "handoff", "normalise"), clock, clock[1:], strict=False):
            spent[name] += hi - lo
    reader.close()
    return {f"{name}_ms_per_batch": 1000 * s / batches for name, s in spent.items()}


def format_section(report: dict[str, Any]) -> str:
    """The BENCHMARKS.md section: command, machine, the table, the verdicts, the stage profile."""
    s, r, p, t = report["setup"], report["results"], report["profile"], report["targets"]
    rows = [
        ("frozen, in memory", r["memory_samples_per_s"], r["memory_s_per_step"], None, "1.00 (reference)"),
        ("frozen, streamed", r["stream_samples_per_s"], r["stream_s_per_step"], r["stream_data_wait_s_per_step"],
         f"{r['stream_over_memory']:.2f} × in memory"),
        ("end to end, streamed", r["e2e_samples_per_s"], r["e2e_s_per_step"], r["e2e_data_wait_s_per_step"],
         f"frozen is {r['frozen_over_e2e']:.1f} × faster"),
        ("frozen, streamed, 1 process (torchrun)", r["ddp1_samples_per_s"], r["ddp1_s_per_step"], None, "1.00"),
        ("frozen, streamed, 2 processes (torchrun, gloo), total", r["ddp2_samples_per_s"], r["ddp2_s_per_step"], None,
         f"{r['ddp2_over_ddp1']:.2f} × 1 process"),
    ]  # fmt: skip
    lines = [
        "## Training throughput (`mmfuse bench train`)",
        "",
        f"Command: `{s['command']}`",
        "",
        _setup(s),
        "",
        "| variant | samples/s | s/step | data wait s/step | ratio |",
        "|---|---|---|---|---|",
    ]
    for name, rate, step, wait, ratio in rows:
        lines.append(f"| {name} | {rate:.1f} | {step:.3f} | {'' if wait is None else f'{wait:.3f}'} | {ratio} |")
    lines += [
        "",
        "| peak RSS, one streaming epoch in a fresh process | 1× samples | 4× samples | 4× / 1× |",
        "|---|---|---|---|",
        f"| main process `VmHWM` (MiB) | {r['rss_1x_main_mb']:.0f} | {r['rss_4x_main_mb']:.0f} | "
        f"{r['rss_4x_over_1x_main']:.3f} |",
        f"| largest DataLoader worker, `VmHWM` (MiB) | {r['rss_1x_worker_mb']:.0f} | "
        f"{r['rss_4x_worker_mb']:.0f} | {r['rss_4x_over_1x_worker']:.3f} |",
        f"| steps (one epoch) | {r['rss_1x_steps']:.0f} | {r['rss_4x_steps']:.0f} | |",
        "",
        "Targets:",
        "",
        f"- streaming ≥ {STREAM_TARGET} × in-memory samples/s: **{_verdict(t['stream_ge_0.9x_memory'])}** "
        f"({r['stream_over_memory']:.2f} ×).",
        f"- peak RSS growth from 1× to 4× samples < 10 %: **{_verdict(t['rss_growth_lt_10pct'])}** "
        f"(main {100 * (r['rss_4x_over_1x_main'] - 1):+.1f} %, "
        f"worker {100 * (r['rss_4x_over_1x_worker'] - 1):+.1f} %).",
        "",
        f"Data stages, ms per batch of {s['batch_size']} (one after another in one process, frozen mode):",
        "",
        "| " + " | ".join(k.removesuffix("_ms_per_batch") for k in p) + " |",
        "|" + "---|" * len(p),
        "| " + " | ".join(f"{v:.1f}" for v in p.values()) + " |",
        "",
        *analysis(report),
    ]
    return "\n".join(lines)


def _setup(s: dict[str, Any]) -> str:
    """The paragraph on the machine, the data, the model and how the variants were run."""
    return (
        f"Machine: {s['machine']}. Data: {s['samples']} synthetic train samples in {s['shards']} shards "
        f"({s['shard_mb']:.0f} MB; written by `bench/train_steps.py`): text {s['shapes']['tokens'][0]}–"
        f"{s['shapes']['tokens'][1]} tokens × {s['shapes']['dt']}, clips {s['shapes']['seconds'][0]:g}–"
        f"{s['shapes']['seconds'][1]:g} s (audio 50 fps × {s['shapes']['da']} + 16 kHz waveform, video 25 fps × "
        "478 × 3 + 4 geometry), every modality present. End-to-end encoders: "
        f"`{Path(s['encoders']['text']).name}` (text) and `{Path(s['encoders']['audio']).name}` (audio). "
        f"Model `{s['model']}` (its preset), batch {s['batch_size']}, {s['warmup_steps']} warm-up steps excluded, "
        f"then {s['steps']} timed steps per variant; {s['workers']} DataLoader worker(s) per process when streaming, "
        f"shuffle buffer {s['shuffle_buffer']} per worker (smaller than the dataset, so the timed steps include "
        "steady-state reading, not a drained buffer). "
        "A step is `fit`'s own (training runs `fit` itself): next batch, forward under autocast, backward through "
        "the GradScaler, per-group clip, AdamW, schedule. Stream and in-memory runs alternate "
        f"{s['repeats']} time(s); the best of each is shown (all: {_runs(s['all_runs_samples_per_s'])})."
    )


def analysis(report: dict[str, Any]) -> list[str]:
    """Where the data time goes, from the stage profile and the measured waits (numbers only, no judgement)."""
    s, r, p = report["setup"], report["results"], report["profile"]
    work = {k: p[f"{k}_ms_per_batch"] for k in ("read", "decode", "validate", "select", "to_inputs", "collate")}
    worker, top = sum(work.values()), max(work, key=work.get)
    main = p["handoff_ms_per_batch"] / 2 + p["normalise_ms_per_batch"]
    cores = os.cpu_count() or 1
    return [
        f"Where the data time goes: the worker stages cost {worker:.0f} ms of CPU per batch (largest: {top}, "
        f"{work[top]:.0f} ms), spread over {s['workers']} worker(s) but taken from the same {cores} cores the "
        f"training process uses; the training process then spends about {main:.0f} ms per batch on data (half "
        f"the hand-off round trip for receiving the chunk, and the network's normalisation step) against "
        f"{1000 * r['memory_s_per_step']:.0f} ms for a whole in-memory step. Measured wait for the next batch: "
        f"{1000 * r['stream_data_wait_s_per_step']:.0f} ms per step streamed.",
    ]


def _runs(runs: dict[str, list[float]]) -> str:
    return "; ".join(f"{name} " + ", ".join(f"{v:.1f}" for v in values) for name, values in runs.items())


def _verdict(ok: bool) -> str:
    return "met" if ok else "missed"
