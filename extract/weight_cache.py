"""Weight hashes cached by file identity, so a rerun does not hash the same weights again.

The feature set names each encoder's weights by a hash over its loaded parameters
(:func:`extract.models.weights_hash`): about 1.7 s per run for MiniLM and wav2vec2-base on a CPU. The cache
maps what the weights were loaded from (every file of the model directory by resolved path, size and
modification time in ns, with the model class and the torch and transformers versions) to that hash, in one
small JSON file: ``$MMFUSE_CACHE/weights.json``, else ``~/.cache/mmfuse/weights.json``. Any change to a file
(a new mtime or size) is a new key, so the hash is computed again. The file is replaced atomically; one that
cannot be read is ignored (the hash is recomputed and the file rewritten), one that cannot be written is
skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CACHE_ENV = "MMFUSE_CACHE"
MAX_ENTRIES = 256  # oldest dropped first
_HEX = frozenset("0123456789abcdef")


def cache_file() -> Path:
    """Where the cache lives: ``$MMFUSE_CACHE/weights.json``, else ``~/.cache/mmfuse/weights.json``."""
    root = os.environ.get(CACHE_ENV)
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "mmfuse") / "weights.json"


def file_identity(path: Path | str) -> list[list[Any]]:
    """``[resolved path, size, mtime_ns]`` of ``path`` or, for a directory, of every file beneath it (links
    followed, as loading follows them: a Hugging Face snapshot's files are links to its blobs)."""
    path = Path(path).resolve()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    out = []
    for f in files:
        st = f.stat()
        out.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    return out


def cached_hash(identity: Any, compute: Callable[[], str]) -> str:
    """The hash cached for ``identity`` (any JSON value saying what the weights were made from), else
    ``compute()``, which is then cached."""
    key = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
    entries = _read(cache_file())
    if key in entries:
        return entries[key]
    value = compute()
    entries.pop(key, None)
    entries[key] = value
    _write(cache_file(), dict(list(entries.items())[-MAX_ENTRIES:]))
    return value


def _read(path: Path) -> dict[str, str]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(obj, dict):
        return {}
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, str) and set(v) <= _HEX and v}


def _write(path: Path, entries: dict[str, str]) -> None:
    """Replace ``path`` atomically (a temporary file beside it, then a rename); failures are only logged."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".weights.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(entries, f, indent=0)
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        log.debug("weight-hash cache %s not written: %s", path, exc)
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
