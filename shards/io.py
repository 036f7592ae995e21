"""Shard I/O: encode/decode members without pickle, write tars atomically, read them back.

Shards are plain POSIX tars: member ``<key>.<suffix>`` per array (``.npy``) or object (``.json``), samples
contiguous and in a fixed member order, so ``tar``, webdataset and Hugging Face ``datasets`` read them.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import tarfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from mmfuse.errors import MmfuseError
from shards.guard import ShardLimits, iter_raw_samples, load_json, load_npy
from shards.schema import MEMBERS, MemberSpec, SchemaError, validate_sample
from shards.sidecar import member_digest

MEMBER_ORDER = ("meta.json", *MEMBERS)
DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


class DiskFullError(MmfuseError, OSError):
    """Writing a shard ran out of space (or hit a file-size limit)."""


def encode_member(name: str, value: Any) -> bytes:
    """Bytes of one member: ``.npy`` without pickle, ``.json`` as UTF-8."""
    if name.endswith(".json"):
        return json.dumps(value, ensure_ascii=False, sort_keys=True, allow_nan=False).encode("utf-8")
    if name.endswith(".npy"):
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(value), allow_pickle=False)
        return buf.getvalue()
    raise SchemaError(f"member {name!r}: only .npy and .json members are allowed")


def decode_member(name: str, data: bytes, copy: bool = True) -> Any:
    """Decode one member; never unpickles. A ``.npy`` header declaring more data than the member holds, or JSON
    nested deeper than :data:`shards.guard.JSON_MAX_DEPTH`, is a SchemaError (see :mod:`shards.guard`).
    ``copy=False``: arrays are read-only views of ``data`` (:func:`shards.guard.load_npy`)."""
    if name.endswith(".json"):
        return load_json(data)
    if name.endswith(".npy"):
        return load_npy(data, copy)
    raise SchemaError(f"member {name!r}: only .npy and .json members are allowed")


def host_name() -> str:
    """This host's name as temporary file names carry it (characters other than ``A-Za-z0-9_.-`` become ``_``)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", os.uname().nodename) or "localhost"


def temp_path(path: Path, rank: int = 0) -> Path:
    """The temporary name this process writes ``path`` under: ``<name>.tmp-r<rank>-p<pid>-<host>``. It names its
    writer (rank, pid, host), so a clean-up removes it only once that writer is gone."""
    return path.with_name(f"{path.name}.tmp-r{rank}-p{os.getpid()}-{host_name()}")


def open_new(path: Path) -> BinaryIO:
    """``path`` opened for writing as a new regular file, never through a link: whatever is at that name (a stale
    temporary file, or a symbolic link planted there) is removed first (a link itself, never its target), then
    the file is created with ``O_EXCL | O_NOFOLLOW``, so a link that appears in between makes this fail instead
    of writing into another file."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    return os.fdopen(fd, "wb")


def atomic_write_bytes(path: Path, data: bytes, rank: int = 0) -> None:
    """Write ``data`` to ``path`` via a temporary name (:func:`temp_path`, opened by :func:`open_new`), fsync,
    rename (a rename replaces a link at ``path`` itself, never its target)."""
    tmp = temp_path(path, rank)
    try:
        with open_new(tmp) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno in DISK_FULL:
            raise DiskFullError(exc.errno, f"no space left writing {path}") from exc
        raise


def atomic_write_json(path: Path, obj: Any, rank: int = 0) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True, allow_nan=False) + "\n").encode(), rank)


class ShardWriter:
    """Write one shard to its temporary name (:func:`temp_path`); :meth:`commit` renames it into place.

    Every sample is validated before it is written. On any error the temporary file is removed, so a
    half-written shard never appears under its final name. ``keys`` lists the samples written, in order, and
    ``digests`` each one's members with their digests (:func:`shards.sidecar.member_digest`), for the sidecar.
    """

    def __init__(
        self, path: Path | str, validate: bool = True, rank: int = 0, members: Mapping[str, MemberSpec] | None = None
    ) -> None:
        self.path = Path(path)
        self.tmp = temp_path(self.path, rank)
        self.validate = validate
        self.members = MEMBERS if members is None else members  # the extractors' member table (shards.contract)
        self.keys: list[str] = []
        self.digests: dict[str, dict[str, str]] = {}
        self.nbytes = 0
        self._file = open_new(self.tmp)
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)

    def write(self, sample: Mapping[str, Any]) -> None:
        if self.validate:
            validate_sample(sample, members=self.members)
        key = sample["__key__"]
        digests: dict[str, str] = {}
        declared = sorted(n for n in sample if not n.startswith("__") and n not in MEMBER_ORDER)
        try:
            for name in (*MEMBER_ORDER, *declared):  # the schema's order, then members an extractor declares
                if name in sample:
                    digests[name] = self._add(f"{key}.{name}", encode_member(name, sample[name]))
        except OSError as exc:
            self.abort()
            if exc.errno in DISK_FULL:
                raise DiskFullError(exc.errno, f"no space left writing shard {self.path}") from exc
            raise
        self.keys.append(key)
        self.digests[key] = digests

    def _add(self, name: str, data: bytes) -> str:
        """Append one member; its digest."""
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o644
        info.mtime = 0  # reproducible bytes: same input, same shard
        self._tar.addfile(info, io.BytesIO(data))
        self.nbytes += len(data)
        return member_digest(data)

    def commit(self) -> Path:
        """Flush, fsync and rename the shard to its final name."""
        try:
            self._tar.close()  # a tar given a file object leaves it open
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self.tmp, self.path)
        except OSError as exc:
            self.abort()
            if exc.errno in DISK_FULL:
                raise DiskFullError(exc.errno, f"no space left writing shard {self.path}") from exc
            raise
        return self.path

    def abort(self) -> None:
        for close in (self._tar.close, self._file.close):
            try:
                close()
            except OSError:
                pass
        self.tmp.unlink(missing_ok=True)


def iter_shard(path: Path | str, validate: bool = True, limits: ShardLimits | None = None) -> Iterator[dict[str, Any]]:
    """Yield decoded samples of one shard in order; errors name the shard and member.

    The tar is read through :func:`shards.guard.iter_raw_samples` (``limits``: its member caps, by default from
    the dataset.json beside the shard).
    """
    path = Path(path)
    limits = ShardLimits.beside(path) if limits is None else limits
    for raw in iter_raw_samples(path, limits):
        yield _finish(decode_sample(raw, path), path, validate, limits.members)


def decode_sample(raw: dict[str, Any], shard: Path | str, copy: bool = True) -> dict[str, Any]:
    """``raw`` with every member decoded by :func:`decode_member` (its ``__`` entries kept as they are);
    :class:`SchemaError` naming the shard and member when one cannot be decoded. ``copy=False``: arrays are
    read-only views of the member bytes."""
    sample = {k: v for k, v in raw.items() if k.startswith("__")}
    for suffix, data in raw.items():
        if suffix.startswith("__"):
            continue
        try:
            sample[suffix] = decode_member(suffix, data, copy)
        except (ValueError, OSError, UnicodeDecodeError) as exc:
            member = f"{raw['__key__']}.{suffix}"
            raise SchemaError(f"shard {shard}: member {member} cannot be decoded ({exc})") from exc
    return sample


def _finish(sample: dict[str, Any], path: Path, validate: bool, members: Mapping[str, MemberSpec]) -> dict[str, Any]:
    if validate:
        try:
            validate_sample(sample, members=members)
        except SchemaError as exc:
            raise SchemaError(f"shard {path}: {exc}") from exc
    return sample
