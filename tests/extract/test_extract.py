"""Extraction of the bundled clips: exact keys, shapes, dtypes, masks, statuses and train-only statistics."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest
from conftest import AUDIO_DIM, TEXT_DIM

from shards import iter_shard, load_dataset_json
from shards.stats import RunningStats

KEYS = {"grid__bbaf2n", "grid__pwij3p", "grid__id2_vcd_swwp2s", "faces__face_noface"}


def all_samples(root):
    ds = load_dataset_json(root)
    return {s["__key__"]: s for entry in ds["shards"] for s in iter_shard(root / entry["name"])}


def test_bundled_keys_shards_and_statuses(bundled_dataset):
    ds = load_dataset_json(bundled_dataset)
    assert [s["name"] for s in ds["shards"]] == ["train-000000.tar", "valid-000000.tar", "test-000000.tar"]
    assert ds["complete"] and ds["samples"] == 4
    assert ds["counts"] == {"test": {"partial": 1}, "train": {"ok": 2}, "valid": {"ok": 1}}
    assert ds["dims"] == {"Dt": TEXT_DIM, "Da": AUDIO_DIM, "landmarks": 478}
    samples = all_samples(bundled_dataset)
    assert set(samples) == KEYS
    status = [json.loads(line) for line in (bundled_dataset / "status.jsonl").read_text().splitlines()]
    assert {r["key"] for r in status} == KEYS
    noface = next(r for r in status if r["key"] == "faces__face_noface")
    assert noface["modalities"]["text"] == {"status": "failed", "error": "empty transcript"}


def test_grid_clip_members_shapes_and_dtypes(bundled_dataset):
    s = all_samples(bundled_dataset)["grid__bbaf2n"]
    members = {k for k in s if not k.startswith("__")}
    assert members == {
        "meta.json", "text_ids.npy", "text_feat.npy", "audio_wave.npy", "audio_feat.npy", "audio_mask.npy",
        "audio_time.npy", "video_lmk.npy", "video_mask.npy", "video_time.npy", "video_norm.npy", "video_geom.npy",
    }  # fmt: skip
    ids = s["text_ids.npy"]
    assert ids.dtype == np.int32 and ids[0] == 101 and ids[-1] == 102  # [CLS] ... [SEP]
    assert s["text_feat.npy"].shape == (len(ids), TEXT_DIM) and s["text_feat.npy"].dtype == np.float16
    # 3.0 s of video at 25 fps, every frame kept, all with a face.
    assert s["video_lmk.npy"].shape == (75, 478, 3) and s["video_lmk.npy"].dtype == np.float16
    assert s["video_mask.npy"].all()
    np.testing.assert_allclose(s["video_time.npy"][:3], [0.0, 0.04, 0.08], atol=1e-4)
    # Normalised landmarks: centred, inter-ocular distance 1.
    lmk = s["video_lmk.npy"].astype(np.float32)
    np.testing.assert_allclose(lmk.mean(1), 0.0, atol=2e-3)
    iod = np.linalg.norm(lmk[:, [33, 133]].mean(1) - lmk[:, [362, 263]].mean(1), axis=-1)
    np.testing.assert_allclose(iod, 1.0, atol=2e-3)
    # Audio: the whole 2.98 s stream on a 3.0 s clip, ~50 frames/s.
    meta = s["meta.json"]
    n = len(s["audio_wave.npy"])
    assert s["audio_wave.npy"].dtype == np.int16 and n == round(meta["duration"] * 16000)
    ta = len(s["audio_feat.npy"])
    assert s["audio_feat.npy"].shape == (ta, AUDIO_DIM) and ta == (n - 400) // 320 + 1
    assert s["audio_mask.npy"].dtype == bool and s["audio_time.npy"].dtype == np.float32
    np.testing.assert_allclose(s["audio_time.npy"][:2], [200 / 16000, 520 / 16000], atol=1e-6)
    assert meta["labels"] == {"label": -1.5} and meta["split"] == "train" and meta["media"] == "grid/bbaf2n.mpg"


def test_face_noface_keeps_every_frame_and_places_late_audio(bundled_dataset):
    s = all_samples(bundled_dataset)["faces__face_noface"]
    mask, times = s["video_mask.npy"], s["video_time.npy"]
    assert len(mask) == 169  # variable frame rate: all frames, none dropped
    assert mask.any() and not mask.all()
    assert mask[:60].all() and not mask[-60:].any()  # face, then the cartoon
    assert np.all(np.diff(times) > 0) and times[-1] == pytest.approx(6.36, abs=0.02)
    assert not s["video_lmk.npy"][~mask].any()  # zeros where no face
    # Audio starts at 2.43 s: silence before, mask False there, True over the real part.
    meta = s["meta.json"]
    a0, a1 = meta["modalities"]["audio"]["real_span"]
    assert a0 == pytest.approx(2.43, abs=0.01) and a1 == pytest.approx(6.40, abs=0.03)
    wave = s["audio_wave.npy"]
    assert not wave[: int(2.4 * 16000)].any() and np.abs(wave[int(2.5 * 16000) :]).max() > 1000
    amask, atime = s["audio_mask.npy"], s["audio_time.npy"]
    assert not amask[atime < 2.42].any() and amask[(atime > 2.45) & (atime < 6.3)].all()
    assert "text_ids.npy" not in s and meta["modalities"]["text"]["status"] == "failed"
    assert meta["modalities"]["video"]["face_frames"] == int(mask.sum())


def test_train_only_statistics(bundled_dataset):
    ds = load_dataset_json(bundled_dataset)
    samples = all_samples(bundled_dataset)
    train = [s for s in samples.values() if s["meta.json"]["split"] == "train"]
    for member, mask in (
        ("text_feat.npy", None),
        ("audio_feat.npy", "audio_mask.npy"),
        ("video_lmk.npy", "video_mask.npy"),
    ):
        rows = np.concatenate(
            [s[member].astype(np.float64).reshape(len(s[member]), -1)[s[mask] if mask else slice(None)] for s in train]
        )
        got = ds["stats"][member]
        assert got["count"] == len(rows)
        np.testing.assert_allclose(got["mean"], rows.mean(0), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(got["std"], rows.std(0), rtol=1e-6, atol=1e-9)


def test_running_stats_merge_matches_numpy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(3, 2, (50, 5)), rng.normal(-1, 0.5, (7, 5))
    s1, s2 = RunningStats(), RunningStats()
    s1.update(a)
    s2.update(b)
    s1.merge(s2)
    both = np.concatenate([a, b])
    np.testing.assert_allclose(s1.mean, both.mean(0))
    np.testing.assert_allclose(s1.std, both.std(0))
    assert s1.count == 57


def test_shards_readable_by_tar_and_webdataset(bundled_dataset):
    import webdataset as wds

    names = sorted(p.name for p in bundled_dataset.glob("*.tar"))
    for name in names:
        with tarfile.open(bundled_dataset / name) as tar:
            members = tar.getnames()
        assert all(m.count(".") >= 1 for m in members)
    urls = [str(bundled_dataset / n) for n in names]
    keys = [s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode()]
    assert set(keys) == KEYS and len(keys) == 4
    sample = next(iter(wds.WebDataset(urls[:1], shardshuffle=False).decode()))
    assert sample["video_lmk.npy"].shape[1:] == (478, 3) and isinstance(sample["meta.json"], dict)


def test_transcript_only_extraction_needs_no_media(tmp_path, tiny_cfg):
    from conftest import write_manifest

    from extract.pipeline import run_extract

    manifest = write_manifest(
        tmp_path / "t.csv",
        [
            {"video_id": "v", "clip_id": str(i), "text": t, "mode": "train"}
            for i, t in enumerate(["héllo wörld ünïcode", "日本語のテキスト", "ok"])
        ],
    )
    run_extract(manifest, None, tmp_path / "out", tiny_cfg(modalities=("text",)))
    ds = load_dataset_json(tmp_path / "out")
    assert ds["feature_set"]["modalities"] == ["text"] and ds["counts"] == {"train": {"ok": 3}}
    samples = all_samples(tmp_path / "out")
    for s in samples.values():
        mods = s["meta.json"]["modalities"]
        assert mods["audio"]["status"] == "absent" and mods["video"]["status"] == "absent"
        assert not any(k.startswith(("audio_", "video_")) for k in s)
    assert samples["v__0"]["meta.json"]["text"] == "héllo wörld ünïcode"
    assert len(samples["v__1"]["text_ids.npy"]) > 2  # non-ASCII is tokenised, not dropped
