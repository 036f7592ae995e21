"""Decode a clip once: video frames with their own time stamps, audio at 16 kHz mono, on one clock.

The clip clock starts at the container's earliest stream start (or the manifest's ``start``). A stream that
starts late or ends early is placed at its true time: audio is silence-padded and its real span recorded, so
the audio mask covers only real samples. PyAV (FFmpeg's libraries) probes the streams and decodes the audio
here, and the video in :mod:`extract.video`.

Audio is made mono by averaging its channels with equal weights, so the mix is never louder than its loudest
channel; what still exceeds full scale (a lossy codec's or the resampler's overshoot) is scaled down, never
clipped (:func:`limit`). FFmpeg's own mono downmix (a resampler asked for a mono layout, as decord's
``mono=True``) adds the channels with gains of up to 1 each for float output: ×1.41 for stereo, ×3.4 for 5.1,
which clips once the waveform is stored as int16.

No torch here: this module runs in worker processes.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmfuse.errors import MmfuseError
from shards.schema import SAMPLE_RATE

log = logging.getLogger(__name__)

# How audio is made mono, recorded in the feature set (it sets the stored waveform's level).
AUDIO_DOWNMIX = "equal-weight mean of the channels; a clip whose peak exceeds full scale is scaled down to it"


class DecodeError(MmfuseError, RuntimeError):
    """A media file, or one of its streams, cannot be decoded."""


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

    @property
    def start(self) -> float:
        starts = [s for s, ok in ((self.video_start, self.has_video), (self.audio_start, self.has_audio)) if ok]
        return min(starts) if starts else 0.0

    @property
    def end(self) -> float:
        ends = [e for e, ok in ((self.video_end, self.has_video), (self.audio_end, self.has_audio)) if ok]
        return max(ends) if ends else 0.0


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
            video = next((s for s in container.streams if s.type == "video"), None)
            audio = next((s for s in container.streams if s.type == "audio"), None)
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
    except av.FFmpegError as exc:
        raise DecodeError(f"unreadable container {path.name}: {exc}") from exc
    if video is None and audio is None:
        raise DecodeError(f"no audio or video stream in {path.name}")
    return Probe(video is not None, audio is not None, v0, v1, a0, a1, fps, w, h)


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


def clip_window(p: Probe, start: float | None, end: float | None) -> tuple[float, float]:
    """``(t0, t1)`` of the clip on the container clock: the manifest's cut, else every stream's extent."""
    t0 = p.start if start is None else start
    t1 = p.end if end is None else min(end, p.end) if p.end > 0 else end
    return t0, max(t0, t1)


# Audio decoding starts with a seek when the clip starts this far into the stream (a clip cut from a long file);
# nearer the start it decodes from the first sample, placed at the stream's start time as before.
AUDIO_SEEK_AFTER_S = 2.0
AUDIO_SEEK_MARGIN_S = 1.0  # decoded before the clip's start after a seek (see :func:`_audio_frames`)
# Resampled values (samples x channels) one decoded audio frame may become: 32 MB of float32. Real frames are far
# below it (FLAC's longest block, 65,535 samples of 8 channels at 8 kHz, is 1 M values at 16 kHz); a frame over it
# (a file declaring a rate of 1 Hz) is refused before it is resampled.
MAX_FRAME_VALUES = 1 << 23


def decode_audio(path: Path, p: Probe, t0: float, t1: float) -> tuple[np.ndarray, tuple[float, float]]:
    """Waveform ``(N,)`` float32 at 16 kHz on the clip clock, silence outside the real stream, and that span.

    ``N = round((t1 - t0) * 16000)``. The span ``(a, b)`` is in clip seconds: samples in ``[a, b)`` are real.
    Only the clip's window is decoded (from a seek when it starts well into the stream), and decoding stops once
    it reaches ``t1``: what a clip costs is its own length, whatever the file's.
    """
    n = int(round((t1 - t0) * SAMPLE_RATE))
    first, real = _read_audio(path, p.audio_start, t0, t1)
    wave = np.zeros(n, dtype=np.float32)
    offset = int(round((first - t0) * SAMPLE_RATE))  # where sample 0 of what was decoded lands
    lo, hi = max(0, offset), min(n, offset + len(real))
    if hi > lo:
        wave[lo:hi] = real[lo - offset : hi - offset]
    return wave, (lo / SAMPLE_RATE, max(lo, hi) / SAMPLE_RATE)


def _read_audio(path: Path, stream_start: float, t0: float, t1: float) -> tuple[float, np.ndarray]:
    """``(time of its first sample, samples)``: the audio stream from at or before ``t0`` to at least ``t1`` (or
    its end), at 16 kHz, float32, its channels averaged (the module docstring says why).

    Frames are resampled to packed float in their own channel layout (no rematrixing; FFmpeg's planar conversion
    crashes the process on 8 or more channels) and averaged at once, so a long multichannel clip costs no more
    memory than a mono one. Lossy codecs may still overshoot full scale slightly (see :func:`limit`).
    """
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise DecodeError(f"no audio stream in {path.name}")
            stream = container.streams.audio[0]
            first, frames = _audio_frames(container, stream, stream_start, t0)
            resampler = av.AudioResampler(format="flt", layout=stream.layout, rate=SAMPLE_RATE)
            window = _Window(int(np.floor((t0 - first) * SAMPLE_RATE)), int(np.ceil((t1 - first) * SAMPLE_RATE)))
            for frame in frames:
                _check_frame(frame, path)
                for out in resampler.resample(frame):
                    window.add(_channel_mean(out))
                if window.full:
                    break
            else:
                for out in resampler.resample(None):
                    window.add(_channel_mean(out))
    except av.FFmpegError as exc:
        raise DecodeError(f"audio stream of {path.name} cannot be decoded: {exc}") from exc
    if not window.seen:
        raise DecodeError(f"audio stream of {path.name} holds no samples")
    return first + window.dropped / SAMPLE_RATE, window.samples()


class _Window:
    """Resampled samples ``[lo, hi)`` of a stream, counted from its first: what comes before ``lo`` is dropped as
    it arrives, so memory holds the clip, not what precedes it in the file."""

    def __init__(self, lo: int, hi: int) -> None:
        self.lo, self.hi = max(lo, 0), max(hi, 0)
        self.chunks: list[np.ndarray] = []
        self.seen = self.dropped = 0  # samples received; samples dropped before ``lo``

    def add(self, values: np.ndarray) -> None:
        self.seen += len(values)
        if self.seen <= self.lo:
            self.dropped = self.seen
            return
        if self.dropped < self.lo:
            values = values[self.lo - (self.seen - len(values)) :]  # from the chunk's sample ``lo``
            self.dropped = self.lo
        self.chunks.append(values)

    @property
    def full(self) -> bool:
        return self.seen >= self.hi

    def samples(self) -> np.ndarray:
        kept = np.concatenate(self.chunks) if self.chunks else np.zeros(0, dtype=np.float32)
        return kept[: self.hi - self.dropped].astype(np.float32, copy=False)


def _audio_frames(container, stream, stream_start: float, t0: float):
    """``(time of the first sample, decoded frames)``: from the stream's start, or, when the clip starts over
    ``AUDIO_SEEK_AFTER_S`` into it, from a seek ``AUDIO_SEEK_MARGIN_S`` before ``t0``.

    After a seek the first samples are dropped up to the next instant where the stream's sample grid meets the
    16 kHz grid counted from the stream's start, so the resampled samples fall on the same instants as a decode
    from the start (a 48 kHz frame boundary is a third of a 16 kHz sample: placed at the nearest sample, a 440 Hz
    tone was off by 0.017). The margin also keeps the resampler's start-up transient out of the clip. A seek that
    lands after the margin, or frames without time stamps, fall back to decoding from the start."""
    if t0 - stream_start <= AUDIO_SEEK_AFTER_S or not stream.time_base:
        return stream_start, container.decode(stream)
    target = t0 - AUDIO_SEEK_MARGIN_S
    container.seek(int(target / stream.time_base), stream=stream, backward=True)
    frames = container.decode(stream)
    head = next(frames, None)
    if head is None or head.time is None or head.time > target or not head.sample_rate:
        container.seek(0, stream=stream, backward=True)
        return stream_start, container.decode(stream)
    rate = head.sample_rate
    period = rate // math.gcd(rate, SAMPLE_RATE)  # input samples between instants on both grids
    at = round((head.time - stream_start) * rate)
    drop = -at % period
    return stream_start + (at + drop) / rate, _skip_samples(itertools.chain([head], frames), drop)


def _skip_samples(frames, drop: int):
    """``frames`` as packed float at their own rate, without their first ``drop`` samples. (Converted first:
    PyAV reads and builds planar frames of 8 or more channels out of bounds.)"""
    import av

    packed = None
    for frame in frames:
        packed = packed or av.AudioResampler(format="flt", layout=frame.layout, rate=frame.sample_rate)
        for out in packed.resample(frame):
            if drop >= out.samples:
                drop -= out.samples
                continue
            if drop:
                values = out.to_ndarray()[:, drop * len(out.layout.channels) :]
                tail = av.AudioFrame.from_ndarray(np.ascontiguousarray(values), format="flt", layout=out.layout)
                tail.sample_rate, tail.time_base = out.sample_rate, out.time_base
                tail.pts = None if out.pts is None else out.pts + round(drop / out.sample_rate / out.time_base)
                out, drop = tail, 0
            yield out


def _check_frame(frame, path: Path) -> None:
    """Refuse a decoded frame that would resample to over ``MAX_FRAME_VALUES`` values, before it is resampled."""
    rate = frame.sample_rate or 0
    values = frame.samples * max(len(frame.layout.channels), 1) * SAMPLE_RATE / max(rate, 1)
    if rate <= 0 or values > MAX_FRAME_VALUES:
        raise DecodeError(
            f"audio stream of {path.name}: a frame of {frame.samples} samples at {rate} Hz would resample to "
            f"{values / 1e6:.0f} M values at {SAMPLE_RATE} Hz (at most {MAX_FRAME_VALUES / 1e6:.0f} M)"
        )


def _channel_mean(frame) -> np.ndarray:
    """A packed float frame (``(1, n * channels)`` as PyAV gives it) -> ``(n,)``: the equal-weight mean of its
    channels."""
    channels = len(frame.layout.channels)
    values = frame.to_ndarray().reshape(-1)
    return values if channels == 1 else values.reshape(-1, channels).mean(axis=1, dtype=np.float32)


def limit(wave: np.ndarray) -> tuple[np.ndarray, float | None]:
    """``wave`` scaled down to full scale when its peak exceeds it, and that peak (None when untouched).

    Scaling the whole clip, not clipping the samples over full scale, keeps the waveform's shape: the int16
    waveform stored never holds a run of clipped samples."""
    peak = float(np.abs(wave).max()) if wave.size else 0.0
    if peak <= 1.0:
        return wave, None
    return (wave / np.float32(peak)).astype(np.float32), peak


def frame_plan(pts: np.ndarray, t0: float, t1: float, fps: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Which decoded frames to use and their clip times.

    ``pts`` are the frames' own presentation times (container clock, seconds, increasing). With ``fps`` the
    clip is sampled on a regular grid ``t0 + k/fps`` and each grid point takes the frame on screen then (the
    last with ``pts <= t``), which is right for variable frame rate; without it every frame in ``[t0, t1)`` is
    kept. Returns ``(indices, times)`` with times relative to ``t0``.
    """
    if fps is None:
        idx = np.flatnonzero((pts >= t0 - 1e-6) & (pts < t1 - 1e-6))
        return idx, (pts[idx] - t0).astype(np.float32)
    grid = t0 + np.arange(int(np.ceil((t1 - t0) * fps - 1e-6))) / fps
    grid = grid[(grid >= pts[0] - 1e-6) & (grid < t1)] if len(pts) else grid[:0]
    idx = np.clip(np.searchsorted(pts, grid + 1e-6, side="right") - 1, 0, max(len(pts) - 1, 0))
    return idx, (grid - t0).astype(np.float32)
