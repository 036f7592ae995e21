"""A training run in one object, and how it is built.

``Run`` holds the network (and its DDP / compiled wrapper), the optimiser, the learning-rate schedule, the
GradScaler, the autocast dtype, the training data, and where training stands: epoch, optimiser step, data
position and best validation score. ``build_run`` prepares the run directory and, resuming, restores all of it
from ``checkpoints/last.pt``; ``make_run`` is the part that writes nothing (``mmfuse bench train`` uses it).
``save`` writes a run as a checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    """Everything the training loop carries from one optimiser step to the next.

    ``net`` is what is checkpointed and evaluated; ``model`` is what the training forward pass goes through:
    ``net`` itself, or ``net`` wrapped in DDP and/or ``torch.compile``. ``step``, ``epoch``, ``batch`` (batches
    of ``epoch`` already consumed, so a resumed epoch skips them), ``best`` and ``best_step`` are what a
    checkpoint saves as the run's ``state``. ``run_dir``, ``log`` and ``progress`` are None when the run writes
    nothing (benchmarks).
    """

    config: TrainConfig
    d: Dist
    shards: Path
    dataset: ShardDataset
    dims: dict[str, int]
    data: DataConfig
    net: FusionPipeline
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: StepScaler
    amp: torch.dtype | None  # autocast dtype; None: full precision
    batches_per_epoch: int  # per rank
    total_steps: int
    run_dir: Path | None = None
    log: RunLog | None = None
    progress: Progress | None = None  # progress(steps done, steps in all), rank 0 only
    started: float = field(default_factory=time.perf_counter)
    step: int = 0  # optimiser steps taken
    epoch: int = 0
    batch: int = 0
    best: float | None = None  # best validation score so far (train.metrics.SELECTION)
    best_step: int = -1
    ddp: DistributedDataParallel | None = None  # the DDP wrapper inside ``model`` (``no_sync`` is taken from it)
    trainable: int | None = None  # the encoders' trainable top k the wrappers were built for (end to end)

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.d.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None)

    def state(self) -> dict[str, Any]:
        """Where training stands, as a checkpoint's ``state`` holds it."""
        return {
            "step": self.step,
            "epoch": self.epoch,
            "batch": self.batch,
            "best": self.best,
            "best_step": self.best_step,
        }


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


def build_run(
    config: TrainConfig, shards: Path, run_dir: Path, d: Dist, *, resume: bool = False, progress: Progress | None = None
) -> Run:
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
    run = make_run(config, shards, d, dataset, dims, checkpoint)
    run.run_dir, run.log, run.progress = run_dir, RunLog(run_dir, enabled=d.main), progress
    if d.main and checkpoint is None:
        write_json(run_dir / "config.json", run_record(run))
    elif d.main and changes:
        record_resume(run, changes)
    return run


def check_selection(config: TrainConfig, dataset: ShardDataset) -> None:
    """``selection=valid`` needs a valid split: refuse, before anything is trained or written, shards without one."""
    if config.run.selection == "valid" and "valid" not in dataset.splits:
        raise DataError(
            f"the shards in {dataset.root} have no valid split (they have: {', '.join(dataset.splits) or 'none'}): "
            "selection needs one; extract a valid split, or pass selection=last to keep the last step's checkpoint"
        )


def record_resume(run: Run, changes: dict[str, Any]) -> None:
    """config.json after a resume with changed settings: the settings now in force, and under ``resumed`` the step
    the run resumed at and each change (from, to)."""
    path = run.run_dir / "config.json"
    record = json.loads(path.read_text()) if path.is_file() else run_record(run)
    record["config"] = run.config.to_dict()
    record.setdefault("resumed", []).append({"step": run.step, "changes": changes})
    write_json(path, record)


def make_run(
    config: TrainConfig,
    shards: Path,
    d: Dist,
    dataset: ShardDataset,
    dims: dict[str, int],
    checkpoint: dict[str, Any] | None = None,
) -> Run:
    """The network (seeded with ``config.run.seed``), AdamW over its parameter groups, the warm-up + decay schedule
    over every step of the run, the GradScaler (on with fp16 autocast only) and the training data; at step 0, or
    where ``checkpoint`` stopped. Writes nothing."""
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
    run = Run(
        config, d, shards, dataset, dims, data, net, net, optimizer, scheduler, scaler, amp, per_epoch, total_steps
    )
    if checkpoint is not None:
        restore(run, checkpoint)
    if net.end_to_end:
        train_encoders(run)  # freeze before wrapping: DDP reduces only what requires a gradient when it is built
    wrap(run)
    return run


