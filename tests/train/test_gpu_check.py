"""What ``make gpu-check`` runs on a GPU machine, and ``make test`` on the CPU: every model trains and is
scored with a modality missing, on each device and precision (bf16 and fp16 autocast on CUDA; full precision
on the CPU, where AMP is off by design); an fp16 run resumes with the same losses; CUDA agrees with the CPU."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from test_trainer import Interrupt, RunLog, losses

import fusion
from shards.dataset import ShardDataset
from train.checkpoint import load_checkpoint
from train.config import make_train_config
from train.pipeline import FusionPipeline
from train.predict import load_network
from train.runtime import Dist, seed_everything
from train.trainer import evaluate, fit

RUNS = [
    ("cpu", "off"),
    pytest.param("cuda", "bf16", marks=pytest.mark.gpu),
    pytest.param("cuda", "fp16", marks=pytest.mark.gpu),
]


def settings(device: str, amp: str) -> list[str]:
    return ["batch_size=1", "num_workers=0", "log_every=1", "model.hidden=12", "model.num_heads=3",
            f"device={device}", f"amp={amp}", "epochs=2"]  # fmt: skip


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


@pytest.mark.gpu
def test_fp16_resume_gives_the_same_losses_on_cuda(bundled_dataset: Path, tmp_path: Path, monkeypatch) -> None:
    """The GradScaler's state is in the checkpoint: a resumed fp16 run does not restart at scale 65536."""
    config = make_train_config("late", overrides=[*settings("cuda", "fp16"), "epochs=3", "checkpoint_every=1"])
    fit(config, bundled_dataset, tmp_path / "straight")
    expected = losses(tmp_path / "straight")
    original = RunLog.train

    def stop_at_step_4(self, step, *args):
        if step == 4:
            raise Interrupt()
        return original(self, step, *args)

    monkeypatch.setattr(RunLog, "train", stop_at_step_4)
    with pytest.raises(Interrupt):
        fit(config, bundled_dataset, tmp_path / "resumed")
    monkeypatch.setattr(RunLog, "train", original)
    fit(config, bundled_dataset, tmp_path / "resumed", resume=True)
    got = losses(tmp_path / "resumed")
    assert got.keys() == expected.keys()
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-3), step


@pytest.mark.gpu
def test_cuda_agrees_with_the_cpu_in_full_precision(bundled_dataset: Path, tmp_path: Path) -> None:
    runs = {}
    for device in ("cpu", "cuda"):
        config = make_train_config("late", overrides=settings(device, "off"))
        fit(config, bundled_dataset, tmp_path / device)
        runs[device] = losses(tmp_path / device)
    assert runs["cuda"].keys() == runs["cpu"].keys()
    for step, value in runs["cpu"].items():
        assert runs["cuda"][step] == pytest.approx(value, rel=1e-3, abs=1e-4), step
