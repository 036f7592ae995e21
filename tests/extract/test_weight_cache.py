"""Weight hashes cached by file identity: a rerun does not hash the same weights again; a changed file does."""

from __future__ import annotations

import json
import os

import pytest

import extract.models as models
from extract.extractors.text import TextExtractor
from extract.weight_cache import cache_file


@pytest.fixture()
def counted(monkeypatch, tmp_path):
    """Each state-dict hash computed, counted; the cache in a fresh directory."""
    monkeypatch.setenv("MMFUSE_CACHE", str(tmp_path / "cache"))
    calls = []
    real = models.state_dict_hash

    def counting(module):
        calls.append(type(module).__name__)
        return real(module)

    monkeypatch.setattr(models, "state_dict_hash", counting)
    return calls


def test_second_setup_does_not_hash_again_and_a_touched_file_does(counted, tiny_text_model, tmp_path):
    first = TextExtractor(str(tiny_text_model))
    first.setup()
    assert counted == ["BertModel"] and cache_file() == tmp_path / "cache" / "weights.json"
    assert list(json.loads(cache_file().read_text()).values()) == [first._hash]
    again = TextExtractor(str(tiny_text_model))
    again.setup()
    assert again._hash == first._hash == models.state_dict_hash(again._model)
    assert counted == ["BertModel", "BertModel"]  # the second setup hashed nothing (the last call is ours)
    weights = next(p for p in tiny_text_model.iterdir() if p.suffix in (".safetensors", ".bin"))
    st = weights.stat()
    try:
        os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        touched = TextExtractor(str(tiny_text_model))
        touched.setup()
    finally:
        os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert counted == ["BertModel"] * 3 and touched._hash == first._hash
    assert len(json.loads(cache_file().read_text())) == 2


def test_unreadable_cache_is_recomputed_and_rewritten(counted, tiny_text_model):
    cache_file().parent.mkdir(parents=True)
    cache_file().write_text("{not json")
    ex = TextExtractor(str(tiny_text_model))
    ex.setup()
    assert counted == ["BertModel"]
    assert list(json.loads(cache_file().read_text()).values()) == [ex._hash]
    cache_file().write_text(json.dumps({k: "not a hash!" for k in json.loads(cache_file().read_text())}))
    TextExtractor(str(tiny_text_model)).setup()  # a corrupt entry is not trusted
    assert counted == ["BertModel"] * 2


def test_unwritable_cache_still_hashes(counted, tiny_text_model, monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("MMFUSE_CACHE", str(blocker / "cache"))  # a directory under a file: cannot be made
    ex = TextExtractor(str(tiny_text_model))
    ex.setup()
    assert ex._hash == models.state_dict_hash(ex._model)


def test_random_models_are_cached_by_name_config_and_seed(counted):
    from extract.extractors.audio import AudioExtractor

    for _ in range(2):
        AudioExtractor("random:wav2vec2-small").setup()
    assert counted == ["Wav2Vec2Model"]
