"""Pieces of ``mmfuse bench train``: a synthetic shard directory of realistic shapes, and timed training steps.

``run_child`` writes a spec and starts ``python -m bench.train_steps SPEC.json``, which runs one variant in a
fresh process (alone, or one rank of a ``torchrun`` job), streamed or from memory (``spec["source"]``, default
``stream``), and writes ``rank<R>.json`` next to the spec: timings plus the peak resident set of the process and
of its largest DataLoader worker (``VmHWM``, polled while it runs: see ``bench.memory``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.memory import ChildPeaks, own_peak_mib
from shards import SCHEMA_VERSION, ShardDataset, ShardWriter, build_dataset, feature_set_hash
from shards.contract import builtin_contracts
from shards.io import atomic_write_json
from shards.schema import N_LANDMARKS, SAMPLE_RATE
from shards.stats import RunningStats

AUDIO_FPS, VIDEO_FPS = 50, 25
ROOT = Path(__file__).resolve().parents[1]
BUILTIN = builtin_contracts()  # the built-in extractors' records: which member is each modality's feature, mask
BUNDLED_TEXT, RANDOM_AUDIO = "sentence-transformers/all-MiniLM-L6-v2", "random:wav2vec2-small"


@dataclass(frozen=True)
class Shapes:
    """Per-sample sizes: tokens (Tt), clip seconds (Ta = 50 s, Tv = 25 s, N = 16000 s) and feature widths."""

    tokens: tuple[int, int]
    seconds: tuple[float, float]
    dt: int
    da: int
    vocab: int


FULL = Shapes(tokens=(20, 50), seconds=(2.0, 8.0), dt=384, da=256, vocab=30522)  # MiniLM + wav2vec2-small
QUICK = Shapes(tokens=(4, 8), seconds=(0.2, 0.4), dt=21, da=27, vocab=997)  # the tiny encoders below


def save_tiny_encoders(root: Path, shapes: Shapes = QUICK) -> tuple[str, str]:
    """A 1-layer BERT (width ``dt``) and a 2-layer wav2vec 2.0 (width ``da``) as local model directories."""
    from transformers import BertConfig, BertModel, Wav2Vec2Config, Wav2Vec2Model

    text, audio = root / "tiny-bert", root / "tiny-w2v"
    torch.manual_seed(1)
    bert = BertConfig(
        vocab_size=shapes.vocab, hidden_size=shapes.dt, num_hidden_layers=1, num_attention_heads=3,
        intermediate_size=37, max_position_embeddings=64,
    )  # fmt: skip
    BertModel(bert).save_pretrained(text)
    w2v = Wav2Vec2Config(
        hidden_size=shapes.da, num_hidden_layers=2, num_attention_heads=3, intermediate_size=33, conv_dim=(13,) * 7,
        feat_extract_norm="group", do_stable_layer_norm=False, num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=3,
    )  # fmt: skip
    Wav2Vec2Model(w2v).save_pretrained(audio)
    return str(text), str(audio)


def make_feature_set(text_model: str, audio_model: str, shapes: Shapes) -> dict[str, Any]:
    """A feature set naming loadable encoders, as `mmfuse extract` records it (no weight hashes: not checked)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "modalities": ["text", "audio", "video"],
        "fps": VIDEO_FPS,
        "extractors": {
            "text": {"name": "text-transformer", "model": text_model, "layer": -1, "dims": {"Dt": shapes.dt}},
            "audio": {
                "name": "speech-ssl",
                "model": audio_model,
                "layer": -1,
                "do_normalize": True,
                "frame_stride_samples": 320,
                "chunk_samples": 30 * SAMPLE_RATE,
                "dims": {"Da": shapes.da},
            },  # fmt: skip
            "video": {"name": "mediapipe-facemesh", "dims": {"landmarks": N_LANDMARKS}},
        },
    }


def bench_data(work: Path, quick: bool) -> tuple[Shapes, tuple[str, str], dict[str, Any], int]:
    """What both training benchmarks write: the shapes, the (text, audio) encoders (the bundled MiniLM and a
    random wav2vec2-small; tiny ones saved under ``work`` when ``quick``), their feature set and the shard size."""
    shapes = QUICK if quick else FULL
    encoders = save_tiny_encoders(work) if quick else (BUNDLED_TEXT, RANDOM_AUDIO)
    return shapes, encoders, make_feature_set(*encoders, shapes), 8 if quick else 64


