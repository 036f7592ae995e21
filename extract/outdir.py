"""The output directory: which of its files are ours, who owns a temporary file, and per-shard locks.

Only files with our exact names are ever removed: ``{split}-{NNNNNN}.tar|.json`` (split train, valid or test,
six digits), their temporary names (:func:`shards.io.temp_path`: ``<name>.tmp-r<rank>-p<pid>-<host>``),
``dataset.json``, ``status.jsonl`` and the lock files ``{split}-{NNNNNN}.lock`` and ``dataset.lock``.

A temporary file belongs to its writer. It is removed as stale only once that writer is gone: on this host
when its pid is no longer alive; written on another host (a shared file system), when it has not been
modified for :data:`FOREIGN_LEASE_S` (one hour; a live writer touches its file as it writes).

A writer holds a shard's lock (``fcntl.flock`` on ``{shard}.lock``) while it writes that shard, so two ranks or
two whole runs on the same ``--out`` never write the same shard at once; the lock is released when the writer
exits, however it exits, and the lock file is removed by whoever releases it. ``--overwrite`` is refused while
any lock in ``--out`` is held (:func:`refuse_live_writers`, before any model loads), and a shard whose lock is
held is never removed: it belongs to the live writer holding it.

A shard lock also records the feature set its writer writes. A writer checks the directory and claims its
shards holding ``dataset.lock`` (:func:`check_feature_set`, then :func:`claim_shards`), and keeps its shard locks
until it holds ``dataset.lock`` again to write ``dataset.json``; so from before its first shard until
``dataset.json`` names its feature set, a second writer (another run, or a rank) with another feature set finds
it and is refused, naming both feature sets.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import stat
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from extract.extractors.base import ExtractionError
from extract.writer import is_complete
from shards.dataset import DATASET_JSON, STATUS_JSONL, feature_set_hash
from shards.dataset_fields import MAX_DURATION_S
from shards.io import host_name, temp_path
from shards.schema import SHOWN_CHARS, shown

log = logging.getLogger(__name__)

FOREIGN_LEASE_S = 3600.0  # a temporary file from another host is stale after an hour without a write
DATASET_LOCK = "dataset.lock"
LOCK_MAX_BYTES = 1 << 16  # a lock file holds its owner and the feature set it writes (about 2 kB)
DIFFS_SHOWN = 3  # differences between two feature sets named in a message
SHARD_FILE = re.compile(r"^(?P<stem>(?:train|valid|test)-\d{6})\.(?:tar|json)$")
LOCK_FILE = re.compile(r"^(?P<stem>(?:train|valid|test)-\d{6})\.lock$")
TEMP_FILE = re.compile(
    r"^(?P<final>(?:train|valid|test)-\d{6}\.(?:tar|json)|dataset\.json|status\.jsonl)"
    r"\.tmp-r(?P<rank>\d+)-p(?P<pid>\d+)-(?P<host>[A-Za-z0-9_.-]+)$"
)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by someone else
    return True


def owner_gone(path: Path, now: float | None = None) -> bool:
    """Whether the writer of the temporary file ``path`` (our temporary naming) is gone."""
    m = TEMP_FILE.match(path.name)
    if m is None:
        return False
    if m["host"] == host_name():
        return not pid_alive(int(m["pid"]))
    try:
        age = (time.time() if now is None else now) - path.stat().st_mtime
    except FileNotFoundError:
        return False
    return age > FOREIGN_LEASE_S


def clean_stale(out: Path, planned: set[str], remove_all: bool) -> None:
    """Remove temporary files whose writer is gone and unheld lock files; with ``remove_all`` (``--overwrite``)
    also every shard, ``dataset.json`` and ``status.jsonl``. Shards outside the plan are left (they are not
    listed in ``dataset.json``); files that are not named like ours are never touched."""
    outside = []
    for path in sorted(out.iterdir()):
        name = path.name
        if TEMP_FILE.match(name):
            if owner_gone(path):
                log.info("removing %s (its writer is gone)", name)
                path.unlink(missing_ok=True)
        elif (m := LOCK_FILE.match(name)) or name == DATASET_LOCK:
            lock = ShardLock.claim(path)  # removes a lock file nobody holds
            if lock is not None:
                lock.release()
        elif m := SHARD_FILE.match(name):
            if remove_all and is_held(out / f"{m['stem']}.lock"):
                log.warning(
                    "%s is left to the writer holding its lock (%s)", name, lock_owner(out / f"{m['stem']}.lock")
                )
            elif remove_all:
                log.info("removing %s (--overwrite)", name)
                path.unlink(missing_ok=True)
            elif m["stem"] not in planned:
                outside.append(name)
        elif remove_all and name in (DATASET_JSON, STATUS_JSONL):
            path.unlink(missing_ok=True)
    if outside:
        log.warning("%s: %d shard files are not in this run's plan and are left as they are: %s", out, len(outside),
                    ", ".join(outside[:5]) + (" ..." if len(outside) > 5 else ""))  # fmt: skip


class ShardLock:
    """An exclusive ``flock`` on a lock file, with its owner (rank, pid, host) written inside."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self.fd = path, fd

    @classmethod
    def claim(
        cls, path: Path, rank: int = 0, wait: bool = False, feature_set: Mapping[str, Any] | None = None
    ) -> ShardLock | None:
        """The lock on ``path``, or None when another live writer holds it (``wait``: block until it is free).
        ``feature_set``: the one this writer writes, recorded in the lock file for other writers to check."""
        while True:
            fd = open_lock_file(path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:  # not a file its last holder removed while we waited for it
                owner: dict[str, Any] = {"rank": rank, "pid": os.getpid(), "host": host_name()}
                if feature_set is not None:
                    owner.update(feature_set_hash=feature_set_hash(feature_set), feature_set=dict(feature_set))
                os.ftruncate(fd, 0)
                os.write(fd, json.dumps(owner).encode())
                return cls(path, fd)
            os.close(fd)

    def release(self) -> None:
        """Remove the lock file (while still holding it) and unlock."""
        if self.fd < 0:
            return
        self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = -1


def open_lock_file(path: Path) -> int:
    """A descriptor on the lock file ``path`` (created when absent), never through a link: ``O_NOFOLLOW``, and the
    file must be a regular file. A link or anything else there is an ``ExtractionError`` naming it (writing the
    owner into it would overwrite whatever it points to)."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ExtractionError(f"{path} is a symbolic link: remove it (lock files are never followed)") from exc
        if exc.errno == errno.EISDIR:
            raise ExtractionError(f"{path} is not a regular file: remove it (it is where a lock file goes)") from exc
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ExtractionError(f"{path} is not a regular file: remove it (it is where a lock file goes)")
    return fd


def is_held(path: Path) -> bool:
    """Whether a live writer holds the lock file ``path`` now (probed without taking, changing or removing it;
    a link is never followed, and is not a held lock)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the probe's lock
    return False


def refuse_live_writers(out: Path) -> None:
    """``--overwrite`` deletes every shard in ``out``: refuse it (``ExtractionError``) while another extraction
    holds a lock there (a shard being written, or ``dataset.json`` being rebuilt)."""
    if not out.is_dir():
        return
    for path in sorted(out.iterdir()):
        if (LOCK_FILE.match(path.name) or path.name == DATASET_LOCK) and is_held(path):
            try:
                owner = json.loads(path.read_text())
                who = f"pid {owner['pid']}, host {owner['host']}"
            except (OSError, ValueError, KeyError, TypeError):
                who = "pid and host not recorded"
            raise ExtractionError(
                f"another extraction ({who}) is writing to {out} (it holds {path.name}); wait for it or stop it. "
                "--overwrite would delete the shards it is writing, so nothing was removed."
            )


def read_lock(path: Path) -> dict[str, Any]:
    """What the lock file ``path`` records (owner; a shard lock also the feature set its writer writes), read
    without following a link and at most :data:`LOCK_MAX_BYTES`; ``{}`` when there is nothing readable."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return {}
    try:
        data = os.read(fd, LOCK_MAX_BYTES + 1)
    finally:
        os.close(fd)
    try:
        obj = json.loads(data) if len(data) <= LOCK_MAX_BYTES else None
    except (ValueError, RecursionError):
        return {}
    return obj if isinstance(obj, dict) else {}


def lock_owner(path: Path) -> str:
    """Who holds the lock at ``path``, in words (for messages)."""
    owner = read_lock(path)
    if all(k in owner for k in ("rank", "pid", "host")):
        return f"rank {plain(owner['rank'])}, pid {plain(owner['pid'])} on {plain(owner['host'])}"
    return "another writer"


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse an ``--out`` that is not a directory, cannot be written, or holds a ``dataset.json`` mmfuse did not
    write; before any model is loaded."""
    if out.exists() and not out.is_dir():
        raise ExtractionError(f"--out {out} is a file, not a directory: choose a directory for the shards.")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = temp_path(out / DATASET_JSON)
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW, 0o644))
        probe.unlink()
    except OSError as exc:
        raise ExtractionError(f"--out {out} cannot be written ({exc.strerror}): choose a writable directory.") from exc
    path = out / DATASET_JSON
    if overwrite or not path.exists():
        return
    try:
        obj: Any = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ExtractionError(
            f"{path} is not readable JSON ({exc}): pass --overwrite to replace it, or choose another --out."
        ) from exc
    missing = [k for k in ("schema_version", "feature_set_hash") if not isinstance(obj, dict) or k not in obj]
    if missing:
        raise ExtractionError(
            f"{path} lacks {', '.join(missing)}: it was not written by `mmfuse extract`. Pass --overwrite to "
            "replace it, or choose another --out."
        )


