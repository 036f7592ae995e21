"""The one guarded way into a shard: every reader (iter_shard, inspect, report, Hugging Face, training) goes here.

A shard is a plain POSIX tar of flat ``<key>.<member>`` regular files. The reader refuses, with a
:class:`~shards.schema.SchemaError` naming the shard and member, before it reads the bytes:

* a compressed tar (gzip, bzip2, xz, zstd magic bytes): a few MB on disk may inflate to GBs;
* anything but a regular file: symbolic or hard links, devices, FIFOs, folders, sparse members (a few KB on
  disk declaring GBs), names in a folder, absolute or with ``..``;
* a member that is not in the schema, or whose size in the tar header is over its cap. The caps follow from the
  declared shapes (:data:`shards.schema.MEMBERS`, and the members dataset.json's records declare, see
  :mod:`shards.contract`): item size times the product of the axes, the widths
  from dataset.json's ``dims`` and each time axis bounded by its step rate times the longest clip
  (dataset.json's ``max_duration_s`` or extraction's default, with a margin). ``meta.json`` is capped at 1 MB.

Decoding (:func:`load_npy`, :func:`load_json`) then checks a ``.npy`` header's declared shape against the bytes
the member holds before NumPy allocates anything, and a JSON document's nesting depth before ``json.loads``.
"""

from __future__ import annotations

import functools
import json
import math
import re
import struct
import tarfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from shards.contract import table_of
from shards.dataset_fields import DURATION, FPS
from shards.schema import MEMBERS, SAMPLE_RATE, MemberSpec, SchemaError
from shards.tarstream import NotATar, iter_members

COMPRESSED_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}
META_MEMBER = "meta.json"
META_MAX_BYTES = 1 << 20
JSON_MAX_DEPTH = 64
DEFAULT_MAX_DURATION_S = 3600.0  # extraction's default max_duration_s (extract/config.py)
DURATION_MARGIN = 2.0  # time axes may be this many times the longest clip's steps
DEFAULT_FPS = 30.0  # extraction's frame rate cap when the feature set records "native"
STEP_RATES = {"Tt": 20.0, "Ta": 50.0, "N": float(SAMPLE_RATE)}  # steps per second; "Tv" comes from the fps
MIN_STEPS = 4096  # a time axis may always be this long (short clips with long transcripts)
MAX_WIDTH = 8192  # a feature width dataset.json does not declare
NPY_HEADER_BYTES = 1 << 16  # room for a .npy header on top of the array bytes


