"""``mmfuse bench extract --precisions fp32,bf16,fp16``: the text and audio encoders' speed and feature deviation
per ``--precision``, against fp32.

The N tiled clips are decoded once (audio only); then, for each precision in turn, in this process, the text
and the audio extractor are built at that precision and set up on ``--device`` (loading not timed), warmed up
on one clip, and timed over every clip in groups of ``--batch-size`` as the pipeline calls them. Deviation is
against the fp32 features (as stored: float16): the largest absolute difference over every clip and frame,
and the mean cosine similarity of matching rows (token or audio frame). The ``bench-extract-precision``
section of ``--out`` gets the command and the table.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from bench.extract_runs import command, machine, tile_manifest
from bench.markdown import replace_section
from extract.extractors.base import ExtractionError

log = logging.getLogger(__name__)
NAME = "bench-extract-precision"
write_section = partial(replace_section, name=NAME)  # (path, body)
MEMBERS = {"text": "text_feat.npy", "audio": "audio_feat.npy"}


def run_precision(args: argparse.Namespace, base: dict[str, Any], tmp: Path) -> int:
    """Measure every precision of ``args.precisions`` (fp32 first, the reference); print and write the report."""
    import torch

    from extract.manifest import load_manifest
    from extract.worker import DecodeSettings, decode_clip

    torch.set_num_threads(base["threads"])
    precisions = ["fp32", *[p for p in args.precisions if p != "fp32"]]
    clips = load_manifest(tile_manifest(tmp / "tiled.csv", args.clips), base["media_root"], need_text=True)
    decoded = [decode_clip(c, DecodeSettings(("audio",))) for c in clips]
    results: dict[str, dict[str, Any]] = {}
    with args.progress("bench extract precision", "precision") as bar:
        bar(0, len(precisions))
        for k, precision in enumerate(precisions):
            log.info("bench extract: encoders at %s", precision)
            results[precision] = measure_precision(base, decoded, precision)
            bar(k + 1, len(precisions))
    report = make_report(args, base, results, clips)
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    if args.out is not None:
        write_section(args.out, section(report))
        log.info("wrote the %s section of %s", NAME, args.out)
    return 0


def measure_precision(base: dict[str, Any], decoded: list[Any], precision: str) -> dict[str, Any]:
    """Seconds and features of the text and audio extractors at ``precision`` over ``decoded``."""
    from extract.extractors.audio import AudioExtractor
    from extract.extractors.text import TextExtractor

    batch = base["batch_size"]
    built = {
        "text": TextExtractor(base["text_model"], batch_size=batch, precision=precision),
        "audio": AudioExtractor(base["audio_model"], batch_size=batch, precision=precision),
    }
    out: dict[str, Any] = {}
    for modality, ex in built.items():
        ex.setup(base["device"])
        ex(decoded[:1])  # warm-up: first-call allocations and kernels
        tic = time.perf_counter()
        feats = []
        for lo in range(0, len(decoded), batch):
            # a clip without this modality (the bundled face clip has no transcript) stays None
            feats += [r[MEMBERS[modality]] if isinstance(r, dict) else None for r in ex(decoded[lo : lo + batch])]
        if all(f is None for f in feats):
            raise ExtractionError(f"{modality} at {precision}: no clip gave features")
        out[modality] = {"seconds": time.perf_counter() - tic, "features": feats}
    return out


def deviation(ref: list[np.ndarray | None], low: list[np.ndarray | None]) -> tuple[float, float]:
    """Largest absolute difference and mean row cosine similarity of ``low`` against ``ref``."""
    max_abs, cosines = 0.0, []
    for a, b in zip(ref, low, strict=True):
        if a is None or b is None:
            if (a is None) != (b is None):
                raise ExtractionError("a clip has features at one precision and none at the other")
            continue
        a, b = a.astype(np.float64), b.astype(np.float64)
        max_abs = max(max_abs, float(np.abs(a - b).max()))
        norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
        cosines.append((a * b).sum(-1) / np.maximum(norms, 1e-12))
    return max_abs, float(np.concatenate(cosines).mean())


def make_report(
    args: argparse.Namespace, base: dict[str, Any], results: dict[str, dict[str, Any]], clips: list[Any]
) -> dict[str, Any]:
    rows = []
    for precision, res in results.items():
        row: dict[str, Any] = {"precision": precision}
        for modality in MEMBERS:
            seconds = res[modality]["seconds"]
            max_abs, cosine = deviation(results["fp32"][modality]["features"], res[modality]["features"])
            row[modality] = {
                "seconds": round(seconds, 3),
                "speed_vs_fp32": round(results["fp32"][modality]["seconds"] / seconds, 3),
                "max_abs": max_abs,
                "mean_cosine": cosine,
            }
        rows.append(row)
    return {
        "command": command(args) + f" --precisions {','.join(results)}",
        "machine": machine(),
        "settings": {k: base[k] for k in ("text_model", "audio_model", "batch_size", "threads", "device")},
        "clips": len(clips),
        "rows": rows,
    }


def format_table(report: dict[str, Any]) -> str:
    lines = [
        "| precision | text s | text speed vs fp32 | text max abs | text mean cosine | audio s | audio speed vs fp32 "
        "| audio max abs | audio mean cosine |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        cells = [row["precision"]]
        for modality in MEMBERS:
            m = row[modality]
            cells += [f"{m['seconds']:.2f}", f"{m['speed_vs_fp32']:.2f}×", f"{m['max_abs']:.4f}"]
            cells.append(f"{m['mean_cosine']:.6f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def section(report: dict[str, Any]) -> str:
    mach, st = report["machine"], report["settings"]
    return "\n".join(
        [
            "## Encoder precision (`mmfuse bench extract --precisions`)",
            "",
            f"Command: `{report['command']}`",
            "",
            f"Machine: {mach['cpu_model']}, {mach['cores']} cores available, torch {mach['torch']} with "
            f"{st['threads']} intra-op thread(s), GPU: {mach['gpu'] or 'none'}, 1-minute load average at the end "
            f"{mach['load_avg_1min_at_end']}; device {st['device']}. Models: text `{st['text_model']}`, audio "
            f"`{st['audio_model']}`; {report['clips']} tiled bundled clips, encoder batch {st['batch_size']}. "
            "Each precision's extractors run in this one process on the same decoded clips (model loading and "
            "one warm-up clip not timed); bf16 and fp16 run under autocast. Deviation is against the fp32 "
            "features as stored (float16): the largest absolute difference over every token or frame, and the "
            "mean cosine similarity of matching rows. Timings are only comparable within this run (shared "
            "machine).",
            "",
            format_table(report),
        ]
    )
