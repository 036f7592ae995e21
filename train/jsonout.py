"""Standard JSON output (NaN and inf become null). Imports nothing heavy: the command line loads it at start."""

from __future__ import annotations

import json
import math
from typing import Any


def strict_json(obj: Any) -> Any:
    """``obj`` with NaN / inf floats replaced by None, so the output is standard JSON (e.g. an undefined
    correlation is ``null``)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """Standard JSON (NaN -> null)."""
    return json.dumps(strict_json(obj), allow_nan=False, default=str, **kwargs)
