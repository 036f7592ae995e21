"""``compile=true`` over whole training steps, frozen and end to end: one graph, recompiled at most once when the
batch sizes change (dynamo then makes them symbolic), never split. Host syncs in the forward (``int(tensor)``,
``bool(tensor)``, per-clip Python loops in the audio encoder, LayerDrop's Python branch) and guards on the batch's
string keys would show as more graphs. ``CompileCounter`` is the eager backend plus a count of compiled graphs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from shards.dataset import ShardDataset
from train.checkpoint import load_checkpoint
from train.config import make_train_config
from train.data import make_loader
from train.trainer import fit

FAST = ["batch_size=2", "num_workers=0", "model.hidden=12", "model.num_heads=3", "device=cpu", "compile=true"]
FAST += ["epochs=1", "max_steps=10", "selection=last"]


def cropped(batch: dict, fraction: float) -> dict:
    """``batch`` with every sequence member (and its mask) cut to ``fraction`` of its time axis (fresh, contiguous
    tensors, as the loader gives), 2 steps at least
    (dynamo specialises sizes 0 and 1)."""
    return {
        k: v[:, : max(2, round(fraction * v.shape[1]))].clone() if isinstance(v, torch.Tensor) and v.dim() >= 2 else v
        for k, v in batch.items()
    }


def varied_batches(shards: Path, config, count: int) -> list[dict]:
    """``count`` batches of the train split, each cut to its own lengths. The batch size stays: the training loader
    gives full batches only."""
    (batch,) = make_loader(
        ShardDataset.load(shards), "train", dataclasses.replace(config.data, batch_size=2), train=False
    )
    batches = [cropped(batch, 1.0 - 0.06 * i) for i in range(count)]
    shapes = {tuple(tuple(v.shape) for k, v in sorted(b.items()) if k.endswith("_mask")) for b in batches}
    assert len(shapes) == count
    return batches


@pytest.mark.parametrize("mode", ["frozen", "end_to_end"])
def test_compiled_training_steps_need_one_graph_and_at_most_one_recompile(
    bundled_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    torch._dynamo.reset()
    counter = CompileCounter()
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: real(model, **{**kwargs, "backend": counter}))
    config = make_train_config("mult", overrides=[*FAST, f"mode={mode}", "encoder_lr=0.01"])
    batches = varied_batches(bundled_dataset, config, 10)
    fit(config, bundled_dataset, tmp_path / mode, source=lambda job, epoch, skip: list(batches))
    assert load_checkpoint(tmp_path / mode / "checkpoints" / "last.pt")["state"]["step"] == 10
    assert counter.frame_count >= 1  # the training forward went through the compiled wrapper
    assert counter.frame_count <= 2, f"{counter.frame_count} graphs in 10 steps: graph breaks or recompiles"
