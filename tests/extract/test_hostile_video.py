"""Video files that lie about themselves: frames are the real ones at their real times, or the stream is refused
with the reason; what is indexed and decoded is bounded by the clip, not by what the file declares."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from extract import decode, video
from extract.decode import DecodeError, clip_window, frame_plan, probe
from extract.video import VideoFrames


def shade_frames(n: int, size=(64, 48), fmt: str = "yuv420p", rate: int = 25) -> list:
    """``n`` flat frames, frame ``i`` at grey level ``(40 + 4 i) % 256``, stamped ``i`` at ``1/rate``."""
    import av

    frames = []
    for i in range(n):
        image = np.full((size[1], size[0], 3), (40 + 4 * i) % 256, dtype=np.uint8)
        frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format=fmt)
        frame.pts, frame.time_base = i, Fraction(1, rate)
        frames.append(frame)
    return frames


def add_video(out, codec: str, n: int, size=(64, 48), rate: int = 25, fmt: str = "yuv420p", **options):
    stream = out.add_stream(codec, rate=rate, options=options)
    stream.width, stream.height, stream.pix_fmt = size[0], size[1], fmt
    stream.time_base = Fraction(1, rate)
    return stream, [p for f in shade_frames(n, size, fmt, rate) for p in stream.encode(f)] + list(stream.encode(None))


def grey_levels(frames: VideoFrames) -> list[int]:
    return [int(round(float(image.mean()))) for batch, _ in frames.chunks() for image in batch]


def frames_of(path: Path, fps: float | None = None) -> VideoFrames:
    p = probe(path)
    t0, t1 = clip_window(p, None, None)
    return VideoFrames(path, p, t0, t1, fps)


def test_the_stream_a_player_would_play_is_decoded(tmp_path):
    """Stream 0 is a one-frame picture (or holds no frame at all), stream 1 the 50-frame video: stream 1 is
    probed and decoded, and the probe says the file holds two video streams."""
    import av

    for first in (1, 0):
        path = tmp_path / f"two_{first}.mkv"
        with av.open(str(path), "w") as out:
            thumb, thumb_packets = add_video(out, "mjpeg", first, fmt="yuvj420p")
            main, main_packets = add_video(out, "mjpeg", 50, size=(80, 60), fmt="yuvj420p")
            for packet in thumb_packets:
                out.mux(packet)
            for packet in main_packets:
                out.mux(packet)
        p = probe(path)
        assert (p.video_stream, p.video_streams, p.width, p.height) == (1, 2, 80, 60)
        frames = frames_of(path)
        assert len(frames) == 50 and frames.decoded_size == (80, 60)


def test_a_truncated_file_is_sampled_up_to_its_last_real_frame(tmp_path):
    """The moov of a cut MP4 lists 100 frames (4 s) but the file holds about half: the 25 fps grid stops where the
    last real frame leaves the screen, every frame of the plan is a distinct decoded frame, and none repeats."""
    import av

    path = tmp_path / "whole.mp4"
    with av.open(str(path), "w", options={"movflags": "faststart"}) as out:  # the index (moov) before the data
        _, packets = add_video(out, "mjpeg", 100, fmt="yuvj420p")
        for packet in packets:
            out.mux(packet)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    p = probe(cut)
    assert p.video_end == pytest.approx(4.0)  # what the container claims
    frames = frames_of(cut, fps=25.0)
    levels = grey_levels(frames)
    assert 30 < len(levels) < 70 and len(set(levels)) == len(levels)
    assert frames.times[-1] == pytest.approx((len(levels) - 1) / 25)


def test_the_frame_grid_stops_after_the_last_frame():
    pts = np.arange(75) / 25  # 3 s of frames in a container claiming 120 s
    idx, times = frame_plan(pts, 0.0, 120.0, 25.0)
    assert len(idx) == 75 and idx.tolist() == list(range(75)) and times[-1] == pytest.approx(74 / 25)
    idx, _ = frame_plan(pts, 0.0, 120.0, 30.0)
    assert len(idx) == 90 and idx[-1] == 74  # a finer grid holds the last frame while it is on screen, no longer


def test_frames_whose_times_go_back_are_refused(tmp_path):
    """An intra-only stream (MJPEG) whose 49 packets carry shuffled time stamps: the decoder returns them in
    packet order; placed as they came, they gave 30 distinct frames. The stream is refused with the reason."""
    import av

    order = np.random.default_rng(0).permutation(49)
    path = tmp_path / "shuffled.mkv"
    with av.open(str(path), "w") as out:
        _, packets = add_video(out, "mjpeg", 49, fmt="yuvj420p")
        for i, (packet, stamp) in enumerate(zip(packets, order, strict=True)):
            packet.pts, packet.dts = int(stamp) + 49, i  # decoding times in order, presentation times shuffled
            out.mux(packet)
    with pytest.raises(DecodeError, match=r"frame time stamps go back, from \d+\.\d+ s to \d+\.\d+ s"):
        grey_levels(frames_of(path))


def test_frames_over_the_pixel_cap_are_refused_before_decoding(tmp_path, monkeypatch):
    """The probe refuses the file (nothing else opens it: opening it again would decode a frame to probe it); the
    decoder refuses a frame over the cap that the header understated."""
    import av

    path = tmp_path / "big.mkv"
    with av.open(str(path), "w") as out:
        _, packets = add_video(out, "mjpeg", 3, size=(320, 240), fmt="yuvj420p")
        for packet in packets:
            out.mux(packet)
    monkeypatch.setattr(decode, "MAX_PIXELS", 300 * 200)
    with pytest.raises(DecodeError, match=r"frames of 320x240 pixels in big.mkv, over the 60,000 decoded at most"):
        probe(path)
    monkeypatch.undo()
    p = probe(path)
    frames = VideoFrames(path, p, *clip_window(p, None, None), None)
    monkeypatch.setattr(video, "MAX_PIXELS", 300 * 200)
    with pytest.raises(DecodeError, match=r"a frame of big.mkv is 320x240 pixels, over the 60,000 decoded at most"):
        grey_levels(frames)


def test_a_stream_of_more_packets_than_a_clip_can_hold_is_refused(tmp_path, monkeypatch):
    """At most ``MAX_PACKET_RATE`` packets per second of clip (plus ``INDEX_SLACK_S`` seconds' worth) are indexed,
    8 bytes each; past that the stream is refused (10 M tiny frames took 2.3 GB and 6 minutes)."""
    import av

    path = tmp_path / "dense.mkv"
    with av.open(str(path), "w") as out:
        _, packets = add_video(out, "mjpeg", 200, size=(16, 16), rate=200, fmt="yuvj420p")
        for packet in packets:
            out.mux(packet)
    monkeypatch.setattr(video, "MAX_PACKET_RATE", 50)
    monkeypatch.setattr(video, "INDEX_SLACK_S", 0.0)
    with pytest.raises(DecodeError, match=r"over 50 video packets for a 1 s clip \(50/s at most\)"):
        frames_of(path)


def test_damaged_packets_are_passed_over_and_counted(tmp_path):
    """3 KB of noise in the middle of a 50-frame MP4: the 5 packets it hit are passed over and counted (with the
    first one's time and reason, which extraction records in the video status), and the rest of the stream is
    decoded; one bad packet failed the whole stream before. A frame whose packet was lost is shown as the next."""
    import av

    path = tmp_path / "whole.mp4"
    with av.open(str(path), "w") as out:
        _, packets = add_video(out, "mjpeg", 50, fmt="yuvj420p")
        for packet in packets:
            out.mux(packet)
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 3000] = np.random.default_rng(0).bytes(3000)
    noisy = tmp_path / "noisy.mp4"
    noisy.write_bytes(bytes(data))
    frames = frames_of(noisy)
    levels = grey_levels(frames)
    assert len(levels) == 50 and len(set(levels)) == 45
    assert frames.skipped.count == 5 and frames.skipped.first.startswith("at 1.00 s: [Errno")
