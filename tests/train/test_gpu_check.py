"""What ``make gpu-check`` runs on a GPU machine, and ``make test`` on the CPU: every model trains and is
scored with a modality missing, on each device and precision (bf16 and fp16 autocast on CUDA; full precision
on the CPU, where AMP is off by design); an fp16 run resumes with the same losses; CUDA agrees with the CPU."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from test_fp16_steps import cuda_amp_on_cpu
from test_trainer import Interrupt, RunLog, losses

import fusion
import train.run
from shards.dataset import ShardDataset
from train.checkpoint import load_checkpoint
from train.config import make_train_config
from train.pipeline import FusionPipeline
from train.predict import load_network
from train.run import INIT_SCALE, StepScaler
from train.runtime import Dist, seed_everything
from train.trainer import evaluate, fit

RUNS = [
    ("cpu", "off"),
    pytest.param("cuda", "bf16", marks=pytest.mark.gpu),
    pytest.param("cuda", "fp16", marks=pytest.mark.gpu),
]


def settings(device: str, amp: str, epochs: int = 2) -> list[str]:
    return ["batch_size=1", "num_workers=0", "log_every=1", "model.hidden=12", "model.num_heads=3",
            f"device={device}", f"amp={amp}", f"epochs={epochs}"]  # fmt: skip


@pytest.mark.parametrize(("device", "amp"), RUNS)
@pytest.mark.parametrize("model", sorted(fusion.MODELS))
def test_every_model_trains_and_scores_with_a_modality_missing(
    bundled_dataset: Path, tmp_path: Path, model: str, device: str, amp: str
) -> None:
    config = make_train_config(model, overrides=settings(device, amp))
    fit(config, bundled_dataset, tmp_path / "run")
    got = losses(tmp_path / "run")
    assert sorted(got) == [1, 2, 3, 4] and all(math.isfinite(v) for v in got.values())  # no step skipped or lost
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert ckpt["state"]["step"] == 4
    seed_everything(config.run.seed)  # the network as the run initialised it
    start = FusionPipeline(config, ckpt["dims"], ShardDataset.load(bundled_dataset))
    trained, net = ckpt["model"], load_network(ckpt, device)[1]
    changed = [k for k, v in start.state_dict().items() if k in trained and not torch.equal(v, trained[k].cpu())]
    assert changed, "training left every parameter as initialised"
    scored = evaluate(net, bundled_dataset, "train", config, Dist(device=torch.device(device)), drop=("video",))
    assert scored["n"] == 2 and all(math.isfinite(v) for k, v in scored.items() if isinstance(v, float)), scored


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_an_fp16_resume_continues_at_the_saved_scale(bundled_dataset: Path, tmp_path: Path, monkeypatch, device):
    """The GradScaler's state is in the checkpoint and a resumed fp16 run continues at it, with the same losses. One
    overflow (an inf gradient at the second step) halves the scale before the checkpoint at step 3, so a resume at
    the initial scale would end at another one. On the CPU: fp16 autocast and the GradScaler as on CUDA."""
    if device == "cpu":
        cuda_amp_on_cpu(monkeypatch)
    unscale = StepScaler.unscale_

    def one_overflow(self, optimizer):
        self.unscaled = getattr(self, "unscaled", 0) + 1  # the run's second step, once: its retry runs at half scale
        if self.unscaled == 2 and self.get_scale() == INIT_SCALE:
            params = (p for group in optimizer.param_groups for p in group["params"] if p.grad is not None)
            next(params).grad.fill_(math.inf)
        return unscale(self, optimizer)

    monkeypatch.setattr(StepScaler, "unscale_", one_overflow)
    config = make_train_config("late", overrides=[*settings(device, "fp16", epochs=3), "checkpoint_every=1"])
    fit(config, bundled_dataset, tmp_path / "straight")
    expected = losses(tmp_path / "straight")
    assert sorted(expected) == [1, 2, 3, 4, 5]  # 6 batches, one step skipped
    original = RunLog.train

    def stop_at_step_4(self, step, *args):
        if step == 4:
            raise Interrupt()
        return original(self, step, *args)

    monkeypatch.setattr(RunLog, "train", stop_at_step_4)
    with pytest.raises(Interrupt):
        fit(config, bundled_dataset, tmp_path / "resumed")
    monkeypatch.setattr(RunLog, "train", original)
    saved = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    assert saved["state"]["step"] == 3 and saved["scaler"]["scale"] == INIT_SCALE / 2  # the scale moved
    restore, restored = train.run.restore, []

    def restore_recorded(checkpoint, run, parts, d):
        restore(checkpoint, run, parts, d)
        restored.append(parts.scaler.state_dict())

    monkeypatch.setattr(train.run, "restore", restore_recorded)
    fit(config, bundled_dataset, tmp_path / "resumed", resume=True)
    assert restored == [saved["scaler"]]
    got = losses(tmp_path / "resumed")
    assert got.keys() == expected.keys()
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-3), step
    final = [load_checkpoint(tmp_path / r / "checkpoints" / "last.pt")["scaler"] for r in ("straight", "resumed")]
    assert final[0] == final[1] and final[0]["scale"] == INIT_SCALE / 2


def agreement(device: str) -> list[str]:
    """Full precision and no dropout: CUDA draws dropout masks from its own generator, so with dropout the two
    devices' losses differ whatever the arithmetic (by up to 85 % at dropout 0.1)."""
    return [*settings(device, "off"), "model.dropout=0"]


def test_the_agreement_settings_leave_nothing_to_the_random_stream(
    bundled_dataset: Path, tmp_path: Path, monkeypatch
) -> None:
    """The CPU twin of CUDA's other generator: the same network (built from the seed) trained with the random
    stream moved after it is built gives the same losses."""
    config = make_train_config("late", overrides=agreement("cpu"))
    fit(config, bundled_dataset, tmp_path / "seeded")
    original = train.run.build

    def reseeded(*args, **kwargs):
        built = original(*args, **kwargs)
        torch.manual_seed(12345)  # what the run draws from now on (dropout) comes from another stream
        return built

    monkeypatch.setattr(train.run, "build", reseeded)
    fit(config, bundled_dataset, tmp_path / "reseeded")
    expected, got = losses(tmp_path / "seeded"), losses(tmp_path / "reseeded")
    assert got.keys() == expected.keys() == {1, 2, 3, 4}
    for step, value in expected.items():
        assert got[step] == pytest.approx(value, rel=1e-6, abs=1e-7), step


@pytest.mark.gpu
def test_cuda_agrees_with_the_cpu_in_full_precision(bundled_dataset: Path, tmp_path: Path) -> None:
    runs = {}
    for device in ("cpu", "cuda"):
        config = make_train_config("late", overrides=agreement(device))
        fit(config, bundled_dataset, tmp_path / device)
        runs[device] = losses(tmp_path / device)
    assert runs["cuda"].keys() == runs["cpu"].keys()
    for step, value in runs["cpu"].items():
        assert runs["cuda"][step] == pytest.approx(value, rel=1e-3, abs=1e-4), step
