"""The extractor registry drives extraction: an extractor is one class plus one ``EXTRACTORS`` entry.

Test-only toy extractors are registered with ``monkeypatch`` on the dict alone and must reach the shards through
``run_extract``: a toy "worker" extractor filling the video slot (in a spawned decode worker) and a toy
"encoder" extractor filling the text slot with features of a fixed width.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import pytest
from conftest import MEDIA, bundled_rows, write_manifest

from extract import EXTRACTORS, ExtractionError, Registered, extract_clip, extractor_for, get_extractor, registered_as
from extract.config import ExtractConfig, make_config
from extract.extractors.base import DecodedClip, Extractor, ExtractorResult, ModalityFailure, shared
from extract.manifest import load_manifest
from extract.pipeline import build_extractors, describe_feature_set, run_extract
from shards import iter_shard, load_dataset_json
from shards.dataset import feature_set_hash
from shards.schema import N_LANDMARKS
from train.inputs import has_video_geom

TOY_DT = 5
LMK, NORM, GEOM = 0.25, 0.5, 0.75


class ToyFaces(Extractor):
    """Constant "landmarks" on every decoded frame, in the decode worker (it reads only the frame times)."""

    name = "toy-faces"
    version = "1"
    modality = "video"
    members = ("video_lmk.npy", "video_mask.npy", "video_time.npy", "video_norm.npy", "video_geom.npy")
    runs_in = "worker"
    joined = ("video_geom.npy",)

    @dataclass(frozen=True)
    class Settings:
        max_faces: int = 1

    def __init__(self, max_faces: int = 1):
        self.max_faces = max_faces

    def provenance(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "max_faces": self.max_faces}

    def __call__(self, clips: Sequence[DecodedClip]) -> list[ExtractorResult]:
        out: list[ExtractorResult] = []
        for c in clips:
            n = len(c.frames)
            c.info["video"] = {"frames": n}
            out.append(
                {
                    "video_lmk.npy": np.full((n, N_LANDMARKS, 3), LMK, dtype=np.float16),
                    "video_mask.npy": np.ones(n, dtype=bool),
                    "video_time.npy": c.frames.times.astype(np.float32),
                    "video_norm.npy": np.full((n, 4), NORM, dtype=np.float32),
                    "video_geom.npy": np.full((n, 4), GEOM, dtype=np.float32),
                }
                if n
                else ModalityFailure("no frames")
            )
        return out


class ToyWords(Extractor):
    """One row per word: ids 1..n and features (n, 5) whose row k holds k + max_text_tokens / 1000."""

    name = "toy-words"
    version = "1"
    modality = "text"
    members = ("text_ids.npy", "text_feat.npy")

    @dataclass(frozen=True)
    class Settings:
        max_text_tokens: int = 512
        batch_size: int = shared(16)

    def __init__(self, max_text_tokens: int, batch_size: int):
        self.offset = max_text_tokens / 1000
        self.batch_size = batch_size

    def provenance(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "offset": self.offset, "dims": {"Dt": TOY_DT}}

    def __call__(self, clips: Sequence[DecodedClip]) -> list[ExtractorResult]:
        out: list[ExtractorResult] = []
        for c in clips:
            n = len(c.clip.text.split())
            if not n:
                out.append(ModalityFailure("empty transcript"))
                continue
            feat = np.arange(n, dtype=np.float32)[:, None] + self.offset + np.zeros(TOY_DT, dtype=np.float32)
            out.append({"text_ids.npy": np.arange(1, n + 1, dtype=np.int32), "text_feat.npy": feat.astype(np.float16)})
        return out


FACES = Registered(ToyFaces, name="toy-faces", modality="video", runs_in="worker", members=ToyFaces.members)
WORDS = Registered(ToyWords, name="toy-words", modality="text", runs_in="encoder", members=ToyWords.members)


def shard_samples(out) -> dict[str, dict]:
    ds = load_dataset_json(out)
    return {s["__key__"]: s for entry in ds["shards"] for s in iter_shard(out / entry["name"])}


def test_a_registered_worker_extractor_fills_its_modality(tmp_path, tiny_cfg, monkeypatch):
    monkeypatch.setitem(EXTRACTORS, "toy-faces", FACES)  # FaceMesh stays registered: the settings pick this one
    manifest = write_manifest(tmp_path / "m.csv", bundled_rows())
    out = tmp_path / "out"
    picked = {"extractors.video": "toy-faces", "toy_faces.max_faces": 3, "facemesh.max_faces": 2}
    run_extract(manifest, MEDIA, out, tiny_cfg(modalities="audio,video", workers=1, **picked))
    ds = load_dataset_json(out)
    assert ds["feature_set"]["extractors"]["video"] == {"name": "toy-faces", "version": "1", "max_faces": 3}
    assert has_video_geom(out)
    samples = shard_samples(out)
    assert sorted(samples) == ["faces__face_noface", "grid__bbaf2n", "grid__id2_vcd_swwp2s", "grid__pwij3p"]
    for key, s in samples.items():
        n = len(s["video_time.npy"])
        assert n > 10, key
        video = dict(s["meta.json"]["modalities"]["video"])
        span = video.pop("real_span")  # the decoder's: from the first frame to where the last leaves the screen
        assert video == {"status": "ok", "error": None, "frames": n}
        assert span[0] == pytest.approx(float(s["video_time.npy"][0]), abs=1e-4) and span[1] > s["video_time.npy"][-1]
        assert s["video_lmk.npy"].shape == (n, N_LANDMARKS, 3) and (s["video_lmk.npy"] == np.float16(LMK)).all()
        assert (s["video_norm.npy"] == NORM).all() and (s["video_geom.npy"] == GEOM).all() and s["video_mask.npy"].all()
        assert s["meta.json"]["modalities"]["text"]["status"] == "absent" and "audio_feat.npy" in s
    monkeypatch.delitem(EXTRACTORS, "toy-faces")  # dataset.json's record says so, registered or not
    assert has_video_geom(out) and ds["modalities"]["video"]["extra"] == {"video_geom.npy": 4}
    assert ds["modalities"]["video"]["settings"] == {"max_faces": 3}


def test_a_registered_encoder_extractor_fills_its_modality(tmp_path, tiny_cfg, monkeypatch):
    monkeypatch.setitem(EXTRACTORS, "toy-words", WORDS)
    manifest = write_manifest(tmp_path / "m.csv", bundled_rows())
    out = tmp_path / "out"
    picked = {"extractors.text": "toy-words", "toy_words.max_text_tokens": 250}
    run_extract(manifest, MEDIA, out, tiny_cfg(modalities="text,video", batch_size=3, **picked))
    settings = load_dataset_json(out)["modalities"]["text"]["settings"]
    assert settings == {"max_text_tokens": 250, "batch_size": 3}  # its own section's, and the shared batch size
    ds = load_dataset_json(out)
    assert ds["feature_set"]["extractors"]["text"]["name"] == "toy-words" and ds["dims"]["Dt"] == TOY_DT
    samples = shard_samples(out)
    feat = samples["grid__bbaf2n"]["text_feat.npy"]  # "bin blue at f two now"
    assert feat.shape == (6, TOY_DT) and feat.dtype == np.float16
    np.testing.assert_array_equal(feat[:, 2], np.arange(6, dtype=np.float16) + np.float16(0.25))
    np.testing.assert_array_equal(samples["grid__pwij3p"]["text_ids.npy"], np.arange(1, 7, dtype=np.int32))
    empty = samples["faces__face_noface"]["meta.json"]["modalities"]["text"]
    assert empty == {"status": "failed", "error": "empty transcript"}
    assert samples["grid__bbaf2n"]["meta.json"]["modalities"]["video"]["status"] == "ok"  # the real FaceMesh
    assert ds["feature_set"]["extractors"]["video"]["name"] == "mediapipe-facemesh"


def test_settings_fields_are_extraction_config_keys():
    general = {f.name for f in fields(ExtractConfig)}
    cfg = make_config(None, ["text.max_tokens=77", "text_layer=-2", "audio.chunk_s=12", "max_faces=2"], raw=False)
    for name, entry in EXTRACTORS.items():
        cls = entry.load()
        section = {f.name for f in fields(getattr(cfg, name))}
        assert {f.name for f in fields(cls.Settings) if f.metadata.get("shared")} <= general, name
        assert section == {f.name for f in fields(cls.Settings)}, name  # the section is the extractor's Settings
        assert (cls.name, cls.modality, cls.runs_in, cls.members) == (
            entry.name, entry.modality, entry.runs_in, entry.members,
        ), name  # fmt: skip
    cfg = dataclasses.replace(cfg, batch_size=8)
    assert EXTRACTORS["text"].settings(cfg, "text") == EXTRACTORS["text"].load().Settings(cfg.text.model, -2, 77, 8)
    audio = EXTRACTORS["audio"].build(EXTRACTORS["audio"].settings(cfg, "audio"))
    assert (audio.layer, audio._chunk_s, audio.keep_wave) == (-1, 12.0, False)
    assert get_extractor("facemesh", max_faces=2).max_faces == EXTRACTORS["facemesh"].build(
        EXTRACTORS["facemesh"].settings(cfg, "facemesh")
    ).max_faces == 2  # fmt: skip


def test_registry_lookups(monkeypatch):
    assert [extractor_for(m) for m in ("text", "audio", "video")] == ["text", "audio", "facemesh"]
    assert registered_as("mediapipe-facemesh") == "facemesh" and registered_as("nope") is None
    assert registered_as("mediapipe-facemesh", "video") == "facemesh"
    assert registered_as("mediapipe-facemesh", "audio") is None  # a name recorded under another modality
    monkeypatch.setitem(EXTRACTORS, "toy-faces", FACES)
    assert extractor_for("video") == "facemesh"  # several for one modality: the default one
    monkeypatch.delitem(EXTRACTORS, "facemesh")
    assert extractor_for("video") == "toy-faces"
    monkeypatch.setitem(EXTRACTORS, "toy-faces-2", FACES)
    with pytest.raises(ExtractionError, match="2 extractors registered for the video modality"):
        extractor_for("video")
    with pytest.raises(KeyError, match="valid names"):
        get_extractor("nope")
    wrong = Registered(ToyWords, name="toy-words", modality="audio", runs_in="encoder", members=ToyWords.members)
    with pytest.raises(ExtractionError, match="make the entry"):
        wrong(max_text_tokens=1, batch_size=1)


def test_extract_clip_gives_the_sample_extraction_wrote(bundled_dataset, tiny_cfg, tmp_path):
    cfg = tiny_cfg(shard_size=2)
    extractors = build_extractors(cfg)
    fs_hash = feature_set_hash(describe_feature_set(cfg, extractors))
    assert fs_hash == load_dataset_json(bundled_dataset)["feature_set_hash"]
    clips = {c.key: c for c in load_manifest(write_manifest(tmp_path / "m.csv", bundled_rows()), MEDIA)}
    written = shard_samples(bundled_dataset)
    for key in ("grid__bbaf2n", "faces__face_noface"):
        got, want = extract_clip(clips[key], cfg, extractors, fs_hash), written[key]
        assert set(got) == set(want) - {"__url__"}
        assert got["meta.json"] == want["meta.json"]
        for member in set(got) - {"__key__", "meta.json"}:
            tol = 2e-2 if member.endswith("_feat.npy") else 0  # batch padding moves float16 values by rounding only
            np.testing.assert_allclose(got[member].astype(np.float32), want[member].astype(np.float32), atol=tol)
    only_audio = extract_clip(clips["grid__bbaf2n"], cfg, extractors, fs_hash, modalities=("audio",))
    assert {m: s["status"] for m, s in only_audio["meta.json"]["modalities"].items()} == {
        "text": "absent", "audio": "ok", "video": "absent",
    }  # fmt: skip
    assert not any(m.startswith(("text_", "video_")) for m in only_audio)
