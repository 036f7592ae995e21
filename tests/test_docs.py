"""The user-facing tables stay true: every test a document cites exists, and every case is covered."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPEC_CASES = [
    "missing file", "zero-byte file", "truncated or corrupt container", "video without audio stream",
    "audio-only file", "no face", "several faces", "empty transcript", "non-ASCII transcript", "very long clip",
    "clip shorter than one frame", "duplicate ids", "ids or paths with `../`", "corrupt or truncated shard",
    "shard from another schema", "shards from another feature set", "NaN or inf in features", "disk full",
    "extraction killed at any moment", "training killed at any moment",
]  # fmt: skip


def table_rows(path: Path) -> list[list[str]]:
    rows = []
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 3 and not set(cells[0]) <= {"-"} and cells[0] != "case":
            rows.append(cells)
    return rows


def test_bad_input_table_cites_real_tests_and_covers_every_case() -> None:
    rows = table_rows(ROOT / "docs" / "bad-inputs.md")
    cases = [r[0] for r in rows]
    assert [c for c in SPEC_CASES if c not in cases] == []
    for case, _, test in rows:
        match = re.fullmatch(r"`(tests/[\w/]+\.py)::(test_\w+)`", test)
        assert match, f"{case}: cite a test as `path::name`, got {test!r}"
        source = (ROOT / match[1]).read_text()
        assert f"def {match[2]}(" in source, f"{case}: {match[1]} has no {match[2]}"


def test_the_architecture_page_names_only_what_exists() -> None:
    """docs/architecture.md: every file it names in backticks, every module of its diagram (under the package
    the diagram's row names) and every dotted name of ours it cites exists."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    missing = [p for p in re.findall(r"`([\w/]+\.py|\w+/)`", text) if not (ROOT / p).exists()]
    package, rows = None, 0
    for line in text.split("```")[1].splitlines():
        if head := re.match(r"\s*(extract|shards|train|fusion)\s+─", line):
            package = head[1]
        elif package and (row := re.match(r" {3}([\w/.]+)\s{2,}", line)):
            rows += 1
            missing += [f"{package}/{row[1]}"] if not (ROOT / package / row[1]).exists() else []
    for dotted in re.findall(r"`((?:mmfuse|extract|shards|train|fusion)\.[\w.]+)`", text):
        *module, name = dotted.split(".")
        source = ROOT.joinpath(*module).with_suffix(".py")
        if not source.is_file() or not re.search(rf"^(def|class) {name}\b|^{name} =", source.read_text(), re.M):
            missing.append(dotted)
    assert rows >= 15 and missing == []
