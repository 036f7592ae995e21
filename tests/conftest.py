"""Shared fixtures: tiny encoders built from configs (odd, distinct sizes), the bundled clips, manifests."""

from __future__ import annotations

import csv
import importlib.util
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GLOG_minloglevel", "2")


def pytest_configure(config):
    import tempfile

    import torch

    # Weight hashes are cached (extract.weight_cache): in a directory of this test run, not the user's cache.
    if "MMFUSE_CACHE" not in os.environ:
        os.environ["MMFUSE_CACHE"] = config._mmfuse_cache = tempfile.mkdtemp(prefix="mmfuse-test-cache-")

    # The tests use tiny models: one intra-op thread is as fast, and it does not oversubscribe the cores
    # that extraction worker processes (and parallel jobs) share.
    torch.set_num_threads(1)


def pytest_unconfigure(config):
    import shutil

    if getattr(config, "_mmfuse_cache", None):
        shutil.rmtree(config._mmfuse_cache, ignore_errors=True)
        os.environ.pop("MMFUSE_CACHE", None)


ROOT = Path(__file__).resolve().parents[1]
MEDIA = ROOT / "examples" / "media"
TEXT_DIM, AUDIO_DIM = 21, 27
BUNDLED = [
    ("grid", "bbaf2n", "bin blue at f two now", "train"),
    ("grid", "pwij3p", "place white in j three please", "train"),
    ("grid", "id2_vcd_swwp2s", "set white with p two soon", "valid"),
    ("faces", "face_noface", "", "test"),
]
# The GPU machine's image has no mediapipe (FaceMesh runs on the CPU anyway, and is tested on the CPU machine). On
# the image, extraction in this process gets stand-in landmarks (tests/facemesh_stand_in.py), so that the GPU tests
# train on shards with all three modalities; extraction in other processes leaves video out (HAS_FACEMESH False).
HAS_FACEMESH = importlib.util.find_spec("mediapipe") is not None


@pytest.fixture(scope="session", autouse=True)
def facemesh_stand_in():
    if HAS_FACEMESH:
        yield
        return
    from facemesh_stand_in import install

    with pytest.MonkeyPatch.context() as mp:
        install(mp)
        yield


def pytest_collection_modifyitems(config, items):
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_text_model(tmp_path_factory) -> Path:
    """A 1-layer BERT of width 21 with the bundled MiniLM tokenizer, saved as a local model directory; where MiniLM
    is not installed (the GPU image), with a WordPiece tokenizer of the same size made here."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from bench.stand_ins import save_wordpiece_tokenizer
    from extract.models import bundled_models

    path = tmp_path_factory.mktemp("tiny-bert")
    minilm = bundled_models().get("all-MiniLM-L6-v2")
    tok = AutoTokenizer.from_pretrained(minilm) if minilm else save_wordpiece_tokenizer(path)
    torch.manual_seed(1)
    cfg = BertConfig(
        vocab_size=tok.vocab_size, hidden_size=TEXT_DIM, num_hidden_layers=1, num_attention_heads=3,
        intermediate_size=37, max_position_embeddings=64,
    )  # fmt: skip
    BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_audio_model(tmp_path_factory) -> Path:
    """A 2-layer wav2vec 2.0 of width 27 with wav2vec2-base's group-norm feature encoder."""
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    path = tmp_path_factory.mktemp("tiny-w2v")
    torch.manual_seed(2)
    cfg = Wav2Vec2Config(
        hidden_size=AUDIO_DIM, num_hidden_layers=2, num_attention_heads=3, intermediate_size=33,
        conv_dim=(13,) * 7, feat_extract_norm="group", do_stable_layer_norm=False,
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=3,
    )  # fmt: skip
    Wav2Vec2Model(cfg).save_pretrained(path)
    return path


def encode_all(container, stream, frames) -> None:
    """Encode ``frames`` (PyAV video or audio frames) into ``stream`` and mux every packet, flushing the encoder
    at the end."""
    for frame in frames:
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode(None):
        container.mux(packet)


def rgb_frames(path: Path, n: int, **size) -> list:
    """The first ``n`` frames of ``path`` as RGB arrays ``(H, W, 3)`` uint8, at ``width``/``height`` if given."""
    import av

    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24", **size) for _, f in zip(range(n), container.decode(video=0), strict=False)]


def write_manifest(path: Path, rows: list[dict], columns: list[str] | None = None) -> Path:
    columns = columns or sorted({k for r in rows for k in r})
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for r in rows:
            w.writerow(r)
    return path


def bundled_rows() -> list[dict]:
    return [
        {"video_id": v, "clip_id": c, "text": t, "mode": s, "label": i - 1.5} for i, (v, c, t, s) in enumerate(BUNDLED)
    ]


@pytest.fixture()
def tiny_cfg(tiny_text_model, tiny_audio_model):
    """Factory for extraction settings that use the tiny encoders."""
    from extract.config import make_config

    def make(**kw):
        base = {"text_model": str(tiny_text_model), "audio_model": str(tiny_audio_model), "workers": 0}
        return make_config(None, **{**base, **kw})

    return make


@pytest.fixture(scope="session")
def bundled_dataset(tmp_path_factory, tiny_text_model, tiny_audio_model) -> Path:
    """The four bundled clips extracted once with the tiny encoders (shard size 2)."""
    from extract.config import make_config
    from extract.pipeline import run_extract

    tmp = tmp_path_factory.mktemp("bundled")
    manifest = write_manifest(tmp / "label.csv", bundled_rows())
    cfg = make_config(None, text_model=str(tiny_text_model), audio_model=str(tiny_audio_model), workers=0, shard_size=2)
    run_extract(manifest, MEDIA, tmp / "out", cfg)
    return tmp / "out"
