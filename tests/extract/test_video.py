"""Video frames (extract.video), checked against decord and against a plain decode on the same files: the same
frame times, the same pixels, every frame the one its time says (where decord's is not), upright rotated video,
clips cut from a long file decoded only around their window, and a read-ahead that stays bounded."""

from __future__ import annotations

import threading
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from conftest import MEDIA, encode_all, rgb_frames

from extract.decode import DecodeError, clip_window, probe
from extract.video import FRAME_CHUNK, READ_AHEAD, VideoFrames

FACE = MEDIA / "faces" / "face_noface.mov"


def encode(path: Path, frames: int, *, rate: int = 25, size=(320, 180), rotation=None, start=0, steps=None, gop=12):
    """An H.264 file (B-frames, a key frame every ``gop``) made of the face clip's frames, each frame also
    stamped with its number in its top-left corner block so that a wrong frame cannot pass for the right one.
    ``steps`` (ms) makes the frame rate variable; ``start`` (s) delays the stream; ``rotation`` sets its
    display matrix (counterclockwise degrees)."""
    import av

    faces = rgb_frames(FACE, 8, width=size[0], height=size[1])

    def stamped():
        t = int(start * 1000)
        for i in range(frames):
            image = faces[i % len(faces)].copy()
            image[:16, :16] = (i * 37) % 256
            frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format="yuv420p")
            frame.pts, frame.time_base = t, Fraction(1, 1000)
            t += steps[i % len(steps)] if steps else 1000 // rate
            yield frame

    with av.open(str(path), "w") as dst:
        stream = dst.add_stream("libx264", rate=rate, options={"bf": "2", "g": str(gop), "qp": "10"})
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        stream.time_base = Fraction(1, 1000)
        if rotation is not None:
            stream.set_display_rotation(rotation)
        encode_all(dst, stream, stamped())
    return path


def ours(path: Path, start=None, end=None, fps=None, max_side=None) -> VideoFrames:
    p = probe(path)
    t0, t1 = clip_window(p, start, end)
    return VideoFrames(path, p, t0, t1, fps, max_side=max_side)


def decord_frames(path: Path, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """decord's frames at ``indices`` and its time stamps of every frame (seconds from the stream's start)."""
    decord = pytest.importorskip("decord")
    reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
    times = reader.get_frame_timestamp(range(len(reader)))[:, 0].astype(np.float64)
    return reader.get_batch(indices.tolist()).asnumpy(), times


def decode_all(frames: VideoFrames) -> np.ndarray:
    return np.concatenate([batch for batch, _ in frames.chunks()])


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("video")
    return {
        "h264": encode(root / "h264.mp4", 60),
        "vfr": encode(root / "vfr.mkv", 45, steps=[33, 67, 17]),
        "late": encode(root / "late.mkv", 30, start=1.5),
        "rot90": encode(root / "rot90.mp4", 20, rotation=90),
        "rot270": encode(root / "rot270.mp4", 20, rotation=-90),
        "long": encode(root / "long.mp4", 1000, gop=25),
    }


@pytest.mark.parametrize("name", ["h264", "vfr", "late", "rot90", "rot270"])
def test_frames_and_times_match_decord(media, name):
    """Bit-identical frames (same FFmpeg scaler, same rotation) at the same times: decord's times count from the
    stream's start, ours are on the container clock, so a stream starting at 1.5 s differs by exactly that."""
    path = media[name]
    frames = ours(path)
    theirs, their_times = decord_frames(path, frames.indices)
    p = probe(path)
    np.testing.assert_allclose(frames.times + p.start, their_times[frames.indices] + p.video_start, atol=1e-6)
    assert decode_all(frames).tobytes() == theirs.tobytes()
    assert len(frames) == len(their_times)


def test_bundled_hevc_clip_matches_decord():
    frames = ours(FACE)
    theirs, times = decord_frames(FACE, frames.indices)
    assert len(frames) == 169 and np.allclose(frames.times, times, atol=1e-6)
    assert decode_all(frames).tobytes() == theirs.tobytes()


def sequential(path: Path) -> np.ndarray:
    """Every frame, decoded in order from the file's start with no seek at all, through the same conversion."""
    import av

    from extract.video import _graph

    with av.open(str(path)) as container:
        out, graph = [], None
        for frame in container.decode(video=0):
            graph = graph or _graph(frame, 0, (frame.width, frame.height))
            graph.vpush(frame)
            out.append(graph.vpull().to_ndarray())
    return np.stack(out)


@pytest.mark.parametrize("name", ["bbaf2n.mpg", "id2_vcd_swwp2s.mpg", "pwij3p.mpg"])
def test_mpeg_program_stream_frames_are_in_order(name):
    """MPEG program streams seek by scanning time stamps and can land a group of pictures late: a reader that
    seeks to the start and counts frames from there (decord: on these clips its frame i is frame i + 12, 0.48 s
    late) misplaces every frame. Ours are the frames a plain decode from the start gives, in order."""
    path = MEDIA / "grid" / name
    frames = ours(path)
    assert len(frames) == 75
    assert decode_all(frames).tobytes() == sequential(path)[frames.indices].tobytes()


def stamped_mpeg1(path: Path, frames: int = 60) -> Path:
    """An MPEG-1 program stream (25 fps; the muxer starts it at 0.54 s) whose frame k is flat grey with a corner
    block of level 4k, its number. Nearly all frames are alike, so the file is tiny (8 KB for 60 frames)."""
    import av

    def numbered():
        for i in range(frames):
            image = np.full((192, 320, 3), 90, np.uint8)
            image[:32, :32] = i * 4
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, 25)
            yield frame

    with av.open(str(path), "w") as dst:
        stream = dst.add_stream("mpeg1video", rate=25)
        stream.width, stream.height, stream.pix_fmt, stream.bit_rate = 320, 192, "yuv420p", 2_000_000
        encode_all(dst, stream, numbered())
    return path


