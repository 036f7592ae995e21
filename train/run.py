"""What a training run is made of, and how it is built.

``fit`` (``train.trainer``) holds a run as locals: the ``Job`` (settings, device, shards, data settings, the run's
length and where it writes: fixed for the whole run), the ``Run`` (where training stands: optimiser step, epoch,
data position, best validation score: what a checkpoint saves as ``state``) and the ``Parts`` that train (network,
optimiser, learning-rate schedule, GradScaler). ``prepare`` makes all three for a new run or a resumed one and
writes the run directory's ``config.json``; ``build`` is the part that writes nothing. ``save`` writes a checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from shards import Progress
from shards.dataset import ShardDataset, check_feature_set
from train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from train.config import TrainConfig, check_model_settings, resume_changes
from train.data import DataConfig, ShardLoader, make_loader, num_batches
from train.inputs import DataError, feature_dims
from train.logs import RunLog
from train.pipeline import FusionPipeline
from train.runtime import (
    Dist,
    amp_dtype,
    git_revision,
    prepare_run_dir,
    rng_state,
    seed_everything,
    set_rng_state,
    write_json,
)

# The fp16 GradScaler's first loss scale. torch's default, 2**16, suits large networks' small gradients; these fusion
# models' own losses send back larger ones at initialisation (~44 per element from BC-PMJRS's CLUB fit at batch 32,
# more inside the networks), which overflow fp16 (65504) and make the scaler skip steps while it halves the scale.
# Skipped of the first 4 steps at batch 1 / 32 (output layers in float32): from 2**16 bc_pmjrs 0 / 4, mim 3 / 1,
# ithp and tcmax 1 / 0; from 2**13 bc_pmjrs 0 / 3, mim 1 / 0; from 2**11 bc_pmjrs 0 / 1; from 2**10 none. The scaler
# still doubles the scale after every 2000 steps without an overflow (tests/train/test_fp16_steps.py).
INIT_SCALE = 2.0**10


class StepScaler(torch.amp.GradScaler):
    """The GradScaler, telling whether ``step`` skipped the optimiser step with one host read of the scale per
    step (under fp16; none when it is off): ``update`` backs the scale off only after a skip, so a scale below
    the one before ``step`` is a skip. The scale before is kept on the host (``host_scale``) from the last read."""

    def __init__(self, device: str, init_scale: float, enabled: bool = True) -> None:
        super().__init__(device, init_scale=init_scale, enabled=enabled)
        self.host_scale = init_scale if enabled else 1.0

    def step_and_update(self, optimizer: torch.optim.Optimizer) -> bool:
        """``step`` then ``update``; whether the optimiser stepped."""
        self.step(optimizer)  # under fp16 torch reads the inf check on the host here (its own synchronisation)
        self.update()
        if not self.is_enabled():
            return True
        before, self.host_scale = self.host_scale, self.get_scale()
        return self.host_scale >= before

    def update(self, new_scale: float | torch.Tensor | None = None) -> None:
        super().update(new_scale)
        if new_scale is not None and self.is_enabled():
            self.host_scale = self.get_scale()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.host_scale = self.get_scale() if self.is_enabled() else 1.0


@dataclass
class Run:
    """Where training stands, what a checkpoint saves as its ``state``: optimiser steps taken, the epoch, batches
    of that epoch already consumed (a resumed epoch skips them), and the best validation score so far
    (``train.metrics.SELECTION``) with its step (-1 while there is none)."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    best: float | None = None
    best_step: int = -1

    def state(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Job:
    """What stays fixed while a run trains: its settings, device, shards (``dims``: each modality's feature width),
    the training data's settings (``data``: pinned on CUDA, token ids checked against the network's vocabulary),
    its length (``batches_per_epoch`` per rank, ``total_steps``) and where it writes. ``run_dir``, ``log`` and
    ``progress`` are None for a run that writes nothing (``build``)."""

    config: TrainConfig
    d: Dist
    shards: Path
    dataset: ShardDataset
    dims: dict[str, int]
    data: DataConfig
    amp: torch.dtype | None  # autocast dtype; None: full precision
    batches_per_epoch: int
    total_steps: int
    run_dir: Path | None = None
    log: RunLog | None = None
    progress: Progress | None = None  # progress(steps done, steps in all), rank 0 only
    started: float = field(default_factory=time.perf_counter)

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.d.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None)