@dataclass(frozen=True)
class ShardLimits:
    """Per-member byte caps (member suffix → bytes) for the shards of one dataset, and the member table they
    come from (:func:`shards.contract.member_table` of its dataset.json: the schema's members and those its
    extractors declare), which the samples read are validated against."""

    caps: Mapping[str, int]
    members: Mapping[str, MemberSpec] = field(default_factory=lambda: dict(MEMBERS))

    @classmethod
    def derive(
        cls,
        dims: Mapping[str, Any] | None = None,
        feature_set: Mapping[str, Any] | None = None,
        max_duration_s: float | None = None,
        members: Mapping[str, MemberSpec] | None = None,
    ) -> ShardLimits:
        """Caps from the shapes of ``members`` (default: the schema's), dataset.json's ``dims`` and ``feature_set``
        and the longest clip.

        A frame rate or duration outside what extraction accepts (``shards.dataset_fields.FPS`` and ``DURATION``)
        is a SchemaError naming it: a cap sized from ``1e308`` seconds would be no cap (and overflows)."""
        fps = (feature_set or {}).get("fps")
        problems = [] if fps is None or isinstance(fps, str) else [FPS.problem(fps, "feature_set.fps")]
        problems += [] if max_duration_s is None else [DURATION.problem(max_duration_s, "max_duration_s")]
        if any(problems):
            raise SchemaError("dataset.json: " + "; ".join(p for p in problems if p))
        fps = float(fps) if isinstance(fps, (int, float)) else DEFAULT_FPS
        seconds = float(max_duration_s or DEFAULT_MAX_DURATION_S) * DURATION_MARGIN
        bounds = {sym: max(MIN_STEPS, math.ceil(rate * seconds)) for sym, rate in {**STEP_RATES, "Tv": fps}.items()}
        for sym, width in (dims or {}).items():
            if sym not in bounds and isinstance(width, int) and width > 0:
                bounds[sym] = width
        caps = {META_MEMBER: META_MAX_BYTES}
        members = dict(MEMBERS if members is None else members)
        for name, spec in members.items():
            axes = [axis if isinstance(axis, int) else bounds.get(axis, MAX_WIDTH) for axis in spec.shape]
            caps[name] = np.dtype(spec.dtype).itemsize * math.prod(axes) + NPY_HEADER_BYTES
        return cls(caps, members)

    @classmethod
    def of_dataset(cls, ds: Mapping[str, Any]) -> ShardLimits:
        """Caps for the shards a dataset.json object lists."""
        fs = ds.get("feature_set") if isinstance(ds.get("feature_set"), Mapping) else {}
        dims = ds.get("dims") if isinstance(ds.get("dims"), Mapping) else {}
        return cls.derive(dims, fs, ds.get("max_duration_s") or fs.get("max_duration_s"), table_of(ds))

    @classmethod
    def beside(cls, shard: Path | str) -> ShardLimits:
        """Caps from the dataset.json next to ``shard`` (the schema's defaults when there is none or it is
        unusable: a reader of the directory refuses such a dataset.json itself, see ``shards.dataset``)."""
        path = Path(shard).with_name("dataset.json")
        try:
            if path.stat().st_size <= 64 * META_MAX_BYTES:
                ds = load_json(path.read_bytes(), max_bytes=64 * META_MAX_BYTES)
                if isinstance(ds, Mapping):
                    return cls.of_dataset(ds)
        except (OSError, ValueError):
            pass
        return cls.derive()


def refuse_compressed(head: bytes, label: str) -> None:
    """SchemaError if ``head`` (a file's first bytes) starts like a compressed stream."""
    for magic, kind in COMPRESSED_MAGIC.items():
        if head.startswith(magic):
            raise SchemaError(
                f"shard {label}: a {kind}-compressed tar; shards are plain (uncompressed) tars, refused unread"
            )


def check_member(info: tarfile.TarInfo, label: str, limits: ShardLimits) -> tuple[str, str]:
    """``(key, member)`` of a tar entry, or SchemaError if it is not a regular schema member within its cap."""
    where = f"shard {label}: member {info.name}"
    parts = (info.name,) if "/" not in info.name and info.name != ".." else PurePosixPath(info.name).parts
    if info.name.startswith("/") or ".." in parts:
        raise SchemaError(f"{where}: the name escapes the shard (absolute or '..'); refused")
    if info.issym() or info.islnk():
        kind = "symbolic" if info.issym() else "hard"
        raise SchemaError(f"{where}: a {kind} link (to {info.linkname}), not a regular file; refused")
    if info.issparse() or not info.isreg():
        kind = "sparse file" if info.issparse() else _kind(info)
        raise SchemaError(f"{where}: a {kind}, not a regular file; refused")
    if len(parts) != 1:
        raise SchemaError(f"{where}: in a folder; shard members are flat <key>.<member> files")
    key, _, name = info.name.partition(".")
    cap = limits.caps.get(name)
    if cap is None:
        raise SchemaError(f"{where}: {name!r} is not a member of the shard schema; refused")
    if info.size > cap:
        raise SchemaError(
            f"{where}: the tar header declares {info.size} bytes, over the {cap}-byte cap for {name} "
            "(from the schema's shape, dataset.json's dims and the longest clip); refused unread"
        )
    return key, name


def _kind(info: tarfile.TarInfo) -> str:
    if info.isdir():
        return "folder"
    if info.ischr() or info.isblk():
        return "device"
    if info.isfifo():
        return "FIFO"
    return f"tar entry of type {info.type!r}"


