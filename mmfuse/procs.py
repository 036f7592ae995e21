"""Child processes are joined before a command returns: none is left for the parent's parent to reap.

A pool of the ``spawn`` start method also starts multiprocessing's resource tracker, a helper process that
lives until its parent exits and only then notices and exits itself: a process of the command's process
group that outlives it. :func:`reap_children` joins every multiprocessing child and stops that tracker.

This module imports nothing of ours (every package may use it).
"""

from __future__ import annotations

import sys


def reap_children(timeout_s: float = 10.0) -> None:
    """Join every multiprocessing child of this process (terminating one still running after ``timeout_s``)
    and stop the resource tracker, waiting for it to exit. Call it when no pool is in use any more: the end
    of a command. Without multiprocessing imported there is nothing to do."""
    if "multiprocessing" not in sys.modules:
        return
    import gc
    import multiprocessing as mp
    from multiprocessing import resource_tracker

    tracker = resource_tracker._resource_tracker
    if getattr(tracker, "_pid", None) is None and not mp.active_children():
        return  # no pool ran: skip the collection (0.6 s after a text-only extraction)
    gc.collect()  # finalise dropped pools' queues and locks now: they unregister from the tracker
    for child in mp.active_children():
        child.join(timeout_s)
        if child.is_alive():
            child.terminate()
            child.join(timeout_s)
    stop = getattr(tracker, "_stop", None)  # CPython 3.8+: close its pipe, wait
    if stop is not None:
        stop()
