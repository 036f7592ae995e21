"""Encoding overlaps decoding: each group of ``batch_size`` decoded clips is encoded and written as it arrives,
and the shards are the same whatever the group size or the number of decode workers."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import MEDIA, write_manifest

import extract.pipeline as pipeline
import extract.pool as pool
from extract.pipeline import run_extract
from shards import iter_shard, load_dataset_json, read_sidecar

CLIPS = ["grid/bbaf2n.mpg", "grid/pwij3p.mpg", "grid/id2_vcd_swwp2s.mpg"]


def rows(n: int) -> list[dict]:
    return [
        {"video_id": "v", "clip_id": f"c{i}", "text": f"clip number {i}", "mode": "train", "path": CLIPS[i % 3]}
        for i in range(n)
    ]


def samples(out) -> dict[str, dict]:
    ds = load_dataset_json(out)
    return {s["__key__"]: s for entry in ds["shards"] for s in iter_shard(out / entry["name"])}


def test_encoders_run_per_group_as_clips_arrive(tmp_path, tiny_cfg, monkeypatch):
    events: list[tuple[str, ...]] = []
    decode = pool.decode_clip

    def logged_decode(clip, settings):
        events.append(("decode", clip.clip_id))
        return decode(clip, settings)

    monkeypatch.setattr(pool, "decode_clip", logged_decode)
    built = pipeline.build_extractors

    def logged_build(cfg):
        found = built(cfg)
        text = found["text"]
        call = type(text).__call__

        class Logged(type(text)):
            def __call__(self, clips):
                events.append(("encode", *(d.clip.clip_id for d in clips)))
                return call(self, clips)

        text.__class__ = Logged
        return found

    monkeypatch.setattr(pipeline, "build_extractors", logged_build)
    manifest = write_manifest(tmp_path / "m.csv", rows(5))
    progress: list[tuple[int, int | None]] = []
    summary = run_extract(
        manifest, MEDIA, tmp_path / "out", tiny_cfg(batch_size=2, shard_size=5), progress=lambda *a: progress.append(a)
    )
    assert events == [
        ("decode", "c0"), ("decode", "c1"), ("encode", "c0", "c1"),
        ("decode", "c2"), ("decode", "c3"), ("encode", "c2", "c3"),
        ("decode", "c4"), ("encode", "c4"),
    ]  # fmt: skip
    assert progress == [(0, 5), (2, 5), (4, 5), (5, 5)]  # none already complete, then clips as they are written
    assert 0 < summary["first_clip_s"] <= summary["decode_wait_s"] < summary["wall_s"] - summary["setup_s"]
    side = read_sidecar(tmp_path / "out" / "train-000000.json")
    assert side["keys"] == side["planned"] == [f"v__c{i}" for i in range(5)]
    assert side["timings"]["text_s"] > 0 and side["timings"]["audio_s"] > 0


def test_group_size_and_workers_do_not_change_the_shards(tmp_path, tiny_cfg):
    manifest = write_manifest(tmp_path / "m.csv", rows(5))
    run_extract(manifest, MEDIA, tmp_path / "one", tiny_cfg(batch_size=1, shard_size=3, workers=1))
    run_extract(manifest, MEDIA, tmp_path / "all", tiny_cfg(batch_size=8, shard_size=3, workers=0))
    a, b = samples(tmp_path / "one"), samples(tmp_path / "all")
    assert list(a) == list(b) == [f"v__c{i}" for i in range(5)]
    for key in a:
        assert set(a[key]) == set(b[key])
        for member in ("text_ids.npy", "audio_wave.npy", "audio_mask.npy", "video_lmk.npy", "video_mask.npy"):
            np.testing.assert_array_equal(a[key][member], b[key][member], err_msg=f"{key} {member}")
        for member in ("text_feat.npy", "audio_feat.npy"):  # batch padding moves float16 values by rounding only
            np.testing.assert_allclose(
                a[key][member].astype(np.float32), b[key][member].astype(np.float32), atol=2e-2, rtol=1e-2
            )
    stats_a = load_dataset_json(tmp_path / "one")["stats"]
    stats_b = load_dataset_json(tmp_path / "all")["stats"]
    assert stats_a.keys() == stats_b.keys()
    for member in stats_a:
        np.testing.assert_allclose(stats_a[member]["mean"], stats_b[member]["mean"], atol=1e-2)


def test_a_failing_encoder_leaves_no_temporary_tar(tmp_path, tiny_cfg, monkeypatch):
    built = pipeline.build_extractors

    def broken(cfg):
        found = built(cfg)

        class Broken(type(found["audio"])):
            def __call__(self, clips):
                raise RuntimeError("encoder exploded")

        found["audio"].__class__ = Broken
        return found

    monkeypatch.setattr(pipeline, "build_extractors", broken)
    manifest = write_manifest(tmp_path / "m.csv", rows(3))
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="^encoder exploded$"):
        run_extract(manifest, MEDIA, out, tiny_cfg(batch_size=1, shard_size=3))
    assert sorted(p.name for p in out.iterdir()) == []
