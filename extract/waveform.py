"""A clip's audio at 16 kHz mono, decoded from its window of the file only.

Audio is made mono by averaging its channels with equal weights, so the mix is never louder than its loudest
channel; what still exceeds full scale (a lossy codec's or the resampler's overshoot) is scaled down, never
clipped (:func:`limit`). FFmpeg's own mono downmix (a resampler asked for a mono layout, as decord's
``mono=True``) adds the channels with gains of up to 1 each for float output: ×1.41 for stereo, ×3.4 for 5.1,
which clips once the waveform is stored as int16. (``extract.decode.AUDIO_DOWNMIX`` says so in the feature set.)

No torch here: this module runs in worker processes.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np

from extract.decode import DecodeError, Probe, Skipped, decode_packets, pick_stream
from shards.schema import SAMPLE_RATE

# Audio decoding starts with a seek when the clip starts this far into the stream (a clip cut from a long file);
# nearer the start it decodes from the first sample, placed at the stream's start time.
AUDIO_SEEK_AFTER_S = 2.0
AUDIO_SEEK_MARGIN_S = 1.0  # decoded before the clip's start after a seek (see :func:`_audio_frames`)
# Resampled values (samples x channels) one decoded audio frame may become: 32 MB of float32. Real frames are far
# below it (FLAC's longest block, 65,535 samples of 8 channels at 8 kHz, is 1 M values at 16 kHz); a frame over it
# (a file declaring a rate of 1 Hz) is refused before it is resampled.
MAX_FRAME_VALUES = 1 << 23


def decode_audio(
    path: Path, p: Probe, t0: float, t1: float, skipped: Skipped | None = None
) -> tuple[np.ndarray, tuple[float, float]]:
    """Waveform ``(N,)`` float32 at 16 kHz on the clip clock, silence outside the real stream, and that span.

    ``N = round((t1 - t0) * 16000)``. The span ``(a, b)`` is in clip seconds: samples in ``[a, b)`` are real.
    Only the clip's window is decoded (from a seek when it starts well into the stream), and decoding stops once
    it reaches ``t1``: what a clip costs is its own length, whatever the file's. Packets passed over as damaged
    (:func:`decode_packets`) are counted in ``skipped``.
    """
    n = int(round((t1 - t0) * SAMPLE_RATE))
    first, real = _read_audio(path, p.audio_start, t0, t1, Skipped() if skipped is None else skipped)
    wave = np.zeros(n, dtype=np.float32)
    offset = int(round((first - t0) * SAMPLE_RATE))  # where sample 0 of what was decoded lands
    lo, hi = max(0, offset), min(n, offset + len(real))
    if hi > lo:
        wave[lo:hi] = real[lo - offset : hi - offset]
    return wave, (lo / SAMPLE_RATE, max(lo, hi) / SAMPLE_RATE)


def _read_audio(path: Path, stream_start: float, t0: float, t1: float, skipped: Skipped) -> tuple[float, np.ndarray]:
    """``(time of its first sample, samples)``: the audio stream from at or before ``t0`` to at least ``t1`` (or
    its end), at 16 kHz, float32, its channels averaged (the module docstring says why).

    Frames are resampled to packed float in their own channel layout (no rematrixing; FFmpeg's planar conversion
    crashes the process on 8 or more channels) and averaged at once, so a long multichannel clip costs no more
    memory than a mono one. Lossy codecs may still overshoot full scale slightly (see :func:`limit`).
    """
    import av

    try:
        with av.open(str(path)) as container:
            stream = pick_stream(container, "audio")
            if stream is None:
                raise DecodeError(f"no audio stream in {path.name}")
            first, frames = _audio_frames(container, stream, stream_start, t0, skipped)
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


def _audio_frames(container, stream, stream_start: float, t0: float, skipped: Skipped):
    """``(time of the first sample, decoded frames)``: from the stream's start, or, when the clip starts over
    ``AUDIO_SEEK_AFTER_S`` into it, from a seek ``AUDIO_SEEK_MARGIN_S`` before ``t0``.

    After a seek the first samples are dropped up to the next instant where the stream's sample grid meets the
    16 kHz grid counted from the stream's start, so the resampled samples fall on the same instants as a decode
    from the start (a 48 kHz frame boundary is a third of a 16 kHz sample: placed at the nearest sample, a 440 Hz
    tone was off by 0.017). The margin also keeps the resampler's start-up transient out of the clip. A seek that
    lands after the margin, or frames without time stamps, fall back to decoding from the start."""
    if t0 - stream_start <= AUDIO_SEEK_AFTER_S or not stream.time_base:
        return stream_start, decode_packets(container, stream, skipped)
    target = t0 - AUDIO_SEEK_MARGIN_S
    container.seek(int(target / stream.time_base), stream=stream, backward=True)
    frames = decode_packets(container, stream, skipped)
    head = next(frames, None)
    if head is None or head.time is None or head.time > target or not head.sample_rate:
        container.seek(0, stream=stream, backward=True)
        return stream_start, decode_packets(container, stream, skipped)
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
