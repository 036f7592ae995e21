"""wav2vec 2.0 features: batched == unbatched, and the HF checkpoint == torchaudio's implementation."""

from __future__ import annotations

import numpy as np
import torch

from extract.extractors.audio import AudioExtractor
from extract.extractors.base import DecodedClip
from extract.manifest import Clip


def _clip(n: int, seed: int) -> DecodedClip:
    rng = np.random.default_rng(seed)
    wave = (rng.standard_normal(n) * 3000).astype(np.int16)
    return DecodedClip(
        Clip(f"k{seed}", "v", str(seed), "train", "", 1), duration=n / 16000, wave=wave, audio_span=(0.0, n / 16000)
    )


def test_batched_features_equal_unbatched(tiny_audio_model):
    ex = AudioExtractor(str(tiny_audio_model), batch_size=4)
    ex.setup("cpu")
    clips = [_clip(n, i) for i, n in enumerate([16000, 5000, 23456, 401])]
    batched = ex(clips)
    for c, b in zip(clips, batched, strict=True):
        single = ex([c])[0]
        diff = np.abs(single["audio_feat.npy"].astype(np.float32) - b["audio_feat.npy"].astype(np.float32)).max()
        assert diff < 2e-3, diff  # float16 storage; the float32 values agree to ~1e-6
        assert len(b["audio_feat.npy"]) == ex.n_frames(len(c.wave))


def test_hf_matches_torchaudio_same_weights(tiny_audio_model):
    from torchaudio.models.wav2vec2.utils import import_huggingface_model
    from transformers import Wav2Vec2Model

    ex = AudioExtractor(str(tiny_audio_model), batch_size=2)
    ex.setup("cpu")
    hf = Wav2Vec2Model.from_pretrained(tiny_audio_model).eval()
    ta = import_huggingface_model(hf).eval()
    c = _clip(24000, 7)
    wave = c.wave.astype(np.float32) / 32768.0
    wave = (wave - wave.mean()) / np.sqrt(wave.var() + 1e-7)
    with torch.inference_mode():
        ours = ex._encode([torch.from_numpy(wave)])[0]
        ref, _ = ta(torch.from_numpy(wave)[None])
        direct = hf(torch.from_numpy(wave)[None]).last_hidden_state[0].numpy()
    max_diff = float(np.abs(ours - ref[0].numpy()).max())
    print(f"max |ours - torchaudio| = {max_diff:.2e}")
    assert max_diff < 1e-4
    assert float(np.abs(ours - direct).max()) < 1e-5


def test_long_audio_is_chunked_with_continuous_times(tiny_audio_model):
    ex = AudioExtractor(str(tiny_audio_model), chunk_s=1.0)
    ex.setup("cpu")
    out = ex([_clip(16000 * 3 + 800, 3)])[0]
    t = out["audio_time.npy"]
    assert np.all(np.diff(t) > 0) and t[-1] < 3.05
    assert len(t) == 3 * ex.n_frames(16000) + ex.n_frames(800)


def test_length_buckets_never_pad_beyond_the_slack() -> None:
    from extract.extractors.audio import length_buckets

    lengths = [100, 105, 109, 120, 121, 300, 301, 302, 303]
    assert length_buckets(lengths, batch_size=3) == [[0, 1, 2], [3, 4], [5, 6, 7], [8]]
    assert length_buckets(lengths, batch_size=8, slack=10.0) == [[0, 1, 2, 3, 4, 5, 6, 7], [8]]
    assert length_buckets([], batch_size=4) == []


def test_wave_pieces_pad_normalise_and_chunk():
    from extract.extractors.audio import wave_pieces

    short = wave_pieces(torch.full((10,), 0.5), receptive=400, chunk=1000, normalise=False)
    assert [(lo, p.numel()) for lo, p in short] == [(0, 400)]
    assert torch.equal(short[0][1][:10], torch.full((10,), 0.5)) and not short[0][1][10:].any()
    wave = torch.linspace(-0.3, 0.9, 2350, requires_grad=True)
    pieces = wave_pieces(wave, receptive=400, chunk=1000, normalise=True)
    assert [(lo, p.numel()) for lo, p in pieces] == [(0, 1000), (1000, 1000)]  # the 350-sample tail is no frame
    whole = torch.cat([p for _, p in pieces] + [wave_pieces(wave, 400, 10_000, True)[0][1][2000:]]).detach()
    assert abs(float(whole.mean())) < 1e-5 and abs(float(whole.var(unbiased=False)) - 1) < 1e-4  # clip-wide
    pieces[1][1].sum().backward()
    assert wave.grad is not None and wave.grad.abs().sum() > 0
    kept = wave_pieces(torch.zeros(2000 + 500), receptive=400, chunk=1000, normalise=False)
    assert [lo for lo, _ in kept] == [0, 1000, 2000]  # a 500-sample tail still makes a frame


def test_cuda_batches_are_sized_by_a_sample_budget() -> None:
    from extract.extractors.audio import TYPICAL_CLIP_SAMPLES, batch_plan, length_buckets

    lengths = sorted([16000 * s for s in (1, 2, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 15, 20, 30)] + [16000 * 200])
    plan = batch_plan(lengths, batch_size=2, device="cuda")
    assert sorted(k for g in plan for k in g) == list(range(len(lengths)))
    assert all(g == sorted(g) and g[-1] - g[0] == len(g) - 1 for g in plan)  # runs of the sorted order
    budget = 2 * TYPICAL_CLIP_SAMPLES
    assert all(len(g) * lengths[g[-1]] <= budget for g in plan if len(g) > 1)
    assert plan[-1] == [len(lengths) - 1]  # longer than the budget: alone
    assert len(plan[0]) > 2  # short clips fill a batch beyond batch_size
    assert len(plan) < len(length_buckets(lengths, 2))
    assert batch_plan(lengths, 2, "cuda:1") == plan
    assert batch_plan(lengths, 2, "cpu") == length_buckets(lengths, 2)  # CPU unchanged


def test_budget_batches_keep_features_exact(tiny_audio_model, monkeypatch):
    import extract.extractors.audio as audio

    ex = AudioExtractor(str(tiny_audio_model), batch_size=1)
    ex.setup("cpu")
    clips = [_clip(n, i) for i, n in enumerate([16000, 5000, 23456, 401, 40000])]
    singles = [ex([c])[0]["audio_feat.npy"].astype(np.float32) for c in clips]
    seen: list[list[list[int]]] = []
    real_plan = audio.batch_plan

    def cuda_plan(lengths, batch_size, device):  # the CUDA policy on CPU
        seen.append(real_plan(lengths, batch_size, "cuda"))
        return seen[-1]

    monkeypatch.setattr(audio, "TYPICAL_CLIP_SAMPLES", 200000)
    monkeypatch.setattr(audio, "batch_plan", cuda_plan)
    batched = ex(clips)
    assert max(len(g) for g in seen[-1]) >= 3
    for single, b in zip(singles, batched, strict=True):
        assert np.abs(single - b["audio_feat.npy"].astype(np.float32)).max() < 2e-3
