"""Decode workers: processes that decode clips and run the worker extractors (FaceMesh) on them, started while the
parent loads its models and then fed the plan's clips with a window of them in flight.

A worker's start-up (spawn, imports, MediaPipe) takes about a second on a CPU; started before the models load,
it runs on a core that would otherwise idle, so the first decoded clip is ready soon after the encoders are.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager, nullcontext
from typing import Any

from extract.extractors.base import DecodedClip
from extract.manifest import Clip
from extract.worker import DecodeSettings, decode_clip, init_worker

Job = tuple[Any, Clip]  # (the clip's shard plan, the clip)


def _started() -> int:
    """The warm-up task: it returns once the worker has run its initializer (imports, extractors set up)."""
    return os.getpid()


class DecodePool:
    """``workers`` decode processes (spawned: the parent holds torch threads, and forking it is unsafe).

    :meth:`start` spawns them at once, so their start-up overlaps whatever the parent does next (loading the
    encoders); :meth:`decode` yields decoded clips in order; :meth:`close` stops them, also on errors. A worker
    that crashes (corrupt media can do that) breaks the pool: it is restarted and every clip in flight retried
    once, and a clip that crashes it twice is recorded as skipped."""

    def __init__(self, settings: DecodeSettings, workers: int) -> None:
        if workers < 1:
            raise ValueError(f"a decode pool needs at least one worker, not {workers}")
        self.settings, self.workers = settings, workers
        self._pool: ProcessPoolExecutor | None = None
        self._submitted = 0  # to the current pool
        self._pending: list[tuple[int, Future]] = []  # of decode(): (job index, its future), in order

    def start(self) -> None:
        """Spawn the workers now (one warm-up task each) unless they are already running."""
        if self._pool is None:
            self._new_pool()
            for _ in range(self.workers):
                self._submit(_started)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _new_pool(self) -> ProcessPoolExecutor:
        self._submitted = 0
        ctx = mp.get_context("spawn")
        self._pool = ProcessPoolExecutor(
            self.workers, mp_context=ctx, initializer=init_worker, initargs=(self.settings, os.getpid())
        )
        return self._pool

    def _submit(self, fn: Any, *args: Any) -> Future:
        # A pool starts a worker on each of its first `workers` submits (at most): a worker started with SIGINT
        # ignored inherits that, so a Ctrl-C while it is still importing prints no traceback there. Later
        # submits start nothing and leave SIGINT alone, so no Ctrl-C is lost while the pool runs.
        spawning = self._submitted < self.workers
        self._submitted += 1
        assert self._pool is not None
        with _sigint_ignored() if spawning else nullcontext():
            return self._pool.submit(fn, *args)

    def next_ready(self) -> bool:
        """Whether :meth:`decode` can hand over its next clip without waiting (False when none is in flight)."""
        return bool(self._pending) and self._pending[0][1].done()

    def decode(self, jobs: Sequence[Job], window: int) -> Iterator[tuple[Any, DecodedClip]]:
        """Every job's clip decoded, in order, with its plan; up to ``window`` clips in flight, so the workers
        decode while the caller encodes."""
        self.start()
        self._pending = pending = []
        attempts = [0] * len(jobs)
        nxt = 0

        def top_up() -> None:
            nonlocal nxt
            while nxt < len(jobs) and len(pending) < window:
                pending.append((nxt, self._submit(decode_clip, jobs[nxt][1], self.settings)))
                nxt += 1

        while nxt < len(jobs) or pending:
            top_up()
            i, fut = pending.pop(0)
            try:
                decoded = fut.result()
            except BrokenProcessPool:
                retry = [i] + [j for j, _ in pending]
                self.close()
                self._new_pool()
                for j in retry:
                    attempts[j] += 1
                decoded = None
                if attempts[i] >= 2:
                    decoded = DecodedClip(jobs[i][1], info={"skipped": "the decoder process crashed on this file"})
                    retry = retry[1:]
                pending[:] = [(j, self._submit(decode_clip, jobs[j][1], self.settings)) for j in retry]
                if decoded is None:
                    continue
            top_up()  # before handing this clip over, so the workers decode while the caller encodes
            yield jobs[i][0], decoded


def decode_clips(
    plans: Sequence[Any],
    settings: DecodeSettings,
    workers: int,
    media: bool,
    window: int = 16,
    pool: DecodePool | None = None,
) -> Iterator[tuple[Any, DecodedClip]]:
    """Every clip of ``plans`` decoded, in plan order, with its shard. With workers, decode jobs stay in flight
    (``window`` clips, at least 4 per worker) while the caller encodes: decoding and encoding overlap. ``pool``: a
    :class:`DecodePool` already started (while the models loaded), else one is made here; either way it is
    closed when the iteration ends."""
    if not media:
        for plan in plans:
            for clip in plan.clips:
                yield plan, DecodedClip(clip)
        return
    if workers == 0:
        init_worker(settings)
        for plan in plans:
            for clip in plan.clips:
                yield plan, decode_clip(clip, settings)
        return
    jobs = [(plan, clip) for plan in plans for clip in plan.clips]
    with pool if pool is not None else DecodePool(settings, workers) as running:
        yield from running.decode(jobs, max(window, 4 * workers))


@contextmanager
def _sigint_ignored() -> Iterator[None]:
    """SIGINT ignored meanwhile (main thread only). A process started inside inherits the ignored disposition,
    which CPython keeps, so a Ctrl-C while a decode worker is still importing does not print its traceback;
    afterwards the worker ignores SIGINT by itself (``init_worker``) and the parent handles it again."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
