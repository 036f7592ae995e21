"""Word-aligned features on a real clip with known word timings (GRID's swwp2s.align) and by hand."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import MEDIA, write_manifest

from extract.pipeline import run_extract
from train.align import AlignWords, word_index
from train.data import DataConfig, make_loader
from train.inputs import DataError


def grid_words() -> list[list]:
    """swwp2s.align in seconds (GRID's unit is 1/25000 s), silences dropped."""
    words = []
    for line in (MEDIA / "grid" / "swwp2s.align").read_text().split("\n"):
        if line.strip():
            start, end, word = line.split()
            if word != "sil":
                words.append([word, int(start) / 25000, int(end) / 25000])
    return words


@pytest.fixture(scope="module")
def aligned_shards(tmp_path_factory, tiny_text_model, tiny_audio_model) -> Path:
    from extract.config import make_config

    tmp = tmp_path_factory.mktemp("aligned")
    row = {"video_id": "grid", "clip_id": "swwp2s", "text": "set white with p two soon", "mode": "train",
           "path": "grid/id2_vcd_swwp2s.mpg", "label": 0.5, "words": json.dumps(grid_words())}  # fmt: skip
    manifest = write_manifest(tmp / "m.csv", [row])
    cfg = make_config(None, text_model=str(tiny_text_model), audio_model=str(tiny_audio_model), workers=0)
    run_extract(manifest, MEDIA, tmp / "out", cfg)
    return tmp / "out"


def test_frames_averaged_per_word_on_a_real_clip(aligned_shards: Path) -> None:
    words = grid_words()
    assert [w for w, _, _ in words] == ["set", "white", "with", "p", "two", "soon"]
    config = DataConfig(batch_size=1, num_workers=0, normalise=False)
    plain = next(iter(make_loader(aligned_shards, "train", config, train=False)))
    aligned = next(iter(make_loader(aligned_shards, "train", DataConfig(**{**config.__dict__, "align_words": True}),
                                    train=False)))  # fmt: skip
    from shards import iter_shard

    sample = next(iter_shard(next(aligned_shards.glob("train-*.tar"))))
    for m, time_name in (("audio", "audio_time.npy"), ("video", "video_time.npy")):
        assert aligned[m].shape[1] == len(words)
        assert aligned[f"{m}_mask"][0].all()
        times = sample[time_name]
        for w, (_, start, end) in enumerate(words):
            inside = (times >= start) & (times < end) & plain[f"{m}_mask"][0].numpy()
            expected = plain[m][0][inside].mean(0)
            np.testing.assert_allclose(aligned[m][0, w].numpy(), expected.numpy(), rtol=2e-3, atol=2e-3)
    assert aligned["text"].shape == plain["text"].shape  # text stays at token level


def test_word_index_by_hand() -> None:
    times = np.array([0.02, 0.06, 0.10, 0.14, 0.18])
    valid = np.array([True, True, False, True, True])
    words = [["a", 0.0, 0.08], ["b", 0.085, 0.115], ["c", 0.145, 0.155], ["d", 0.5, 0.6]]
    groups = word_index(times, valid, words)
    # a: both valid frames inside. b: only the invalid frame 0.10 inside, and the nearest valid frames are 0.04
    # from its middle, more than half a frame (0.02) plus half the word (0.015): no frame, mask False.
    # c: no frame inside, 0.14 is 0.01 from its middle: taken. d: past every frame.
    assert [g.tolist() for g in groups] == [[0, 1], [], [3], []]


def test_sample_without_words_is_a_clear_error() -> None:
    sample = {"meta.json": {"key": "v__c", "words": None, "modalities": {}}}
    with pytest.raises(DataError, match="sample v__c has no word timings: align_words needs a 'words' column"):
        AlignWords(("audio",))(sample)


def test_training_on_word_aligned_features(aligned_shards: Path, tmp_path: Path) -> None:
    from mmfuse.cli import main
    from train.checkpoint import load_checkpoint
    from train.config import make_train_config
    from train.trainer import fit

    overrides = [
        "batch_size=1",
        "num_workers=0",
        "epochs=1",
        "align_words=true",
        "selection=last",  # the aligned shards have a train split only
        "model.hidden=12",
        "model.num_heads=3",
    ]
    fit(make_train_config("late", overrides=overrides), aligned_shards, tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    assert load_checkpoint(ckpt)["config"]["data.align_words"] is True
    video = str(MEDIA / "grid" / "id2_vcd_swwp2s.mpg")
    assert main(["predict", "--checkpoint", str(ckpt), video, "--text", "set white with p two soon"]) == 1