def recorded_max_duration(out: Path, this_run: float) -> float:
    """The ``max_duration_s`` that ``dataset.json`` records: the largest of this run's and the one already
    recorded there (an earlier run on this ``--out`` may have allowed longer clips, whose shards are kept); a
    recorded value outside (0, MAX_DURATION_S] (an edited file) is not carried over."""
    try:
        old = json.loads((out / DATASET_JSON).read_text()).get("max_duration_s")
    except (OSError, ValueError, AttributeError):
        old = None
    valid = isinstance(old, (int, float)) and not isinstance(old, bool) and 0 < old <= MAX_DURATION_S
    return max(this_run, float(old)) if valid else this_run


def check_feature_set(out: Path, feature_set: Mapping[str, Any], overwrite: bool) -> None:
    """Refuse to write ``feature_set`` into ``out`` beside shards of another one (``ExtractionError`` naming both):
    while another writer holds a shard lock recording another (``--overwrite`` or not: its shards are being
    written), or, without ``--overwrite``, when ``dataset.json`` records another. Call it holding
    ``dataset.lock``, then claim this run's shards before letting go of it."""
    fs_hash = feature_set_hash(feature_set)
    for path in sorted(out.iterdir()):
        record = read_lock(path) if LOCK_FILE.match(path.name) and is_held(path) else {}
        theirs = record.get("feature_set_hash")
        if isinstance(theirs, str) and theirs != fs_hash:
            raise ExtractionError(
                f"another extraction ({lock_owner(path)}) is writing shards of feature set {plain(theirs)} to {out} "
                f"(it holds {path.name}); this run's feature set is {fs_hash}"
                f"{differences(record.get('feature_set'), feature_set)}. Shards of two feature sets cannot share "
                "one directory: choose another --out, or wait for that extraction to finish and pass --overwrite."
            )
    path = out / DATASET_JSON
    if overwrite or not path.is_file():
        return
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    old_hash = old.get("feature_set_hash") if isinstance(old, dict) else None
    if old_hash and old_hash != fs_hash:
        raise ExtractionError(
            f"{out} holds shards of another feature set ({plain(old_hash)}, this run is {fs_hash})"
            f"{differences(old.get('feature_set'), feature_set)}. Pass --overwrite to replace them, or choose "
            "another --out."
        )


