"""Video frames of one clip, decoded with PyAV (FFmpeg's libraries) a bounded distance ahead of their reader.

A thread of the worker decodes at most ``READ_AHEAD`` chunks ahead of the caller (FaceMesh), so decoding overlaps
FaceMesh while what a clip holds in memory stays a few chunks, whatever the file's length; it stops after the
clip's last frame. A clip cut from a long file (the manifest's ``start``/``end``) decodes from the key frame
before its start to its end, not the rest of the file. (decord, used before, decoded on to the end of the file
in a thread of its own: 1.5 GiB of a 40 s 960×540 file within 3.5 s of reading its first 4 frames.)

Frame times are the packets' presentation times in presentation order, read once per clip from the container
without decoding, for the clip's window only (:func:`read_index`); frame ``i`` is the ``i``-th of them. A
decoded frame is matched to its index by its own time stamp, so a seek that lands early costs time, never a
wrong frame (one that lands late is not used). Frames go through one FFmpeg filter graph: turned upright by the
stream's display matrix (phones store portrait video as landscape frames with a rotation), scaled to
``decoded_size``, converted to RGB; frames the clip does not use skip the graph.

No torch here: this module runs in worker processes.
"""

from __future__ import annotations

import itertools
import math
import queue
import threading
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from extract.decode import MAX_PIXELS, DecodeError, Probe, Skipped, decode_packets, frame_plan

NATIVE_FPS_CAP = 30.0
# Frames handed out per chunk: what FaceMesh holds at once besides the frame it works on.
FRAME_CHUNK = 4
# Frames larger than this on their long side are decoded scaled down to it (FaceMesh needs no more: it finds
# faces in a 128-pixel image and places landmarks in a 192-pixel crop), so a chunk of FRAME_CHUNK frames
# holds at most 4 x 1280 x 720 x 3 bytes (11 MB) whatever the video's resolution.
MAX_FRAME_SIDE = 1280
# Decoder threads per video: one. Decode workers already run one per core beside the encoders; a thread per core
# in each decoder competes with the encoder process for its core.
VIDEO_DECODE_THREADS = 1
# Chunks decoded ahead of FaceMesh, by a thread of the worker: decoding then overlaps FaceMesh, as decord's
# thread did, while what waits stays bounded (decord's read-ahead was not: it decoded on to the end of the file).
READ_AHEAD = 1
# Filters that turn a frame upright, by the counterclockwise rotation its display matrix asks for.
_UPRIGHT = {0: [], 90: [("transpose", "cclock")], 180: [("hflip", ""), ("vflip", "")], 270: [("transpose", "clock")]}


@dataclass(frozen=True)
class FrameIndex:
    """The video stream's frames as the container lists them, in presentation order.

    ``pts`` are in stream time-base units (int64), ``times`` the same in seconds on the container clock, and
    ``keys`` the positions (into ``pts``) of the key frames, where decoding can start. ``whole`` is False when the
    index starts at a key frame after the stream's first packet (a clip cut from a long file)."""

    pts: np.ndarray
    times: np.ndarray
    keys: np.ndarray
    whole: bool = True


# The index of a clip is read from a seek when the clip starts this far into the stream, and ends this far past
# the clip's end in decoding time (frames reordered for B-frames arrive within it).
INDEX_SEEK_AFTER_S = 2.0
INDEX_MARGIN_S = 1.0
# Packets indexed per second of clip, plus INDEX_SLACK_S seconds' worth for the group of pictures before it: a
# phone's slow motion is 960 frames per second. A stream over it (a 60 MB file of 10 M tiny frames took 2.3 GB
# and 6 minutes to index) is refused after at most that many packets, 8 bytes each.
MAX_PACKET_RATE = 1000
INDEX_SLACK_S = 600.0


