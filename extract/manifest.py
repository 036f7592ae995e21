"""Input manifest (CSV or JSONL, one row per clip), validated as a whole before any work starts.

MMSA's ``label.csv`` is accepted as it is (``video_id, clip_id, text, label, label_T, label_A, label_V,
annotation, mode``), with media at ``MEDIA_ROOT/<video_id>/<clip_id>.<ext>``. Optional columns: ``path``
(relative to the media root), ``start``/``end`` (seconds), ``split`` (alias of ``mode``), ``labels`` (JSON
object), ``words`` (JSON list of ``[word, start, end]``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath
from typing import Any

from extract.manifest_read import ManifestError, NonFinite, find_non_finite, is_jsonl, loads_strict, read_rows
from shards.schema import SPLITS, label_problem, make_key, seconds_problem, shown, words_problem

__all__ = ["Clip", "ManifestError", "load_manifest", "read_rows"]

log = logging.getLogger(__name__)
MEDIA_EXTENSIONS = (".mp4", ".avi", ".mpg", ".mpeg", ".mov", ".mkv", ".webm", ".m4v", ".flv", ".wav", ".mp3", ".m4a")
SPLIT_ALIASES = {"val": "valid", "dev": "valid", "validation": "valid"}
LABEL_COLUMNS = ("label", "label_T", "label_A", "label_V", "annotation")
TEXT_COLUMNS = ("video_id", "clip_id", "text", "path", "split", "mode")  # a text, or (ids only) an integer
DECIMAL = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
ROWS_SHOWN = 10
WORD_SLACK_S = 1.0  # a word may end this much after its clip (aligners round, clips are cut by hand)


@dataclass(frozen=True)
class Clip:
    """One manifest row, validated. ``path`` is absolute and ``media`` relative to the media root (both ``None``
    for transcript-only extraction)."""

    key: str
    video_id: str
    clip_id: str
    split: str
    text: str
    row: int
    path: Path | None = None
    media: str | None = None
    start: float | None = None
    end: float | None = None
    labels: dict[str, Any] = field(default_factory=dict)
    words: list[tuple[str, float, float]] | None = None
    unlabelled: tuple[str, ...] = ()  # labels other rows have and this one leaves empty: training skips it there


def load_manifest(
    path: Path | str, media_root: Path | str | None, need_media: bool = True, need_text: bool = True
) -> list[Clip]:
    """Read and validate a manifest; raise :class:`ManifestError` with every problem found.

    ``need_text=False`` makes the ``text`` column optional (transcripts come from ASR): rows without it, or with
    it empty, get ``text=""``. Rows left without a label that other rows have are allowed: they are counted,
    logged and marked in :attr:`Clip.unlabelled`.
    """
    path = Path(path)
    rows = read_rows(path)
    root = Path(media_root).resolve() if media_root is not None else None
    problems: list[str] = []
    if not rows:
        raise ManifestError(str(path), ["the manifest has no rows"])
    columns = set().union(*(r.keys() for _, r in rows))
    required = {"video_id", "clip_id"} | ({"text"} if need_text else set())
    missing = sorted(required - columns)
    if missing:
        hint = " (no transcripts? --asr PATH transcribes the audio with a local Whisper model)"
        problems.append(
            f"missing column(s) {missing}; found {sorted(columns)}" + (hint if need_media and "text" in missing else "")
        )
    if need_media and root is None:
        problems.append("--media-root is required unless only the text modality is extracted")
    elif need_media and not root.is_dir():
        problems.append(f"media root {root} is not a directory")
    if problems:
        raise ManifestError(str(path), problems)
    clips: list[Clip] = []
    seen: dict[str, int] = {}
    for n, row in rows:
        where = f"line {n}" if is_jsonl(path) else f"row {n}"
        clip = _parse_row(row, n, where, root if need_media else None, need_text, problems)
        if clip is None:
            continue
        if clip.key in seen:
            problems.append(f"{where}: duplicate key {clip.key!r} (first at row/line {seen[clip.key]})")
            continue
        seen[clip.key] = n
        clips.append(clip)
    if problems:
        raise ManifestError(str(path), problems)
    return _mark_unlabelled(clips, [c for c in LABEL_COLUMNS if c in columns], "line" if is_jsonl(path) else "row")


def _mark_unlabelled(clips: list[Clip], label_columns: list[str], unit: str) -> list[Clip]:
    """Mark (and log, one line per label) the clips without a value for a label that other rows have."""
    names = list(dict.fromkeys([*label_columns, *(k for c in clips for k in c.labels)]))
    names = [k for k in names if any(c.labels.get(k) is not None for c in clips)]  # a column no row fills: no label
    out = []
    for clip in clips:
        empty = tuple(k for k in names if clip.labels.get(k) is None)
        out.append(dataclasses.replace(clip, unlabelled=empty) if empty else clip)
    for name in names:
        at = [c.row for c in out if name in c.unlabelled]
        if at:
            shown = ", ".join(map(str, at[:ROWS_SHOWN])) + (", ..." if len(at) > ROWS_SHOWN else "")
            log.warning(
                "%d of %d rows have no %r label (%s %s): extracted without it; training and metrics on %r leave "
                "them out", len(at), len(out), name, unit, shown, name,
            )  # fmt: skip
    return out


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def _parse_row(
    row: dict[str, Any], n: int, where: str, root: Path | None, need_text: bool, problems: list[str]
) -> Clip | None:
    before = len(problems)
    for column, value in row.items():  # JSON NaN / Infinity / 1e400, anywhere in a JSONL record
        bad = find_non_finite(value)
        if bad is not None:
            problems.append(f"{where}, column {column!r}: {bad} is not a finite number (NaN and Infinity are refused)")
    for column in TEXT_COLUMNS:  # JSONL values have types: an id may be an integer, nothing else may be a list
        value = row.get(column)
        integer = isinstance(value, int) and not isinstance(value, bool) and column in ("video_id", "clip_id")
        if value is not None and not isinstance(value, str) and not integer:
            problems.append(f"{where}, column {column!r}: {shown(value)} is a {type(value).__name__}, not a text")
    if len(problems) > before:
        return None
    video_id, clip_id = _text(row.get("video_id")), _text(row.get("clip_id"))
    if not video_id or not clip_id:
        problems.append(f"{where}: empty video_id or clip_id")
        return None
    split = _text(row.get("split") or row.get("mode") or "train").lower()
    split = SPLIT_ALIASES.get(split, split)
    if split not in SPLITS:
        problems.append(f"{where}: unknown split {split!r}; use one of {list(SPLITS)}")
    start, end = _seconds(row.get("start"), "start", where, problems), _seconds(row.get("end"), "end", where, problems)
    if start is not None and end is not None and end <= start:
        problems.append(f"{where}: end {end} must be after start {start}")
    labels = _labels(row, where, problems)
    words = _words(row.get("words"), where, problems)
    if words and start is not None and end is not None and end > start:
        _words_inside(words, end - start, where, problems)
    path = _media_path(row, video_id, clip_id, root, where, problems) if root is not None else None
    if len(problems) > before:
        return None
    text = row.get("text")
    return Clip(
        key=make_key(video_id, clip_id),
        video_id=video_id,
        clip_id=clip_id,
        split=split,
        text="" if text is None else str(text),
        row=n,
        path=path,
        media=path.relative_to(root).as_posix() if path is not None and root is not None else None,
        start=start,
        end=end,
        labels=labels,
        words=words,
    )


def _seconds(value: Any, name: str, where: str, problems: list[str]) -> float | None:
    if value is None or isinstance(value, NonFinite) or _text(value) == "":
        return None
    if isinstance(value, str):
        cell = value.strip()
        value = float(cell) if DECIMAL.fullmatch(cell) and math.isfinite(float(cell)) else cell
    problem = seconds_problem(value)
    if problem is not None:
        problems.append(f"{where}, column {name!r}: {problem}")
        return None
    return float(value)


def _label_value(value: Any, column: str, where: str, problems: list[str]) -> Any:
    """A label cell: a number float32 holds, a text label (a class name), or ``None`` (empty: the row is
    unlabelled). A text spelling a number is that number."""
    if value is None or find_non_finite(value) is not None:  # JSON NaN is reported with the record
        return None
    if not isinstance(value, str):
        problem = label_problem(value)
        if problem is not None:
            problems.append(f"{where}, column {column!r}: {shown(value)} {problem}")
            return None
        return value
    cell = value.strip()
    if cell == "":
        return None
    if DECIMAL.fullmatch(cell):
        x = float(cell)
        if math.isfinite(x):
            problem = label_problem(x)
            if problem is None:
                return x
            problems.append(f"{where}, column {column!r}: {shown(cell)} {problem}")
            return None
    else:
        try:
            float(cell)  # nan, inf, Infinity, 1_0: spelled as numbers but not plain finite ones
        except ValueError:
            return value
    problems.append(f"{where}, column {column!r}: {shown(cell)} is not a finite number")
    return None


def _labels(row: dict[str, Any], where: str, problems: list[str]) -> dict[str, Any]:
    labels = {c: _label_value(row[c], c, where, problems) for c in LABEL_COLUMNS if c in row}
    labels = {c: v for c, v in labels.items() if v is not None}
    extra = row.get("labels")
    if isinstance(extra, str) and extra.strip():
        try:
            extra = loads_strict(extra)
        except ValueError as exc:
            problems.append(f"{where}, column 'labels': not valid JSON ({exc})")
            return labels
        bad = find_non_finite(extra)
        if bad is not None:
            problems.append(f"{where}, column 'labels': {bad} is not a finite number (NaN and Infinity are refused)")
            return labels
    if isinstance(extra, dict):
        for k, v in extra.items():
            if (
                v is not None
                and not (isinstance(v, str) and not v.strip())
                and _label_value(v, f"labels.{k}", where, problems) is None
            ):
                continue  # not a label (a list, a number float32 cannot hold, a text spelling NaN): reported
            labels[k] = v  # as written: "0.5" inside the JSON object stays a text
    elif extra not in (None, ""):
        problems.append(f"{where}, column 'labels': must be a JSON object, got {type(extra).__name__}")
    return labels


def _words(value: Any, where: str, problems: list[str]) -> list[tuple[str, float, float]] | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        try:
            items = loads_strict(value)
        except ValueError as exc:
            problems.append(f"{where}, column 'words': not valid JSON ({exc})")
            return None
        bad = find_non_finite(items)
        if bad is not None:
            problems.append(f"{where}, column 'words': {bad} is not a finite number")
            return None
    elif find_non_finite(value) is not None:  # a JSONL record's own NaN is reported with the record
        return None
    else:
        items = value
    problem = words_problem(items)
    if problem is not None:
        problems.append(f"{where}, column 'words': {problem}")
        return None
    return [(w, float(s), float(e)) for w, s, e in items]


def _words_inside(words: list[tuple[str, float, float]], length: float, where: str, problems: list[str]) -> None:
    """Word timings are on the clip's clock (0 = its ``start``): one past the clip's end (with a second to spare)
    is most likely on the source file's clock, and would find no frame to average."""
    late = [w for w in words if w[2] > length + WORD_SLACK_S]
    if late:
        word, _, at = late[0]
        problems.append(
            f"{where}, column 'words': {len(late)} word(s) end after the clip (it lasts {length:g} s; "
            f"{shown(word)} ends at {at:g} s): word timings are on the clip's clock, 0 = its start"
        )


def _media_path(
    row: dict[str, Any], video_id: str, clip_id: str, root: Path, where: str, problems: list[str]
) -> Path | None:
    """The media file of a row, resolved (symlinks followed); ``None`` with a problem when it leaves ``root``."""
    explicit = _text(row.get("path"))
    if explicit:
        windows = PureWindowsPath(explicit)  # accepts both separators; a drive or leading slash shows in anchor
        if windows.anchor:
            problems.append(
                f"{where}, column 'path': {explicit!r} is absolute; paths are relative to the media root {root}"
            )
            return None
        named = "/".join(windows.parts)
        candidate = root / named
    else:
        named = f"{video_id}/{clip_id}"
        base = root / video_id / clip_id
        found = [base.with_name(base.name + e) for e in MEDIA_EXTENSIONS if base.with_name(base.name + e).exists()]
        candidate = found[0] if found else base.with_name(base.name + ".mp4")
    resolved = candidate.resolve()
    if not resolved.is_relative_to(root):
        via = f" (through a symlink, to {resolved})" if Path(os.path.normpath(candidate)).is_relative_to(root) else ""
        problems.append(f"{where}: media path {named} escapes the media root {root}{via}")
        return None
    return resolved
