"""Open a media file: its streams, on one clock, and the frames a clip takes from them.

The clip clock starts at the container's earliest stream start (or the manifest's ``start``). A stream that
starts late or ends early is placed at its true time: audio is silence-padded and its real span recorded, so
the audio mask covers only real samples. PyAV (FFmpeg's libraries) probes the streams here; the audio is decoded
in :mod:`extract.waveform` and the video in :mod:`extract.video`.

No torch here: this module runs in worker processes.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from extract.errors import DecodeError

log = logging.getLogger(__name__)

# How audio is made mono (:mod:`extract.waveform`), recorded in the feature set: it sets the stored waveform's level.
AUDIO_DOWNMIX = "equal-weight mean of the channels; a clip whose peak exceeds full scale is scaled down to it"


@dataclass(frozen=True)
class Probe:
    """Stream layout of a media file, in seconds on the container clock."""

    has_video: bool
    has_audio: bool
    video_start: float
    video_end: float
    audio_start: float
    audio_end: float
    fps: float
    width: int
    height: int
    video_stream: int = -1  # the container's index of the stream decoded (see :func:`pick_stream`), -1: none
    audio_stream: int = -1
    video_streams: int = 0  # how many video streams the file holds, attached pictures left out

    @property
    def start(self) -> float:
        starts = [s for s, ok in ((self.video_start, self.has_video), (self.audio_start, self.has_audio)) if ok]
        return min(starts) if starts else 0.0

    @property
    def end(self) -> float:
        ends = [e for e, ok in ((self.video_end, self.has_video), (self.audio_end, self.has_audio)) if ok]
        return max(ends) if ends else 0.0


@dataclass
class Skipped:
    """Packets :func:`decode_packets` passed over: how many, and the first one's time and reason."""

    count: int = 0
    first: str | None = None

    def add(self, packet, reason: str) -> None:
        self.count += 1
        if self.first is None:
            stamp = packet.pts if packet.pts is not None else packet.dts
            at = f"{float(stamp * packet.time_base):.2f} s" if stamp is not None and packet.time_base else "?"
            self.first = f"at {at}: {reason}"


def decode_packets(container, stream, skipped: Skipped):
    """``container.decode(stream)``, passing over the packets a cut or damaged file holds: those the demuxer marks
    corrupt (the last, short packet of a truncated file) and those the decoder refuses as invalid data. They are
    counted in ``skipped``; one bad packet no longer ends the stream (3 KB of noise mid-file failed both streams
    of an MP4 whose other 1.8 s decoded)."""
    import av

    for packet in container.demux(stream):
        if packet.is_corrupt:
            skipped.add(packet, "truncated or corrupt packet")
            continue
        try:
            frames = packet.decode()
        except av.error.InvalidDataError as exc:
            skipped.add(packet, str(exc))
            continue
        yield from frames


def probe(path: Path) -> Probe:
    """Open ``path`` with PyAV and read stream start times and durations; raise :class:`DecodeError`."""
    import av

    if not path.exists():
        raise DecodeError(f"file not found: {path}")
    size = path.stat().st_size
    if size == 0:
        raise DecodeError(f"zero-byte file: {path}")
    try:
        with av.open(str(path)) as container:
            cdur = container.duration / 1e6 if container.duration else None
            video = pick_stream(container, "video")
            audio = pick_stream(container, "audio")
            _check_declared(path, video, audio)
            videos = len(motion_streams(container, "video"))
            v0, v1 = _span(video, cdur)
            a0, a1 = _span(audio, cdur)
            fps = float(video.average_rate or video.guessed_rate or 0) if video is not None else 0.0
            if _guessed_from_bit_rate(container, size):
                spans = _packet_spans(container)
                real_end = max((hi for _, hi in spans.values()), default=0.0)
                if real_end > max(v1, a1) + (1.0 / fps if fps else 0.04):  # the guess would cut a frame or more
                    v0, v1 = spans.get(video.index, (v0, v1)) if video is not None else (v0, v1)
                    a0, a1 = spans.get(audio.index, (a0, a1)) if audio is not None else (a0, a1)
            w = video.codec_context.width if video is not None else 0
            h = video.codec_context.height if video is not None else 0
            index = (video.index if video is not None else -1, audio.index if audio is not None else -1)
    except av.error.MemoryError as exc:  # FFmpeg's own index of the file, over the process's memory limit
        raise DecodeError(f"opening {path.name} needs more memory than a decode process may take: {exc}") from exc
    except av.FFmpegError as exc:
        raise DecodeError(f"unreadable container {path.name}: {exc}") from exc
    if video is None and audio is None:
        raise DecodeError(f"no audio or video stream in {path.name}")
    if w * h > MAX_PIXELS:  # refused before decoding: opening it again elsewhere would decode a frame to probe it
        raise DecodeError(f"frames of {w}x{h} pixels in {path.name}, over the {MAX_PIXELS:,} decoded at most (8K)")
    return Probe(video is not None, audio is not None, v0, v1, a0, a1, fps, w, h, *index, videos)