def make_sample(key: str, base: int, label: float, shapes: Shapes, fs_hash: str, seed: int = 0) -> dict[str, Any]:
    """One schema-valid sample; its arrays depend only on ``(seed, base)``, so tiling repeats them exactly."""
    rng = np.random.default_rng([seed, base])
    secs = rng.uniform(*shapes.seconds)
    tt = int(rng.integers(shapes.tokens[0], shapes.tokens[1] + 1))
    ta, tv, n = max(1, round(secs * AUDIO_FPS)), max(1, round(secs * VIDEO_FPS)), round(secs * SAMPLE_RATE)
    ok = {"status": "ok", "error": None}
    meta = {
        "schema_version": SCHEMA_VERSION, "key": key, "video_id": key.split("__")[0], "clip_id": key.split("__")[1],
        "split": "train", "feature_set_hash": fs_hash, "modalities": {m: dict(ok) for m in BUILTIN},
        "labels": {"label": label},
    }  # fmt: skip
    return {
        "__key__": key,
        "meta.json": meta,
        "text_ids.npy": rng.integers(1, shapes.vocab, tt).astype(np.int32),
        "text_feat.npy": rng.standard_normal((tt, shapes.dt), np.float32).astype(np.float16),
        "audio_wave.npy": (rng.standard_normal(n, np.float32) * 3000).astype(np.int16),
        "audio_feat.npy": rng.standard_normal((ta, shapes.da), np.float32).astype(np.float16),
        "audio_mask.npy": np.ones(ta, bool),
        "audio_time.npy": ((np.arange(ta) + 0.5) / AUDIO_FPS).astype(np.float32),
        "video_lmk.npy": rng.standard_normal((tv, N_LANDMARKS, 3), np.float32).astype(np.float16),
        "video_mask.npy": np.ones(tv, bool),
        "video_time.npy": (np.arange(tv) / VIDEO_FPS).astype(np.float32),
        "video_geom.npy": rng.standard_normal((tv, 4), np.float32),
    }


def write_dataset(
    root: Path,
    samples: int,
    shapes: Shapes,
    feature_set: dict[str, Any],
    *,
    shard_size: int = 64,
    pool: int = 0,
    unlabelled: Collection[int] = (),
) -> dict[str, Any]:
    """A train split of ``samples`` samples in shards of ``shard_size``, with sidecars and dataset.json.

    ``pool > 0`` tiles ``pool`` distinct samples under new keys and labels (4x the data, same shapes). The samples
    numbered in ``unlabelled`` have no label.
    """
    root.mkdir(parents=True, exist_ok=True)
    fs_hash, planned = feature_set_hash(feature_set), []
    dims = {"Dt": shapes.dt, "Da": shapes.da, "landmarks": N_LANDMARKS}
    for index in range(math.ceil(samples / shard_size)):
        name, stats = f"train-{index:06d}", {}
        writer = ShardWriter(root / f"{name}.tar", validate=True)
        for j in range(index * shard_size, min(samples, (index + 1) * shard_size)):
            label = float(np.sin(j)) * 2.0
            s = make_sample(f"bench__c{j:07d}", j % pool if pool else j, label, shapes, fs_hash)
            if j in unlabelled:
                s["meta.json"]["labels"] = {}
            writer.write(s)
            for c in BUILTIN.values():  # each feature's train statistics, over its valid steps
                rows = s[c.feature][s[c.mask]] if c.mask else s[c.feature]
                stats.setdefault(c.feature, RunningStats()).update(rows)
        writer.commit()
        side = {
            "schema_version": SCHEMA_VERSION, "feature_set_hash": fs_hash, "split": "train", "keys": writer.keys,
            "digests": writer.digests,
            "bytes": (root / f"{name}.tar").stat().st_size, "clips": [{"key": k, "status": "ok"} for k in writer.keys],
            "dims": dims, "stats": {m: st.to_json() for m, st in stats.items()},
        }  # fmt: skip
        atomic_write_json(root / f"{name}.json", side)
        planned.append(("train", index))
    return build_dataset(root, planned, feature_set)


