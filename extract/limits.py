"""The memory a media file may take while it is opened and decoded, enforced by the kernel (``RLIMIT_AS``).

Our own decoding is bounded by what a clip needs (:mod:`extract.decode` and :mod:`extract.video` cap samples,
pixels and packets), but FFmpeg builds its own index when it opens a file: an MP4 whose header claims 80 M
samples per track took 5.8 GB inside ``av.open`` before any of our checks could run. So a process that decodes
media limits its own address space to what it uses once set up plus :func:`decode_budget`; past it an allocation
fails (FFmpeg reports ENOMEM, numpy raises MemoryError) and the clip is recorded as skipped with that reason.

Decode workers set the limit on themselves once (:func:`limit_address_space`). A process that cannot (the
encoder process decoding inline with ``--workers 0``, or ``mmfuse predict``: torch and its threads need their
address space) opens each file first in a forked child under the limit (:func:`probe_in_child`): a file that
fits there fits in the parent too, since opening it again builds the same index.

No torch here: this module runs in worker processes.
"""

from __future__ import annotations

import json
import os
import resource
import warnings
from collections.abc import Callable
from typing import Any

from mmfuse.errors import MmfuseError

# Address space a decoding process may add to what it holds once set up: FFmpeg's index, a few decoded frames at
# up to 8K (extract.video.MAX_PIXELS), FaceMesh's work. Under 1 GB, so one hostile file costs less than that.
DECODE_HEADROOM = 900 << 20
# Bytes per 16 kHz sample of the longest clip allowed (max_duration_s): the float32 window, its int16 copy and
# the copy that travels back from a worker. A one-hour clip is 576 MB of it.
AUDIO_BYTES_PER_SAMPLE = 10


def decode_budget(max_duration_s: float) -> int:
    """Bytes of address space a decoding process may add: the headroom plus the longest clip's audio."""
    return DECODE_HEADROOM + int(max_duration_s * 16000 * AUDIO_BYTES_PER_SAMPLE)


def address_space() -> int:
    """This process's virtual size in bytes (``/proc/self/statm``), 0 where there is no /proc."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def limit_address_space(budget: int) -> bool:
    """Limit this process's address space to its present size plus ``budget`` (never raising a lower limit);
    True when a limit is in force."""
    size = address_space()
    if not size:
        return False
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    want = size + budget if hard == resource.RLIM_INFINITY else min(size + budget, hard)
    if soft != resource.RLIM_INFINITY and soft <= want:
        return True
    resource.setrlimit(resource.RLIMIT_AS, (want, hard))
    return True


class ChildFailed(MmfuseError, RuntimeError):
    """The child of :func:`probe_in_child` ended without an answer (killed, or out of its memory)."""


def probe_in_child(fn: Callable[..., Any], *args: Any, budget: int) -> tuple[str, Any]:
    """``fn(*args)`` in a forked child whose address space is limited to the parent's size plus ``budget``.

    Returns ``("ok", result)``, or ``(name, message)`` of an exception the child raised (``result`` travels as
    JSON: ``fn`` returns something ``json.dumps`` takes; a MemoryError's message names the budget). Raises
    :class:`ChildFailed` when the child gave no answer. The child only opens files and ends with ``os._exit``:
    forking a process with threads is safe for that."""
    read, write = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "multi-threaded, fork() may deadlock": not here
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child; its outcome is what the parent reads
        code = 0
        try:
            os.close(read)
            limit_address_space(budget)
            try:
                answer = ["ok", fn(*args)]
            except MemoryError:
                answer = ["MemoryError", f"opening it needs over {budget >> 20} MiB of memory"]
            except Exception as exc:  # the parent decides what the error means
                answer = [type(exc).__name__, str(exc)]
            with os.fdopen(write, "w") as out:
                json.dump(answer, out)
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as answer_in:
        data = answer_in.read()
    _, status = os.waitpid(pid, 0)
    if not data:
        how = f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"exit {os.WEXITSTATUS(status)}"
        raise ChildFailed(f"opening it took over {budget >> 20} MiB of memory or crashed ({how})")
    kind, value = json.loads(data)
    return kind, value
