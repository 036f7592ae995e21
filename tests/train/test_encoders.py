"""End-to-end encoders recompute exactly the features extraction stored, from the raw inputs in the shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from train.data import DataConfig, make_loader
from train.encoders import AudioEncoder, EncoderMismatch, TextEncoder


def raw_batches(root: Path):
    config = DataConfig(batch_size=4, num_workers=0, raw=True, normalise=False)
    for split in ("train", "valid", "test"):
        loader = make_loader(root, split, config, train=False)
        yield from (loader.normalise(batch) for batch in loader)  # float32, as FusionPipeline gives the models


def test_encoders_reproduce_stored_features(bundled_dataset: Path) -> None:
    extractors = json.loads((bundled_dataset / "dataset.json").read_text())["feature_set"]["extractors"]
    text, audio = TextEncoder(extractors["text"]).eval(), AudioEncoder(extractors["audio"]).eval()
    checked = {"text": 0, "audio": 0}
    with torch.no_grad():
        for batch in raw_batches(bundled_dataset):
            feats = text(batch["text_ids"], batch["text_ids_mask"])
            for i in range(len(batch["key"])):
                valid = batch["text_mask"][i]
                if valid.any():  # stored features are float16: compare at that precision
                    torch.testing.assert_close(feats[i][valid], batch["text"][i][valid], atol=2e-3, rtol=2e-3)
                    checked["text"] += 1
            frames, counts = audio(batch["audio_wave"], batch["audio_wave_mask"])
            for i in range(len(batch["key"])):
                n = int(batch["audio_mask"][i].shape[0])
                valid = batch["audio_mask"][i]
                if valid.any():
                    assert int(counts[i]) >= int(valid.nonzero().max()) + 1
                    torch.testing.assert_close(frames[i, :n][valid], batch["audio"][i][valid], atol=2e-3, rtol=2e-3)
                    checked["audio"] += 1
    assert checked["text"] == 3  # face_noface has an empty transcript
    assert checked["audio"] == 4


def test_other_weights_are_refused(bundled_dataset: Path) -> None:
    extractors = json.loads((bundled_dataset / "dataset.json").read_text())["feature_set"]["extractors"]
    wrong = {**extractors["text"], "weights_sha256": "f" * 16}
    with pytest.raises(EncoderMismatch, match="different weights from the one the shards were extracted with"):
        TextEncoder(wrong)


def test_gradient_checkpointing_switch(bundled_dataset: Path) -> None:
    extractors = json.loads((bundled_dataset / "dataset.json").read_text())["feature_set"]["extractors"]
    assert TextEncoder(extractors["text"], gradient_checkpointing=True).model.is_gradient_checkpointing
    assert AudioEncoder(extractors["audio"], gradient_checkpointing=True).model.is_gradient_checkpointing
    assert not TextEncoder(extractors["text"]).model.is_gradient_checkpointing


@pytest.mark.parametrize("top_k", [0, 1])
def test_frozen_audio_front_end_is_not_back_propagated(top_k: int) -> None:
    audio = AudioEncoder({"model": "random:wav2vec2-small"}).train()
    audio.set_trainable(top_k)
    front = audio.model.feature_extractor
    wave = torch.randn(2, 8000) * 0.1
    assert not front(wave).requires_grad  # the conv front end runs without a graph
    frames, _ = audio(wave, torch.ones(2, 8000, dtype=torch.bool))
    assert frames.requires_grad == (top_k > 0)
    if frames.requires_grad:
        frames.sum().backward()
        assert all(p.grad is None for p in front.parameters())
        assert any(p.grad is not None for p in audio.layers[-1].parameters())


def test_unfrozen_audio_front_end_trains_again() -> None:
    audio = AudioEncoder({"model": "random:wav2vec2-small"}).train()
    audio.set_trainable(0)
    audio.set_trainable(-1)
    frames, _ = audio(torch.randn(1, 8000) * 0.1, torch.ones(1, 8000, dtype=torch.bool))
    frames.sum().backward()
    assert all(p.grad is not None for p in audio.model.feature_extractor.parameters() if p.requires_grad)
    assert audio.model.feature_extractor._requires_grad
