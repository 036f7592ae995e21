"""``mmfuse bench train --data-only``: mmfuse's loader against a plain webdataset + ``np.load`` loop, same tars.

    mmfuse bench train --data-only --samples 256 --batch-size 32 --workers 2 --repeats 3 --out BENCHMARKS.md

Both read the same shards (``mmfuse bench train``'s synthetic ones, written here) and decode the same members: every
member frozen-feature training uses (``meta.json`` and the feature, mask, time and geometry arrays; not
``text_ids.npy`` and ``audio_wave.npy``). The plain loop (:func:`plain_samples`) is webdataset's tar reader and
``np.load`` / ``json.loads`` per member, nothing else; mmfuse's loader (``make_loader``, training mode) also does
what SPEC §9 asks of a shard reader (member caps before reading, no links / compressed / sparse / escaping members,
the sidecar's keys, member sets, split and ``meta.json`` digest, JSON depth, the schema and finite values), shuffles,
and collates into padded tensors.

1. One process: each loop over every sample, ``--repeats`` times alternating; the best wall time of each, as ms per
   sample, and their ratio (loader / plain: the target is at most 1.3). CPU time per sample is reported beside.
2. ``--workers`` DataLoader workers, two epochs each, every epoch a new ``make_loader`` as ``fit`` makes them: the
   time to the first batch and samples/s of each epoch, whether epoch 2 ran in epoch 1's worker processes
   (persistent workers), and samples/s per worker; the plain loop in as many workers (a DataLoader with persistent
   workers, each yielding its batch count, so nothing crosses the process boundary) for its second epoch.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds

from bench.markdown import replace_section
from shards.contract import builtin_contracts
from shards.io import MEMBER_ORDER
from train.data import DataConfig, make_loader
from train.workers import POOLS, close_pools

SECTION = "bench-train-data"
TARGET = 1.3  # the loader's ms per sample over the plain loop's, at most
RAW = {c.raw for c in builtin_contracts().values() if c.raw}  # the built-in extractors' raw inputs
MEMBERS = tuple(m for m in MEMBER_ORDER if m not in RAW)  # what frozen training decodes


def plain_samples(urls: Sequence[str], members: Sequence[str] = MEMBERS) -> Iterator[dict[str, Any]]:
    """Samples of the tars at ``urls`` as a plain webdataset loop decodes them: ``members`` only, ``.json`` with
    ``json.loads`` and ``.npy`` with ``np.load`` (in a DataLoader worker: that worker's share of the tars)."""
    keep = set(members)
    for raw in wds.DataPipeline(wds.SimpleShardList(list(urls)), wds.split_by_worker, wds.tarfile_to_samples()):
        sample = {"__key__": raw["__key__"]}
        for name, data in raw.items():
            if name in keep:
                sample[name] = json.loads(data) if name.endswith(".json") else np.load(io.BytesIO(data))
        yield sample


class PlainBatches(torch.utils.data.IterableDataset):
    """The plain loop in DataLoader workers: per ``batch_size`` decoded samples, their count."""

    def __init__(self, urls: Sequence[str], batch_size: int) -> None:
        self.urls, self.batch_size = list(urls), batch_size

    def __iter__(self) -> Iterator[int]:
        n = 0
        for _ in plain_samples(self.urls):
            n += 1
            if n == self.batch_size:
                yield n
                n = 0
        if n:
            yield n


def timed(count: Callable[[], int]) -> dict[str, float]:
    """Wall and CPU milliseconds per sample of ``count()`` (which returns the samples it read)."""
    wall, cpu = time.perf_counter(), time.process_time()
    n = count()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"samples": n, "wall_ms_per_sample": 1000 * wall / n, "cpu_ms_per_sample": 1000 * cpu / n}


