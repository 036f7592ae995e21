"""One training step on a run built as ``fit`` builds it: accumulation, the optimiser step, skipped micro-batches."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from shards.dataset import ShardDataset
from train.config import make_train_config
from train.inputs import feature_dims
from train.run import Run, make_run, train_loader
from train.runtime import Dist
from train.step import train_step

SETTINGS = ["batch_size=1", "num_workers=0", "model.hidden=12", "model.num_heads=3", "device=cpu", "epochs=3"]


def tiny_run(shards: Path, *overrides: str) -> Run:
    config = make_train_config("late", overrides=[*SETTINGS, *overrides])
    dataset = ShardDataset.load(shards)
    return make_run(config, shards, Dist(), dataset, feature_dims(dataset, config.data.modalities))


def grads(run: Run) -> list[torch.Tensor]:
    return [p.grad for p in run.net.parameters() if p.grad is not None]


def test_a_full_group_takes_one_optimiser_step(bundled_dataset: Path) -> None:
    run = tiny_run(bundled_dataset, "grad_accum=2", "schedule=linear")
    assert (run.batches_per_epoch, run.total_steps) == (2, 3)  # 2 train clips, batch 1; 3 epochs of 1 step
    batches = list(train_loader(run))
    before = [p.detach().clone() for p in run.net.parameters()]

    partial = train_step(run, batches[:1])  # an epoch's incomplete last group: backward only
    assert not partial.stepped and partial.labelled == 1 and run.step == 0 and grads(run)

    full = train_step(run, batches)
    assert full.stepped and full.labelled == 2 and run.step == 1
    assert not grads(run) and math.isfinite(float(full.grad_norm)) and full.loss is not None
    assert any(not torch.equal(a, b) for a, b in zip(before, run.net.parameters(), strict=True))
    assert run.scheduler.get_last_lr()[0] == run.config.optim.lr * (1 - 1 / 3)  # one linear-decay step of three


def test_a_group_ending_without_a_label_takes_no_step(bundled_dataset: Path) -> None:
    run = tiny_run(bundled_dataset, "grad_accum=2")
    first, second = list(train_loader(run))
    unlabelled = {**second, "label": torch.full_like(second["label"], math.nan)}
    step = train_step(run, [first, unlabelled])
    assert not step.stepped and step.labelled == 1 and run.step == 0
    assert grads(run)  # kept for the next group
