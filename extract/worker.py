"""Per-clip decoding and the extractors that run on decoded frames (``runs_in = "worker"``: FaceMesh), in worker
processes (or inline with ``--workers 0``). No torch here."""

from __future__ import annotations

import ctypes
import dataclasses
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from extract.decode import DecodeError, Probe, Skipped, clip_window, probe
from extract.extractors.base import DecodedClip, Extractor, ModalityFailure
from extract.limits import ChildFailed, decode_budget, limit_address_space, probe_in_child
from extract.manifest import Clip
from extract.video import VideoFrames
from extract.waveform import decode_audio, limit

MEDIA = ("audio", "video")  # the streams decoded here


@dataclass(frozen=True)
class DecodeSettings:
    """What a worker needs: which streams to decode, the frame rate, limits, and the extractors to run on each
    decoded clip as ``(registry entry, its Settings)`` pairs (``extract.Registered``)."""

    modalities: tuple[str, ...]
    fps: float | None = None
    max_duration_s: float = 3600.0
    extractors: tuple[tuple[Any, Any], ...] = ()


_BUILT: dict[tuple[Any, Any], Extractor] = {}  # this process's worker extractors, by (entry, settings)


def init_worker(settings: DecodeSettings, parent_pid: int | None = None) -> None:
    """Process initializer: build the worker extractors once. In pool workers (``parent_pid`` given: the pid of
    the process that made the pool), also:

    - silence MediaPipe's C++ logging (it writes to file descriptor 2 directly; Python errors still travel back
      with the results), unless ``MMFUSE_NATIVE_LOGS=show`` (``mmfuse --log-level DEBUG`` sets it);
    - ignore Ctrl-C: the terminal sends SIGINT to the whole process group, and the parent alone decides (it
      stops the pool and exits with one line; a worker would print a traceback per process);
    - exit as soon as that parent is gone, even if it died while this worker was still starting: a parent killed
      with SIGKILL leaves no workers behind;
    - run at a lower priority (``WORKER_NICENESS``), so that on a busy machine the encoder process keeps its core;
    - once set up, limit its address space (:mod:`extract.limits`): a hostile file fails to open or decode, the
      machine keeps its memory. Other processes open each file in a limited child first (:func:`probe_media`)."""
    os.environ.setdefault("GLOG_minloglevel", "2")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if parent_pid is not None:
        cap_malloc_arenas()
        os.nice(WORKER_NICENESS)  # before any thread starts: threads inherit it (Linux keeps it per thread)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()
        if os.environ.get("MMFUSE_NATIVE_LOGS") != "show":
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            os.close(devnull)
    for entry, options in settings.extractors:
        _extractor(entry, options)
    if parent_pid is not None:  # set up: from here on, media may add no more than the budget
        global _LIMITED
        _LIMITED = limit_address_space(decode_budget(settings.max_duration_s))


_LIMITED = False  # this process's address space is limited (a pool worker): files are probed in it directly


MALLOC_ARENAS = 2  # glibc's malloc arenas in a decode process; its default is 8 per core
# Niceness added to pool workers. A worker runs more threads than its core (MediaPipe's graph; decord's decoder
# too, when it decoded the video); at equal priority they took turns with the encoder process's thread, and the
# encoders, the pipeline's other half, ran slower inside it than alone. At +10 the workers use what the encoders
# leave: on 2 cores, 1 worker, 16 clips, the pipeline took 7.38-7.57 s against 7.85-8.21 s at equal priority
# (4 interleaved pairs).
WORKER_NICENESS = 10
M_ARENA_MAX = -8  # mallopt's parameter number for it (glibc's malloc.h)


def cap_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas in this process (``mallopt(M_ARENA_MAX)``, what ``MALLOC_ARENA_MAX`` sets at
    start-up); True when it took effect. Called first thing in a process that only decodes.

    FaceMesh's graph runs threads of its own (and, until its graph was reused, built new ones per clip); new
    threads take fresh arenas, where the freed memory of earlier clips stays resident: in ``mmfuse bench
    extract`` a decode worker's peak RSS grew 12.5 % from 16 to 64 clips, and 3.7 % with two arenas."""
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(M_ARENA_MAX, arenas))
    except (OSError, AttributeError):  # not glibc
        return False


def _extractor(entry: Any, options: Any) -> Extractor:
    """The worker extractor of ``entry`` with ``options``, built and set up on first use in this process."""
    key = (entry, options)
    if key not in _BUILT:
        extractor = entry.build(options)
        extractor.setup("cpu")
        _BUILT[key] = extractor
    return _BUILT[key]


def _exit_with_parent(parent: int, every_s: float = 0.5) -> None:
    """Watchdog thread of a pool worker: once the parent is gone (we are re-parented), leave at once."""
    while os.getppid() == parent:
        time.sleep(every_s)
    os._exit(1)


def quantise(wave: np.ndarray) -> np.ndarray:
    """float waveform in [-1, 1] -> int16 (what the shard stores, and what the audio encoder sees)."""
    return np.clip(np.round(wave * 32768.0), -32768, 32767).astype(np.int16)


