"""A 3840×2160 clip: frames reach FaceMesh scaled to 1280 pixels on their long side, so extraction's memory does
not grow with the resolution, and the landmarks (in the video's own pixels) agree with a full-size run."""

from __future__ import annotations

import json
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from conftest import MEDIA, ROOT, encode_all, write_manifest

from extract.decode import probe
from extract.extractors.base import DecodedClip
from extract.extractors.facemesh import FaceMeshExtractor
from extract.manifest import Clip
from extract.video import MAX_FRAME_SIDE, VideoFrames

FRAMES = 16


@pytest.fixture(scope="module")
def uhd_clip(tmp_path_factory) -> Path:
    """The bundled face clip's first frames (960×540) upscaled four times to 3840×2160, MPEG-4 at 25 fps."""
    import av

    path = tmp_path_factory.mktemp("uhd") / "face_uhd.mp4"
    with av.open(str(MEDIA / "faces" / "face_noface.mov")) as src, av.open(str(path), "w") as dst:
        stream = dst.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt, stream.bit_rate = 3840, 2160, "yuv420p", 20_000_000

        def upscaled():
            for i, frame in zip(range(FRAMES), src.decode(video=0), strict=False):
                big = frame.reformat(width=3840, height=2160, format="yuv420p")
                big.pts, big.time_base = i, Fraction(1, 25)
                yield big

        encode_all(dst, stream, upscaled())
    return path


MEASURE = """
import json, sys
from pathlib import Path
import mediapipe, torch  # what every extraction loads, before the peak it starts from is read
from bench.memory import vm_hwm_mib
from extract.config import make_config
from extract.pipeline import run_extract
from shards import iter_shard

before = vm_hwm_mib()
manifest, media, out = map(Path, sys.argv[1:])
run_extract(manifest, media, out, make_config(None, modalities=("video",), workers=0))
faces = [int(s["video_mask.npy"].sum()) for p in out.glob("*.tar") for s in iter_shard(p)]
print(json.dumps({"before": before, "after": vm_hwm_mib(), "faces": faces}))
"""


def test_a_uhd_clip_is_extracted_in_bounded_memory(tmp_path, uhd_clip):
    """Extraction's own peak (VmHWM after the imports to VmHWM at the end, in a fresh process) stays under
    400 MiB: one chunk of at most 4 scaled frames, 11 MB (held twice, as decord copies it out), plus the
    decoder's 4K reference frames and FaceMesh's graph. Measured: 154 MiB for this clip with chunks of 4,
    194 MiB with chunks of 32; decoding these 16 frames at full size in chunks of 32 took 1160 MiB."""
    manifest = write_manifest(
        tmp_path / "m.csv", [{"video_id": "f", "clip_id": "uhd", "text": "x", "path": uhd_clip.name, "mode": "train"}]
    )
    code = [sys.executable, "-c", MEASURE, str(manifest), str(uhd_clip.parent), str(tmp_path / "out")]
    done = subprocess.run(code, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["faces"] == [FRAMES]
    assert got["after"] - got["before"] < 400, got


def face_mesh(path: Path, max_side: int | None, frames: int = 4) -> dict[str, np.ndarray]:
    p = probe(path)
    clip = DecodedClip(Clip("k", "f", "uhd", "train", "", 1), duration=frames / 25)
    clip.frames = VideoFrames(path, p, 0.0, frames / 25, None, max_side=max_side)
    return FaceMeshExtractor()([clip])[0]


def test_landmarks_from_scaled_frames_agree_with_full_size_ones_in_the_videos_pixels(uhd_clip):
    scaled, full = face_mesh(uhd_clip, MAX_FRAME_SIDE), face_mesh(uhd_clip, None)
    assert VideoFrames(uhd_clip, probe(uhd_clip), 0.0, 0.1, None).decoded_size == (1280, 720)
    assert scaled["video_mask.npy"].all() and full["video_mask.npy"].all()
    # Normalised landmarks (inter-ocular distance units, face about 4 IOD across) agree to 2 % of an IOD.
    lmk_diff = np.abs(scaled["video_lmk.npy"].astype(np.float32) - full["video_lmk.npy"].astype(np.float32))
    assert lmk_diff.max() < 0.02 and lmk_diff.mean() < 0.003
    # Centre and inter-ocular distance stay in the 3840×2160 frame's pixels (IOD about 420 px there).
    centre, iod = scaled["video_norm.npy"][:, :2], scaled["video_norm.npy"][:, 3]
    assert np.abs(centre - full["video_norm.npy"][:, :2]).max() < 4.0
    assert np.abs(iod / full["video_norm.npy"][:, 3] - 1).max() < 0.01 and iod.min() > 300
    assert np.abs(scaled["video_geom.npy"] - full["video_geom.npy"]).max() < 0.01
