"""Hostile media through `mmfuse extract` (inline and with a worker) and `mmfuse predict`: every file ends with a
recorded status and its reason, in bounded time, and the run's peak resident memory (the process and its
children) stays under 1 GB above the same run on one plain clip. Every file is generated here, small on disk."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import wave
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import MEDIA, ROOT, write_manifest
from test_hostile_video import add_video

from shards import iter_shard

pytestmark = pytest.mark.slow

MEASURE = """
import json, resource, sys
from bench.memory import vm_hwm_mib
from mmfuse.cli import main
runs = json.loads(sys.argv[1])
codes = [main(args) for args in runs]
children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps({"codes": codes, "peak_mib": max(vm_hwm_mib(), children)}))
"""


def run_measured(runs: list[list[str]], timeout: float = 300) -> dict:
    """``mmfuse`` commands run one after another in a fresh process: exit codes, peak MiB, stderr."""
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, json.dumps(runs)], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "stderr": done.stderr}


def write_wav(path: Path, channels: int, rate: int, n: int) -> None:
    samples = (np.random.default_rng(channels).standard_normal((n, channels)) * 3000).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes(samples.tobytes())


def write_mux(path: Path, *streams: tuple[str, int, dict], **options) -> None:
    """Video streams ``(codec, frames, add_video's keywords)`` in ``path``, muxed one after another."""
    import av

    with av.open(str(path), "w", options=options) as out:
        packets = [add_video(out, codec, n, **kw)[1] for codec, n, kw in streams]
        for packet in (p for group in packets for p in group):
            out.mux(packet)


def huge_png(path: Path, side: int) -> None:
    """A black RGB PNG of ``side`` x ``side`` pixels (a few hundred KB: its rows compress to almost nothing)."""
    pack = zlib.compressobj(9)
    row = bytes(1 + 3 * side)
    data = b"".join(pack.compress(row) for _ in range(side)) + pack.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def declared_frames_bomb(path: Path, frames: int) -> None:
    """A 10-frame MP4 whose header claims ``frames`` frames of 100 bytes each (FFmpeg indexes every one)."""
    small = path.with_suffix(".small.mp4")
    write_mux(small, ("mjpeg", 10, {"fmt": "yuvj420p"}))
    data = bytearray(small.read_bytes())
    at = data.find(b"stsz")
    data[at + 8 : at + 16] = struct.pack(">II", 100, frames)
    at = data.find(b"stts")
    data[at + 12 : at + 16] = struct.pack(">I", frames)
    path.write_bytes(bytes(data))
    small.unlink()


def shuffled_stamps(path: Path) -> None:
    import av

    order = np.random.default_rng(0).permutation(49)
    with av.open(str(path), "w") as out:
        _, packets = add_video(out, "mjpeg", 49, fmt="yuvj420p")
        for i, (packet, stamp) in enumerate(zip(packets, order, strict=True)):
            packet.pts, packet.dts = int(stamp) + 49, i
            out.mux(packet)


# key -> (file, manifest extras, expected status, a piece of the reason or of the recorded status)
CASES = {
    "plain": ("plain.mpg", {}, "ok", None),
    "ch8": ("ch8.wav", {}, "partial", "no video stream"),
    "ch64": ("ch64.wav", {}, "partial", "no video stream"),
    "hz1": ("hz1.wav", {"start": 0, "end": 10}, "partial", "no video stream"),
    "bomb": ("bomb.mp4", {}, "skipped", "declares 80,000,000 frames, over 10,000,000"),
    "png": ("huge.png", {}, "skipped", "frames of 12000x12000 pixels in huge.png, over the 33,177,600"),
    "cut": ("cut.mp4", {}, "skipped", None),  # video only: ok, see below
    "shuffled": ("shuffled.mkv", {}, "skipped", "frame time stamps go back"),
    "thumb": ("thumb.mkv", {}, "skipped", None),
}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile")
    shutil.copy(MEDIA / "grid" / "bbaf2n.mpg", root / "plain.mpg")
    write_wav(root / "ch8.wav", 8, 16000, 16000)  # 7.1's channel count: FFmpeg's planar conversion crashed
    write_wav(root / "ch64.wav", 64, 16000, 8000)
    write_wav(root / "hz1.wav", 1, 1, 14400)  # 28 KB declaring 4 hours at 1 Hz
    declared_frames_bomb(root / "bomb.mp4", 80_000_000)
    huge_png(root / "huge.png", 12000)
    write_mux(root / "whole.mp4", ("mjpeg", 100, {"fmt": "yuvj420p"}), movflags="faststart")
    (root / "cut.mp4").write_bytes((root / "whole.mp4").read_bytes()[: (root / "whole.mp4").stat().st_size // 2])
    shuffled_stamps(root / "shuffled.mkv")
    write_mux(root / "thumb.mkv", ("mjpeg", 1, {"fmt": "yuvj420p"}), ("mjpeg", 50, {"fmt": "yuvj420p"}))
    return root


def manifest_for(root: Path, keys: list[str]) -> Path:
    rows = [{"video_id": "h", "clip_id": k, "text": "one two three", "path": CASES[k][0], "mode": "train",
             **CASES[k][1]} for k in keys]  # fmt: skip
    columns = ["video_id", "clip_id", "text", "path", "mode", "start", "end"]
    return write_manifest(root / f"m{len(keys)}.csv", rows, columns)


def extract_args(manifest: Path, media: Path, out: Path, workers: int, models: tuple[Path, Path]) -> list[str]:
    return ["extract", str(manifest), "--media-root", str(media), "--out", str(out), "--workers", str(workers),
            "--text-model", str(models[0]), "--audio-model", str(models[1]), "--no-progress"]  # fmt: skip


@pytest.mark.parametrize("workers", [0, 1])
def test_hostile_media_end_with_a_status_in_bounded_memory(
    hostile, tmp_path, workers, tiny_text_model, tiny_audio_model
):
    models = (tiny_text_model, tiny_audio_model)
    plain = run_measured([extract_args(manifest_for(tmp_path, ["plain"]), hostile, tmp_path / "p", workers, models)])
    keys = list(CASES)
    got = run_measured([extract_args(manifest_for(tmp_path, keys), hostile, tmp_path / "h", workers, models)])
    assert plain["codes"] == [0] and got["codes"] == [0], got["stderr"][-2000:]
    status = {
        r["key"].split("__")[1]: r for r in map(json.loads, (tmp_path / "h" / "status.jsonl").read_text().splitlines())
    }
    assert set(status) == set(keys)
    samples = {s["__key__"].split("__")[1]: s for p in (tmp_path / "h").glob("*.tar") for s in iter_shard(p)}
    for key in ("bomb", "png", "shuffled"):
        assert status[key]["status"] == "skipped" and CASES[key][3] in status[key]["error"], status[key]
    for key in ("ch8", "ch64", "hz1"):
        audio = status[key]["modalities"]["audio"]
        assert status[key]["status"] == "partial" and audio["status"] == "ok", status[key]
    assert len(samples["ch8"]["audio_wave.npy"]) == 16000 and len(samples["hz1"]["audio_wave.npy"]) == 160_000
    cut, thumb = status["cut"]["modalities"]["video"], status["thumb"]["modalities"]["video"]
    assert cut["status"] == "ok" and 30 < cut["frames"] < 70 and cut["real_span"][1] < 3.0, cut
    assert thumb["status"] == "ok" and thumb["frames"] == 50 and thumb["stream"] == 1, thumb
    assert got["peak_mib"] - plain["peak_mib"] < 1000, (got["peak_mib"], plain["peak_mib"])


def test_hostile_media_through_predict(hostile, tmp_path, bundled_dataset):
    """The same files through ``mmfuse predict`` (decoding inline, files opened first in a limited child): one
    line each, exit 1 for a file that cannot be used, and the peak stays under 1 GB above a plain clip's."""
    from train.config import make_train_config
    from train.trainer import fit

    run = tmp_path / "run"
    fit(make_train_config("late", overrides=["epochs=1", "num_workers=0", "device=cpu", "batch_size=2"]),
        bundled_dataset, run)  # fmt: skip
    ckpt = str(run / "checkpoints" / "last.pt")
    plain = run_measured([["predict", "--checkpoint", ckpt, str(hostile / "plain.mpg"), "--text", "bin blue"]])
    files = ["ch8.wav", "hz1.wav", "bomb.mp4", "huge.png", "cut.mp4", "shuffled.mkv", "thumb.mkv"]
    cut = {"hz1.wav": ["--start", "0", "--end", "10"]}  # it declares 4 hours: over predict's limit otherwise
    got = run_measured(
        [["predict", "--checkpoint", ckpt, str(hostile / f), "--text", "bin blue", *cut.get(f, [])] for f in files]
    )
    codes = dict(zip(files, got["codes"], strict=True))
    assert plain["codes"] == [0]
    assert {f for f, c in codes.items() if c != 0} == {"bomb.mp4", "huge.png", "shuffled.mkv"}, got["stderr"][-3000:]
    errors = [line for line in got["stderr"].splitlines() if line.startswith("mmfuse predict: error:")]
    assert len(errors) == 3 and "declares 80,000,000 frames" in errors[0] and "12000x12000" in errors[1]
    assert "frame time stamps go back" in errors[2]
    assert got["peak_mib"] - plain["peak_mib"] < 1000, (got["peak_mib"], plain["peak_mib"])