def stream_batches(dataset: ShardDataset, data: Any, rank: int = 0, world_size: int = 1) -> Iterator[dict[str, Any]]:
    """Training batches from ``make_loader``, epoch after epoch (a new loader per epoch, as ``fit`` does)."""
    from train.data import make_loader

    epoch = 0
    while True:
        loader = make_loader(dataset, "train", data, train=True, epoch=epoch, rank=rank, world_size=world_size)
        if len(loader) == 0:
            raise ValueError(f"{dataset.root} gives no full batch of {data.batch_size}; use more samples")
        yield from loader
        epoch += 1


def memory_batches(source: Any) -> Iterator[dict[str, Any]]:
    """Batches of an ``InMemorySource``, epoch after epoch."""
    epoch = 0
    while True:
        source.set_epoch(epoch)
        yield from source
        epoch += 1


def timed_training(
    shards: Path,
    model: str,
    overrides: list[str],
    *,
    source: str,
    steps: int,
    warmup: int,
    d: Any = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Train ``model`` (its preset, then ``overrides``) with ``fit`` itself; time its steps after the first
    ``warmup``.

    A step is ``fit``'s own: the next ``grad_accum`` batches (the wait for data is timed on its own), then forward,
    losses and backward under autocast and the GradScaler, unscale, per-group clip, AdamW step and schedule step,
    and what ``fit`` does between steps (no log line or checkpoint falls in the timed ones). ``fit`` takes its
    batches from ``TimedBatches``: ``stream`` (``make_loader`` with the config's workers, a new loader per epoch)
    or ``memory`` (``InMemorySource.from_shards``, read before the first step). It trains ``warmup + steps + 1``
    steps: a step ends when the next one asks for its batches. The run is on ``d.device`` (without ``d``:
    ``device``). On CUDA every clock reading waits for the device's queued work, so ``compute_s_per_step`` (copy
    to the device, forward, backward, optimiser) holds the GPU time and excludes the data wait: wait + compute =
    step. The run directory (a checkpoint at the end) is a temporary one.
    """
    import tempfile

    from train.config import make_train_config
    from train.runtime import Dist
    from train.trainer import fit

    d = d or Dist(device=torch.device(device))
    timing = ["max_steps", "log_every", "checkpoint_every", "selection", "eval_every"]
    fixed = [f"max_steps={warmup + steps + 1}", f"log_every={10**9}", "checkpoint_every=0", "selection=last"]
    kept = [o for o in overrides if o.split("=")[0].split(".")[-1] not in timing]  # bare or dotted (run.max_steps)
    config = make_train_config(model, overrides=[*kept, *fixed, f"eval_every={10**9}", f"device={d.device}"])
    batches, said = TimedBatches(source), logging.getLogger("train")
    level = said.level
    said.setLevel(logging.WARNING)  # fit's log lines and evaluations of a run that is only timed
    try:
        with tempfile.TemporaryDirectory(prefix="bench-train-") as run_dir:
            fit(config, shards, run_dir, d=d, source=batches)
    finally:
        said.setLevel(level)
    wait_s, compute_s = batches.step_split(config.optim.grad_accum)
    wait, compute = sum(wait_s[warmup : warmup + steps]), sum(compute_s[warmup : warmup + steps])
    seconds = wait + compute
    return {
        "steps": steps,
        "warmup_steps": warmup,
        "batch_size": config.data.batch_size,
        "world_size": d.world_size,
        "device": str(d.device),
        "seconds": seconds,
        "s_per_step": seconds / steps,
        "data_wait_s_per_step": wait / steps,
        "compute_s_per_step": compute / steps,
        "samples_per_s": config.data.batch_size * config.optim.grad_accum * steps * d.world_size / seconds,
        "load_s": batches.load_s,
    }


class TimedBatches:
    """A batch source for ``fit`` (``train.run.BatchSource``): ``stream`` or ``memory`` batches, epoch after epoch
    in one iterator (so the run stays in its first epoch: no end-of-epoch evaluation or checkpoint between the
    timed steps), with the device clock read when ``fit`` asks for each batch and when it has it."""

    def __init__(self, kind: str) -> None:
        if kind not in ("stream", "memory"):
            raise ValueError(f"source must be stream or memory, got {kind!r}")
        self.kind, self.load_s = kind, 0.0
        self.asked: list[float] = []
        self.got: list[float] = []

    def __call__(self, job: Any, epoch: int, skip: int) -> Iterator[dict[str, Any]]:
        from train.memory import InMemorySource

        if self.kind == "stream":
            return self.timed(stream_batches(job.dataset, job.data, job.d.rank, job.d.world_size), job.d.device)
        start = time.perf_counter()
        held = InMemorySource.from_shards(job.dataset, "train", job.data, shuffle=True)
        self.load_s = time.perf_counter() - start
        return self.timed(memory_batches(held), job.d.device)

    def timed(self, batches: Iterator[dict[str, Any]], device: torch.device) -> Iterator[dict[str, Any]]:
        while True:
            self.asked.append(device_clock(device))
            batch = next(batches)
            self.got.append(device_clock(device))
            yield batch

    def step_split(self, grad_accum: int) -> tuple[list[float], list[float]]:
        """Per step but the last: the seconds waiting for its ``grad_accum`` batches, and computing it (from having
        its last batch to the next step asking for its first)."""
        wait_s, compute_s = [], []
        for first in range(0, len(self.got) - grad_accum, grad_accum):
            wait_s.append(sum(self.got[i] - self.asked[i] for i in range(first, first + grad_accum)))
            compute_s.append(self.asked[first + grad_accum] - self.got[first + grad_accum - 1])
        return wait_s, compute_s


def device_clock(device: torch.device) -> float:
    """``time.perf_counter()`` once ``device`` has finished its queued work (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def peak_rss_mb(workers: ChildPeaks) -> dict[str, float]:
    """Peak resident set of this process and of its largest DataLoader worker (``VmHWM``, see bench.memory)."""
    return {"main_rss_mb": own_peak_mib(), "worker_rss_mb": workers.largest_mib}


def run_child(
    out: Path,
    shards: Path,
    overrides: list[str],
    args: argparse.Namespace,
    procs: int,
    *,
    steps: int,
    warmup: int,
    source: str = "stream",
) -> dict[str, Any]:
    """One variant in fresh process(es): ``torchrun`` when timing 1 vs 2 ranks (``out`` named ``ddp*``), plain
    python otherwise (peak RSS, sweep points); ``source`` as in ``timed_training``."""
    out.mkdir(parents=True, exist_ok=True)
    spec = {
        "shards": str(shards), "model": args.model, "overrides": overrides, "threads": args.threads,
        "steps": steps, "warmup": warmup, "source": source, "device": getattr(args, "device", "cpu"),
    }  # fmt: skip
    (out / "spec.json").write_text(json.dumps(spec))
    entry = ["-m", "bench.train_steps", str(out / "spec.json")]
    if out.name.startswith("ddp"):
        entry = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs), *entry]
    # the tree first, then what the caller's PYTHONPATH holds (on the GPU image: the carried wheels' folder)
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": path}
    done = subprocess.run([sys.executable, *entry], cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark child {out.name} failed:\n{done.stderr[-3000:]}")
    return json.loads((out / "rank0.json").read_text())


def slowest_rank(result: dict[str, Any], d: Any) -> None:
    """Under DDP, ``result`` (``timed_training``'s) in the slowest rank's time: every rank's clock stops when the
    slowest rank is done. The reduced tensor is on ``d.device``: NCCL reduces only tensors on the GPU."""
    if not d.enabled:
        return
    import torch.distributed as dist

    seconds = torch.tensor([result["seconds"]], dtype=torch.float64, device=d.device)
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    own, result["seconds"] = result["seconds"], float(seconds)
    result["s_per_step"] = result["seconds"] / result["steps"]
    result["samples_per_s"] *= own / result["seconds"]  # the same samples in the slowest rank's time


def child_main(spec_path: str) -> int:
    """Entry of a fresh process (or torchrun rank): run the variant in the spec, write ``rank<R>.json``."""
    from train.runtime import setup_distributed, teardown_distributed

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(int(spec["threads"]))
    d = setup_distributed(spec.get("device", "cpu"))
    try:
        # DataLoader workers of a short run can live under 0.1 s: poll often enough to read each one
        with ChildPeaks(every_s=0.01) as workers:
            result = timed_training(
                Path(spec["shards"]),
                spec["model"],
                spec["overrides"],
                source=spec.get("source", "stream"),
                steps=spec["steps"],
                warmup=spec["warmup"],
                d=d,
            )
            slowest_rank(result, d)
    finally:
        teardown_distributed(d)
    result.update(peak_rss_mb(workers))
    atomic_write_json(Path(spec_path).with_name(f"rank{d.rank}.json"), result)
    return 0


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1]))