# Frames larger than this (8K UHD) are refused before decoding: a 16000 x 16000 RGBA64 frame is 2 GB.
MAX_PIXELS = 7680 * 4320
# Frames a stream may declare (PCM audio aside, indexed by chunk): FFmpeg builds an index entry of 24 bytes per
# declared frame when it opens the file, 240 MB at this cap, which is 46 hours of 60 fps video or 58 hours of AAC.
# An MP4 whose header claims 80 M frames took 1 GB to open (5.8 GB with more tracks); under the decode memory
# limit (:mod:`extract.limits`) FFmpeg's index fails to allocate and the declared count is refused here.
MAX_DECLARED_FRAMES = 10_000_000


def _check_declared(path: Path, *streams) -> None:
    for s in streams:
        if s is not None and (s.frames or 0) > MAX_DECLARED_FRAMES and not s.codec_context.name.startswith("pcm_"):
            raise DecodeError(
                f"the {s.type} stream of {path.name} declares {s.frames:,} frames, over {MAX_DECLARED_FRAMES:,}"
            )


def motion_streams(container, kind: str) -> list:
    """The file's ``kind`` ("video" or "audio") streams, attached pictures, still images and thumbnails left out."""
    from av.stream import Disposition

    skip = Disposition.attached_pic | Disposition.still_image | Disposition.timed_thumbnails
    return [s for s in getattr(container.streams, kind) if not s.disposition & skip]


def pick_stream(container, kind: str):
    """The ``kind`` stream a player would play, or None: of :func:`motion_streams`, the longest (its duration, or
    Matroska's ``DURATION`` tag), then the one with the most frames, then FFmpeg's choice (``av_find_best_stream``:
    the default-marked stream, then the one that gave the most frames while probing), then the largest picture or
    the most channels; ties go to the first. (Always taking the first stream decoded a one-frame cover picture, or
    an empty stream, where the file's real video came second.)"""
    best = container.streams.best(kind)

    def rank(s) -> tuple[float, int, bool, int]:
        seconds = _stream_seconds(s)
        size = s.codec_context.width * s.codec_context.height if kind == "video" else s.codec_context.channels
        return seconds, s.frames or 0, s is best, size or 0

    return max(motion_streams(container, kind), key=rank, default=None)  # max keeps the first of equals


def _span(stream, container_duration: float | None) -> tuple[float, float]:
    if stream is None:
        return 0.0, 0.0
    tb = float(stream.time_base) if stream.time_base else 0.0
    start = float(stream.start_time * tb) if stream.start_time is not None else 0.0
    if stream.duration is not None and tb:
        return start, start + float(stream.duration * tb)
    return start, container_duration or start