def iter_raw_samples(
    path: Path | str, limits: ShardLimits | None = None, label: str | None = None
) -> Iterator[dict[str, Any]]:
    """Samples of one shard in order with members as bytes: ``{"__key__", "__url__", member: bytes, ...}``.

    ``limits`` defaults to those of the dataset.json beside the shard; ``label`` names the shard in errors
    (its path by default). Every refusal is a SchemaError naming the shard and, where there is one, the member.
    Each header is checked (:func:`check_member`) before its member's bytes are read (:mod:`shards.tarstream`).
    """
    label = label or str(path)
    limits = limits or ShardLimits.beside(path)
    try:
        stream = open(path, "rb")  # noqa: SIM115 - closed by the with below
    except OSError as exc:
        raise SchemaError(f"shard {label}: not a readable tar ({exc})") from exc
    with stream:
        refuse_compressed(stream.read(8), label)
        stream.seek(0)
        current: dict[str, Any] | None = None
        done = 0
        try:
            for (key, name), data in iter_members(stream, functools.partial(check_member, label=label, limits=limits)):
                if current is not None and current["__key__"] != key:
                    yield current
                    current, done = None, done + 1
                if current is None:
                    current = {"__key__": key, "__url__": str(path)}
                if name in current:
                    raise SchemaError(f"shard {label}: member {key}.{name} appears twice")
                current[name] = data
        except NotATar as exc:
            raise SchemaError(f"shard {label}: not a readable tar ({exc})") from exc
        except (tarfile.TarError, OSError) as exc:
            raise SchemaError(f"shard {label}: truncated or corrupt tar after sample {done} ({exc})") from exc
        if current is not None:
            yield current


NPY_MAGIC = b"\x93NUMPY"
NPY_MAX_HEADER = 10_000  # as numpy's own reader (max_header_size)
# The header numpy writes (format.write_array_header_*): the dict's keys sorted, a simple dtype, the shape's repr,
# padded with spaces to an aligned length and ended by a newline. Anything else is refused, never evaluated.
NPY_HEADER = re.compile(
    r"\{'descr': '(?P<descr>[<>|=][a-zA-Z]\d{0,4})', 'fortran_order': (?P<fortran>True|False), "
    r"'shape': \((?P<shape>|\d{1,19},|\d{1,19}(?:, \d{1,19})+)\), \} *\n"
)
NPY_KINDS = "biufcSU"  # plain numbers, booleans and fixed-width text; never objects (pickles) or records


def load_npy(data: bytes, copy: bool = True) -> np.ndarray:
    """A ``.npy`` member as :func:`numpy.load` reads it, never unpickled: its header parsed once by a strict parser
    (:data:`NPY_HEADER`, nothing evaluated) and its declared shape checked against the bytes present before
    anything is allocated. ``copy=False``: a read-only view of ``data`` (no copy), for readers that only read."""
    version = data[6:8] if data[:6] == NPY_MAGIC else b""
    if version not in (b"\x01\x00", b"\x02\x00"):
        shown = tuple(version) if len(version) == 2 else "none: no .npy magic"
        raise SchemaError(f".npy format version {shown} is not one mmfuse writes (1.0 or 2.0)")
    size = 2 if version == b"\x01\x00" else 4
    (length,) = struct.unpack_from("<H" if size == 2 else "<I", data, 8) if len(data) >= 8 + size else (-1,)
    start = 8 + size + length
    if length < 0 or length > NPY_MAX_HEADER or start > len(data):
        raise SchemaError(f".npy header of {length} bytes is truncated or over {NPY_MAX_HEADER} bytes")
    match = NPY_HEADER.fullmatch(data[8 + size : start].decode("latin1"))
    if match is None:
        raise SchemaError(f".npy header {data[8 + size : start][:80]!r} is not one numpy writes for a plain array")
    dtype = npy_dtype(match["descr"])
    shape = tuple(int(n) for n in match["shape"].split(",") if n.strip())
    declared, present = dtype.itemsize * math.prod(shape), len(data) - start
    if declared > present:
        raise SchemaError(
            f".npy header declares shape {shape} of {dtype} ({declared} bytes) but the member holds "
            f"{present}; refused before allocating"
        )
    try:
        flat = np.frombuffer(data, dtype, count=math.prod(shape), offset=start)
        array = flat.reshape(shape[::-1]).T if match["fortran"] == "True" else flat.reshape(shape)
    except ValueError as exc:
        raise SchemaError(f".npy array of shape {shape} cannot be made ({exc})") from exc
    return array.copy(order="K") if copy else array


