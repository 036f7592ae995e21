"""``mmfuse report``: a self-contained HTML quality report about a shard directory.

One streaming pass over the shards (one sample in memory at a time) keeps only per-clip scalars: face-detection
rate, duration, audio/video end mismatch, mean feature norms and NaN/inf counts. Landmark overlays are drawn while
their sample is in hand, on frames decoded again from the media (extract/overlays.py). ``index.html`` and its PNG
files share one directory and link relatively, so the directory can be copied or archived as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any

import numpy as np

from extract.overlays import Overlay, figure, landmark_overlay, save_png
from shards import Progress
from shards.dataset import load_dataset_json
from shards.guard import ShardLimits
from shards.inspect import read_status
from shards.io import iter_shard
from shards.schema import MEMBERS, SchemaError
from shards.sidecar import dataset_problems

MAX_BARS = 60  # above this many clips a per-clip plot becomes a histogram
MAX_ROWS = 500  # rows of the per-clip table
NORMED = {"text": ("text_feat.npy", None), "audio": ("audio_feat.npy", "audio_mask.npy")}
NORMED["video"] = ("video_lmk.npy", "video_mask.npy")
FLOAT_MEMBERS = [name for name, spec in MEMBERS.items() if spec.dtype.startswith("float")]
CSS = (
    "body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin:.5em 0}"
    "td,th{border:1px solid #ccc;padding:2px 8px;text-align:left;font-size:90%}th{background:#eee}"
    "img{max-width:100%;border:1px solid #ddd;margin:.3em 0}.flag{color:#a40}"
)


@dataclass
class ClipStats:
    """The scalars the report keeps for one sample."""

    key: str
    split: str
    duration: float | None
    text: str = ""
    face_rate: float | None = None
    av_end_gap: float | None = None  # audio real-span end minus the last video frame time, seconds
    norms: dict[str, float] = field(default_factory=dict)


@dataclass
class Scan:
    """Everything one pass over the shards leaves behind."""

    clips: list[ClipStats] = field(default_factory=list)
    nonfinite: dict[str, list[int]] = field(default_factory=lambda: {m: [0, 0, 0] for m in FLOAT_MEMBERS})
    overlays: list[Overlay] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def write_report(
    shards_dir: Path | str,
    out_dir: Path | str,
    media_root: Path | str | None = None,
    overlays: int = 4,
    progress: Progress | None = None,
) -> Path:
    """Write ``out_dir/index.html`` and its PNG files about the shards in ``shards_dir``; return the HTML path.

    ``media_root`` is where the media are now (default: the root recorded in dataset.json); overlays are drawn for
    the first ``overlays`` clips whose video is ok. Unreachable media are noted in the report, never fatal.
    ``progress(samples read, samples listed)`` is called as the shards are read.
    """
    root, out = Path(shards_dir), Path(out_dir)
    ds = load_dataset_json(root)
    out.mkdir(parents=True, exist_ok=True)
    media = media_root if media_root is not None else ds.get("media_root")
    scan = _scan(root, ds, out, Path(media) if media else None, overlays, progress)
    scan.problems[:0] = dataset_problems(root, ds)  # dataset.json against the sidecars: a shard listed twice...
    plots = _plots(scan.clips, out)
    index = out / "index.html"
    index.write_text(_render(root, ds, read_status(root), scan, plots), encoding="utf-8")
    return index


def _scan(
    root: Path,
    ds: dict[str, Any],
    out: Path,
    media: Path | None,
    n_overlays: int,
    progress: Progress | None = None,
) -> Scan:
    scan = Scan()
    listed, read = sum(entry["samples"] for entry in ds.get("shards", [])), 0
    limits = ShardLimits.of_dataset(ds)  # every shard read through shards.guard with the dataset's member caps
    for entry in ds.get("shards", []):
        try:
            for sample in iter_shard(root / entry["name"], validate=False, limits=limits):
                read += 1
                if progress is not None:
                    progress(read, listed)
                meta = sample.get("meta.json")
                if not isinstance(meta, dict) or not isinstance(meta.get("modalities"), dict):
                    scan.problems.append(f"{entry['name']}: sample {sample['__key__']} has no usable meta.json")
                    continue
                scan.clips.append(_clip_stats(sample))
                _count_nonfinite(sample, scan.nonfinite)
                if len(scan.overlays) < n_overlays and meta["modalities"].get("video", {}).get("status") == "ok":
                    scan.overlays.append(landmark_overlay(sample, media, out, len(scan.overlays)))
        except SchemaError as exc:
            scan.problems.append(str(exc))
    return scan


def _clip_stats(sample: dict[str, Any]) -> ClipStats:
    meta = sample["meta.json"]
    key, text = str(meta.get("key", sample["__key__"])), str(meta.get("text") or "")
    stats = ClipStats(
        key, str(meta.get("split", "?")), meta.get("duration"), text[:80] + ("…" if len(text) > 80 else "")
    )
    mask, vtime = sample.get("video_mask.npy"), sample.get("video_time.npy")
    if mask is not None and len(mask):
        stats.face_rate = float(np.mean(mask))
    span = (meta["modalities"].get("audio") or {}).get("real_span")
    if span and vtime is not None and len(vtime):
        stats.av_end_gap = float(span[1]) - float(vtime[-1])
    for modality, (member, mask_member) in NORMED.items():
        if member not in sample or not len(sample[member]):
            continue
        rows = np.asarray(sample[member], dtype=np.float32).reshape(len(sample[member]), -1)
        keep = sample.get(mask_member) if mask_member else None
        if keep is not None and len(keep) == len(rows):
            rows = rows[np.asarray(keep, dtype=bool)]
        rows = rows[np.isfinite(rows).all(axis=1)]
        if len(rows):
            stats.norms[modality] = float(np.linalg.norm(rows, axis=1).mean())
    return stats


def _count_nonfinite(sample: dict[str, Any], counts: dict[str, list[int]]) -> None:
    """Per float member: [samples holding it, NaN values, inf values]."""
    for name, value in sample.items():
        if name.endswith(".npy") and isinstance(value, np.ndarray) and value.dtype.kind == "f":
            entry = counts.setdefault(name, [0, 0, 0])
            entry[0] += 1
            entry[1] += int(np.isnan(value).sum())
            entry[2] += int(np.isinf(value).sum())


def _per_clip(ax: Any, pairs: list[tuple[str, float | None]], label: str) -> None:
    """Bars per clip (keys on the x axis), or a histogram when there are too many clips to label."""
    pairs = [(k, v) for k, v in pairs if v is not None]
    ax.set_title(label, fontsize=10)
    if not pairs:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    elif len(pairs) <= MAX_BARS:
        ax.bar(range(len(pairs)), [v for _, v in pairs], color="#4878a8")
        ax.set_xticks(range(len(pairs)), [k for k, _ in pairs], rotation=90, fontsize=7)
    else:
        ax.hist([v for _, v in pairs], bins=40, color="#4878a8")
        ax.set_xlabel(label)
        ax.set_ylabel("clips")


def _plots(clips: list[ClipStats], out: Path) -> list[tuple[str, str]]:
    """Write the PNG plots; return ``(file name, caption)`` pairs."""
    width = max(6.0, min(0.18 * len(clips), 24.0))
    panels = {
        "face_rate.png": [("face-detection rate (fraction of frames with video_mask True)", "face_rate")],
        "av_mismatch.png": [("audio real-span end minus last video frame time (s)", "av_end_gap")],
        "feature_norms.png": [(f"{NORMED[m][0]}: mean L2 norm per clip (valid frames)", m) for m in NORMED],
    }
    for name, series in panels.items():
        fig, axes = figure(width, 3.2 * len(series), len(series))
        for ax, (label, attr) in zip(axes, series, strict=True):
            _per_clip(ax, [(c.key, c.norms.get(attr) if attr in NORMED else getattr(c, attr)) for c in clips], label)
        save_png(fig, out / name)
    fig, (ax,) = figure(6.0, 3.2)
    durations = [c.duration for c in clips if c.duration is not None]
    if durations:
        ax.hist(durations, bins=min(30, max(5, len(durations))), color="#4878a8")
    ax.set(title="clip durations", xlabel="seconds", ylabel="clips")
    save_png(fig, out / "durations.png")
    captions = ["Face-detection rate per clip", "Audio/video end mismatch per clip", "Feature norms per clip"]
    return [*zip(panels, captions, strict=True), ("durations.png", "Clip durations")]


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{escape(_cell(c))}</td>" for c in row) + "</tr>\n" for row in rows)
    return f"<table><tr>{head}</tr>\n{body}</table>\n"


def _header(root: Path, ds: dict[str, Any], status: list[dict[str, Any]]) -> str:
    counts = ds.get("counts", {})
    statuses = sorted({s for c in counts.values() for s in c})
    rows = [[split, *(c.get(s, 0) for s in statuses), sum(c.values())] for split, c in counts.items()]
    coverage: dict[str, dict[str, int]] = {}
    for rec in status:
        for m, entry in (rec.get("modalities") or {}).items():
            coverage.setdefault(m, {}).setdefault(entry.get("status", "?"), 0)
            coverage[m][entry.get("status", "?")] += 1
    extractors = ds.get("feature_set", {}).get("extractors", {})
    models = [
        [m, e.get("name"), e.get("model"), e.get("pretrained"), e.get("weights_sha256")] for m, e in extractors.items()
    ]
    complete = "yes" if ds.get("complete") else f"NO, missing shards: {', '.join(ds.get('missing_shards', []))}"
    return (
        f"<h1>mmfuse quality report</h1><p>{escape(str(root.resolve()))}: {ds.get('samples', 0)} samples in "
        f"{len(ds.get('shards', []))} shards; feature set <code>{escape(str(ds.get('feature_set_hash')))}</code>; "
        f"complete: {escape(complete)}; dims: {escape(str(ds.get('dims')))}; "
        f"fps: {escape(str(ds.get('feature_set', {}).get('fps')))}</p>\n<h2>Samples by split and status</h2>\n"
        + _table(["split", *statuses, "total"], rows)
        + _table(
            ["modality", "status counts (status.jsonl)"],
            [[m, ", ".join(f"{k} {v}" for k, v in sorted(c.items()))] for m, c in coverage.items()],
        )
        + "<h2>Models</h2>\n"
        + _table(["modality", "extractor", "model", "pretrained", "weights hash"], models)
    )


def _problems(ds: dict[str, Any], status: list[dict[str, Any]], scan: Scan) -> str:
    rows = []
    for rec in status:
        if rec.get("status") == "skipped":
            rows.append([rec.get("key"), rec.get("split"), "skipped", "(whole clip)", rec.get("error")])
            continue
        for m, entry in (rec.get("modalities") or {}).items():
            if entry.get("status") == "failed":
                rows.append([rec.get("key"), rec.get("split"), rec.get("status"), m, entry.get("error")])
    text = "<h2>Skipped and failed clips</h2>\n"
    text += _table(["key", "split", "status", "failed", "error"], rows) if rows else "<p>none</p>\n"
    issues = scan.problems + [f"shard {name} missing or incomplete" for name in ds.get("missing_shards", [])]
    return text + "".join(f"<p class='flag'>{escape(p)}</p>\n" for p in issues)


def _flags(ds: dict[str, Any], scan: Scan) -> list[str]:
    """Short warnings worth a look before training."""
    flags = [
        f"{m} encoder {e.get('model')} is randomly initialised (pretrained: false): no learned signal"
        for m, e in ds.get("feature_set", {}).get("extractors", {}).items()
        if e.get("pretrained") is False
    ]
    low = [c.key for c in scan.clips if c.face_rate is not None and c.face_rate < 0.5]
    far = [c.key for c in scan.clips if c.av_end_gap is not None and abs(c.av_end_gap) > 0.1]
    if low:
        flags.append(f"{len(low)} clip(s) with a face in fewer than half their frames: {', '.join(low[:10])}")
    if far:
        flags.append(
            f"{len(far)} clip(s) whose audio ends over 0.1 s away from the last video frame: {', '.join(far[:10])}"
        )
    return flags


def _render(root: Path, ds: dict[str, Any], status: list[dict[str, Any]], scan: Scan, plots: list) -> str:
    nonfinite = [[m, n, nan, inf] for m, (n, nan, inf) in scan.nonfinite.items()]
    bad = sum(nan + inf for _, _, nan, inf in nonfinite)
    parts = [_header(root, ds, status), "".join(f"<p class='flag'>{escape(f)}</p>\n" for f in _flags(ds, scan))]
    parts += [_problems(ds, status, scan), "<h2>Plots</h2>\n"]
    parts += [f"<h3>{escape(cap)}</h3><img src='{escape(name)}' alt='{escape(cap)}'>\n" for name, cap in plots]
    parts.append("<h2>NaN / inf values per member</h2>\n" + _table(["member", "samples", "NaN", "inf"], nonfinite))
    parts.append(f"<p class='flag'>{bad} non-finite values</p>\n" if bad else "<p>all values finite</p>\n")
    parts.append("<h2>Landmark overlays</h2>\n" if scan.overlays else "<h2>Landmark overlays</h2><p>none drawn</p>\n")
    for ov in scan.overlays:  # an overlay not drawn is one line: the clip and why
        if ov.png:
            img = f"<img src='{escape(ov.png)}' alt='{escape(ov.key)}'>"
            parts.append(f"<h3>{escape(ov.key)}</h3><p>{escape(ov.note)}</p>{img}\n")
        else:
            parts.append(f"<p class='flag'>no overlay for {escape(ov.key)}: {escape(ov.note)}</p>\n")
    rows = [
        [c.key, c.split, c.text, c.duration, c.face_rate, c.av_end_gap, *(c.norms.get(m) for m in NORMED)]
        for c in scan.clips[:MAX_ROWS]
    ]
    parts.append(f"<h2>Clips ({len(scan.clips)}, first {len(rows)} listed)</h2>\n")
    parts.append(
        _table(["key", "split", "text", "duration s", "face rate", "A-V end s", *(f"|{m}|" for m in NORMED)], rows)
    )
    body = "".join(parts)
    head = f"<head><meta charset='utf-8'><title>mmfuse report</title><style>{CSS}</style></head>"
    return f"<!DOCTYPE html>\n<html>{head}\n<body>{body}</body></html>\n"
