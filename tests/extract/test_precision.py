"""``--precision``: bf16 and fp16 encoders stay close to fp32, are recorded in the feature set and its hash,
and shards of different precisions never mix."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import MEDIA, bundled_rows, write_manifest
from precision_bounds import FP32, bound, recorded_precision

import extract.config
from extract import ExtractionError
from extract.auto import resolve_precision
from extract.pipeline import build_extractors, describe_feature_set, run_extract
from shards import iter_shard, load_dataset_json
from shards.dataset import feature_set_hash


def deviation(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Max abs difference and the mean cosine similarity of matching rows."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return float(np.abs(a - b).max()), float(cos.mean())


def features(out) -> dict[tuple[str, str], np.ndarray]:
    found = {}
    for tar in sorted(out.glob("*.tar")):
        for s in iter_shard(tar):
            for name in ("text_feat.npy", "audio_feat.npy"):
                if name in s:
                    found[(s["__key__"], name)] = s[name]
    return found


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_features_stay_close_to_fp32(tmp_path, tiny_cfg, precision):
    manifest = write_manifest(tmp_path / "m.csv", bundled_rows()[:3])
    ref, low = tmp_path / "fp32", tmp_path / precision
    run_extract(manifest, MEDIA, ref, tiny_cfg(modalities="text,audio"))
    run_extract(manifest, MEDIA, low, tiny_cfg(modalities="text,audio", precision=precision))
    a, b = features(ref), features(low)
    assert sorted(a) == sorted(b) and len(a) == 6  # 3 clips x text, audio
    for key in a:
        max_abs, cosine = deviation(a[key], b[key])
        # measured on these clips: bf16 text 0.001, audio 0.08; fp16 text 0.001, audio 0.013 (max abs)
        limit = {"bf16": {"text_feat.npy": 0.01, "audio_feat.npy": 0.15}, "fp16": {"text_feat.npy": 0.005}}
        assert max_abs < limit[precision].get(key[1], 0.03), (key, max_abs)
        assert cosine > (0.9995 if precision == "bf16" else 0.99999), (key, cosine)
        assert max_abs > 0, key  # the encoder did run at the lower precision


def test_a_run_that_picks_bf16_is_compared_with_fp32_at_bf16s_bound(tmp_path, tiny_cfg, monkeypatch):
    """What the CUDA extraction tests compare: a run whose automatic precision is bf16 (CUDA's pick on a GPU with
    native bf16, here the CPU's) against a CPU fp32 run of the same clips. Its audio features move by more than
    fp32's bound (2e-2, what those tests allowed) and stay within bf16's (precision_bounds.BOUNDS)."""
    manifest = write_manifest(tmp_path / "m.csv", bundled_rows()[:2])
    run_extract(manifest, MEDIA, tmp_path / "cpu", tiny_cfg(modalities=("text", "audio")))
    monkeypatch.setattr(extract.config, "resolve_precision", lambda asked, device: asked or "bf16")  # resolved()
    run_extract(manifest, MEDIA, tmp_path / "auto", tiny_cfg(modalities=("text", "audio")))
    reference, got = features(tmp_path / "cpu"), features(tmp_path / "auto")
    assert sorted(got) == sorted(reference) and len(got) == 4
    largest = {}
    for (key, member), value in reference.items():
        assert recorded_precision(tmp_path / "auto", member) == "bf16"
        assert recorded_precision(tmp_path / "cpu", member) == "fp32"
        max_abs = deviation(value, got[(key, member)])[0]
        assert max_abs <= bound(tmp_path / "auto", member), (key, member, max_abs)
        largest[member] = max(largest.get(member, 0.0), max_abs)
    assert largest["audio_feat.npy"] > FP32, largest  # measured 0.083: the fp32 bound refuses it
    assert 0 < largest["text_feat.npy"] < FP32, largest


def test_precision_is_in_the_feature_set_and_resume_refuses_a_mix(tmp_path, tiny_cfg):
    def described(**kw):
        cfg = tiny_cfg(modalities="text,audio", **kw)
        return describe_feature_set(cfg, build_extractors(cfg))

    fp32, bf16 = described(), described(precision="bf16")
    assert "precision" not in fp32["extractors"]["text"] and "precision" not in fp32["extractors"]["audio"]
    assert described(precision="fp32") == fp32  # auto on a CPU is fp32: the hash of earlier datasets holds
    assert (bf16["extractors"]["text"]["precision"], bf16["extractors"]["audio"]["precision"]) == ("bf16", "bf16")
    assert len({feature_set_hash(fp32), feature_set_hash(bf16), feature_set_hash(described(precision="fp16"))}) == 3

    manifest = write_manifest(tmp_path / "m.csv", bundled_rows()[:2])
    out = tmp_path / "out"
    run_extract(manifest, None, out, tiny_cfg(modalities="text"))
    with pytest.raises(ExtractionError, match="another feature set.*--overwrite"):
        run_extract(manifest, None, out, tiny_cfg(modalities="text", precision="bf16"))
    run_extract(manifest, None, out, tiny_cfg(modalities="text", precision="bf16", overwrite=True))
    assert load_dataset_json(out)["feature_set"]["extractors"]["text"]["precision"] == "bf16"


def test_auto_precision_per_device(monkeypatch):
    import torch

    assert resolve_precision(None, "cpu") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"
    asked = []

    def supported(including_emulation=True):
        asked.append(including_emulation)
        return native

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    native = True
    assert resolve_precision(None, "cuda:0") == "bf16"
    native = False
    assert resolve_precision(None, "cuda") == "fp16" and resolve_precision("fp32", "cuda") == "fp32"
    assert asked == [False, False]  # emulated bf16 (pre-Ampere) does not count


def test_predict_reproduces_the_recorded_precision(tiny_cfg):
    """A checkpoint's shards extracted at bf16 (the CUDA default) are predicted at bf16, also on a CPU whose
    own default is fp32; shards without a recorded precision at fp32."""
    from train.predict import extract_config

    for precision in ("bf16", "fp32"):
        cfg = tiny_cfg(modalities="text,audio", precision=precision)
        recorded = describe_feature_set(cfg, build_extractors(cfg))
        again = extract_config(recorded, device="cpu")
        assert again.precision == precision
        assert feature_set_hash(describe_feature_set(again, build_extractors(again))) == feature_set_hash(recorded)
