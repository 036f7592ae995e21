"""A shard's tar members in order, each header parsed once and checked before its bytes are read.

The headers mmfuse's writer and most tools write (ustar, GNU, v7: one 512-byte block per member) are parsed here,
field by field as :mod:`tarfile` parses them (checksum signed or unsigned, octal or base-256 numbers, the ustar
name prefix, a regular file's name ending in ``/`` being a folder, an old-GNU sparse member), into a
:class:`tarfile.TarInfo` the guard's ``check`` sees before a byte of the member is read; ``tarfile`` itself costs
about ten times as much per member. Extension headers (pax ``x`` / ``g``, GNU long names ``L`` / ``K`` / ``N``)
are left to ``tarfile``: from the first one on, the rest of the shard is read through it, under the same check.

Errors are :class:`tarfile.ReadError`: :class:`NotATar` when the very first header is not one, otherwise a header
that is truncated or fails its checksum, or a member whose bytes end early.
"""

from __future__ import annotations

import struct
import tarfile
from collections.abc import Callable, Iterator
from typing import BinaryIO, TypeVar

from mmfuse.errors import MmfuseError

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
EXTENDED = (b"x", b"g", b"L", b"K", b"N")  # headers that change the next member's: left to tarfile
ENCODING, ERRORS = "utf-8", "surrogateescape"  # as tarfile.open decodes names on Linux
T = TypeVar("T")


class NotATar(MmfuseError, tarfile.ReadError):
    """The file does not start with a tar header (or is empty)."""


def iter_members(stream: BinaryIO, check: Callable[[tarfile.TarInfo], T]) -> Iterator[tuple[T, bytes]]:
    """``(check(info), member bytes)`` for each member of the tar ``stream`` (read from its position), in order.

    ``check`` sees every header before its member's bytes are read and refuses by raising; a member it accepts must
    be a regular file (its declared size is read). The archive ends at the first all-zero block or at the end of
    the file.
    """
    start = offset = stream.tell()
    while True:
        block = stream.read(BLOCK)
        if not block or block == ZERO_BLOCK:
            if not block and offset == start:
                raise NotATar("empty file")
            return
        if len(block) < BLOCK:
            raise (NotATar if offset == start else tarfile.ReadError)(f"truncated header at byte {offset}")
        if block[156:157] in EXTENDED:
            stream.seek(offset)
            yield from _by_tarfile(stream, check, offset == start)
            return
        try:
            info = parse_header(block)
        except tarfile.HeaderError as exc:
            raise (NotATar if offset == start else tarfile.ReadError)(f"{exc} at byte {offset}") from exc
        checked = check(info)
        data = stream.read(info.size)
        if len(data) < info.size:
            raise tarfile.ReadError(f"unexpected end of data in member {info.name}")
        padding = -info.size % BLOCK
        if padding:
            stream.seek(padding, 1)
        offset += BLOCK + info.size + padding
        yield checked, data


def _by_tarfile(stream: BinaryIO, check: Callable[[tarfile.TarInfo], T], first: bool) -> Iterator[tuple[T, bytes]]:
    try:
        tar = tarfile.open(fileobj=stream, mode="r|")
    except tarfile.ReadError as exc:
        raise (NotATar if first else tarfile.ReadError)(str(exc)) from exc
    for info in tar:
        checked = check(info)
        yield checked, tar.extractfile(info).read()


def parse_header(block: bytes) -> tarfile.TarInfo:
    """One 512-byte ustar / GNU / v7 header as :meth:`tarfile.TarInfo.frombuf` reads it (its fields the guard
    checks: name, type, size, link name, sparse); :class:`tarfile.InvalidHeaderError` when it is not one."""
    chksum = number(block[148:156])
    if chksum != 256 + sum(block[:148]) + sum(block[156:]):
        if chksum != 256 + sum(struct.unpack_from("148b8x356b", block)):
            raise tarfile.InvalidHeaderError("bad checksum")
    kind = block[156:157]
    name = text(block[0:100])
    if kind == tarfile.AREGTYPE and name.endswith("/"):
        kind = tarfile.DIRTYPE
    if kind == tarfile.DIRTYPE:
        name = name.rstrip("/")
    prefix = text(block[345:500])
    if prefix and kind not in tarfile.GNU_TYPES:
        name = f"{prefix}/{name}"
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = kind, number(block[124:136]), text(block[157:257])
    if kind == tarfile.GNUTYPE_SPARSE:
        info.sparse = []  # holes: refused by the guard whatever the map says
    if info.size < 0:
        raise tarfile.InvalidHeaderError(f"negative size {info.size}")
    return info


def text(field: bytes) -> str:
    """A NUL-terminated header field as tarfile decodes names."""
    return field.partition(b"\0")[0].decode(ENCODING, ERRORS)


def number(field: bytes) -> int:
    """An octal header number, or a base-256 one (first byte 0x80, or 0xff for negative), as tarfile reads them."""
    if field[:1] in (b"\x80", b"\xff"):
        n = int.from_bytes(field[1:], "big")
        return n - 256 ** (len(field) - 1) if field[0] == 0xFF else n
    try:
        return int(field.partition(b"\0")[0].strip() or b"0", 8)
    except ValueError:
        raise tarfile.InvalidHeaderError("invalid header") from None
