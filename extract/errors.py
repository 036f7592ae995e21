"""Everything extraction raises on purpose, in one leaf module: each error is an :class:`MmfuseError`, so the
``mmfuse`` command prints its message in one line and exits 1. The modules that raise them import them from
here (their old homes still name them)."""

from __future__ import annotations

from collections.abc import Sequence

from mmfuse.errors import MmfuseError

MAX_PROBLEMS_SHOWN = 50  # manifest problems listed in one ManifestError; the rest are counted


class ExtractionError(MmfuseError, RuntimeError):
    """Extraction cannot go on (bad settings, missing model, disk full); the message says what to do."""


class ModelNotFoundError(ExtractionError):
    """A model id or path cannot be found locally (mmfuse never downloads at run time)."""


class ConfigError(MmfuseError, ValueError):
    """Invalid settings; the message names every bad key."""


class DeviceError(MmfuseError, RuntimeError):
    """A device name that names no device, or a device this machine does not have."""


class DecodeError(MmfuseError, RuntimeError):
    """A media file, or one of its streams, cannot be decoded."""


class ManifestError(MmfuseError, ValueError):
    """The manifest has problems; the message lists all of them."""

    def __init__(self, source: str, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        shown = "\n  ".join(self.problems[:MAX_PROBLEMS_SHOWN])
        more = len(self.problems) - MAX_PROBLEMS_SHOWN
        tail = f"\n  ... and {more} more" if more > 0 else ""
        super().__init__(f"{source}: {len(self.problems)} problem(s), nothing was extracted:\n  {shown}{tail}")
