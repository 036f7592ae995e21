"""Text-only extraction: transcripts are encoded in large length-sorted groups (no per-batch groups), with one
tokenizer call per group, and their features do not depend on the batch."""

from __future__ import annotations

import numpy as np
from conftest import write_manifest

from extract.extractors.text import TextExtractor
from extract.pipeline import TEXT_GROUP, encode_group, run_extract
from shards import iter_shard


def rows(n: int) -> list[dict]:
    return [
        {"video_id": "t", "clip_id": f"c{i}", "text": " ".join(["word"] * (1 + (7 * i) % 23)), "mode": "train"}
        for i in range(n)
    ]


def test_text_only_encodes_whole_groups_sorted_by_length(tmp_path, tiny_cfg, monkeypatch):
    groups, tokenised, batches = [], [], []
    call, tokenizer_of, encode = TextExtractor.__call__, TextExtractor.setup, TextExtractor._encode

    def counted_call(self, clips):
        groups.append(len(clips))
        return call(self, clips)

    def counted_setup(self, device="cpu"):
        tokenizer_of(self, device)
        real = self._tokenizer
        self._tokenizer = lambda texts, **kw: (
            tokenised.append(len(texts) if isinstance(texts, list) else 1),
            real(texts, **kw),
        )[1]  # noqa: E501
        self._tokenizer.pad_token_id = real.pad_token_id

    def counted_encode(self, seqs):
        batches.append([len(s) for s in seqs])
        return encode(self, seqs)

    monkeypatch.setattr(TextExtractor, "__call__", counted_call)
    monkeypatch.setattr(TextExtractor, "setup", counted_setup)
    monkeypatch.setattr(TextExtractor, "_encode", counted_encode)
    manifest = write_manifest(tmp_path / "m.csv", rows(30))
    run_extract(manifest, None, tmp_path / "a", tiny_cfg(modalities="text", batch_size=4, shard_size=20))
    assert groups == [20, 10] and tokenised == [20, 10]  # one group (and tokenizer call) per shard, not per batch
    assert [len(b) for b in batches] == [4] * 5 + [4, 4, 2]
    for group in (batches[:5], batches[5:]):  # each shard's transcripts sorted by length across its batches
        flat = [n for b in group for n in b]
        assert flat == sorted(flat) and len(set(flat)) > 4
    assert encode_group(tiny_cfg(modalities="text", batch_size=4), media=False) == TEXT_GROUP
    assert encode_group(tiny_cfg(batch_size=4), media=True) == 4

    monkeypatch.undo()
    run_extract(manifest, None, tmp_path / "b", tiny_cfg(modalities="text", batch_size=1, shard_size=20))
    for name in ("train-000000.tar", "train-000001.tar"):
        for s, t in zip(iter_shard(tmp_path / "a" / name), iter_shard(tmp_path / "b" / name), strict=True):
            np.testing.assert_array_equal(s["text_ids.npy"], t["text_ids.npy"])
            np.testing.assert_allclose(s["text_feat.npy"], t["text_feat.npy"], atol=2e-3)