class Parts(NamedTuple):
    """What trains and what a checkpoint saves besides the ``Run``: the network (what is evaluated and saved, never
    a DDP or compiled wrapper), AdamW over its parameter groups, the warm-up + decay schedule, the GradScaler."""

    net: FusionPipeline
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: StepScaler


def lr_lambda(config: TrainConfig, total_steps: int):
    """Multiplier of the base learning rates at each optimiser step: linear warm-up, then the schedule."""

    def factor(step: int) -> float:
        if step < config.optim.warmup_steps:
            return (step + 1) / config.optim.warmup_steps
        if config.optim.schedule == "constant" or total_steps <= config.optim.warmup_steps:
            return 1.0
        progress = min(1.0, (step - config.optim.warmup_steps) / max(1, total_steps - config.optim.warmup_steps))
        if config.optim.schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def prepare(
    config: TrainConfig, shards: Path, run_dir: Path, d: Dist, *, resume: bool = False, progress: Progress | None = None
) -> tuple[Job, Run, Parts]:
    """A run ready for its first step, or resuming (``resume`` and ``checkpoints/last.pt`` present) for the step
    after its last checkpoint. Checks the settings against the shards, prepares ``run_dir`` (``prepare_run_dir``)
    and writes ``config.json`` when the run is new. Resuming, settings may change only as
    ``train.config.resume_changes`` allows, and config.json records what changed at which step."""
    dataset = ShardDataset.load(shards)
    check_selection(config, dataset)
    dims = feature_dims(dataset, config.data.modalities)
    check_model_settings(config, dims)
    if d.main:
        prepare_run_dir(run_dir, resume)
    barrier(d)
    last = run_dir / "checkpoints" / "last.pt"
    # rank 0 decides and reads: on node-local disks other ranks may not see the file, and must not start afresh alone
    checkpoint = read_checkpoint(d, last) if agreed(d, resume and last.is_file()) else None
    changes: dict[str, Any] = {}
    if checkpoint is not None:
        check_feature_set(checkpoint["feature_set_hash"], dataset, what=f"the run in {run_dir}")
        changes = resume_changes(checkpoint["config"], config)
    job, run, parts = build(config, shards, d, dataset, dims, checkpoint)
    job.run_dir, job.log, job.progress = run_dir, RunLog(run_dir, enabled=d.main), progress
    if d.main and checkpoint is None:
        write_json(run_dir / "config.json", run_record(job))
    elif d.main and changes:
        record_resume(job, run, changes)
    return job, run, parts


def check_selection(config: TrainConfig, dataset: ShardDataset) -> None:
    """``selection=valid`` needs a valid split: refuse, before anything is trained or written, shards without one."""
    if config.run.selection == "valid" and "valid" not in dataset.splits:
        raise DataError(
            f"the shards in {dataset.root} have no valid split (they have: {', '.join(dataset.splits) or 'none'}): "
            "selection needs one; extract a valid split, or pass selection=last to keep the last step's checkpoint"
        )


def record_resume(job: Job, run: Run, changes: dict[str, Any]) -> None:
    """config.json after a resume with changed settings: the settings now in force, and under ``resumed`` the step
    the run resumed at and each change (from, to)."""
    path = job.run_dir / "config.json"
    record = json.loads(path.read_text()) if path.is_file() else run_record(job)
    record["config"] = job.config.to_dict()
    record.setdefault("resumed", []).append({"step": run.step, "changes": changes})
    write_json(path, record)


