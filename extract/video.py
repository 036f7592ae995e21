"""Video frames of one clip, decoded with PyAV (FFmpeg's libraries) a bounded distance ahead of their reader.

A thread of the worker decodes at most ``READ_AHEAD`` chunks ahead of the caller (FaceMesh), so decoding overlaps
FaceMesh while what a clip holds in memory stays a few chunks, whatever the file's length; it stops after the
clip's last frame. A clip cut from a long file (the manifest's ``start``/``end``) decodes from the key frame
before its start to its end, not the rest of the file. (decord, used before, decoded on to the end of the file
in a thread of its own: 1.5 GiB of a 40 s 960×540 file within 3.5 s of reading its first 4 frames.)

Frame times are the packets' presentation times in presentation order, read once per clip from the container
without decoding; frame ``i`` is the ``i``-th of them. A decoded frame is matched to its index by its own time
stamp, so a seek that lands early costs time, never a wrong frame (one that lands late is not used). Frames go
through one FFmpeg filter graph: turned upright by the stream's display matrix (phones store portrait video as
landscape frames with a rotation), scaled to ``decoded_size``, converted to RGB; frames the clip does not use
skip the graph.

No torch here: this module runs in worker processes.
"""

from __future__ import annotations

import itertools
import math
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from extract.decode import DecodeError, Probe, frame_plan

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
    ``keys`` the positions (into ``pts``) of the key frames, where decoding can start."""

    pts: np.ndarray
    times: np.ndarray
    keys: np.ndarray


def read_index(container: Any, stream: Any) -> FrameIndex:
    """Every packet of ``stream`` (demuxed, not decoded): its time stamp, and which are key frames.

    A packet without a presentation time takes its decoding time; one with neither is left out."""
    stamps, key = [], []
    for packet in container.demux(stream):
        ts = packet.pts if packet.pts is not None else packet.dts
        if ts is not None:
            stamps.append(ts)
            key.append(packet.is_keyframe)
    order = np.argsort(np.asarray(stamps, dtype=np.int64), kind="stable")
    pts = np.asarray(stamps, dtype=np.int64)[order]
    tb = float(stream.time_base) if stream.time_base else 0.0
    keys = np.flatnonzero(np.asarray(key, dtype=bool)[order]) if len(order) else np.zeros(0, dtype=np.int64)
    return FrameIndex(pts, pts.astype(np.float64) * tb, keys)


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
        self._frames: Iterator[tuple[int, Any]] | None = None  # (index, frame) from the clip's first key frame
        first = None  # the first decoded frame, read at once for the rotation it carries
        self._container: Any = None
        self._ahead: Any = None  # the read-ahead generator of :meth:`chunks`, while one runs
        try:
            self._open()
            self._index = read_index(self._container, self._stream)
            self._plan(p, t0, t1, fps)
            if len(self.indices):
                frames = self._decoded(int(self.indices[0]))
                first = next(frames, None)
                if first is None:
                    raise DecodeError("no frame decodes")
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
        if key > 0:
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
        self._stream = self._container.streams.video[0]
        self._stream.codec_context.thread_count = VIDEO_DECODE_THREADS

    def _placed(self) -> Iterator[tuple[int, Any]]:
        """Decoded frames with their index: found by time stamp, or the one after the previous frame's."""
        pts = self._index.pts.tolist()
        first_at = {v: i for i, v in reversed(list(enumerate(pts)))}  # a time stamp listed twice: its first
        last = -1
        for frame in self._container.decode(self._stream):
            self.decoded += 1
            stamp = frame.pts if frame.pts is not None else frame.dts
            follows = stamp is None or (last + 1 < len(pts) and pts[last + 1] == stamp)
            last = last + 1 if follows else first_at.get(stamp, last + 1)
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


def _scaled_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """``(width, height)`` scaled so the long side is at most ``max_side`` (aspect kept; unknown sizes kept)."""
    long = max(width, height)
    if max_side is None or long <= max_side or min(width, height) <= 0:
        return width, height
    return max(1, round(width * max_side / long)), max(1, round(height * max_side / long))
