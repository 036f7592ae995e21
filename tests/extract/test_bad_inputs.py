"""SPEC §9 bad inputs for extraction: each gives a clear error or a recorded status; other clips still land."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import wave

import numpy as np
import pytest
from conftest import MEDIA, ROOT, encode_all, write_manifest

from extract import ExtractionError, ManifestError
from extract.pipeline import run_extract
from shards import iter_shard, load_dataset_json


def make_media(root):
    """A media root with one good clip and every kind of bad file."""
    import av

    (root / "good").mkdir(parents=True)
    shutil.copy(MEDIA / "grid" / "bbaf2n.mpg", root / "good" / "a.mpg")
    (root / "bad").mkdir()
    (root / "bad" / "zero.mp4").write_bytes(b"")
    (root / "bad" / "trunc.mov").write_bytes((MEDIA / "faces" / "face_noface.mov").read_bytes()[:200_000])
    (root / "bad" / "noise.mp4").write_bytes(np.random.default_rng(0).bytes(50_000))
    with wave.open(str(root / "bad" / "speech.wav"), "wb") as w:  # audio-only file
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes((np.sin(np.arange(16000) / 5) * 8000).astype(np.int16).tobytes())
    with av.open(str(MEDIA / "grid" / "pwij3p.mpg")) as src, av.open(str(root / "bad" / "silent.mpg"), "w") as dst:
        stream = dst.add_stream_from_template(src.streams.video[0])  # video without an audio stream
        for packet in src.demux(src.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                dst.mux(packet)
    return root


ROWS = [
    ("good", "a", "a good clip", "good/a.mpg", {}),
    ("bad", "missing", "file not there", "bad/missing.mp4", {}),
    ("bad", "zero", "zero bytes", "bad/zero.mp4", {}),
    ("bad", "trunc", "truncated container", "bad/trunc.mov", {}),
    ("bad", "noise", "not a media file", "bad/noise.mp4", {}),
    ("bad", "wav", "only audio", "bad/speech.wav", {}),
    ("bad", "silent", "only video", "bad/silent.mpg", {}),
    ("bad", "tiny", "a sliver", "good/a.mpg", {"start": 1.005, "end": 1.015}),
    ("bad", "long", "too long", "good/a.mpg", {}),
    ("bad", "past", "past the end", "good/a.mpg", {"start": 99, "end": 100}),
    ("bad", "empty", "", "good/a.mpg", {}),
    ("bad", "unicode", "ça va très bien 😀 — 日本語", "good/a.mpg", {}),
]


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory, tiny_text_model, tiny_audio_model):
    from extract.config import make_config

    tmp = tmp_path_factory.mktemp("bad")
    root = make_media(tmp / "media")
    rows = [{"video_id": v, "clip_id": c, "text": t, "path": p, "mode": "train", **extra} for v, c, t, p, extra in ROWS]
    manifest = write_manifest(tmp / "m.csv", rows, ["video_id", "clip_id", "text", "path", "mode", "start", "end"])
    cfg = make_config(None, text_model=str(tiny_text_model), audio_model=str(tiny_audio_model), workers=1, shard_size=4)
    run_extract(manifest, root, tmp / "out", cfg)
    status = {r["key"]: r for r in map(json.loads, (tmp / "out" / "status.jsonl").read_text().splitlines())}
    samples = {s["__key__"]: s for p in sorted((tmp / "out").glob("*.tar")) for s in iter_shard(p)}
    return status, samples


@pytest.mark.parametrize(
    ("key", "error"),
    [
        ("bad__missing", "file not found"),
        ("bad__zero", "zero-byte file"),
        ("bad__trunc", "unreadable container"),
        ("bad__noise", "unreadable container"),
        ("bad__past", "past the end of the media"),
    ],
)
def test_unreadable_files_are_skipped_and_listed(bad_run, key, error):
    status, samples = bad_run
    assert status[key]["status"] == "skipped" and error in status[key]["error"]
    assert key not in samples


@pytest.mark.parametrize(
    ("key", "failed", "error"),
    [
        ("bad__wav", "video", "no video stream (audio-only file)"),
        ("bad__silent", "audio", "no audio stream"),
        ("bad__empty", "text", "empty transcript"),
        ("bad__tiny", "video", "shorter than one frame"),
    ],
)
def test_broken_modality_is_recorded_and_the_rest_kept(bad_run, key, failed, error):
    status, samples = bad_run
    rec = status[key]
    assert rec["status"] == "partial"
    assert rec["modalities"][failed]["status"] == "failed" and error in rec["modalities"][failed]["error"]
    meta = samples[key]["meta.json"]
    assert meta["modalities"][failed]["status"] == "failed"
    assert not any(k.startswith(failed + "_") for k in samples[key])
    others = [m for m in ("text", "audio", "video") if m != failed]
    assert all(rec["modalities"][m]["status"] == "ok" for m in others)


def test_good_and_unicode_clips_unaffected(bad_run):
    status, samples = bad_run
    assert status["good__a"]["status"] == "ok" and status["bad__unicode"]["status"] == "ok"
    assert samples["bad__unicode"]["meta.json"]["text"] == "ça va très bien 😀 — 日本語"
    assert len(samples["good__a"]["video_mask.npy"]) == 75
    assert len(status) == len(ROWS)


def test_sliver_clip_keeps_audio_with_its_mask(bad_run):
    _, samples = bad_run
    s = samples["bad__tiny"]
    assert s["meta.json"]["duration"] == pytest.approx(0.01, abs=1e-6)
    assert len(s["audio_feat.npy"]) == 1 and len(s["audio_wave.npy"]) == 160


def test_very_long_clip_is_skipped_with_a_reason(tmp_path, tiny_cfg):
    manifest = write_manifest(
        tmp_path / "m.csv", [{"video_id": "g", "clip_id": "a", "text": "x", "path": "grid/bbaf2n.mpg"}]
    )
    run_extract(manifest, MEDIA, tmp_path / "out", tiny_cfg(max_duration_s=2.0))
    rec = json.loads((tmp_path / "out" / "status.jsonl").read_text())
    assert rec["status"] == "skipped" and "over max_duration_s=2" in rec["error"]


def test_nan_features_become_a_recorded_failure(tmp_path, tiny_cfg, monkeypatch):
    from extract.extractors import text as text_mod

    real = text_mod.TextExtractor._encode
    monkeypatch.setattr(text_mod.TextExtractor, "_encode", lambda self, seqs: [f * np.nan for f in real(self, seqs)])
    manifest = write_manifest(
        tmp_path / "m.csv", [{"video_id": "g", "clip_id": "a", "text": "x", "path": "grid/bbaf2n.mpg"}]
    )
    run_extract(manifest, MEDIA, tmp_path / "out", tiny_cfg(modalities=("text", "audio")))
    rec = json.loads((tmp_path / "out" / "status.jsonl").read_text())
    assert rec["status"] == "partial" and "NaN/inf" in rec["modalities"]["text"]["error"]
    assert rec["modalities"]["audio"]["status"] == "ok"


def test_manifest_problems_reported_together_before_work(tmp_path, tiny_cfg):
    rows = [
        {"video_id": "g", "clip_id": "a", "text": "x", "mode": "train"},
        {"video_id": "g", "clip_id": "a", "text": "dup", "mode": "train"},
        {"video_id": "g", "clip_id": "b", "text": "x", "mode": "holdout"},
        {"video_id": "..", "clip_id": "../../etc/passwd", "text": "x", "mode": "test"},
        {"video_id": "g", "clip_id": "c", "text": "x", "mode": "test", "path": "../outside.mp4"},
        {"video_id": "g", "clip_id": "d", "text": "x", "mode": "test", "start": "5", "end": "2"},
    ]
    manifest = write_manifest(tmp_path / "m.csv", rows)
    with pytest.raises(ManifestError) as err:
        run_extract(manifest, MEDIA, tmp_path / "out", tiny_cfg())
    msg = str(err.value)
    assert "6 problem(s)" not in msg and "nothing was extracted" in msg
    for needle in (
        "duplicate key 'g__a'",
        "unknown split 'holdout'",
        "escapes the media root",
        "end 2.0 must be after start 5.0",
    ):
        assert needle in msg
    assert msg.count("escapes the media root") == 2
    assert not (tmp_path / "out").exists()


def test_disk_full_stops_cleanly_and_rerun_resumes(tmp_path, tiny_text_model, tiny_audio_model):
    rows = [{"video_id": "g", "clip_id": f"c{i}", "text": "x", "path": "grid/bbaf2n.mpg", "end": 3} for i in range(4)]
    rows[0]["end"] = 0.4
    manifest = write_manifest(tmp_path / "m.csv", rows)
    out = tmp_path / "out"
    args = [
        "extract", str(manifest), "--media-root", str(MEDIA), "--out", str(out), "--shard-size", "1", "--workers", "0",
        "--text-model", str(tiny_text_model), "--audio-model", str(tiny_audio_model), "-q",
    ]  # fmt: skip
    # A 250 kB file-size limit: the first shard (0.4 s, ~50 kB) fits, the next (3 s, ~330 kB) does not.
    limited = (
        "import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (250_000, 250_000)); "
        "from mmfuse.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    res = subprocess.run([sys.executable, "-c", limited, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stderr
    assert "disk full while writing" in res.stderr and "rerun the same command to resume" in res.stderr
    assert "Traceback" not in res.stderr
    assert not list(out.glob("*.tmp-*"))
    assert sorted(p.name for p in out.glob("train-*")) == ["train-000000.json", "train-000000.tar"]
    res = subprocess.run([sys.executable, "-m", "mmfuse", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert load_dataset_json(out)["samples"] == 4


def test_missing_model_names_what_to_provide(tmp_path):
    from extract.config import make_config
    from extract.pipeline import build_extractors

    with pytest.raises(ExtractionError, match=r"'no-such-org/no-such-model' was not found locally.*never downloads"):
        build_extractors(make_config(None, text_model="no-such-org/no-such-model", modalities=("text",)))


def tone_file(path, layout: str, codec: str = "pcm_s16le", level: float = 0.999, seconds: float = 1.0, rate=48000):
    """A file whose every channel of ``layout`` holds the same 440 Hz tone, ``level`` times full scale."""
    import av

    n = int(seconds * rate)
    tone = (np.sin(2 * np.pi * 440 * np.arange(n) / rate) * level).astype(np.float32)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate, layout=layout)
        channels = len(av.AudioLayout(layout).channels)

        def frames():
            for lo in range(0, n, 1024):
                frame = av.AudioFrame.from_ndarray(
                    np.tile(tone[lo : lo + 1024], (channels, 1)), format="fltp", layout=layout
                )
                frame.sample_rate, frame.pts = rate, lo
                yield frame

        encode_all(container, stream, frames())
    return path


def longest_clipped_run(wave: np.ndarray) -> int:
    clipped = np.abs(wave.astype(np.int32)) >= 32767
    runs = np.diff(np.flatnonzero(np.diff(np.r_[0, clipped.astype(np.int8), 0])))[::2]
    return int(runs.max()) if runs.size else 0


def test_multichannel_audio_is_averaged_without_clipping(tmp_path, tiny_cfg):
    """5.1 and stereo full-scale tones: FFmpeg's mono downmix had gains ×3.4 and ×1.41 and clipped; the mean of
    the channels keeps the tone's level. A float file over full scale (as a lossy codec's overshoot) is scaled
    down, its peak recorded, never clipped."""
    media = tmp_path / "media"
    media.mkdir()
    tone_file(media / "surround.wav", "5.1")
    tone_file(media / "stereo.wav", "stereo")
    tone_file(media / "loud.wav", "5.1", codec="pcm_f32le", level=1.5)
    rows = [{"video_id": "t", "clip_id": n, "text": "a tone", "path": f"{n.replace('_', '.')}"}
            for n in ("surround_wav", "stereo_wav", "loud_wav")]  # fmt: skip
    manifest = write_manifest(tmp_path / "m.csv", rows)
    run_extract(manifest, media, tmp_path / "out", tiny_cfg(modalities=("text", "audio")))
    samples = {s["__key__"]: s for p in sorted((tmp_path / "out").glob("*.tar")) for s in iter_shard(p)}
    for key in ("t__surround_wav", "t__stereo_wav"):
        wave = samples[key]["audio_wave.npy"]
        assert len(wave) == 16000 and longest_clipped_run(wave) == 0
        assert np.abs(wave).max() / 32768 == pytest.approx(0.999, abs=2e-3)  # the level of every channel
        assert np.sqrt(np.mean((wave[800:-800] / 32768.0) ** 2)) == pytest.approx(0.999 / np.sqrt(2), rel=5e-3)
        assert "limited_from_peak" not in samples[key]["meta.json"]["modalities"]["audio"]
    loud = samples["t__loud_wav"]
    peak = loud["meta.json"]["modalities"]["audio"]["limited_from_peak"]
    assert peak == pytest.approx(1.5, abs=3e-3)  # measured before scaling
    assert np.abs(loud["audio_wave.npy"]).max() >= 32766 and longest_clipped_run(loud["audio_wave.npy"]) <= 1
    assert np.sqrt(np.mean((loud["audio_wave.npy"][800:-800] / 32768.0) ** 2)) == pytest.approx(0.5**0.5, rel=5e-3)
    status = [json.loads(line) for line in (tmp_path / "out" / "status.jsonl").read_text().splitlines()]
    assert {r["key"]: r["modalities"]["audio"].get("limited_from_peak") for r in status} == {
        "t__surround_wav": None, "t__stereo_wav": None, "t__loud_wav": peak
    }  # fmt: skip
