"""Audio is decoded for the clip's window only: memory and time follow the clip, not the file it is cut from,
and a window reached by a seek holds exactly the samples a decode from the start would place there."""

from __future__ import annotations

import tracemalloc
import wave
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from extract import waveform
from extract.decode import DecodeError, probe
from extract.waveform import decode_audio


def write_wav(path: Path, samples: np.ndarray, rate: int) -> Path:
    """``samples`` (n, channels) int16 as a PCM WAV at ``rate`` Hz."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(samples.shape[1]), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes(samples.astype("<i2").tobytes())
    return path


def write_aac(path: Path, rate: int, layout: str, seconds: float) -> Path:
    """A 440 Hz tone at 0.3 of full scale in every channel, AAC in MP4 (its time base: one sample)."""
    import av

    channels = len(av.AudioLayout(layout).channels)
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(int(rate * seconds)) / rate)).astype(np.float32)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("aac", rate=rate)
        stream.layout = layout
        for lo in range(0, len(tone), 1024):  # packed input: PyAV builds planar frames of 8+ channels wrongly
            block = np.repeat(tone[lo : lo + 1024], channels)[None]
            frame = av.AudioFrame.from_ndarray(block, format="flt", layout=layout)
            frame.sample_rate, frame.pts, frame.time_base = rate, lo, Fraction(1, rate)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def test_a_clip_cut_from_a_long_file_holds_its_own_samples(tmp_path):
    raw = (np.random.default_rng(0).standard_normal((16000 * 120, 1)) * 3000).astype(np.int16)
    path = write_wav(tmp_path / "long.wav", raw, 16000)
    p = probe(path)
    for t0 in (0.5, 3.25, 100.0):
        wave_, span = decode_audio(path, p, t0, t0 + 2)
        at = int(t0 * 16000)
        assert span == (0.0, 2.0)
        np.testing.assert_array_equal(wave_, raw[at : at + 32000, 0] / np.float32(32768))


def test_a_file_declaring_hours_costs_only_the_clip(tmp_path):
    """A 28 KB WAV at 1 Hz declares 4 hours: a 0-10 s clip allocates 10 s at 16 kHz (0.6 MB), not the 4 hours the
    whole stream resamples to (921 MB of float32; 2.7 GB peak before)."""
    path = write_wav(tmp_path / "hz1.wav", np.full((14400, 1), 1000, dtype=np.int16), 1)
    p = probe(path)
    assert p.audio_end == pytest.approx(14400.0)
    tracemalloc.start()
    try:
        wave_, span = decode_audio(path, p, 0.0, 10.0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(wave_) == 160_000 and span == (0.0, 10.0)
    assert peak < 8 << 20, peak


@pytest.mark.parametrize(("rate", "layout"), [(48000, "stereo"), (44100, "7.1")])
def test_a_window_reached_by_a_seek_equals_the_decode_from_the_start(tmp_path, rate, layout):
    """A 48 kHz frame boundary is a third of a 16 kHz sample: placed at the nearest sample, a seek's window was
    off by up to 0.017 from the decode from the start. Samples are dropped to where both grids meet."""
    path = write_aac(tmp_path / "tone.mp4", rate, layout, 24.0)
    p = probe(path)
    full, _ = decode_audio(path, p, 0.0, 24.0)
    for t0 in (7.77, 20.0):
        window, span = decode_audio(path, p, t0, t0 + 2)
        at = int(round(t0 * 16000))
        assert span == (0.0, 2.0)
        assert np.abs(window - full[at : at + 32000]).max() < 1e-5
        times = t0 + np.arange(32000) / 16000  # and it is the tone at its time (lossy AAC: within 1e-2)
        level = 0.3 * (7 / 8 if layout == "7.1" else 1)  # AAC's LFE channel carries nothing at 440 Hz
        assert np.abs(window[800:] - level * np.sin(2 * np.pi * 440 * times[800:])).max() < 1e-2


def test_a_frame_that_would_resample_past_the_cap_is_refused(tmp_path, monkeypatch):
    path = write_wav(tmp_path / "a.wav", np.zeros((8000, 2), dtype=np.int16), 8000)
    monkeypatch.setattr(waveform, "MAX_FRAME_VALUES", 1000)
    with pytest.raises(DecodeError, match=r"a frame of \d+ samples at 8000 Hz would resample to"):
        decode_audio(path, probe(path), 0.0, 1.0)
