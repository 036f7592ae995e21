"""The training step as ``fit`` writes it out: accumulation over micro-batches, one optimiser step per full group,
skipped micro-batches, and gradients that carry into the next group of an epoch. ``fit`` runs on batches handed to
it (its ``source``); each optimiser step's gradient is read where ``fit`` clips it."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import train.step
import train.trainer
from shards.dataset import ShardDataset
from train.checkpoint import load_checkpoint
from train.config import make_train_config
from train.inputs import feature_dims
from train.run import build, train_loader
from train.runtime import Dist
from train.trainer import fit

SETTINGS = ["batch_size=1", "num_workers=0", "model.hidden=12", "model.num_heads=3", "device=cpu", "epochs=1"]
NO_DROPOUT = "model.dropout=0"  # the same forward every time: gradients comparable across runs


def clips(shards: Path) -> list[dict]:
    """The train split's two clips, one batch each, in the loader's format."""
    config = make_train_config("late", overrides=SETTINGS)
    dataset = ShardDataset.load(shards)
    job, _, _ = build(config, shards, Dist(), dataset, feature_dims(dataset, config.data.modalities))
    return list(train_loader(job, 0, 0))


def unlabelled(batch: dict) -> dict:
    return {**batch, "label": torch.full_like(batch["label"], math.nan)}


def steps_of(
    monkeypatch: pytest.MonkeyPatch, shards: Path, run_dir: Path, epoch: list[dict], *overrides: str
) -> tuple[dict, list[torch.Tensor]]:
    """``fit`` of ``late`` on ``epoch`` (the batches of each epoch): the last checkpoint, and for each optimiser step
    the gradient it clipped (every parameter's, flattened into one vector)."""
    clipped: list[torch.Tensor] = []
    clip = train.step.clip_grad_norm_per_group

    def recorded(optimizer: torch.optim.Optimizer, max_norm: float) -> torch.Tensor:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        clipped.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params]))
        return clip(optimizer, max_norm)

    monkeypatch.setattr(train.trainer, "clip_grad_norm_per_group", recorded)
    config = make_train_config("late", overrides=[*SETTINGS, *overrides])
    fit(config, shards, run_dir, source=lambda job, e, skip: list(epoch))
    return load_checkpoint(run_dir / "checkpoints" / "last.pt"), clipped


def gradient(monkeypatch: pytest.MonkeyPatch, shards: Path, run_dir: Path, batch: dict) -> torch.Tensor:
    """The gradient of ``batch`` alone at the network's initial parameters."""
    return steps_of(monkeypatch, shards, run_dir, [batch], "max_steps=1", NO_DROPOUT)[1][0]


def test_a_full_group_takes_one_optimiser_step(bundled_dataset: Path, tmp_path: Path, monkeypatch) -> None:
    first, second = clips(bundled_dataset)
    overrides = ["grad_accum=2", "schedule=linear", "max_steps=2", NO_DROPOUT]
    saved, clipped = steps_of(monkeypatch, bundled_dataset, tmp_path / "run", [first, second, first], *overrides)
    assert len(clipped) == 1 and saved["state"]["step"] == 1  # the epoch's incomplete last group: backward only
    assert saved["scheduler"]["_last_lr"][0] == pytest.approx(1e-3 * (1 - 1 / 2))  # one linear-decay step of two
    alone = [gradient(monkeypatch, bundled_dataset, tmp_path / f"alone{i}", b) for i, b in enumerate((first, second))]
    assert torch.allclose(clipped[0], (alone[0] + alone[1]) / 2, atol=1e-6)  # the group's mean gradient


def test_a_group_ending_without_a_label_carries_its_gradient_on(
    bundled_dataset: Path, tmp_path: Path, monkeypatch
) -> None:
    """The first group's last micro-batch has no label: no optimiser step, and its first micro-batch's gradient
    joins the next group's."""
    first, second = clips(bundled_dataset)
    carried = [first, unlabelled(second), second, second]
    saved, clipped = steps_of(monkeypatch, bundled_dataset, tmp_path / "run", carried, "grad_accum=2", NO_DROPOUT)
    assert len(clipped) == 1 and saved["state"]["step"] == 1
    alone = gradient(monkeypatch, bundled_dataset, tmp_path / "first", first)
    group = gradient(monkeypatch, bundled_dataset, tmp_path / "second", second)
    assert torch.allclose(clipped[0], group + alone / 2, atol=1e-6)
