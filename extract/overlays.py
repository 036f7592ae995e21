"""Landmark overlays of ``mmfuse report``: a clip's landmarks drawn on frames decoded again from its media.

An overlay is drawn on at most ``FACE_FRAMES`` + 1 frames, decoded at most ``MAX_FRAME_SIDE`` pixels on their long
side whatever the video's size. Whatever goes wrong with one clip (media missing, outside the media root, refused
or not decodable, a damaged sample, a failed drawing) becomes the overlay's one-line note, never the report's end.
Also the Agg figure helpers the report's plots share.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FACE_FRAMES = 3  # frames with a face per overlay (plus one without, if the clip has any)
MAX_ASPECT = 4.0  # an overlay panel's height / width is kept within [1/4, 4] whatever the frame's shape
REASON_LIMIT = 300  # characters of an exception a note quotes


@dataclass
class Overlay:
    """One clip's landmark overlay: the PNG file name in the report directory, or why there is none."""

    key: str
    png: str | None
    note: str = ""


def _pick_frames(mask: np.ndarray) -> list[int]:
    """Up to FACE_FRAMES evenly spaced frames with a face, then the middle frame without one (if any)."""
    face, none = np.flatnonzero(mask), np.flatnonzero(~mask)
    picks = face[np.linspace(0, len(face) - 1, min(FACE_FRAMES, len(face))).round().astype(int)].tolist()
    return picks + ([int(none[len(none) // 2])] if len(none) else [])


def landmark_overlay(sample: dict[str, Any], media: Path | None, out: Path, index: int) -> Overlay:
    """:func:`_overlay`, or an overlay without a picture whose note says why: a hostile or damaged sample, a file
    the decoder refuses, a failed drawing (anything, memory included) is one line of the report, never its end."""
    key = str(sample["meta.json"].get("key", sample["__key__"]))
    try:
        return _overlay(sample, key, media, out, index)
    except Exception as exc:  # noqa: BLE001 - the report is written whatever one overlay does
        (out / f"overlay_{index:03d}.png").unlink(missing_ok=True)  # no half-drawn picture left behind
        return Overlay(key, None, f"overlay not drawn: {_reason(exc)}")


def _reason(exc: BaseException) -> str:
    """An exception as one line of the report, cut to REASON_LIMIT characters."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= REASON_LIMIT else text[:REASON_LIMIT] + "..."


def _overlay(sample: dict[str, Any], key: str, media: Path | None, out: Path, index: int) -> Overlay:
    meta = sample["meta.json"]
    if "video_norm.npy" not in sample:
        return Overlay(key, None, "no video_norm.npy member: landmarks cannot be put back into pixels")
    mask = np.asarray(sample["video_mask.npy"], dtype=bool)
    times = np.asarray(sample["video_time.npy"], dtype=np.float64)
    picks = _pick_frames(mask)
    if not picks:
        return Overlay(key, None, "no video frames")
    if not meta.get("media"):
        return Overlay(key, None, "media not reachable: the sample records no media path")
    if media is None:
        return Overlay(key, None, "media not reachable: no media root recorded (pass --media-root)")
    path = media / meta["media"]
    if not path.resolve().is_relative_to(media.resolve()):  # an absolute or ../ path, or a symlink leading out
        return Overlay(key, None, f"media not decoded: {meta['media']} resolves outside the media root {media}")
    if not path.is_file():
        return Overlay(key, None, f"media not reachable: {path} does not exist (pass --media-root)")
    try:
        images, found, scale = _decode_frames(path, meta, times[picks])
    except Exception as exc:  # noqa: BLE001 - any decoder error (DecodeError, FFmpeg's, memory) becomes a note
        return Overlay(key, None, f"media not decodable: {path}: {_reason(exc)}")
    lmk, norm = sample["video_lmk.npy"], sample["video_norm.npy"]
    # landmarks are in the video's own pixels; the frames were decoded at most MAX_FRAME_SIDE on their long side
    points = [(np.asarray(lmk[i], np.float32) * norm[i, 3] + norm[i, :3]) * scale if mask[i] else None for i in picks]
    name = f"overlay_{index:03d}.png"
    _draw_overlay(out / name, images, points, times[picks])
    gap = float(np.max(np.abs(found - times[picks])))
    return Overlay(key, name, f"{path.name}: nearest decoded frames within {gap * 1000:.0f} ms of the landmark times")


def _decode_frames(path: Path, meta: dict[str, Any], wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The frames of ``path`` nearest to clip times ``wanted`` (same clock as extraction), their times, and the
    ``(x, y, z)`` scale from the video's own pixels (where landmarks are placed) to the decoded frames'.

    Frames are decoded at most ``MAX_FRAME_SIDE`` pixels on their long side, the size extraction gives FaceMesh:
    a panel is drawn 405 pixels wide, and a 16000×16000 frame at full size cost 11 GB."""
    from extract.decode import DecodeError, clip_window, probe
    from extract.video import MAX_FRAME_SIDE, VideoFrames

    p = probe(path)
    t0, t1 = clip_window(p, meta.get("start"), meta.get("end"))
    frames = VideoFrames(path, p, t0, t1, fps=None, max_side=MAX_FRAME_SIDE)
    try:
        if not len(frames):
            raise DecodeError("no video frames inside the clip window")
        pos = [int(np.argmin(np.abs(frames.times - t))) for t in wanted]
        frames.indices, frames.times = frames.indices[pos], frames.times[pos]  # decode only these frames
        images, found = next(frames.chunks(size=len(pos), ahead=0))
    finally:
        frames.close()  # also when decoding failed half way: the file is released at once
    sx = images.shape[2] / frames.width if frames.width > 0 else 1.0
    sy = images.shape[1] / frames.height if frames.height > 0 else 1.0
    return images, np.asarray(found, dtype=np.float64), np.array([sx, sy, sx], dtype=np.float32)


def figure(width: float, height: float, nrows: int = 1, ncols: int = 1) -> tuple[Any, list[Any]]:
    """An Agg figure (no pyplot, no global backend switch) and its axes, flattened."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, list(fig.subplots(nrows, ncols, squeeze=False).flat)


def save_png(fig: Any, path: Path) -> None:
    with warnings.catch_warnings():  # glyphs missing from the default font for non-ASCII keys
        warnings.simplefilter("ignore", UserWarning)
        fig.savefig(path, dpi=90, bbox_inches="tight")


def _draw_overlay(path: Path, images: np.ndarray, points: list[np.ndarray | None], times: np.ndarray) -> None:
    h, w = images.shape[1:3]
    aspect = min(max(h / max(w, 1), 1 / MAX_ASPECT), MAX_ASPECT)  # a 1×1280 frame must not ask for a mile of figure
    fig, axes = figure(4.5 * len(images), 4.5 * aspect + 0.5, 1, len(images))
    for ax, image, pts, t in zip(axes, images, points, times, strict=True):
        ax.imshow(image)
        ax.set_axis_off()
        if pts is None:
            ax.set_title(f"{t:.2f} s: no face", color="#a40")
        else:
            ax.scatter(pts[:, 0], pts[:, 1], s=0.8, c="lime", linewidths=0)
            ax.set_title(f"{t:.2f} s")
    save_png(fig, path)