def read_index(container: Any, stream: Any, t0: float = 0.0, t1: float = math.inf) -> FrameIndex:
    """The packets of ``stream`` (demuxed, not decoded) from the last key frame at or before ``t0`` to
    ``INDEX_MARGIN_S`` past ``t1``: their time stamps, and which are key frames. Raises :class:`DecodeError` past
    ``MAX_PACKET_RATE`` packets per second of the window.

    A packet without a presentation time takes its decoding time; one with neither, or one the demuxer marks
    corrupt, is left out. When the clip starts over ``INDEX_SEEK_AFTER_S`` into the stream, demuxing starts from
    a seek (kept when it lands on a key frame at or before ``t0``); packets before the last key frame at or before
    ``t0`` are dropped as they come."""
    tb = float(stream.time_base) if stream.time_base else 0.0
    start = float(stream.start_time * tb) if stream.start_time is not None else 0.0
    limit = int((min(t1, 1e9) - t0 + INDEX_SLACK_S) * MAX_PACKET_RATE)
    first, stop = (t0 / tb, (t1 + INDEX_MARGIN_S) / tb) if tb else (math.inf, math.inf)
    packets = container.demux(stream)
    whole = True
    if tb and t0 - start > INDEX_SEEK_AFTER_S:
        container.seek(int(first), stream=stream, backward=True)
        packets = container.demux(stream)
        head = next(packets, None)
        stamp = None if head is None else head.pts if head.pts is not None else head.dts
        if head is not None and head.is_keyframe and stamp is not None and stamp <= first:
            packets, whole = itertools.chain([head], packets), False
        else:
            container.seek(0, stream=stream, backward=True)
            packets = container.demux(stream)
    stamps, keys = array("q"), array("q")
    for packet in packets:
        ts = packet.pts if packet.pts is not None else packet.dts
        if ts is None or packet.is_corrupt:  # a truncated file's last, short packet is not a frame
            continue
        if packet.is_keyframe:
            if ts <= first and len(stamps):  # a later start: what came before it is not needed
                del stamps[:], keys[:]
                whole = False
            keys.append(len(stamps))
        stamps.append(ts)
        if len(stamps) > limit:
            seconds = min(t1, 1e9) - t0
            raise DecodeError(f"over {limit:,} video packets for a {seconds:.0f} s clip ({MAX_PACKET_RATE}/s at most)")
        if (packet.dts if packet.dts is not None else ts) > stop:
            break
    order = np.argsort(np.frombuffer(stamps, dtype=np.int64), kind="stable")
    pts = np.frombuffer(stamps, dtype=np.int64)[order]
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    key_at = np.sort(rank[np.frombuffer(keys, dtype=np.int64)]) if len(keys) else np.zeros(0, dtype=np.int64)
    return FrameIndex(pts, pts.astype(np.float64) * tb, key_at, whole)


