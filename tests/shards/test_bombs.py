"""Memory bombs and unsafe members in a shard: every reader (iter_shard, inspect --verify, report, Hugging Face
loading, training) refuses them with one SchemaError naming the shard and member, under a small address-space
limit and below 1 GB peak resident memory, without a traceback (also with ``skip_bad_samples``)."""

from __future__ import annotations

import gzip
import io
import json
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from shards import SchemaError
from shards.guard import ShardLimits, json_depth, load_json, load_npy
from shards.sidecar import member_digest
from tests.train.test_data import write_shards

GB = 1 << 30
BOMB = 8 * GB  # what each bomb inflates to
LIMIT_AS = 4 * GB + GB // 2  # a reader's address space: a normal run (torch's mappings included) peaks near 3.1 GB
MAX_RSS = GB  # what a reader may hold in memory (peak resident set, VmHWM), bomb or not
SHARD = "valid-000000.tar"
VICTIM = "valid0__c1"  # the second sample of the shard
READERS = ("iter_shard", "inspect", "report", "hf", "train", "train-skip")
# One process runs every reader in turn (torch and datasets are imported once); before each reader its peak
# resident set is reset (writing 5 to /proc/self/clear_refs), after it VmHWM is that reader's peak.
CHILD = """
import contextlib, html, io, resource, sys
resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
root, readers = sys.argv[1], sys.argv[2:]
from shards import SchemaError

def read(reader):
    if reader == "iter_shard":
        from shards.io import iter_shard
        for path in sorted(__import__("pathlib").Path(root).glob("*.tar")):
            for _ in iter_shard(path):
                pass
    elif reader.startswith("train"):
        from train.data import DataConfig, make_loader
        cfg = DataConfig(num_workers=0, normalise=False, skip_bad_samples=reader == "train-skip")
        loader = make_loader(root, "valid", cfg, train=False)
        keys = [k for batch in loader for k in batch["key"]]
        print("read", len(keys), "bad", len(loader.bad_samples), *loader.bad_samples, sep="\\n")
    elif reader == "report":
        from extract.report import write_report
        text = html.unescape(write_report(root, root + ".report").read_text())
        problems = [line for line in text.split("<") if "{shard}" in line]
        print(*problems, sep="\\n")
        return 1 if problems else 0
    elif reader == "hf":
        from shards.hf import load_hf_dataset
        data = load_hf_dataset(root, cache_dir=root + ".hf-cache")
        print({{k: len(v) for k, v in data.items()}})
    else:
        from mmfuse.cli import main
        return main(["inspect", root, "--verify"])
    return 0

for reader in readers:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            rc = read(reader)
        except SchemaError as exc:
            print(exc)
            rc = 1
    hwm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(f"=== {{reader}} rc={{rc}} peak_rss={{hwm}}")
    print(out.getvalue(), flush=True)
"""


@dataclass
class Result:
    """What one reader printed, its exit code and its peak resident set (bytes)."""

    text: str
    rc: int
    peak_rss: int


def _npy(shape: tuple[int, ...], dtype: str = "float16", data: bytes = b"\0" * 64) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": shape})
    return buf.getvalue() + data


def _rewrite(shard: Path, extra: tarfile.TarInfo | None = None, replace: dict[str, bytes] | None = None) -> None:
    """Rewrite ``shard`` with members of ``VICTIM`` replaced, and ``extra`` (with no data) added before them.

    The sidecar's digests of replaced members are forged to match: the bomb must be refused by the guards, not
    only by the digest check."""
    sidecar = shard.with_suffix(".json")
    side = json.loads(sidecar.read_text())
    for name, data in (replace or {}).items():
        key, _, member = name.partition(".")
        side["digests"][key][member] = member_digest(data)
    sidecar.write_text(json.dumps(side))
    with tarfile.open(shard) as tin:
        members = [(info, tin.extractfile(info).read()) for info in tin]
    with tarfile.open(shard, "w", format=tarfile.GNU_FORMAT) as tout:
        for info, data in members:
            if extra is not None and info.name == f"{VICTIM}.meta.json":
                tout.addfile(extra)
            data = (replace or {}).get(info.name, data)
            info.size = len(data)
            tout.addfile(info, io.BytesIO(data))


