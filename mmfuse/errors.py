"""The one base class of the errors mmfuse raises on purpose.

Every named error of ``extract``, ``shards`` and ``train`` derives from :class:`MmfuseError` (and keeps its
builtin base, ``ValueError`` or ``RuntimeError``, for code that catches those). Its message says what went
wrong and what to do; the command line prints it as one line and exits 1. ``fusion`` imports only torch, so
its own errors stay builtin-based; ``train`` turns those that reach a command into a :class:`MmfuseError`.

This module and :mod:`mmfuse.settings` import nothing of ours: every package may import them.
"""

from __future__ import annotations


class MmfuseError(Exception):
    """Base of every error mmfuse raises on purpose; the message names the input and the way out."""
