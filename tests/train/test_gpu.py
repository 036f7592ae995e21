"""CUDA training paths: AMP (bf16 and fp16 with a gradient scaler), pinned non-blocking copies. Skipped without CUDA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from train.checkpoint import load_checkpoint
from train.config import make_train_config
from train.trainer import fit

FAST = ["batch_size=1", "num_workers=0", "log_every=1", "model.hidden=12", "model.num_heads=3", "device=cuda"]


@pytest.mark.gpu
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_end_to_end_amp_training_on_cuda(bundled_dataset: Path, tmp_path: Path, amp: str) -> None:
    config = make_train_config("tcmax", overrides=[*FAST, "epochs=2", "mode=end_to_end", f"amp={amp}"])
    final = fit(config, bundled_dataset, tmp_path / amp)
    records = [json.loads(line) for line in (tmp_path / amp / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert json.loads((tmp_path / amp / "config.json").read_text())["device"].startswith("cuda")
    assert load_checkpoint(tmp_path / amp / "checkpoints" / "last.pt")["state"]["step"] == 4
    assert final["test"]["n"] == 1