def decode_clip(clip: Clip, settings: DecodeSettings) -> DecodedClip:
    """Decode one clip and run the worker extractors on it; failures become statuses, never exceptions."""
    d = DecodedClip(clip)
    tic = time.perf_counter()
    try:
        p = probe_media(clip.path, settings.max_duration_s)
    except DecodeError as exc:
        d.info["skipped"] = str(exc)
        return d
    t0, t1 = clip_window(p, clip.start, clip.end)
    d.duration = t1 - t0
    if clip.start is not None and clip.start >= p.end:
        d.info["skipped"] = f"start {clip.start} s is past the end of the media ({p.end:.2f} s)"
        return d
    if d.duration > settings.max_duration_s:
        d.info["skipped"] = (
            f"clip is {d.duration:.0f} s long, over max_duration_s={settings.max_duration_s:.0f}; raise it with "
            "--config or cut the clip with start/end columns"
        )
        return d
    if "audio" in settings.modalities:
        _decode_audio(d, p, t0, t1)
    d.timings["decode_audio_s"] = time.perf_counter() - tic
    try:
        if "video" in settings.modalities:
            _open_video(d, p, t0, t1, settings.fps)
        for entry, options in settings.extractors:
            _run(d, entry.modality, _extractor(entry, options))
    finally:
        if d.frames is not None:
            d.frames.close()  # whether or not FaceMesh read every frame
            _note_skipped(d, "video", d.frames.skipped)
        d.frames = None  # frames never leave the worker
    d.timings["video_s"] = time.perf_counter() - tic - d.timings["decode_audio_s"]
    wanted = [m for m in MEDIA if m in settings.modalities]
    if wanted and all(d.status.get(m, {}).get("status") == "failed" for m in wanted):
        d.info["skipped"] = "no stream could be decoded: " + "; ".join(d.status[m]["error"] for m in wanted)
    return d


def probe_media(path: Path, max_duration_s: float) -> Probe:
    """:func:`extract.decode.probe` under the decode memory limit: in this process when it has the limit (a pool
    worker), else in a forked child that has it. Raises :class:`DecodeError`."""
    if _LIMITED:
        return probe(path)
    budget = decode_budget(max_duration_s)
    try:
        kind, value = probe_in_child(_probe_fields, str(path), budget=budget)
    except ChildFailed as exc:
        raise DecodeError(f"cannot open {path.name}: {exc}") from exc
    if kind == "ok":
        return Probe(**value)
    raise DecodeError(value if kind in ("DecodeError", "MemoryError") else f"cannot open {path.name}: {kind}: {value}")


def _probe_fields(path: str) -> dict[str, Any]:
    return dataclasses.asdict(probe(Path(path)))


def _decode_audio(d: DecodedClip, p, t0: float, t1: float) -> None:
    if not p.has_audio:
        d.status["audio"] = {"status": "failed", "error": "no audio stream"}
        return
    skipped = Skipped()
    try:
        wave, span = decode_audio(d.clip.path, p, t0, t1, skipped)
    except (DecodeError, MemoryError) as exc:
        d.status["audio"] = {"status": "failed", "error": _reason(exc)}
        return
    if span[1] <= span[0]:
        d.status["audio"] = {"status": "failed", "error": "the audio stream has no samples inside the clip"}
        return
    wave, peak = limit(wave)  # over full scale: the clip is scaled down, and the peak it had recorded
    d.wave, d.audio_span = quantise(wave), span
    d.status["audio"] = {"status": "ok", "error": None, "real_span": [round(span[0], 4), round(span[1], 4)]}
    if peak is not None:
        d.status["audio"]["limited_from_peak"] = round(peak, 4)
    _note_skipped(d, "audio", skipped)


def _note_skipped(d: DecodedClip, modality: str, skipped: Skipped) -> None:
    """Record damaged packets passed over in the modality's status: how many, and the first one."""
    if skipped.count and d.status.get(modality, {}).get("status") != "failed":
        d.status.setdefault(modality, {}).update(skipped_packets=skipped.count, first_skipped=skipped.first)


def _reason(exc: Exception) -> str:
    """A decode failure's status text; running out of memory (the process's limit, :mod:`extract.limits`) says so."""
    if isinstance(exc, MemoryError) and not isinstance(exc, DecodeError):
        return f"out of memory while decoding (over the decode memory limit){': ' + str(exc) if str(exc) else ''}"
    return str(exc)


def _open_video(d: DecodedClip, p, t0: float, t1: float, fps: float | None) -> None:
    if not p.has_video:
        d.status["video"] = {"status": "failed", "error": "no video stream (audio-only file)"}
        return
    try:
        d.frames = VideoFrames(d.clip.path, p, t0, t1, fps)
        d.info["fps"] = d.frames.fps
        times = d.frames.times
        if len(times) and d.frames.fps > 0:  # clip seconds from the first frame to where the last leaves the screen
            d.status["video"] = {
                "real_span": [round(float(times[0]), 4), round(float(times[-1]) + 1 / d.frames.fps, 4)]
            }
        if p.video_streams > 1:
            d.status.setdefault("video", {})["stream"] = p.video_stream
    except (DecodeError, MemoryError) as exc:
        d.status["video"] = {"status": "failed", "error": _reason(exc)}


def _run(d: DecodedClip, modality: str, extractor: Extractor) -> None:
    """One worker extractor on one clip: its arrays go to ``d.features``, its outcome (and what it noted in
    ``d.info[modality]``, e.g. face counts) to ``d.status``."""
    before = d.status.get(modality, {})
    if before.get("status") == "failed":  # its stream could not be decoded
        return
    try:
        result = extractor([d])[0]
    except (DecodeError, MemoryError) as exc:
        result = ModalityFailure(_reason(exc))
    noted = d.info.get(modality, {})
    if isinstance(result, ModalityFailure):
        d.status[modality] = {**before, "status": "failed", "error": result.error, **noted}
    else:
        d.features[modality] = result
        d.status[modality] = {**before, "status": "ok", "error": None, **noted}
