"""fp16 with a GradScaler, as training runs it on CUDA, reproduced on the CPU (CPU autocast in float16 and CPU
grad scaling follow the same rules): every model takes its optimiser steps at batch 1 and 32 instead of having
the scaler skip them, because the output layers and losses stay in float32 and the loss scale starts where these
models' gradients fit in fp16."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from test_trainer import losses

import fusion
import train.run
import train.trainer
from train.checkpoint import load_checkpoint
from train.config import make_train_config
from train.run import INIT_SCALE
from train.trainer import fit

DIMS = {"text": 21, "audio": 27, "video": 11}
FAST = ["batch_size=1", "num_workers=0", "log_every=1", "model.hidden=12", "model.num_heads=3", "device=cpu"]


def cuda_amp_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """``amp=fp16`` as on CUDA: fp16 autocast and a GradScaler on, here on the CPU (AMP is off there by design)."""

    def fp16(setting: str, device: torch.device) -> torch.dtype | None:
        return torch.float16 if setting == "fp16" else None

    monkeypatch.setattr(train.run, "amp_dtype", fp16)
    monkeypatch.setattr(train.trainer, "amp_dtype", fp16)


def batch_of(size: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    batch: dict[str, torch.Tensor] = {}
    for m, dim in DIMS.items():
        lengths = torch.randint(2, 14, (size,), generator=g)
        t = int(lengths.max())
        batch[m] = torch.randn(size, t, dim, generator=g)
        batch[f"{m}_mask"] = torch.arange(t)[None] < lengths[:, None]
    batch["label"] = torch.rand(size, generator=g) * 6 - 3
    return batch


@pytest.mark.parametrize("size", [1, 32])
@pytest.mark.parametrize("name", sorted(fusion.MODELS))
def test_every_model_takes_its_fp16_steps(name: str, size: int) -> None:
    """Four steps as ``fit`` takes them (scale, backward, unscale, step, update). Before: at batch 1 the L1
    gradient (+-1 x 65536) overflowed the fp16 prediction, and BC-PMJRS's CLUB fit and MIM's distillation overflowed
    at any batch: skipped steps were bc_pmjrs 1 / 4 (batch 1 / 32), ithp 2 / 0, early 1 / 0, mim 4 / 4, mult 1 / 0,
    tcmax 2 / 0. Now none."""
    torch.manual_seed(0)
    model = fusion.build_model(name, dims=dict(DIMS), hidden=15, num_heads=3, num_layers=1, task="regression")
    optimizer = torch.optim.AdamW(model.param_groups(1e-3))
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
    skipped = 0
    for step in range(4):
        with torch.autocast("cpu", dtype=torch.float16):
            out = model(batch_of(size, seed=step))
        assert out.prediction.dtype == torch.float32  # the output layer computes in float32
        scaler.scale(sum(out.losses.values())).backward()
        scaler.unscale_(optimizer)
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        skipped += scaler.get_scale() < scale
    assert skipped == 0, f"{name} at batch {size}: the scaler skipped {skipped} of 4 steps"
    assert scaler.get_scale() == INIT_SCALE


@pytest.mark.parametrize("model", ["mim", "tcmax"])
def test_an_fp16_run_logs_every_step_at_batch_1(
    bundled_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model: str
) -> None:
    """The CPU twin of the GPU check's fp16 run: 4 of 4 steps logged (before: mim 0, tcmax 2), and the scale in the
    checkpoint is the initial one (no step backed it off)."""
    cuda_amp_on_cpu(monkeypatch)
    config = make_train_config(model, overrides=[*FAST, "amp=fp16", "epochs=2"])
    fit(config, bundled_dataset, tmp_path / "run")
    got = losses(tmp_path / "run")
    assert sorted(got) == [1, 2, 3, 4] and all(math.isfinite(v) for v in got.values()), got
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert ckpt["state"]["step"] == 4 and ckpt["scaler"]["scale"] == INIT_SCALE
