"""What a step leaves behind across processes and resumes: the fp16 scaler's skips and state, the DDP wrapper's
settings, and decisions every rank must take alike."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from test_fp16_steps import cuda_amp_on_cpu

import train.trainer
from shards.dataset import ShardDataset
from train.checkpoint import load_checkpoint
from train.config import make_train_config
from train.inputs import feature_dims
from train.logs import RunLog
from train.run import INIT_SCALE, Job, Parts, Run, StepScaler, build, may_leave_parameters_unused, restore, save
from train.runtime import Dist
from train.trainer import fit

SETTINGS = ["batch_size=1", "num_workers=0", "model.hidden=12", "model.num_heads=3", "device=cpu", "epochs=3"]


def tiny_run(shards: Path, *overrides: str) -> tuple[Job, Run, Parts]:
    config = make_train_config("late", overrides=[*SETTINGS, *overrides])
    dataset = ShardDataset.load(shards)
    return build(config, shards, Dist(), dataset, feature_dims(dataset, config.data.modalities))


def with_cpu_scaler(parts: Parts, init_scale: float) -> Parts:
    """GradScaler is on for fp16 on CUDA only; the same logic runs with CPU grad scaling."""
    return parts._replace(scaler=StepScaler("cpu", init_scale=init_scale))


def test_a_step_the_scaler_skips_neither_counts_nor_advances_the_schedule(
    bundled_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fp16 as on CUDA, with an inf gradient at the first step: the scaler skips it, backs the scale off, and the
    parameters, step count and schedule stay where they were; the next step is step 1."""
    cuda_amp_on_cpu(monkeypatch)
    unscale, seen = StepScaler.unscale_, []

    def first_overflows(self: StepScaler, optimizer: torch.optim.Optimizer) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        seen.append(([p.detach().clone() for p in params], optimizer.param_groups[0]["lr"], self.get_scale()))
        if len(seen) == 1:
            next(p for p in params if p.grad is not None).grad.fill_(math.inf)
        unscale(self, optimizer)

    monkeypatch.setattr(StepScaler, "unscale_", first_overflows)
    config = make_train_config("late", overrides=[*SETTINGS, "epochs=1", "amp=fp16", "schedule=linear"])
    fit(config, bundled_dataset, tmp_path / "run")
    saved = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert len(seen) == 2 and saved["state"]["step"] == 1  # two batches, the first step skipped
    (before, lr, scale), (after, lr_after, scale_after) = seen
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True)) and lr_after == lr
    assert (scale, scale_after) == (INIT_SCALE, INIT_SCALE / 2)  # backed off
    assert saved["scheduler"]["last_epoch"] == 1 and saved["scaler"]["scale"] == INIT_SCALE / 2


def test_scaler_state_round_trips_through_a_checkpoint(bundled_dataset: Path, tmp_path: Path) -> None:
    job, run, parts = tiny_run(bundled_dataset)
    parts = with_cpu_scaler(parts, init_scale=1024.0)
    parts.scaler.scale(torch.ones(()))  # the scale is made lazily
    parts.scaler.update(new_scale=256.0)
    save(tmp_path / "last.pt", job, run, parts)
    checkpoint = load_checkpoint(tmp_path / "last.pt")
    _, resumed_run, resumed = tiny_run(bundled_dataset)
    resumed = with_cpu_scaler(resumed, init_scale=65536.0)
    restore(checkpoint, resumed_run, resumed, Dist())
    assert resumed.scaler.get_scale() == 256.0

    del checkpoint["scaler"]  # written before the scaler was saved: still loads, at the initial scale
    _, older_run, older = tiny_run(bundled_dataset)
    older = with_cpu_scaler(older, init_scale=65536.0)
    restore(checkpoint, older_run, older, Dist())
    assert older.scaler.get_scale() == 65536.0
    _, full_run, full_precision = tiny_run(bundled_dataset)  # scaler off: a saved scale is not applied
    restore(load_checkpoint(tmp_path / "last.pt"), full_run, full_precision, Dist())
    assert not full_precision.scaler.is_enabled()


def test_find_unused_parameters_only_where_a_model_may_leave_some_unused(bundled_dataset: Path, monkeypatch) -> None:
    net = tiny_run(bundled_dataset)[2].net
    monkeypatch.setattr(type(net.fusion), "uses_every_parameter", False, raising=False)
    assert may_leave_parameters_unused(net)  # undeclared: the safe setting
    monkeypatch.setattr(type(net.fusion), "uses_every_parameter", True, raising=False)
    assert not may_leave_parameters_unused(net)
    dropout = tiny_run(bundled_dataset, "model.modality_dropout=0.3")[2].net
    assert may_leave_parameters_unused(dropout)  # a modality can drop out of a whole batch


def test_the_selection_comes_from_the_run_not_the_disk(bundled_dataset: Path, tmp_path: Path, monkeypatch) -> None:
    """On node-local disks a rank may not see best.pt; whether one was saved is the run's own ``best_step``."""
    job, run, parts = tiny_run(bundled_dataset)
    job.run_dir, job.log, run.best_step = tmp_path, RunLog(tmp_path, enabled=False), 1
    saved, loaded = [], []
    monkeypatch.setattr(train.trainer, "save", lambda path, *args: saved.append(path))
    monkeypatch.setattr(
        train.trainer, "read_checkpoint", lambda d, path, part: loaded.append(path) or parts.net.state_dict()
    )
    monkeypatch.setattr(train.trainer, "evaluate", lambda *args, **kwargs: {})
    monkeypatch.setattr(train.trainer, "write_json", lambda *args: None)
    train.trainer.finish(job, run, parts)  # this rank's disk has no best.pt
    assert saved == [] and loaded == [tmp_path / train.trainer.BEST]

    run.best_step = -1  # no validation score on any rank: every rank saves and selects the last state
    saved.clear()
    train.trainer.finish(job, run, parts)
    assert saved == [tmp_path / train.trainer.LAST]
