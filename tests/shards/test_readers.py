"""The shard reader's fast paths equal the slow ones they replace: the strict .npy header parser against numpy's own
(and hostile headers refused), the tar member reader against tarfile, the finite check against np.isfinite, the
vectorised JSON depth against a plain state machine."""

from __future__ import annotations

import ast
import io
import random
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest

from shards import SchemaError
from shards.guard import json_depth, load_json, load_npy
from shards.schema import all_finite
from shards.tarstream import NotATar, iter_members

DTYPES = ["<f2", "<f4", "<f8", ">f4", "|i1", "|u1", "<i2", ">i2", "<i4", "<u4", "<i8", "<u8", "|b1", "<c8", "<c16"]
DTYPES += ["|S5", "<U3", ">U2"]
SHAPES = [(), (0,), (3,), (2, 3), (4, 0, 2), (2, 3, 4), (1, 1, 1, 1), (5, 478, 3)]


def _saved(array: np.ndarray, version: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, array, version=version, allow_pickle=False)
    return buf.getvalue()


@pytest.mark.parametrize("dtype", DTYPES)
def test_npy_parser_reads_what_numpy_reads(dtype: str, monkeypatch) -> None:
    rng = np.random.default_rng(5)
    for shape in SHAPES:
        base = (rng.standard_normal(shape) * 50).astype(dtype)
        for array in (base, np.asfortranarray(base)):
            for version in ((1, 0), (2, 0)):
                data = _saved(array, version)
                want = np.load(io.BytesIO(data), allow_pickle=False)
                with monkeypatch.context() as patch:
                    patch.setattr(ast, "literal_eval", None)  # the header is parsed, never evaluated
                    got, view = load_npy(data), load_npy(data, copy=False)
                for out in (got, view):
                    assert out.dtype == want.dtype and out.shape == want.shape, (dtype, shape, version)
                    assert np.array_equal(out, want), (dtype, shape, version)
                    assert out.flags.f_contiguous == want.flags.f_contiguous
                    assert out.flags.c_contiguous == want.flags.c_contiguous
                assert got.flags.writeable and not np.shares_memory(got, np.frombuffer(data, np.uint8))
                if view.size:
                    assert not view.flags.writeable and np.shares_memory(view, np.frombuffer(data, np.uint8))


def _header(text: str, version: int = 1, data: bytes = b"\0" * 64) -> bytes:
    raw = text.encode("latin1")
    length = struct.pack("<H" if version == 1 else "<I", len(raw))
    return b"\x93NUMPY" + bytes([version, 0]) + length + raw + data


def _npy_dict(descr: str, shape: str, version: int = 1) -> bytes:
    """A header of numpy's dict layout with ``descr`` and ``shape`` as written (source text, not values)."""
    return _header(f"{{'descr': {descr}, 'fortran_order': False, 'shape': {shape}, }}\n", version)


