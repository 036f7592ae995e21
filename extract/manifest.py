"""Input manifest (CSV or JSONL, one row per clip), validated as a whole before any work starts.

MMSA's ``label.csv`` is accepted as it is (``video_id, clip_id, text, label, label_T, label_A, label_V,
annotation, mode``), with media at ``MEDIA_ROOT/<video_id>/<clip_id>.<ext>``. Optional columns: ``path``
(relative to the media root), ``start``/``end`` (seconds), ``split`` (alias of ``mode``), ``labels`` (JSON
object), ``words`` (JSON list of ``[word, start, end]``).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmfuse.errors import MmfuseError
from shards.schema import SPLITS, make_key

MEDIA_EXTENSIONS = (".mp4", ".avi", ".mpg", ".mpeg", ".mov", ".mkv", ".webm", ".m4v", ".flv", ".wav", ".mp3", ".m4a")
SPLIT_ALIASES = {"val": "valid", "dev": "valid", "validation": "valid"}
LABEL_COLUMNS = ("label", "label_T", "label_A", "label_V", "annotation")
MAX_PROBLEMS_SHOWN = 50


class ManifestError(MmfuseError, ValueError):
    """The manifest has problems; the message lists all of them."""

    def __init__(self, source: str, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        shown = "\n  ".join(self.problems[:MAX_PROBLEMS_SHOWN])
        more = len(self.problems) - MAX_PROBLEMS_SHOWN
        tail = f"\n  ... and {more} more" if more > 0 else ""
        super().__init__(f"{source}: {len(self.problems)} problem(s), nothing was extracted:\n  {shown}{tail}")


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


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Raw rows of a CSV or JSONL manifest (by extension; ``.jsonl``/``.json`` are JSON lines)."""
    if not path.is_file():
        raise ManifestError(str(path), [f"manifest file {path} does not exist"])
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        rows, problems = [], []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as exc:
                problems.append(f"line {n}: not valid JSON ({exc})")
                continue
            if not isinstance(obj, dict):
                problems.append(f"line {n}: expected a JSON object, got {type(obj).__name__}")
                continue
            rows.append(obj)
        if problems:
            raise ManifestError(str(path), problems)
        return rows
    return [dict(r) for r in csv.DictReader(text.splitlines())]


def load_manifest(
    path: Path | str, media_root: Path | str | None, need_media: bool = True, need_text: bool = True
) -> list[Clip]:
    """Read and validate a manifest; raise :class:`ManifestError` with every problem found.

    ``need_text=False`` makes the ``text`` column optional (transcripts come from ASR): rows without it, or with
    it empty, get ``text=""``.
    """
    path = Path(path)
    rows = read_rows(path)
    root = Path(media_root).resolve() if media_root is not None else None
    problems: list[str] = []
    if not rows:
        raise ManifestError(str(path), ["the manifest has no rows"])
    columns = set().union(*(r.keys() for r in rows))
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
    for n, row in enumerate(rows, start=2 if path.suffix.lower() == ".csv" else 1):
        where = f"row {n}" if path.suffix.lower() == ".csv" else f"line {n}"
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
    return clips


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def _parse_row(
    row: dict[str, Any], n: int, where: str, root: Path | None, need_text: bool, problems: list[str]
) -> Clip | None:
    before = len(problems)
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
        media=str(path.relative_to(root)) if path is not None and root is not None else None,
        start=start,
        end=end,
        labels=labels,
        words=words,
    )


def _seconds(value: Any, name: str, where: str, problems: list[str]) -> float | None:
    if value is None or _text(value) == "":
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        problems.append(f"{where}: {name} {value!r} is not a number of seconds")
        return None
    if not math.isfinite(x) or x < 0:
        problems.append(f"{where}: {name} {value!r} must be a finite number of seconds >= 0")
        return None
    return x


def _number_or_text(value: Any) -> Any:
    if isinstance(value, (int, float, bool)) or value is None:
        return value
    try:
        x = float(value)
        return x if math.isfinite(x) else str(value)
    except ValueError:
        return str(value)


def _labels(row: dict[str, Any], where: str, problems: list[str]) -> dict[str, Any]:
    labels = {c: _number_or_text(row[c]) for c in LABEL_COLUMNS if c in row and _text(row[c]) != ""}
    extra = row.get("labels")
    if isinstance(extra, str) and extra.strip():
        try:
            extra = json.loads(extra)
        except ValueError as exc:
            problems.append(f"{where}: labels is not valid JSON ({exc})")
            return labels
    if isinstance(extra, dict):
        labels.update(extra)
    elif extra not in (None, ""):
        problems.append(f"{where}: labels must be a JSON object, got {type(extra).__name__}")
    return labels


def _words(value: Any, where: str, problems: list[str]) -> list[tuple[str, float, float]] | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        items = json.loads(value) if isinstance(value, str) else value
        words = [(str(w), float(s), float(e)) for w, s, e in items]
    except (ValueError, TypeError) as exc:
        problems.append(f"{where}: words must be a JSON list of [word, start, end] ({exc})")
        return None
    if any(e < s for _, s, e in words):
        problems.append(f"{where}: a word ends before it starts")
    return words


def _media_path(
    row: dict[str, Any], video_id: str, clip_id: str, root: Path, where: str, problems: list[str]
) -> Path | None:
    explicit = _text(row.get("path"))
    if explicit:
        candidate = (root / explicit).resolve()
    else:
        base = (root / video_id / clip_id).resolve()
        found = [
            base.with_name(base.name + ext) for ext in MEDIA_EXTENSIONS if base.with_name(base.name + ext).exists()
        ]
        candidate = found[0] if found else base.with_name(base.name + ".mp4")
    try:
        candidate.relative_to(root)
    except ValueError:
        problems.append(f"{where}: media path {explicit or video_id + '/' + clip_id} escapes the media root {root}")
        return None
    return candidate
