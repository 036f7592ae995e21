"""Several faces in a frame, phone video stored with a rotation, and the CUDA path (skipped without a GPU)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import MEDIA, encode_all, rgb_frames
from precision_bounds import bound

from extract.decode import clip_window, probe
from extract.extractors.base import DecodedClip
from extract.extractors.facemesh import FaceMeshExtractor
from extract.manifest import Clip
from extract.video import VideoFrames


def two_face_video(path, n=12):
    """Side by side: speaker A (pwij3p, left, at 80 %) and speaker B (bbaf2n, right, full size)."""
    import av
    import cv2

    left, right = rgb_frames(MEDIA / "grid" / "pwij3p.mpg", n), rgb_frames(MEDIA / "grid" / "bbaf2n.mpg", n)

    def side_by_side():
        for a, b in zip(left, right, strict=True):
            small = np.zeros_like(a)
            small[29:259, 36:324] = cv2.resize(a, (288, 230))  # speaker A at 80 %
            yield av.VideoFrame.from_ndarray(np.ascontiguousarray(np.concatenate([small, b], axis=1)), format="rgb24")

    with av.open(str(path), "w") as out:
        s = out.add_stream("mpeg4", rate=25)
        s.width, s.height, s.pix_fmt = 720, 288, "yuv420p"
        encode_all(out, s, side_by_side())


def decoded(clip_path):
    """The whole of ``clip_path`` as a decoded clip whose frames FaceMesh reads."""
    p = probe(clip_path)
    t0, t1 = clip_window(p, None, None)
    d = DecodedClip(Clip(clip_path.stem, "v", clip_path.stem, "train", "", 1, path=clip_path))
    d.frames = VideoFrames(clip_path, p, t0, t1, None)
    return d


def landmarks(path, max_faces):
    d = decoded(path)
    return FaceMeshExtractor(max_faces=max_faces)([d])[0], d.info["video"]


def test_several_faces_keeps_the_largest_and_counts_them(tmp_path):
    path = tmp_path / "two.mp4"
    two_face_video(path)
    out, info = landmarks(path, max_faces=2)
    assert out["video_mask.npy"].all() and info["multi_face_frames"] == len(out["video_mask.npy"]) == 12
    centre_x = out["video_norm.npy"][:, 0]
    assert (centre_x > 360).all()  # the larger face, on the right half
    _, info_one = landmarks(path, max_faces=1)
    assert info_one["multi_face_frames"] == 0


@pytest.mark.gpu
def test_extract_on_cuda(tmp_path, tiny_cfg):
    from conftest import bundled_rows, write_manifest

    from extract.pipeline import run_extract
    from shards import iter_shard

    manifest = write_manifest(tmp_path / "m.csv", bundled_rows()[:2])
    run_extract(manifest, MEDIA, tmp_path / "cpu", tiny_cfg(modalities=("text", "audio")))
    run_extract(manifest, MEDIA, tmp_path / "gpu", tiny_cfg(modalities=("text", "audio"), device="cuda"))
    cpu = {s["__key__"]: s for s in iter_shard(next((tmp_path / "cpu").glob("*.tar")))}
    gpu = {s["__key__"]: s for s in iter_shard(next((tmp_path / "gpu").glob("*.tar")))}
    for key, s in cpu.items():  # the GPU run picked its own precision (bf16 on a GPU with native bf16)
        for member in ("text_feat.npy", "audio_feat.npy"):
            atol = bound(tmp_path / "gpu", member)
            np.testing.assert_allclose(s[member].astype(np.float32), gpu[key][member].astype(np.float32), atol=atol)


def test_one_tracker_for_many_clips_gives_each_clip_a_fresh_trackers_landmarks():
    """The graph is built once and reset per clip: no tracking state carries over from the clip before, in any
    order (a face-less stretch after a face, a face after another speaker's)."""
    paths = [MEDIA / "faces" / "face_noface.mov", MEDIA / "grid" / "pwij3p.mpg", MEDIA / "grid" / "bbaf2n.mpg"]
    fresh = {p.stem: FaceMeshExtractor()([decoded(p)])[0] for p in paths}
    shared = FaceMeshExtractor()
    for order in (paths, paths[::-1]):
        for p, got in zip(order, shared([decoded(p) for p in order]), strict=True):
            if p.suffix == ".mov":  # frames with and without the face
                assert 0 < got["video_mask.npy"].sum() < len(got["video_mask.npy"])
            for name, value in fresh[p.stem].items():
                np.testing.assert_array_equal(got[name], value, err_msg=f"{p.name} {name}")
    assert shared._mesh is not None  # one graph served all six clips


def phone_video(path, rotation: int, n=12):
    """The GRID speaker's first ``n`` frames as a phone stores them: turned by ``-rotation`` degrees, with a display
    matrix that turns them back by ``rotation`` (0: stored upright, no matrix)."""
    import av

    stored = [np.ascontiguousarray(np.rot90(f, -rotation // 90)) for f in rgb_frames(MEDIA / "grid" / "bbaf2n.mpg", n)]
    with av.open(str(path), "w") as out:
        s = out.add_stream("libx264", rate=25, options={"qp": "0"})
        s.height, s.width = stored[0].shape[:2]
        s.pix_fmt = "yuv444p"
        if rotation:
            s.set_display_rotation(rotation)
        encode_all(out, s, (av.VideoFrame.from_ndarray(img, format="rgb24") for img in stored))


@pytest.mark.parametrize("rotation", [90, 270])
def test_rotated_phone_video_gives_the_upright_landmarks(tmp_path, rotation):
    """Landmarks of a video stored sideways with a rotation are those of the same video stored upright: found in
    every frame, in the displayed (upright) pixel space."""
    phone_video(tmp_path / "upright.mp4", 0)
    phone_video(tmp_path / "phone.mp4", rotation)
    upright, _ = landmarks(tmp_path / "upright.mp4", max_faces=1)
    phone, _ = landmarks(tmp_path / "phone.mp4", max_faces=1)
    assert phone["video_mask.npy"].all() and upright["video_mask.npy"].all()
    np.testing.assert_allclose(phone["video_norm.npy"][:, :2], upright["video_norm.npy"][:, :2], atol=2.0)  # pixels
    gap = np.abs(phone["video_lmk.npy"].astype(np.float32) - upright["video_lmk.npy"].astype(np.float32))
    assert np.median(gap) < 0.02  # inter-ocular distances
