"""Two training processes under torchrun with the gloo backend (CPU DDP)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from train.checkpoint import load_checkpoint


@pytest.mark.integration
def test_two_process_gloo_run(bundled_dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "mmfuse", "train", "--shards", str(bundled_dataset), "--model", "late", "--run-dir", str(run),
        "batch_size=1", "num_workers=0", "epochs=2", "log_every=1", "device=cpu", "model.hidden=12", "model.num_heads=3",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        cmd, cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((run / "config.json").read_text())
    assert record["world_size"] == 2
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert 2 in steps  # 2 train clips over 2 ranks: one batch per rank per epoch, 2 epochs
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt["state"]["step"] == 2
    assert len(ckpt["rng"]) == 2  # each rank's RNG state, for resume
    final = json.loads((run / "final.json").read_text())
    assert final["test"]["n"] == 1 and final["valid"]["n"] == 1  # evaluation gathers every sample once
