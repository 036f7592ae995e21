"""What a step leaves behind across processes and resumes: the fp16 scaler's skips and state, the DDP wrapper's
settings, and decisions every rank must take alike."""

from __future__ import annotations

from pathlib import Path

import torch

import train.trainer
from shards.dataset import ShardDataset
from train.checkpoint import load_checkpoint
from train.config import make_train_config
from train.inputs import feature_dims
from train.logs import RunLog
from train.run import Run, StepScaler, make_run, may_leave_parameters_unused, restore, save, train_loader
from train.runtime import Dist
from train.step import train_step

SETTINGS = ["batch_size=1", "num_workers=0", "model.hidden=12", "model.num_heads=3", "device=cpu", "epochs=3"]


def tiny_run(shards: Path, *overrides: str) -> Run:
    config = make_train_config("late", overrides=[*SETTINGS, *overrides])
    dataset = ShardDataset.load(shards)
    return make_run(config, shards, Dist(), dataset, feature_dims(dataset, config.data.modalities))


def with_cpu_scaler(run: Run, init_scale: float) -> Run:
    """GradScaler is on for fp16 on CUDA only; the same logic runs with CPU grad scaling."""
    run.scaler = StepScaler("cpu", init_scale=init_scale)
    return run


def test_a_step_the_scaler_skips_neither_counts_nor_advances_the_schedule(bundled_dataset: Path) -> None:
    run = with_cpu_scaler(tiny_run(bundled_dataset, "schedule=linear"), init_scale=1024.0)
    batch = next(iter(train_loader(run)))
    before = [p.detach().clone() for p in run.net.parameters()]
    lr = run.scheduler.get_last_lr()
    overflow = next(run.net.parameters()).register_hook(lambda g: torch.full_like(g, float("inf")))
    step = train_step(run, [batch])
    overflow.remove()
    assert step.skipped and not step.stepped and step.loss is not None
    assert run.step == 0 and run.scheduler.last_epoch == 0 and run.scheduler.get_last_lr() == lr
    assert all(torch.equal(a, b) for a, b in zip(before, run.net.parameters(), strict=True))
    assert run.scaler.get_scale() == 512.0  # backed off

    step = train_step(run, [batch])
    assert step.stepped and not step.skipped and run.step == 1 and run.scheduler.last_epoch == 1


def test_scaler_state_round_trips_through_a_checkpoint(bundled_dataset: Path, tmp_path: Path) -> None:
    run = with_cpu_scaler(tiny_run(bundled_dataset), init_scale=1024.0)
    run.scaler.scale(torch.ones(()))  # the scale is made lazily
    run.scaler.update(new_scale=256.0)
    save(run, tmp_path / "last.pt")
    checkpoint = load_checkpoint(tmp_path / "last.pt")
    resumed = with_cpu_scaler(tiny_run(bundled_dataset), init_scale=65536.0)
    restore(resumed, checkpoint)
    assert resumed.scaler.get_scale() == 256.0

    del checkpoint["scaler"]  # written before the scaler was saved: still loads, at the initial scale
    older = with_cpu_scaler(tiny_run(bundled_dataset), init_scale=65536.0)
    restore(older, checkpoint)
    assert older.scaler.get_scale() == 65536.0
    full_precision = tiny_run(bundled_dataset)  # scaler off: a saved scale is not applied
    restore(full_precision, load_checkpoint(tmp_path / "last.pt"))
    assert not full_precision.scaler.is_enabled()


def test_find_unused_parameters_only_where_a_model_may_leave_some_unused(bundled_dataset: Path, monkeypatch) -> None:
    run = tiny_run(bundled_dataset)
    monkeypatch.setattr(type(run.net.fusion), "uses_every_parameter", False, raising=False)
    assert may_leave_parameters_unused(run)  # undeclared: the safe setting
    monkeypatch.setattr(type(run.net.fusion), "uses_every_parameter", True, raising=False)
    assert not may_leave_parameters_unused(run)
    dropout = tiny_run(bundled_dataset, "model.modality_dropout=0.3")
    assert may_leave_parameters_unused(dropout)  # a modality can drop out of a whole batch


def test_the_selection_comes_from_the_run_not_the_disk(bundled_dataset: Path, tmp_path: Path, monkeypatch) -> None:
    """On node-local disks a rank may not see best.pt; whether one was saved is the run's own ``best_step``."""
    run = tiny_run(bundled_dataset)
    run.run_dir, run.log, run.best_step = tmp_path, RunLog(tmp_path, enabled=False), 1
    saved, loaded = [], []
    monkeypatch.setattr(train.trainer, "save", lambda run, path: saved.append(path))
    monkeypatch.setattr(
        train.trainer, "read_checkpoint", lambda d, path, part: loaded.append(path) or run.net.state_dict()
    )
    monkeypatch.setattr(train.trainer, "evaluate", lambda *args, **kwargs: {})
    monkeypatch.setattr(train.trainer, "write_json", lambda *args: None)
    train.trainer.finish(run)  # this rank's disk has no best.pt
    assert saved == [] and loaded == [tmp_path / train.trainer.BEST]

    run.best_step = -1  # no validation score on any rank: every rank saves and selects the last state
    saved.clear()
    train.trainer.finish(run)
    assert saved == [tmp_path / train.trainer.LAST]