@functools.lru_cache(maxsize=64)
def npy_dtype(descr: str) -> np.dtype:
    """The dtype a ``.npy`` header's ``descr`` names, if it is a plain one (:data:`NPY_KINDS`)."""
    try:
        dtype = np.dtype(descr)
    except TypeError:
        raise SchemaError(f".npy dtype {descr!r} is not a NumPy dtype") from None
    if dtype.kind == "O":
        raise SchemaError(".npy member holds Python objects: shards never hold pickles (read with allow_pickle=False)")
    if dtype.kind not in NPY_KINDS or dtype.itemsize == 0:
        raise SchemaError(f".npy dtype {descr!r} is not a plain number, boolean or text type")
    return dtype


def load_json(data: bytes, max_bytes: int = META_MAX_BYTES, max_depth: int = JSON_MAX_DEPTH) -> Any:
    """A JSON member of at most ``max_bytes`` nested at most ``max_depth`` deep (checked before parsing; a text with
    no more brackets than ``max_depth`` cannot nest deeper, so only one with more is scanned)."""
    if len(data) > max_bytes:
        raise SchemaError(f"JSON of {len(data)} bytes, over the {max_bytes}-byte cap")
    if data.count(b"[") + data.count(b"{") > max_depth:
        depth = json_depth(data)
        if depth > max_depth:
            raise SchemaError(f"JSON nested {depth} levels deep, over the limit of {max_depth}")
    try:
        return json.loads(data.decode("utf-8"))
    except RecursionError as exc:  # pragma: no cover - json_depth bounds the nesting first
        raise SchemaError("JSON nested too deep to parse") from exc


JSON_SPECIAL = np.zeros(256, bool)
JSON_SPECIAL[list(b'"\\[]{}')] = True  # the bytes json_depth looks at


def json_depth(data: bytes) -> int:
    """Deepest bracket nesting of a JSON text, strings left out, in one linear pass (vectorised).

    A quote opens or closes a string unless an odd run of backslashes precedes it; brackets count only outside
    strings, so everything after an unterminated string is text (as a JSON parser reads it: it stops there).
    Stray closing brackets may take the running depth below 0; the maximum is what bounds the parser's recursion.
    Only the bytes that matter (quotes, backslashes, brackets) are looked at after one pass that finds them.
    """
    raw = np.frombuffer(data, np.uint8)
    if raw.size == 0:
        return 0
    pos = np.flatnonzero(JSON_SPECIAL[raw])
    byte = raw[pos]
    slash = byte == ord("\\")
    # a backslash run: consecutive backslashes at consecutive positions; each event knows where its run started
    joined = np.zeros(pos.size, bool)
    joined[1:] = slash[1:] & slash[:-1] & (pos[1:] == pos[:-1] + 1)
    run_start = np.maximum.accumulate(np.where(slash & ~joined, pos, -1))
    before = np.zeros(pos.size, np.int64)  # backslashes right before each event
    touching = np.zeros(pos.size, bool)
    touching[1:] = slash[:-1] & (pos[1:] == pos[:-1] + 1)
    before[1:] = np.where(touching[1:], pos[1:] - run_start[:-1], 0)
    quotes = (byte == ord('"')) & (before % 2 == 0)
    outside = np.cumsum(quotes) % 2 == 0  # after an even number of string quotes (a quote itself is never a bracket)
    step = np.zeros(pos.size, np.int32)
    step[(byte == ord("[")) | (byte == ord("{"))] = 1
    step[(byte == ord("]")) | (byte == ord("}"))] = -1
    return int(np.cumsum(step * outside).max(initial=0))