# Containers whose durations FFmpeg may estimate from the file's size and bit rate, its last resort when no time
# stamps near the end can be read: an 8 KB MPEG-1 program stream of 60 frames (2.4 s) was given 1.78 s, which
# would cut the clip's last 15 frames. (The bundled GRID clips' guesses are within a frame of their packets.)
_ESTIMATED_DURATION_FORMATS = {"mpeg", "mpegts", "mpegvideo"}


def _guessed_from_bit_rate(container, size: int) -> bool:
    """True when the container's duration is FFmpeg's guess from size x 8 / bit rate (MPEG streams only)."""
    names = set(container.format.name.split(","))
    rate, duration = container.bit_rate, container.duration
    if not names & _ESTIMATED_DURATION_FORMATS or not rate or not duration:
        return False
    return abs(duration / 1e6 - size * 8 / rate) < 1e-3


def _packet_spans(container) -> dict[int, tuple[float, float]]:
    """Each stream's ``(start, end)`` in seconds from its packets' own time stamps (the file is read, not decoded).

    A packet's end is its time stamp plus its duration, or plus one frame at the stream's average rate when the
    container gives none (MPEG video packets)."""
    spans: dict[int, tuple[float, float]] = {}
    for packet in container.demux():
        stamp = packet.pts if packet.pts is not None else packet.dts
        stream = packet.stream
        if stamp is None or not stream.time_base:
            continue
        tb = float(stream.time_base)
        step = packet.duration * tb if packet.duration else 0.0
        if not step and stream.type == "video" and stream.average_rate:
            step = 1.0 / float(stream.average_rate)
        t0 = stamp * tb
        lo, hi = spans.get(stream.index, (t0, t0 + step))
        spans[stream.index] = (min(lo, t0), max(hi, t0 + step))
    return spans


def _stream_seconds(stream) -> float:
    """The stream's duration in seconds: its own, else Matroska's ``DURATION`` tag (``HH:MM:SS.fraction``), else 0."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    tag = str(stream.metadata.get("DURATION", ""))
    parts = tag.split(":")
    try:
        seconds = float(parts[0]) * 3600 + float(parts[1]) * 60 + float(parts[2]) if len(parts) == 3 else 0.0
    except ValueError:
        return 0.0
    return seconds if math.isfinite(seconds) else 0.0


def clip_window(p: Probe, start: float | None, end: float | None) -> tuple[float, float]:
    """``(t0, t1)`` of the clip on the container clock: the manifest's cut, else every stream's extent."""
    t0 = p.start if start is None else start
    t1 = p.end if end is None else min(end, p.end) if p.end > 0 else end
    return t0, max(t0, t1)


def frame_plan(pts: np.ndarray, t0: float, t1: float, fps: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Which decoded frames to use and their clip times.

    ``pts`` are the frames' own presentation times (container clock, seconds, increasing). With ``fps`` the
    clip is sampled on a regular grid ``t0 + k/fps`` and each grid point takes the frame on screen then (the
    last with ``pts <= t``), which is right for variable frame rate; the grid stops where the last frame leaves
    the screen (its time plus the median frame interval), not at a clip end the container may overstate (a
    3 s file claiming 120 s gave 2925 copies of its last frame). Without ``fps`` every frame in ``[t0, t1)`` is
    kept. Returns ``(indices, times)`` with times relative to ``t0``.
    """
    if fps is None:
        idx = np.flatnonzero((pts >= t0 - 1e-6) & (pts < t1 - 1e-6))
        return idx, (pts[idx] - t0).astype(np.float32)
    if not len(pts):
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    shown = float(np.median(np.diff(pts))) if len(pts) > 1 else 1.0 / fps  # how long the last frame is on screen
    end = min(t1, float(pts[-1]) + max(shown, 1e-6))
    grid = t0 + np.arange(int(np.ceil((t1 - t0) * fps - 1e-6))) / fps
    grid = grid[(grid >= pts[0] - 1e-6) & (grid < end - 1e-6)]
    idx = np.clip(np.searchsorted(pts, grid + 1e-6, side="right") - 1, 0, max(len(pts) - 1, 0))
    return idx, (grid - t0).astype(np.float32)
