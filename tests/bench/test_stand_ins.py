"""Encoders made where the bundled MiniLM and mediapipe are absent (the GPU image): the generated WordPiece
tokenizer, the MiniLM-shaped BERT, and what ``bench gpu`` extracts with them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from bench.stand_ins import MINILM_SHAPES, VOCAB_SIZE, save_wordpiece_tokenizer, wordpiece_vocab


def test_vocabulary_has_berts_size_and_special_ids() -> None:
    vocab = wordpiece_vocab()
    assert len(vocab) == VOCAB_SIZE == len(set(vocab))
    assert [vocab.index(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")] == [0, 100, 101, 102, 103]


def test_tokenizer_splits_any_text_without_unknowns(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    save_wordpiece_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert tok.vocab_size == VOCAB_SIZE
    words = tok.convert_ids_to_tokens(tok("Bin blue at F two now")["input_ids"])
    assert words == ["[CLS]", "bin", "blue", "at", "f", "two", "now", "[SEP]"]
    pieces = tok.convert_ids_to_tokens(tok("zebra 42, ça!")["input_ids"])
    assert pieces == ["[CLS]", "z", "##e", "##b", "##r", "##a", "4", "##2", ",", "c", "##a", "!", "[SEP]"]


def test_bench_gpu_extracts_what_the_image_has(tmp_path: Path, monkeypatch) -> None:
    """No MiniLM: a random BERT of its shapes with the generated tokenizer; no mediapipe: text and audio only."""
    from transformers import AutoTokenizer, BertConfig

    import extract.models
    from bench.gpu import image_encoders

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(extract.models, "bundled_models", dict)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mediapipe" else find_spec(name))
    settings, described = image_encoders(tmp_path, quick=False)
    assert settings["modalities"] == ("text", "audio") and "audio_model" not in settings
    assert described["video"] == "not extracted (mediapipe is not installed)"
    assert described["text_model"].startswith("a random-init BERT of all-MiniLM-L6-v2's shapes")
    config = BertConfig.from_pretrained(settings["text_model"])
    assert {k: getattr(config, k) for k in MINILM_SHAPES} == MINILM_SHAPES and config.vocab_size == VOCAB_SIZE
    assert AutoTokenizer.from_pretrained(settings["text_model"]).vocab_size == VOCAB_SIZE
