"""Reading a manifest file into raw rows: CSV as the csv module intends, JSONL one record per ``\\n``.

CSV is opened with ``newline=""`` and handed to the csv module as a file, so a quoted field keeps its line breaks
verbatim and a Unicode line or paragraph separator (U+2028, U+0085, ...) inside a field is just a character. The
number of records parsed is checked against an independent count. JSON is parsed strictly: NaN, Infinity and
numbers that overflow to infinity are kept as :class:`NonFinite` markers, which validation reports by row and
column instead of letting them reach ``meta.json``.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from extract.errors import ManifestError

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


class NonFinite(str):
    """A JSON number that is not finite (``NaN``, ``Infinity``, ``1e400``), as written in the file."""


def _strict_float(text: str) -> float | NonFinite:
    x = float(text)
    return x if math.isfinite(x) else NonFinite(text)


def loads_strict(text: str) -> Any:
    """``json.loads`` with NaN, Infinity and overflowing numbers turned into :class:`NonFinite` markers."""
    return json.loads(text, parse_constant=NonFinite, parse_float=_strict_float)


def find_non_finite(value: Any) -> NonFinite | None:
    """The first :class:`NonFinite` inside ``value`` (nested lists and dicts included), or ``None``."""
    if isinstance(value, NonFinite):
        return value
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        for item in value:
            found = find_non_finite(item)
            if found is not None:
                return found
    return None


def is_jsonl(path: Path) -> bool:
    return path.suffix.lower() in JSONL_SUFFIXES


def read_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """Raw rows of a CSV or JSONL manifest (by extension), each with its row (CSV: header is row 1) or line number."""
    if not path.is_file():
        raise ManifestError(str(path), [f"manifest file {path} does not exist"])
    try:
        return _read_jsonl(path) if is_jsonl(path) else _read_csv(path)
    except UnicodeDecodeError as exc:
        raise ManifestError(str(path), [f"not UTF-8 text ({exc})"]) from None


def _read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    text = path.read_text(encoding="utf-8-sig")
    rows, problems = [], []
    for n, line in enumerate(text.split("\n"), start=1):  # not splitlines: U+2028 etc. are legal inside strings
        if not line.strip():
            continue
        try:
            obj = loads_strict(line)
        except ValueError as exc:
            problems.append(f"line {n}: not valid JSON ({exc})")
            continue
        if not isinstance(obj, dict):
            problems.append(f"line {n}: expected a JSON object, got {type(obj).__name__}")
            continue
        rows.append((n, obj))
    if problems:
        raise ManifestError(str(path), problems)
    return rows


def _read_csv(path: Path) -> list[tuple[int, dict[str, Any]]]:
    rows: list[tuple[int, dict[str, Any]]] = []
    problems: list[str] = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, strict=True)
        try:
            for n, row in enumerate(reader, start=2):
                extra = row.pop(None, None)  # type: ignore[call-overload]
                if extra is not None:
                    problems.append(f"row {n}: {len(extra)} more field(s) than the header ({extra!r}); quote fields "
                                    "holding commas")  # fmt: skip
                rows.append((n, dict(row)))
        except csv.Error as exc:
            where = f"row {len(rows) + 2} (line {reader.line_num})"
            raise ManifestError(str(path), [f"{where}: malformed CSV ({exc}); check the quoting"]) from None
        f.seek(0)
        text = f.read()
    expected = count_csv_records(text) - 1  # less the header
    if len(rows) != max(expected, 0):
        problems.append(f"{len(rows)} rows parsed but the file holds {expected} records; check the quoting")
    if problems:
        raise ManifestError(str(path), problems)
    return rows


def count_csv_records(text: str) -> int:
    """Non-blank records of a CSV text (comma, double quotes), counted without the csv module: line breaks
    (``\\n``, ``\\r``, ``\\r\\n``) end a record unless inside a quoted field; nothing else does."""
    records, in_quotes, field_start, blank = 0, False, True, True
    i, size = 0, len(text)
    while i < size:
        ch = text[i]
        if in_quotes:
            if ch == '"' and text.startswith('""', i):
                i += 1
            elif ch == '"':
                in_quotes = False
        elif ch in "\r\n":
            records += not blank
            blank, field_start = True, True
            i += ch == "\r" and text.startswith("\r\n", i)
        else:
            in_quotes = ch == '"' and field_start
            field_start, blank = ch == ",", False
        i += 1
    return records + (not blank)