class VideoFrames:
    """Frames of one clip, handed out in chunks of ``FRAME_CHUNK`` (the module docstring says how).

    ``indices`` (non-decreasing positions into the stream's frames) and ``times`` (seconds from the clip's
    start) are the clip's frame plan; a caller may narrow both before calling :meth:`chunks`. ``width`` and
    ``height`` are the video's displayed size (after its rotation), the pixel space landmarks are placed in.
    Frames over ``max_side`` pixels on their long side are decoded scaled down to it (aspect kept;
    ``decoded_size`` is their ``(width, height)``); ``max_side=None`` decodes at full size."""

    def __init__(
        self, path: Path, p: Probe, t0: float, t1: float, fps: float | None, max_side: int | None = MAX_FRAME_SIDE
    ) -> None:
        import av

        self.path = path
        self.decoded = 0  # frames the decoder has produced so far, used or not
        self.skipped = Skipped()  # damaged packets passed over (:func:`extract.decode.decode_packets`)
        self._frames: Iterator[tuple[int, Any]] | None = None  # (index, frame) from the clip's first key frame
        first = None  # the first decoded frame, read at once for the rotation it carries
        self._container: Any = None
        self._ahead: Any = None  # the read-ahead generator of :meth:`chunks`, while one runs
        self._stream_index = p.video_stream
        try:
            self._open()
            self._index = read_index(self._container, self._stream, t0, t1)
            if not len(self._index.pts):
                raise DecodeError("the stream holds no frames")
            self._plan(p, t0, t1, fps)
            if len(self.indices):
                frames = self._decoded(int(self.indices[0]))
                first = next(frames, None)
                if first is None:
                    passed = f" ({self.skipped.count} damaged packets passed over, the first {self.skipped.first})"
                    raise DecodeError("no frame decodes" + (passed if self.skipped.count else ""))
                self._frames = itertools.chain([first], frames)
        except (av.FFmpegError, IndexError, DecodeError) as exc:
            if self._container is not None:
                self._container.close()
            raise DecodeError(f"video stream of {path.name} cannot be decoded: {exc}") from exc
        self.rotation = _rotation(first[1]) if first else 0
        w, h = (p.height, p.width) if self.rotation in (90, 270) else (p.width, p.height)
        self.width, self.height = w, h
        self.decoded_size = _scaled_size(w, h, max_side)

    def _plan(self, p: Probe, t0: float, t1: float, fps: float | None) -> None:
        """``fps`` (native when None, capped at ``NATIVE_FPS_CAP``), ``indices`` and ``times`` of the clip."""
        pts = self._index.times
        native = p.fps or (1.0 / float(np.median(np.diff(pts))) if len(pts) > 1 else 0.0)
        if fps is None and native > NATIVE_FPS_CAP:
            fps = NATIVE_FPS_CAP
        self.fps = fps or native
        self.indices, self.times = frame_plan(pts, t0, t1, fps)

    def __len__(self) -> int:
        return len(self.indices)

    def chunks(self, size: int = FRAME_CHUNK, ahead: int = READ_AHEAD) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(frames (n, h, w, 3) uint8 RGB, times (n,))``, ``(w, h)`` being :attr:`decoded_size`.

        With ``ahead`` > 0 a thread decodes up to that many chunks ahead of the caller (0: decode in the
        caller's thread, only when asked). Decoding stops after the last frame of the plan, or when the caller
        stops early, and the file is closed."""
        if not len(self.indices):
            return
        batches = self._batches(size)
        if ahead > 0:
            batches = self._ahead = _read_ahead(batches, ahead, f"decode {self.path.name}")
        try:
            yield from batches
        finally:
            self.close()

    def _batches(self, size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        batch: list[np.ndarray] = []
        for lo, image in enumerate(self._images()):
            batch.append(image)
            if len(batch) == size or lo == len(self.indices) - 1:
                yield np.stack(batch), self.times[lo + 1 - len(batch) : lo + 1]
                batch = []

    def close(self) -> None:
        """Stop the read-ahead thread, if any, then release the file and the decoder (done by :meth:`chunks` when
        it ends; a caller that stops reading early calls it)."""
        if self._ahead is not None:
            self._ahead.close()  # stops and joins the thread: it no longer touches the file
            self._ahead = None
        self._frames = None
        self._container.close()

    def _images(self) -> Iterator[np.ndarray]:
        """One RGB image per entry of ``indices``: a frame used twice (a grid finer than the video) is
        converted once."""
        import av

        if self._frames is None:
            raise DecodeError(f"the frames of {self.path.name} were already read, or their reader closed")
        frames, graph = self._frames, None
        last, image = -1, None
        try:
            for pos, want in enumerate(self.indices):
                while last < want:
                    item = next(frames, None)
                    if item is None:
                        raise DecodeError(f"the video stream of {self.path.name} ends before {self.times[pos]:.2f} s")
                    last, frame = item
                    if last >= want:  # the frame this entry needs (or, past a frame that never decoded, the next)
                        _check_size(frame, self.path)
                        graph = graph or _graph(frame, self.rotation, self.decoded_size)
                        graph.vpush(frame)
                        image = graph.vpull().to_ndarray()
                yield image
        except av.FFmpegError as exc:
            raise DecodeError(f"decoding frames of {self.path.name} failed at {self.times[pos]:.2f} s: {exc}") from exc

    def _decoded(self, first: int) -> Iterator[tuple[int, Any]]:
        """``(index, frame)`` from the key frame at or before frame ``first``, each frame placed by its time stamp.

        A frame in the first group of pictures is reached by decoding from the file's start (on a fresh demuxer);
        a later one by a seek to its key frame. A seek that lands after ``first`` (an MPEG program stream seeks
        by scanning time stamps, and can land a group of pictures late) is replaced by decoding from the start."""
        keys = self._index.keys
        key = int(keys[max(np.searchsorted(keys, first, side="right") - 1, 0)]) if len(keys) else 0
        if key > 0 or not self._index.whole:
            self._container.seek(int(self._index.pts[key]), stream=self._stream, backward=True)
            frames = self._placed()
            head = next(frames, None)
            if head is not None and head[0] <= first:
                yield head
                yield from frames
                return
        self._open()
        yield from self._placed()

    def _open(self) -> None:
        """(Re)open the file, positioned at its start, with its video stream decoded in ``VIDEO_DECODE_THREADS``."""
        import av

        if self._container is not None:
            self._container.close()
        self._container = av.open(str(self.path))
        streams = self._container.streams
        self._stream = streams[self._stream_index] if self._stream_index >= 0 else streams.video[0]
        self._stream.codec_context.thread_count = VIDEO_DECODE_THREADS

    def _placed(self) -> Iterator[tuple[int, Any]]:
        """Decoded frames with their index: found by time stamp, or the one after the previous frame's (a frame
        after the index's last is placed past it). Frames before the index's first (decoded from the file's start)
        are passed over; frames whose time stamps go back (an intra-only codec outputs frames in packet order,
        however their times run) raise :class:`DecodeError`: placed as they came, 49 shuffled frames gave 30
        distinct ones."""
        pts, tb = self._index.pts, float(self._stream.time_base or 0)
        last, previous = -1, None
        for frame in decode_packets(self._container, self._stream, self.skipped):
            self.decoded += 1
            stamp = frame.pts if frame.pts is not None else frame.dts
            if stamp is not None:
                if previous is not None and stamp < previous:
                    raise DecodeError(
                        f"frame time stamps go back, from {previous * tb:.3f} s to {stamp * tb:.3f} s (frames out of "
                        "presentation order)"
                    )
                previous = stamp
                if stamp < pts[0]:
                    continue
            if stamp is None or (last + 1 < len(pts) and pts[last + 1] == stamp):
                last += 1
            else:
                at = int(np.searchsorted(pts, stamp))  # a time stamp listed twice: its first
                last = at if at == len(pts) or pts[at] == stamp else last + 1  # past the index: past every entry
            yield last, frame


_END = object()


def _read_ahead(items: Iterator[Any], ahead: int, name: str) -> Iterator[Any]:
    """``items``, produced by a thread of their own at most ``ahead`` items ahead of the consumer.

    An exception in the thread is raised to the consumer; a consumer that stops early (closes this generator)
    stops the thread, which is joined before this generator ends, so nothing touches ``items``' resources after.
    """
    out: queue.Queue[Any] = queue.Queue(maxsize=ahead)
    stop = threading.Event()

    def offer(item: Any) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not offer(item):
                    return
            offer(_END)
        except BaseException as exc:  # handed to the consumer, raised there
            offer(exc)
        finally:
            items.close()

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while (item := out.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def _rotation(frame: Any) -> int:
    """The counterclockwise turn (0, 90, 180 or 270 degrees) the frame's display matrix asks for."""
    turn = float(getattr(frame, "rotation", 0) or 0)
    return int(round(turn / 90)) % 4 * 90 if math.isfinite(turn) else 0


def _graph(frame: Any, rotation: int, size: tuple[int, int]) -> Any:
    """buffer -> (turn upright) -> scale to ``size`` -> RGB24 -> sink, for frames like ``frame``."""
    import av.filter

    graph = av.filter.Graph()
    nodes = [graph.add_buffer(width=frame.width, height=frame.height, format=frame.format, time_base=frame.time_base)]
    for name, args in [*_UPRIGHT[rotation], ("scale", f"{size[0]}:{size[1]}"), ("format", "rgb24")]:
        nodes.append(graph.add(name, args))
    nodes.append(graph.add("buffersink"))
    for a, b in zip(nodes, nodes[1:], strict=False):
        a.link_to(b)
    graph.configure()
    return graph


def _check_size(frame: Any, path: Path) -> None:
    """Refuse a decoded frame over ``MAX_PIXELS`` (a stream whose header declared a smaller size)."""
    if frame.width * frame.height > MAX_PIXELS:
        raise DecodeError(
            f"a frame of {path.name} is {frame.width}x{frame.height} pixels, over the {MAX_PIXELS:,} decoded at most"
        )


def _scaled_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """``(width, height)`` scaled so the long side is at most ``max_side`` (aspect kept; unknown sizes kept)."""
    long = max(width, height)
    if max_side is None or long <= max_side or min(width, height) <= 0:
        return width, height
    return max(1, round(width * max_side / long)), max(1, round(height * max_side / long))