def test_stamped_mpeg1_frames_match_their_times(tmp_path):
    """The frame handed out at clip time t is frame number round(t x 25), read from its corner block."""
    frames = ours(stamped_mpeg1(tmp_path / "stamped.mpg"))
    stamps = np.rint(decode_all(frames)[:, 4:28, 4:28, 1].mean(axis=(1, 2)) / 4).astype(int)
    assert stamps.tolist() == list(range(60)) == np.rint(frames.times * 25).astype(int).tolist()


def test_duration_guessed_from_the_bit_rate_cuts_no_frame(tmp_path):
    """FFmpeg guesses this tiny file's duration from its size and bit rate (1.78 s for 2.4 s of frames): the
    probe reads the packets' own times instead, so a whole-file clip keeps all 60 frames. The bundled GRID
    clips, whose guesses are within a frame of their packets, keep theirs."""
    import av

    path = stamped_mpeg1(tmp_path / "tiny.mpg")
    with av.open(str(path)) as container:
        assert container.duration / 1e6 == pytest.approx(path.stat().st_size * 8 / container.bit_rate, abs=1e-3)
        assert container.duration / 1e6 < 2.0
    p = probe(path)
    assert (p.video_start, p.video_end) == pytest.approx((0.54, 2.94))
    assert len(ours(path)) == 60
    grid = probe(MEDIA / "grid" / "bbaf2n.mpg")
    assert (grid.start, grid.end) == pytest.approx((0.0, 2.98))


def test_rotated_video_is_upright_with_displayed_size(media):
    """Stored landscape, shown portrait: frames come turned by the display matrix, and ``width``/``height``
    (the pixels landmarks are placed in) are the displayed ones."""
    upright = decode_all(ours(media["h264"]))[:20]
    for name, k in (("rot90", 1), ("rot270", -1)):
        frames = ours(media[name])
        assert (frames.rotation, frames.width, frames.height) == ({1: 90, -1: 270}[k], 180, 320)
        images = decode_all(frames)
        assert images.shape == (20, 320, 180, 3)
        assert np.abs(images.astype(int) - np.rot90(upright, k, axes=(1, 2)).astype(int)).mean() < 2
        assert np.abs(images.astype(int) - np.rot90(upright, -k, axes=(1, 2)).astype(int)).mean() > 20


