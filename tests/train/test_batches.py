"""Batch stages: worker chunks re-cut into exact batches equal collate's; Normalise is the old host-side result."""

from __future__ import annotations

import numpy as np
import torch

from train.batches import Normalise, Rebatch, collate, collate_chunk
from train.stages import BAD


def sample(i: int, rng: np.random.Generator) -> dict:
    t, v = int(rng.integers(1, 6)), int(rng.integers(1, 4))
    return {
        "key": f"s{i}", "label": np.float32(i),
        "text": rng.normal(size=(t, 3)).astype(np.float16), "text_mask": rng.random(t) > 0.3,
        "video": rng.normal(size=(v, 5)).astype(np.float16), "video_mask": np.ones(v, bool),
        "video_geom": rng.normal(size=(v, 4)).astype(np.float32), "video_geom_mask": np.ones(v, bool),
    }  # fmt: skip


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and a["key"] == b["key"] and all(torch.equal(a[k], b[k]) for k in a if k != "key")


def test_rebatch_across_chunks_equals_collate_of_the_same_samples() -> None:
    rng = np.random.default_rng(3)
    samples = [sample(i, rng) for i in range(17)]
    lists = [samples[0:3], samples[3:4] + [{BAD: "broken"}] + samples[4:5], samples[5:8], samples[8:11], []]
    lists += [[{BAD: "gone"}], samples[11:14], samples[14:17]]
    chunks = [collate_chunk(items) if items else None for items in lists]
    rebatch = Rebatch(3, partial=True)
    got = list(rebatch(c for c in chunks if c is not None))
    good = samples[:17]
    want = [collate(good[i : i + 3]) for i in range(0, 17, 3)]
    assert [b["key"] for b in got] == [b["key"] for b in want]
    assert all(same(a, b) for a, b in zip(got, want, strict=True))
    assert rebatch.errors == ["broken", "gone"]
    assert got[0] is chunks[0]["batch"]  # a full chunk on a sample boundary passes through
    assert len(list(Rebatch(3, partial=False)(c for c in chunks if c is not None))) == 5


def test_collate_keeps_float16_and_normalise_is_the_float32_result() -> None:
    rng = np.random.default_rng(4)
    batch = collate([sample(i, rng) for i in range(4)])
    assert batch["text"].dtype == torch.float16 and batch["text_mask"].dtype == torch.bool
    assert batch["video"].shape[-1] == 5 and batch["video_geom"].dtype == torch.float32
    mean = {"text": np.arange(3.0), "video": np.r_[np.ones(5), np.zeros(4)]}
    std = {"text": np.array([2.0, 1e-9, 0.5]), "video": np.r_[np.full(5, 4.0), np.ones(4)]}
    out = Normalise(mean, std)(batch)
    video = torch.cat([batch["video"].float(), batch["video_geom"]], -1)
    want = torch.where(batch["video_mask"][..., None], (video - torch.tensor(mean["video"]).float()) / 4.0, 0.0)
    want[..., 5:] = torch.where(batch["video_mask"][..., None], video[..., 5:], 0.0)
    assert out["video"].dtype == torch.float32 and "video_geom" not in out
    torch.testing.assert_close(out["video"], want, rtol=0, atol=0)
    text = (batch["text"].float() - torch.arange(3.0)) / torch.tensor([2.0, 1.0, 0.5])
    torch.testing.assert_close(out["text"], torch.where(batch["text_mask"][..., None], text, 0.0), rtol=0, atol=0)
    again = Normalise(mean, std)(out)  # float32 inputs are already the models': unchanged
    assert same(again, out) and "video_geom" in batch  # the loader batch itself is left as it was