def train_encoders(run: Run) -> None:
    """Apply the encoders' freeze / unfreeze schedule at ``run.step``; when the trainable parameters change,
    rebuild the DDP / compiled wrappers so the reducer covers exactly the parameters that now train. The
    schedule depends on the step alone, so every rank rebuilds at the same step."""
    config = run.config
    top_k = config.unfreeze_top_k if run.step >= config.unfreeze_after else 0
    if top_k == run.trainable:
        return
    first, run.trainable = run.trainable is None, top_k
    run.net.set_encoders_trainable(top_k)
    if not first:
        wrap(run)


def wrap(run: Run) -> None:
    """``run.model``: ``run.net`` in DDP when distributed (kept as ``run.ddp``), then ``torch.compile`` when asked."""
    run.model, run.ddp = run.net, None
    if run.d.enabled:
        run.ddp = DistributedDataParallel(run.net, find_unused_parameters=may_leave_parameters_unused(run))
        run.model = run.ddp
    if run.config.run.compile:  # lengths vary per batch: dynamic shapes from the first graph, no per-dim recompiles
        run.model = torch.compile(run.model, dynamic=True)


def may_leave_parameters_unused(run: Run) -> bool:
    """Whether a training forward pass can leave a parameter that requires a gradient out of the loss (DDP's
    ``find_unused_parameters``, which costs a graph walk every step). Yes unless the fusion model declares
    ``uses_every_parameter = True`` (its forward reaches every parameter whatever modalities are present), and
    always with modality dropout, which can drop a modality from a whole batch, and while an encoder trains
    (BERT's pooler and wav2vec 2.0's mask embedding take no part in the features). Frozen encoder parameters do
    not count: DDP leaves out what does not require a gradient when it is built (``train_encoders`` rebuilds it)."""
    if getattr(run.net.fusion.config, "modality_dropout", 0.0) > 0:
        return True
    if any(p.requires_grad for encoder in run.net.encoders.values() for p in encoder.parameters()):
        return True
    return not getattr(run.net.fusion, "uses_every_parameter", False)


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


def restore(run: Run, checkpoint: dict[str, Any]) -> None:
    """Network, optimiser, schedule, position and this rank's RNG streams as ``checkpoint`` saved them."""
    run.net.load_state_dict(checkpoint["model"])
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    run.scheduler.load_state_dict(checkpoint["scheduler"])
    if checkpoint.get("scaler") and run.scaler.is_enabled():  # absent from older checkpoints: the initial scale
        run.scaler.load_state_dict(checkpoint["scaler"])
    state = checkpoint["state"]
    run.step, run.epoch, run.batch = state["step"], state["epoch"], state["batch"]
    run.best, run.best_step = state["best"], state["best_step"]
    set_rng_state(checkpoint["rng"][min(run.d.rank, len(checkpoint["rng"]) - 1)], run.d.device)


def train_loader(run: Run) -> ShardLoader:
    """This rank's training batches of ``run.epoch``, after the ``run.batch`` ones already trained on."""
    return make_loader(
        run.dataset,
        "train",
        run.data,
        train=True,
        epoch=run.epoch,
        rank=run.d.rank,
        world_size=run.d.world_size,
        skip_batches=run.batch,
    )


def save(run: Run, path: Path) -> None:
    """Checkpoint ``run`` to ``path`` (rank 0 writes; every rank takes part)."""
    rngs: list[Any] = [rng_state(run.d.device)]
    if run.d.enabled:  # every rank's RNG, so each resumes its own stream
        rngs = [None] * run.d.world_size
        dist.all_gather_object(rngs, rng_state(run.d.device))
    if run.d.main:
        save_checkpoint(
            path,
            run.net,
            run.optimizer,
            run.scheduler,
            run.state(),
            run.config,
            run.dataset,
            run.dims,
            rngs,
            run.scaler,
        )
    barrier(run.d)


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


def run_record(run: Run) -> dict[str, Any]:
    """What config.json holds: settings, code revision, shards and their fingerprint, job shape."""
    return {
        "config": run.config.to_dict(),
        "git_revision": git_revision(),
        "shards": str(run.shards.resolve()),
        "feature_set_hash": run.dataset.feature_set_hash,
        "dataset_counts": run.dataset.counts,
        "dims": run.dims,
        "world_size": run.d.world_size,
        "backend": dist.get_backend() if run.d.enabled else None,
        "device": str(run.d.device),
        "torch": str(torch.__version__),
    }