def _gzip_bomb(shard: Path) -> None:
    """A gzip'd tar (a few MB) whose first member inflates to ``BOMB`` bytes: gzip members concatenated."""
    info = tarfile.TarInfo(f"{VICTIM}.text_feat.npy")
    info.size = BOMB
    chunk = 64 << 20
    zeros = gzip.compress(b"\0" * chunk, compresslevel=9)
    with open(shard, "wb") as f:
        f.write(gzip.compress(info.tobuf(tarfile.GNU_FORMAT)))
        for _ in range(BOMB // chunk + 1):
            f.write(zeros)


def _sparse_member(shard: Path) -> None:
    """An old-GNU sparse member: 512 bytes on disk, ``BOMB`` bytes when read (holes are zeros)."""
    info = tarfile.TarInfo(f"{VICTIM}.text_feat.npy")
    info.size = 512
    head = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    head[156:157] = tarfile.GNUTYPE_SPARSE
    head[386:482] = b"".join(b"%011o\0%011o\0" % (i * 128, 128) for i in range(4))  # 512 data bytes up front
    head[483:495] = b"\x80" + BOMB.to_bytes(11, "big")  # the real size (base-256: over 11 octal digits)
    head[148:156] = b" " * 8
    head[148:156] = b"%06o\0 " % sum(head)
    with tarfile.open(shard) as tin:
        first = [(i, tin.extractfile(i).read()) for i in tin if i.name.startswith("valid0__c0.")]
    with tarfile.open(shard, "w", format=tarfile.GNU_FORMAT) as tout:
        for i, data in first:
            tout.addfile(i, io.BytesIO(data))
        tout.fileobj.write(bytes(head) + _npy((BOMB // 2,), data=b"\0" * 400)[:512])
        tout.offset += 1024


def _huge_declared(shard: Path) -> None:
    """A member whose tar header declares ``BOMB`` bytes, the file sparse on disk (a few KB really written)."""
    info = tarfile.TarInfo(f"{VICTIM}.text_feat.npy")
    info.size = BOMB
    with tarfile.open(shard) as tin:
        first = [(i, tin.extractfile(i).read()) for i in tin if i.name.startswith("valid0__c0.")]
    with tarfile.open(shard, "w", format=tarfile.GNU_FORMAT) as tout:
        for i, data in first:
            tout.addfile(i, io.BytesIO(data))
        tout.fileobj.write(info.tobuf(tarfile.GNU_FORMAT))
    with open(shard, "r+b") as f:
        f.truncate(f.seek(0, 2) + BOMB + 1024)


def _link(kind: bytes, name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def _dotdot() -> tarfile.TarInfo:
    return tarfile.TarInfo(f"../{VICTIM}.text_feat.npy")


def _tamper(case: str, shard: Path) -> str:
    """Make ``shard`` the bomb ``case``; the text its SchemaError must hold."""
    member = f"member {VICTIM}.text_feat.npy"
    if case == "gzip":
        _gzip_bomb(shard)
        return "gzip-compressed tar"
    if case == "sparse":
        _sparse_member(shard)
        return f"{member}: a sparse file, not a regular file"
    if case == "huge":
        _huge_declared(shard)
        return f"{member}: the tar header declares {BOMB} bytes, over the"
    if case == "npy-shape":
        _rewrite(shard, replace={f"{VICTIM}.text_feat.npy": _npy((1 << 20, 1 << 20))})
        return f"{member} cannot be decoded (.npy header declares shape (1048576, 1048576)"
    if case == "deep-json":
        deep = b"[" * 100_000 + b"]" * 100_000
        _rewrite(shard, replace={f"{VICTIM}.meta.json": deep})
        return f"member {VICTIM}.meta.json cannot be decoded (JSON nested 100000 levels deep, over the limit of 64)"
    if case == "symlink":
        _rewrite(shard, extra=_link(tarfile.SYMTYPE, f"{VICTIM}.audio_wave.npy", "/dev/zero"))
        return f"member {VICTIM}.audio_wave.npy: a symbolic link (to /dev/zero), not a regular file"
    if case == "hardlink":
        _rewrite(shard, extra=_link(tarfile.LNKTYPE, f"{VICTIM}.audio_wave.npy", "valid0__c0.meta.json"))
        return f"member {VICTIM}.audio_wave.npy: a hard link (to valid0__c0.meta.json)"
    if case == "fifo":
        _rewrite(shard, extra=_link(tarfile.FIFOTYPE, f"{VICTIM}.audio_wave.npy", ""))
        return f"member {VICTIM}.audio_wave.npy: a FIFO, not a regular file"
    _rewrite(shard, extra=_dotdot())
    return f"member ../{VICTIM}.text_feat.npy: the name escapes the shard"


CASES = ["gzip", "sparse", "huge", "npy-shape", "deep-json", "symlink", "hardlink", "fifo", "dotdot"]


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("good")
    write_shards(root, {"train": [2], "valid": [3, 2]})
    return root


def _run(root: Path, readers: tuple[str, ...] = READERS) -> dict[str, Result]:
    code = CHILD.format(limit=LIMIT_AS, shard=SHARD)
    out = subprocess.run([sys.executable, "-c", code, str(root), *readers], capture_output=True, text=True, timeout=600)
    sections = out.stdout.split("=== ")[1:]
    assert len(sections) == len(readers), out.stdout + out.stderr
    results = {}
    for section in sections:
        head, _, text = section.partition("\n")
        reader, rc, peak = head.split()
        results[reader] = Result(text, int(rc.removeprefix("rc=")), int(peak.removeprefix("peak_rss=")))
    return results


def _copy(good: Path, dst: Path) -> Path:
    dst.mkdir()
    for path in good.iterdir():
        (dst / path.name).write_bytes(path.read_bytes())
    return dst


@pytest.mark.integration
@pytest.mark.parametrize("case", CASES)
def test_every_reader_refuses_the_bomb_naming_shard_and_member(good, tmp_path, case) -> None:
    root = _copy(good, tmp_path / "shards")
    expected = _tamper(case, root / SHARD)
    assert (root / SHARD).stat().st_blocks * 512 < 64 << 20  # small on disk
    for reader, out in _run(root).items():
        assert "Traceback" not in out.text and "MemoryError" not in out.text, (reader, out.text)
        assert "RecursionError" not in out.text, (reader, out.text)
        assert SHARD in out.text and expected in out.text, (reader, out.text)
        assert out.peak_rss < MAX_RSS, (reader, out.peak_rss)
        if reader == "train-skip":
            assert out.rc == 0, (reader, out.text)
            lines = out.text.splitlines()
            assert lines[lines.index("bad") + 1] == "1", (reader, out.text)  # one bad sample counted and skipped
        else:
            assert out.rc == 1, (reader, out.text)


def test_a_normal_run_fits_the_memory_limits(good) -> None:
    results = _run(good, ("iter_shard", "inspect", "report", "hf", "train"))
    for reader, out in results.items():
        assert out.rc == 0, (reader, out.text)
        assert out.peak_rss < MAX_RSS, (reader, out.peak_rss)
    assert "{'train': 2, 'valid': 5}" in results["hf"].text
    assert results["train"].text.splitlines()[:4] == ["read", "5", "bad", "0"]


def test_caps_follow_the_schema_and_dataset_json() -> None:
    small = ShardLimits.derive({"Dt": 8, "Da": 16}, {"fps": 10}, max_duration_s=60)
    big = ShardLimits.derive({"Dt": 1024, "Da": 1024}, {"fps": 30}, max_duration_s=3600)
    assert small.caps["meta.json"] == big.caps["meta.json"] == 1 << 20
    assert small.caps["text_feat.npy"] < big.caps["text_feat.npy"] < BOMB
    assert big.caps["audio_wave.npy"] >= 2 * 16000 * 3600 * 2  # an hour at 16 kHz int16, with its margin
    beside = ShardLimits.of_dataset({"dims": {"Dt": 8}, "feature_set": {"fps": 10}, "max_duration_s": 60})
    assert beside.caps["text_feat.npy"] == ShardLimits.derive({"Dt": 8}, {"fps": 10}, 60).caps["text_feat.npy"]


def test_npy_and_json_guards() -> None:
    with pytest.raises(SchemaError, match=r"declares shape \(4096, 4096\) of float16 \(33554432 bytes\)"):
        load_npy(_npy((4096, 4096)))
    assert load_npy(_npy((8,), data=np.zeros(8, np.float16).tobytes())).shape == (8,)
    assert json_depth(b'{"a": [1, {"b": "[[[[{{{"}]}') == 3
    assert json_depth(b'{"a": "x\\"[[", "b": [["\\\\"]]}') == 3  # an escaped quote stays inside; \\ closes
    assert json_depth(b'[[ "open [[[[[[[[') == 2  # after an unterminated string everything is text
    assert json_depth(b"") == 0 and json_depth(b"[]]][") == 1


def test_json_depth_is_linear_on_escaped_quotes() -> None:
    """A run of escaped quotes in an unterminated string took a backtracking regex quadratic time (300 KB: over a
    minute); one vectorised pass reads 3 MB of it in well under a second."""
    import time

    hostile = b'"' + b'\\"' * 1_500_000
    started = time.perf_counter()
    assert json_depth(hostile + b"[[[") == 0
    assert time.perf_counter() - started < 2.0
    with pytest.raises(SchemaError):
        load_json(hostile)
    assert load_json(json.dumps({"a": [[[1]]]}).encode()) == {"a": [[[1]]]}
    with pytest.raises(SchemaError, match="nested 65 levels deep"):
        load_json(b"[" * 65 + b"]" * 65)
    with pytest.raises(SchemaError, match="over the 1048576-byte cap"):
        load_json(b" " * (1 << 20) + b"1")


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        (b"[" * 200_000 + b"]" * 200_000, "JSON nested 200000 levels deep"),
        (b'{"key": "a"}', "a record needs a string 'status'"),
        (b'{"key": "a", "status": "ok", "modalities": {"text": "ok"}}', "'modalities' must map each modality"),
        (b'"x' + b" " * (1 << 20), "a line over 1048576 bytes"),
    ],
    ids=["nested", "no-status", "bad-modalities", "huge-line"],
)
def test_status_jsonl_is_read_through_the_guard(bundled_dataset: Path, tmp_path: Path, capsys, line, problem) -> None:
    """inspect and report read status.jsonl line by line under the JSON guard: a hostile or damaged line is one
    clear error naming the file and the line, not a RecursionError or KeyError."""
    import shutil

    from mmfuse.cli import main
    from shards.inspect import read_status

    root = tmp_path / "shards"
    shutil.copytree(bundled_dataset, root)
    good = read_status(root)
    assert good and all(isinstance(r["status"], str) for r in good)
    with open(root / "status.jsonl", "ab") as f:
        f.write(line + b"\n")
    with pytest.raises(SchemaError, match=rf"status.jsonl line {len(good) + 1}: .*{problem}"):
        read_status(root)
    assert main(["inspect", str(root)]) == 1
    assert f"line {len(good) + 1}: " in capsys.readouterr().err