def plain(value: Any) -> str:
    """A value read from a file another process wrote, for a message: a printable text as it is, anything else as
    ``shown`` quotes it; cut to ``SHOWN_CHARS`` characters either way."""
    if not isinstance(value, str) or not value.isprintable():
        return shown(value)
    return value if len(value) <= SHOWN_CHARS else value[: SHOWN_CHARS - 3] + "..."


def differences(theirs: Any, ours: Mapping[str, Any]) -> str:
    """``": they differ in <key> (<theirs> there, <ours> here); ..."`` for a message; a general hint when the
    other feature set is not recorded."""
    found = list(_diffs(theirs, ours, "", 0)) if isinstance(theirs, Mapping) else []
    if not found:
        return ": a model, layer, fps or modality differs"
    more = f"; and {len(found) - DIFFS_SHOWN} more" if len(found) > DIFFS_SHOWN else ""
    return ": they differ in " + "; ".join(found[:DIFFS_SHOWN]) + more


def _diffs(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str, depth: int) -> Iterator[str]:
    for key in sorted(set(a) | set(b), key=str):
        x, y = a.get(key), b.get(key)
        if isinstance(x, Mapping) and isinstance(y, Mapping) and depth < 4:
            yield from _diffs(x, y, f"{prefix}{key}.", depth + 1)
        elif x != y:
            yield f"{prefix}{key} ({shown(x)} there, {shown(y)} here)"


def claim_shards(
    out: Path, plans: list[Any], feature_set: Mapping[str, Any], rank: int, raw: bool
) -> tuple[list, list, list]:
    """Lock this rank's incomplete shards: ``(todo, held, locks)``, where ``todo`` are the plans now locked by us
    (``locks``, each recording ``feature_set``) and ``held`` names the shards another live writer is writing, left
    to it."""
    fs_hash = feature_set_hash(feature_set)
    todo: list[Any] = []
    held: list[str] = []
    locks: list[ShardLock] = []
    try:
        for plan in plans:
            keys = [c.key for c in plan.clips]
            if is_complete(out, plan.name, keys, fs_hash, raw):
                continue
            lock = ShardLock.claim(out / f"{plan.name}.lock", rank, feature_set=feature_set)
            if lock is None:
                held.append(f"{plan.name} ({lock_owner(out / f'{plan.name}.lock')})")
            elif is_complete(out, plan.name, keys, fs_hash, raw):  # its writer finished it meanwhile
                lock.release()
            else:
                locks.append(lock)
                todo.append(plan)
    except BaseException:
        for lock in locks:
            lock.release()
        raise
    return todo, held, locks