def one_process(shards: Path, batch_size: int, repeats: int) -> dict[str, Any]:
    """Part 1 of the module docstring: every run of each loop, the best of each and the ratios."""
    urls = [str(p) for p in sorted(shards.glob("train-*.tar"))]
    config = DataConfig(batch_size=batch_size, num_workers=0, shuffle_buffer=batch_size * 8)

    def plain() -> int:
        return sum(1 for _ in plain_samples(urls))

    def loader() -> int:
        return sum(len(batch["key"]) for batch in make_loader(shards, "train", config, train=True))

    runs: dict[str, list[dict[str, float]]] = {"plain": [], "loader": []}
    for _ in range(repeats):  # alternating, so load from other jobs on the machine hits both alike
        runs["plain"].append(timed(plain))
        runs["loader"].append(timed(loader))
    best = {name: min(r, key=lambda x: x["wall_ms_per_sample"]) for name, r in runs.items()}
    best_cpu = {name: min(x["cpu_ms_per_sample"] for x in r) for name, r in runs.items()}
    return {
        "runs": runs,
        "plain_ms_per_sample": best["plain"]["wall_ms_per_sample"],
        "loader_ms_per_sample": best["loader"]["wall_ms_per_sample"],
        "loader_over_plain": best["loader"]["wall_ms_per_sample"] / best["plain"]["wall_ms_per_sample"],
        "plain_cpu_ms_per_sample": best_cpu["plain"],
        "loader_cpu_ms_per_sample": best_cpu["loader"],
        "loader_over_plain_cpu": best_cpu["loader"] / best_cpu["plain"],
    }


def epoch_timing(batches: Callable[[], Iterator[Any]], size: Callable[[Any], int]) -> dict[str, float]:
    """Seconds to the first batch and samples/s of one epoch of ``batches()``."""
    start = time.perf_counter()
    first, n = None, 0
    for batch in batches():
        first = time.perf_counter() - start if first is None else first
        n += size(batch)
    seconds = time.perf_counter() - start
    return {"first_batch_s": first or 0.0, "samples": n, "seconds": seconds, "samples_per_s": n / seconds}


def with_workers(shards: Path, batch_size: int, workers: int, shuffle_buffer: int) -> dict[str, Any]:
    """Part 2 of the module docstring: two epochs of the loader and of the plain loop in ``workers`` workers."""
    config = DataConfig(batch_size=batch_size, num_workers=workers, shuffle_buffer=shuffle_buffer)
    epochs, pids = [], []
    for epoch in (0, 1):
        loader = make_loader(shards, "train", config, train=True, epoch=epoch)
        epochs.append(epoch_timing(lambda loader=loader: iter(loader), lambda b: len(b["key"])))
        pids.append(sorted(pid for pool in POOLS.values() for pid in pool.pids))
    urls = [str(p) for p in sorted(shards.glob("train-*.tar"))]
    plain = torch.utils.data.DataLoader(
        PlainBatches(urls, batch_size), batch_size=None, num_workers=workers, persistent_workers=True
    )
    plain_epochs = [epoch_timing(lambda: iter(plain), int) for _ in (0, 1)]
    plain._iterator._shutdown_workers()  # noqa: SLF001 - a persistent DataLoader has no public close
    rate, plain_rate = epochs[1]["samples_per_s"], plain_epochs[1]["samples_per_s"]
    return {
        "workers": workers,
        "epochs": epochs,
        "plain_epochs": plain_epochs,
        "same_worker_processes": bool(pids[0]) and pids[0] == pids[1],
        "loader_samples_per_s_per_worker": rate / workers,
        "plain_samples_per_s_per_worker": plain_rate / workers,
        "plain_over_loader_rate": plain_rate / rate,
    }