def build(
    config: TrainConfig,
    shards: Path,
    d: Dist,
    dataset: ShardDataset,
    dims: dict[str, int],
    checkpoint: dict[str, Any] | None = None,
) -> tuple[Job, Run, Parts]:
    """The network (seeded with ``config.run.seed``), AdamW over its parameter groups, the warm-up + decay schedule
    over every step of the run and the GradScaler (on with fp16 autocast only); at step 0, or where ``checkpoint``
    stopped. Writes nothing."""
    seed_everything(config.run.seed)
    net = FusionPipeline(config, dims, dataset).to(d.device)
    # pinned: non-blocking copies; text_vocab: end to end, every sample's text_ids checked before it is batched
    data = dataclasses.replace(config.data, pin_memory=d.device.type == "cuda", text_vocab=net.text_vocab)
    per_epoch = train_batches(config, dataset, d)
    total_steps = config.run.max_steps or config.run.epochs * (per_epoch // config.optim.grad_accum)
    optimizer = torch.optim.AdamW(net.param_groups(config.optim.lr, config.optim.encoder_lr, config.optim.weight_decay))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config, total_steps))
    amp = amp_dtype(config.run.amp, d.device)
    scaler = StepScaler(d.device.type, init_scale=INIT_SCALE, enabled=amp == torch.float16)
    job = Job(config, d, shards, dataset, dims, data, amp, per_epoch, total_steps)
    run, parts = Run(), Parts(net, optimizer, scheduler, scaler)
    if checkpoint is not None:
        restore(checkpoint, run, parts, d)
    return job, run, parts


def encoders_top_k(config: TrainConfig, step: int) -> int:
    """How many of the encoders' top layers train at ``step`` (end to end: none before ``unfreeze_after``)."""
    return config.unfreeze_top_k if step >= config.unfreeze_after else 0


def wrap(net: FusionPipeline, config: TrainConfig, d: Dist) -> tuple[torch.nn.Module, DistributedDataParallel | None]:
    """What the training forward pass goes through: ``net`` in DDP when distributed (returned as well, for its
    ``no_sync``), then ``torch.compile`` when asked. Built again whenever the trainable parameters change, so DDP's
    reducer covers exactly the parameters that train."""
    model, ddp = net, None
    if d.enabled:
        ddp = DistributedDataParallel(net, find_unused_parameters=may_leave_parameters_unused(net))
        model = ddp
    if config.run.compile:  # lengths vary per batch: dynamic shapes from the first graph, no per-dim recompiles
        model = torch.compile(model, dynamic=True)
    return model, ddp


def may_leave_parameters_unused(net: FusionPipeline) -> bool:
    """Whether a training forward pass can leave a parameter that requires a gradient out of the loss (DDP's
    ``find_unused_parameters``, which costs a graph walk every step). Yes unless the fusion model declares
    ``uses_every_parameter = True`` (its forward reaches every parameter whatever modalities are present), and
    always with modality dropout, which can drop a modality from a whole batch, and while an encoder trains
    (BERT's pooler and wav2vec 2.0's mask embedding take no part in the features). Frozen encoder parameters do
    not count: DDP leaves out what does not require a gradient when it is built (``wrap`` is called again)."""
    if getattr(net.fusion.config, "modality_dropout", 0.0) > 0:
        return True
    if any(p.requires_grad for encoder in net.encoders.values() for p in encoder.parameters()):
        return True
    return not getattr(net.fusion, "uses_every_parameter", False)


def train_batches(config: TrainConfig, dataset: ShardDataset, d: Dist) -> int:
    """Training batches per epoch on this rank; at least one optimiser step's worth, or ``DataError``."""
    batches = num_batches(dataset, "train", config.data, train=True, rank=d.rank, world_size=d.world_size)
    if batches < config.optim.grad_accum:
        raise DataError(
            f"the train split of {dataset.root} gives {batches} full batch(es) of {config.data.batch_size} per rank "
            f"(world size {d.world_size}), fewer than one optimiser step (grad_accum={config.optim.grad_accum}); "
            "lower batch_size or grad_accum"
        )
    return batches


