"""The small MulT baseline: cross-modal block layout, per-sample attention, cross-modal dependence, training."""

from __future__ import annotations

import pytest
import torch

from fusion import FusionConfigError, build_model

DIMS = {"text": 9, "audio": 7, "video": 5}


def tiny(dims=DIMS, **extra):
    torch.manual_seed(0)
    return build_model("mult", dims=dict(dims), hidden=15, num_heads=3, num_layers=1, **extra)


def batch_of(b: int = 6, dims=DIMS, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    batch = {}
    for i, (m, d) in enumerate(dims.items()):
        batch[m] = torch.randn(b, 4 + i, d, generator=g)
        batch[f"{m}_mask"] = torch.ones(b, 4 + i, dtype=torch.bool)
        batch[f"{m}_mask"][1, 2 + i :] = False
    batch["label"] = torch.rand(b, generator=g) * 6 - 3
    return batch


def test_block_layout() -> None:
    model = tiny(cross_layers=2, memory_layers=3)
    assert sorted(model.cross) == sorted(
        ["text_audio", "text_video", "audio_text", "audio_video", "video_text", "video_audio"]
    )
    assert all(len(blocks) == 2 for blocks in model.cross.values())
    assert all(len(layers) == 3 for layers in model.memory.values())
    assert model.merge["text"].in_features == 2 * 15
    assert model.head[0].in_features == 3 * (15 + 1)  # pooled vectors plus the presence indicator
    single = tiny(dims={"video": 5})
    assert not len(single.cross) and not len(single.merge) and not len(single.memory)
    own = sum(p.numel() for p in single.encoders.parameters()) + sum(p.numel() for p in single.head.parameters())
    assert sum(p.numel() for p in single.parameters()) == own
    assert [g["name"] for g in model.param_groups(1e-3)] == ["model"]


def test_target_attends_to_the_other_modalities() -> None:
    model = tiny(dims={"text": 9, "audio": 7}).eval()
    batch = batch_of(dims={"text": 9, "audio": 7})
    changed = dict(batch, audio=batch["audio"] * 2)
    with torch.no_grad():
        outputs = []
        for b in (batch, changed):
            inputs = model.prepare(b)
            encoded = {m: model.encoders[m](inputs.feats[m], inputs.masks[m]) for m in model.modalities}
            outputs.append(model.cross_modal("text", encoded, inputs.masks))
    assert (outputs[0] - outputs[1]).abs().max() > 1e-3  # text's sequence changed with the audio alone
    torch.testing.assert_close(outputs[0][1, 2:], torch.zeros(2, 15))  # invalid steps stay zero


def test_fits_a_tiny_batch_without_memory_layers() -> None:
    model = tiny(memory_layers=0, dropout=0.0)
    batch = batch_of(seed=3)
    opt = torch.optim.Adam(model.param_groups(lr=3e-3))
    first = None
    for _ in range(15):
        loss = model(batch).losses["task"]
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert set(model(batch).losses) == {"task"}
    assert loss.item() < 0.5 * first


def test_config_problems_are_collected() -> None:
    with pytest.raises(FusionConfigError) as info:
        tiny(cross_layers=0, memory_layers=-1)
    assert "cross_layers: must be >= 1, got 0" in str(info.value)
    assert "memory_layers: must be >= 0, got -1" in str(info.value)