HOSTILE = {
    "object dtype": (_header("{'descr': '|O', 'fortran_order': False, 'shape': (2,), }    \n"), "allow_pickle=False"),
    "code in descr": (_npy_dict("__import__('os').system('true')", "(2,)"), "not one numpy writes"),
    "code in shape": (_npy_dict("'<f2'", "(len(open('/etc/passwd').read()),)"), "not one numpy writes"),
    "structured dtype": (_npy_dict("[('a', '<i4')]", "(2,)"), "not one numpy writes"),
    "void dtype": (_npy_dict("'|V8'", "(2,)"), "not a plain number"),
    "datetime dtype": (_npy_dict("'<M8[s]'", "(2,)"), "not one numpy"),
    "unknown dtype": (_npy_dict("'<Z9'", "(2,)"), "not a NumPy dtype"),
    "zero-size items": (_npy_dict("'|S0'", "(2,)"), "not a plain number"),
    "negative dim": (_npy_dict("'<f2'", "(-1,)"), "not one numpy writes"),
    "huge shape": (
        _npy_dict("'<f2'", "(1048576, 1048576)"),
        r"declares shape \(1048576, 1048576\) of float16 \(2199023255552 bytes\)",
    ),
    "huge dims, no items": (_npy_dict("'<f2'", "(0, 9999999999999999999)"), "cannot be made"),
    "extra key": (
        _header("{'descr': '<f2', 'fortran_order': False, 'shape': (2,), 'x': 1, }\n"),
        "not one numpy writes",
    ),
    "no newline": (_header("{'descr': '<f2', 'fortran_order': False, 'shape': (2,), }"), "not one numpy writes"),
    "not a dict": (_header("[1, 2, 3]\n"), "not one numpy writes"),
    "header past the data": (b"\x93NUMPY\x01\x00\xff\x00{'descr'", "truncated"),
    "header over 10000 bytes": (_header("{'descr': '<f2', " + " " * 20000 + "}\n", version=2), "over 10000"),
    "version 3": (_npy_dict("'<f2'", "(2,)", version=3), "version"),
    "no magic": (b"PK\x03\x04 not an npy", "no .npy magic"),
    "empty": (b"", "no .npy magic"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_npy_headers_are_refused_before_allocating(case: str) -> None:
    data, message = HOSTILE[case]
    with pytest.raises(SchemaError, match=message):
        load_npy(data)


def _tar(path: Path, members: list[tuple[str, bytes]], fmt: int) -> None:
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1_700_000_000
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_members_equal_tarfiles(tmp_path: Path, fmt: int) -> None:
    rng = random.Random(3)
    long_key = "d" * 90 + "/" + "k" * 40 + "__c"  # past a name field's 100 bytes: ustar prefix, GNU or pax header
    members = [(f"s{i}__c.{m}", rng.randbytes(n)) for i, n in enumerate((0, 1, 511, 512, 513, 5000)) for m in "ab"]
    members.insert(3, (f"{long_key}.text_feat.npy", b"long"))
    members.append(("u\u00e9__c.meta.json", b"{}"))  # a non-ASCII key
    path = tmp_path / "a.tar"
    _tar(path, members, fmt)
    seen: list[str] = []
    with open(path, "rb") as f:
        got = [(name, data) for name, data in iter_members(f, lambda info: seen.append(info.type) or info.name)]
    with tarfile.open(path) as tar:
        want = [(info.name, tar.extractfile(info).read()) for info in tar]
    assert got == want == members
    assert set(seen) <= {tarfile.REGTYPE}


def test_tar_reader_errors(tmp_path: Path) -> None:
    path = tmp_path / "a.tar"
    _tar(path, [("a__b.meta.json", b"x" * 3000), ("a__b.text_ids.npy", b"y" * 10)], tarfile.USTAR_FORMAT)
    data = path.read_bytes()

    def members(raw: bytes) -> list[str]:
        return [name for name, _ in iter_members(io.BytesIO(raw), lambda info: info.name)]

    assert members(data) == ["a__b.meta.json", "a__b.text_ids.npy"]
    assert members(data[:4608]) == ["a__b.meta.json", "a__b.text_ids.npy"]  # no end-of-archive blocks: the end
    with pytest.raises(tarfile.ReadError, match="unexpected end of data"):
        members(data[:2000])
    with pytest.raises(tarfile.ReadError, match="truncated header"):
        members(data[: 3584 + 100])
    broken = bytearray(data)
    broken[3584 + 10] ^= 1  # the second header's name: its checksum no longer matches
    with pytest.raises(tarfile.ReadError, match="bad checksum at byte 3584"):
        members(bytes(broken))
    for junk in (b"", b"not a tar at all" * 100):
        with pytest.raises(NotATar):
            members(junk)
    assert members(bytes(1024)) == []  # an empty archive


def test_all_finite_equals_isfinite() -> None:
    rng = np.random.default_rng(1)
    for dtype in (np.float16, np.float32, np.float64, ">f4", np.int32, np.bool_):
        for special in (None, np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, "max", "min"):
            x = (rng.standard_normal((7, 5)) * 3).astype(dtype)
            if special in ("max", "min") and x.dtype.kind == "f":
                x[2, 2] = getattr(np.finfo(x.dtype), special)
            elif special is not None and x.dtype.kind == "f":
                x[3, 1] = special
            for view in (x, x[:, ::2], x[:0]):
                want = bool(np.isfinite(view).all()) if view.dtype.kind == "f" else True
                assert all_finite(view) == want, (dtype, special)
    bits = np.array([0x7E01, 0xFE01, 0x7C00, 0xFC00, 0x7BFF, 0xFBFF], np.uint16)  # NaNs, infs, the largest finite
    assert [all_finite(bits[i : i + 1].view(np.float16)) for i in range(6)] == [False] * 4 + [True] * 2


def _reference_depth(data: bytes) -> int:
    """json_depth's rule one byte at a time: a quote toggles strings unless an odd backslash run precedes it."""
    depth = best = run = 0
    inside = False
    for ch in data.decode("latin1"):
        if ch == '"' and run % 2 == 0:
            inside = not inside
        elif not inside and ch in "[{":
            depth += 1
            best = max(best, depth)
        elif not inside and ch in "]}":
            depth -= 1
        run = run + 1 if ch == "\\" else 0
    return best


def test_json_depth_equals_a_state_machine() -> None:
    rng = random.Random(2)
    for _ in range(3000):
        text = "".join(rng.choice('"\\[]{}a ,') for _ in range(rng.randint(0, 60))).encode()
        assert json_depth(text) == _reference_depth(text), text
    assert load_json(b'{"a": [1, {"b": "[[[["}]}') == {"a": [1, {"b": "[[[["}]}
    with pytest.raises(SchemaError, match="nested 65 levels deep"):
        load_json(b"[" * 65 + b"]" * 65)