def format_data_section(report: dict[str, Any]) -> str:
    """The BENCHMARKS.md section of a ``--data-only`` report."""
    s, one, many = report["setup"], report["one_process"], report["workers"]
    e0, e1, p1 = many["epochs"][0], many["epochs"][1], many["plain_epochs"][1]
    verdict = "met" if one["loader_over_plain"] <= TARGET else "missed"
    lines = [
        "## Training data path vs a plain webdataset loop (`mmfuse bench train --data-only`)",
        "",
        f"Command: `{s['command']}`",
        "",
        f"Machine: {s['machine']}. Data: {s['samples']} synthetic train samples in {s['shards']} shards "
        f"({s['shard_mb']:.0f} MB, {s['mb_per_batch']:.1f} MB per batch of {s['batch_size']}; the shapes of "
        "`mmfuse bench train`). Both loops decode the same members (all but `text_ids.npy` and `audio_wave.npy`); "
        "the plain loop is webdataset's tar reader with `np.load` / `json.loads` and nothing else, mmfuse's loader "
        "(`make_loader`, training mode) also checks what SPEC §9 asks of a shard reader, validates the schema, "
        "shuffles and collates padded tensors. One process: best wall time of "
        f"{s['repeats']} alternating runs each (all runs in the JSON report).",
        "",
        "| one process | ms / sample (wall) | ms / sample (CPU) | samples/s |",
        "|---|---|---|---|",
        f"| plain webdataset + np.load | {one['plain_ms_per_sample']:.2f} | {one['plain_cpu_ms_per_sample']:.2f} | "
        f"{1000 / one['plain_ms_per_sample']:.0f} |",
        f"| mmfuse loader | {one['loader_ms_per_sample']:.2f} | {one['loader_cpu_ms_per_sample']:.2f} | "
        f"{1000 / one['loader_ms_per_sample']:.0f} |",
        f"| loader / plain | {one['loader_over_plain']:.2f} | {one['loader_over_plain_cpu']:.2f} | |",
        "",
        f"Target, the loader within {TARGET} × the plain loop per sample (wall, one process): **{verdict}** "
        f"({one['loader_over_plain']:.2f} ×).",
        "",
        f"| {many['workers']} DataLoader worker(s) | first batch s | samples/s | samples/s per worker |",
        "|---|---|---|---|",
        f"| mmfuse loader, epoch 1 (workers start) | {e0['first_batch_s']:.2f} | {e0['samples_per_s']:.0f} | "
        f"{e0['samples_per_s'] / many['workers']:.0f} |",
        f"| mmfuse loader, epoch 2 | {e1['first_batch_s']:.2f} | {e1['samples_per_s']:.0f} | "
        f"{many['loader_samples_per_s_per_worker']:.0f} |",
        f"| plain loop, epoch 2 (persistent workers) | {p1['first_batch_s']:.2f} | {p1['samples_per_s']:.0f} | "
        f"{many['plain_samples_per_s_per_worker']:.0f} |",
        "",
        f"Epoch 2 ran in epoch 1's worker processes: **{'yes' if many['same_worker_processes'] else 'no'}**. "
        f"The plain loop's rate is {many['plain_over_loader_rate']:.2f} × the loader's with workers (the loader's "
        "batches also cross to the training process, through shared memory; the plain workers send a count).",
    ]
    return "\n".join(lines)


def write_data_section(path: Path, body: str) -> None:
    replace_section(path, body, SECTION)


def data_command(args: argparse.Namespace) -> str:
    """The command that reproduces a ``--data-only`` report (every setting it uses spelled out)."""
    parts = ["mmfuse bench train --data-only", f"--samples {args.samples}", f"--batch-size {args.batch_size}"]
    parts += [f"--workers {args.workers}", f"--shuffle-buffer {args.shuffle_buffer}", f"--repeats {args.repeats}"]
    parts += ["--quick"] if args.quick else []
    parts += [f"--out {args.out.name}"] if args.out is not None else []
    return " ".join(parts)


def data_report(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Write the shards under ``work`` and measure both parts of the module docstring."""
    from bench.train_runs import machine
    from bench.train_steps import bench_data, write_dataset

    shapes, _, fset, shard_size = bench_data(work, args.quick)
    written = write_dataset(work / "shards-1x", args.samples, shapes, fset, shard_size=shard_size)
    shards = work / "shards-1x"
    mb = sum(s["bytes"] for s in written["shards"]) / 1e6
    setup = {
        "command": data_command(args),
        "machine": machine(args.threads),
        "samples": args.samples,
        "shards": len(written["shards"]),
        "shard_mb": mb,
        "mb_per_batch": mb * args.batch_size / args.samples,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "shuffle_buffer": args.shuffle_buffer,
        "repeats": args.repeats,
        "members": list(MEMBERS),
    }
    try:
        one = one_process(shards, args.batch_size, args.repeats)
        many = with_workers(shards, args.batch_size, max(1, args.workers), args.shuffle_buffer)
    finally:
        close_pools()
    return {"setup": setup, "one_process": one, "workers": many}


def run_data_only(args: argparse.Namespace) -> int:
    """``mmfuse bench train --data-only``: the report as JSON (``--json``) or markdown, and ``--out``'s section."""
    from bench.train_runs import workdir

    with workdir(args) as work:
        report = data_report(args, work)
    print(json.dumps(report, indent=1, sort_keys=True) if args.json else format_data_section(report))
    if args.out is not None:
        write_data_section(args.out, format_data_section(report))
    return 0