def restore(checkpoint: dict[str, Any], run: Run, parts: Parts, d: Dist) -> None:
    """Network, optimiser, schedule, scaler, position and this rank's RNG streams as ``checkpoint`` saved them."""
    parts.net.load_state_dict(checkpoint["model"])
    parts.optimizer.load_state_dict(checkpoint["optimizer"])
    parts.scheduler.load_state_dict(checkpoint["scheduler"])
    if checkpoint.get("scaler") and parts.scaler.is_enabled():  # absent from older checkpoints: the initial scale
        parts.scaler.load_state_dict(checkpoint["scaler"])
    for key, value in checkpoint["state"].items():
        setattr(run, key, value)
    set_rng_state(checkpoint["rng"][min(d.rank, len(checkpoint["rng"]) - 1)], d.device)


BatchSource = Callable[[Job, int, int], Iterable[dict[str, Any]]]
"""Where ``fit`` takes an epoch's training batches from: ``source(job, epoch, skip)``, the epoch's batches after
the first ``skip`` (already trained on before a resume). ``train_loader`` streams them from the shards."""


def train_loader(job: Job, epoch: int, skip: int) -> ShardLoader:
    """This rank's training batches of ``epoch`` from the shards, after the ``skip`` ones already trained on."""
    return make_loader(
        job.dataset,
        "train",
        job.data,
        train=True,
        epoch=epoch,
        rank=job.d.rank,
        world_size=job.d.world_size,
        skip_batches=skip,
    )


def save(path: Path, job: Job, run: Run, parts: Parts) -> None:
    """Checkpoint the run to ``path`` (rank 0 writes; every rank takes part)."""
    rngs: list[Any] = [rng_state(job.d.device)]
    if job.d.enabled:  # every rank's RNG, so each resumes its own stream
        rngs = [None] * job.d.world_size
        dist.all_gather_object(rngs, rng_state(job.d.device))
    if job.d.main:
        net, optimizer, scheduler, scaler = parts
        save_checkpoint(path, net, optimizer, scheduler, run.state(), job.config, job.dataset, job.dims, rngs, scaler)
    barrier(job.d)


def read_checkpoint(d: Dist, path: Path, part: str | None = None) -> Any:
    """The checkpoint at ``path`` (its ``part`` alone when given) as rank 0 reads it, on every rank: rank 0 reads
    the file and broadcasts what it read. On node-local disks another rank's run directory may lack the file or
    hold another one. A file rank 0 cannot read is the same ``CheckpointError`` on every rank (none is left
    waiting for the broadcast)."""
    if not d.enabled:
        checkpoint = load_checkpoint(path)
        return checkpoint if part is None else checkpoint[part]
    box: list[Any] = [None]
    if d.main:
        try:
            checkpoint = load_checkpoint(path)
            box[0] = (True, checkpoint if part is None else checkpoint[part])
        except CheckpointError as exc:
            box[0] = (False, str(exc))
    dist.broadcast_object_list(box, src=0)
    read, value = box[0]
    if not read:
        raise CheckpointError(value)
    return value


def agreed(d: Dist, flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank: a decision every rank must take alike (it leads into collectives)."""
    if not d.enabled:
        return flag
    value = torch.tensor([int(flag)], dtype=torch.int64, device=d.device)
    dist.broadcast(value, 0)
    return bool(value.item())


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def run_record(job: Job) -> dict[str, Any]:
    """What config.json holds: settings, code revision, shards and their fingerprint, job shape."""
    return {
        "config": job.config.to_dict(),
        "git_revision": git_revision(),
        "shards": str(job.shards.resolve()),
        "feature_set_hash": job.dataset.feature_set_hash,
        "dataset_counts": job.dataset.counts,
        "dims": job.dims,
        "world_size": job.d.world_size,
        "backend": dist.get_backend() if job.d.enabled else None,
        "device": str(job.d.device),
        "torch": str(torch.__version__),
    }