def test_clip_cut_from_a_long_file_decodes_its_window_only(media):
    """Frames 800-824 of 1,000 (key frames every 25): the index is read from a seek, from the key frame at the
    window's start (frame 800) to a second past its end; decoding starts at that key frame and stops at the
    window's end, and the frames are decord's."""
    path = media["long"]
    frames = ours(path, start=32.0, end=33.0)
    assert not frames._index.whole and frames._index.times[0] == pytest.approx(32.0)
    assert len(frames._index.pts) <= 25 + 25 + 4  # the window, the margin, the reorder delay
    assert frames.indices.tolist() == list(range(25))
    np.testing.assert_allclose(frames.times, np.arange(25) / 25, atol=1e-6)
    images = decode_all(frames)
    assert frames.decoded <= 25 + 25 + 4  # at most a group of pictures before, the window, the reorder delay
    theirs, _ = decord_frames(path, frames.indices + 800)
    assert images.tobytes() == theirs.tobytes()


def test_read_ahead_is_bounded_and_stops_with_the_reader(media):
    """Reading one chunk of a 1,000-frame file and then waiting: the read-ahead thread decodes at most
    ``READ_AHEAD`` chunks beyond the one it is holding, then waits (decord's thread decoded on to the end of the
    file). Closing the reader early stops and joins the thread before the file is closed."""
    frames = ours(media["long"])
    chunks = frames.chunks()
    batch, times = next(chunks)
    assert len(batch) == FRAME_CHUNK and times.tolist() == pytest.approx([0.0, 0.04, 0.08, 0.12])
    deadline = time.monotonic() + 20  # the thread has started on the next chunk (however loaded the machine) ...
    while frames.decoded <= FRAME_CHUNK and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.5)  # ... and has had time to run on, had it no bound
    assert FRAME_CHUNK < frames.decoded <= (READ_AHEAD + 2) * FRAME_CHUNK
    assert [t.name for t in threading.enumerate()].count("decode long.mp4") == 1
    frames.close()
    assert "decode long.mp4" not in [t.name for t in threading.enumerate()]
    with pytest.raises(StopIteration):
        next(chunks)


def test_without_read_ahead_only_what_is_asked_is_decoded(media):
    frames = ours(media["long"])
    chunks = frames.chunks(ahead=0)
    next(chunks)
    time.sleep(0.2)
    assert frames.decoded == FRAME_CHUNK
    chunks.close()


def test_a_decoding_error_reaches_the_reader(media, monkeypatch):
    """An error in the read-ahead thread is raised where the frames are read, not lost in the thread."""
    frames = ours(media["long"])

    def broken(self):
        yield np.zeros((4, 4, 3), np.uint8)
        raise DecodeError("decoding frames of long.mp4 failed at 0.04 s: simulated")

    monkeypatch.setattr(VideoFrames, "_images", broken)
    with pytest.raises(DecodeError, match="failed at 0.04 s: simulated"):
        list(frames.chunks(size=1))


def test_seek_that_lands_late_falls_back_to_the_start(media, monkeypatch):
    """A container whose seeks land past the wanted frame (no exact index) is indexed and decoded from its start
    instead: the same frames, only slower."""
    import av

    path = media["long"]
    p = probe(path)
    expected = decode_all(ours(path, start=4.0, end=4.4))
    real_open = av.open

    class LateSeek:
        def __init__(self, container):
            self._c = container

        def __getattr__(self, name):
            return getattr(self._c, name)

        def seek(self, offset, **kw):
            if offset > 0:  # 2 s (two groups of pictures) too far
                offset += int(2 / float(kw["stream"].time_base))
            return self._c.seek(offset, **kw)

    monkeypatch.setattr(av, "open", lambda *a, **kw: LateSeek(real_open(*a, **kw)))
    frames = VideoFrames(path, p, 4.0, 4.4, None, max_side=None)
    assert decode_all(frames).tobytes() == expected.tobytes()
    assert frames.decoded > 100  # from the file's start


def test_fps_grid_repeats_and_skips_frames_by_time(media):
    """At 50 fps on a 25 fps file every frame is used twice; at 10 fps, the frame on screen at each grid time."""
    path = media["h264"]
    full = decode_all(ours(path))
    double = ours(path, fps=50)
    assert double.indices.tolist()[:6] == [0, 0, 1, 1, 2, 2]
    assert decode_all(double).tobytes() == full[double.indices].tobytes()
    sparse = ours(path, fps=10)
    assert sparse.indices.tolist()[:4] == [0, 2, 5, 7]
    assert decode_all(sparse).tobytes() == full[sparse.indices].tobytes()
