"""``mmfuse bench extract --modalities text``: text-only extraction against a plain batched loop over the same
model, both timed as whole processes (interpreter and torch start-up, model loading included).

N transcripts (``--clips``) are made from the bundled transcripts' words with lengths of 4 to 40 words (a fixed
seed). ``mmfuse extract MANIFEST --modalities text`` runs with its defaults; the plain loop loads the same
model with ``AutoTokenizer`` / ``AutoModel``, sorts the transcripts by length and encodes them in batches of
16, keeping each one's rows as float16 (what the shards store). Wall time and CPU-seconds (the child's
``getrusage``) of each process, one run each, and their ratio.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import random
import resource
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

from bench.extract_runs import MEDIA, ROOT, command, machine
from bench.markdown import replace_section
from extract.extractors.base import ExtractionError

log = logging.getLogger(__name__)
NAME = "bench-extract-text"
write_section = partial(replace_section, name=NAME)  # (path, body)

PLAIN_LOOP = """
import sys, numpy as np, torch
from transformers import AutoModel, AutoTokenizer
path, texts = sys.argv[1], [line.rstrip("\\n") for line in open(sys.argv[2], encoding="utf-8")]
tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
model = AutoModel.from_pretrained(path, local_files_only=True).eval()
order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
out = [None] * len(texts)
with torch.inference_mode():
    for lo in range(0, len(order), 16):
        batch = order[lo : lo + 16]
        enc = tok([texts[i] for i in batch], padding=True, return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        for row, i in enumerate(batch):
            out[i] = hidden[row, : int(enc["attention_mask"][row].sum())].numpy().astype(np.float16)
print(sum(len(o) for o in out))
"""


def transcripts(n: int, seed: int = 0) -> list[str]:
    """``n`` transcripts of 4-40 words drawn from the bundled transcripts' words."""
    rows = csv.DictReader((MEDIA / "manifest.csv").read_text().splitlines())
    words = [w for r in rows for w in r["text"].split()]
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(4, 40))) for _ in range(n)]


def timed(cmd: list[str]) -> dict[str, float]:
    """Wall time and CPU-seconds of one child process; an error with its stderr's tail if it fails."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    tic = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - tic
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise ExtractionError(f"{cmd[:4]} failed (exit {proc.returncode}):\n{proc.stderr.strip()[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3)}


def run_text(args: argparse.Namespace, base: dict[str, Any], tmp: Path) -> int:
    """Time both processes once on the same transcripts; print the report, write its section when asked."""
    from extract.models import resolve_model

    texts = transcripts(args.clips)
    (tmp / "texts.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    manifest = tmp / "texts.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["video_id", "clip_id", "text", "label", "mode"])
        writer.writeheader()
        writer.writerows(
            {"video_id": "t", "clip_id": f"{i:06d}", "text": t, "label": 0.0, "mode": "train"}
            for i, t in enumerate(texts)
        )
    model = str(resolve_model(base["text_model"], "text"))
    mmfuse_cmd = [sys.executable, "-m", "mmfuse", "extract", str(manifest), "--out", str(tmp / "out")]
    mmfuse_cmd += ["--modalities", "text", "--text-model", base["text_model"], "-q", "--no-progress"]
    runs = {}
    for name, cmd in (
        ("mmfuse", mmfuse_cmd),
        ("plain", [sys.executable, "-c", PLAIN_LOOP, model, str(tmp / "texts.txt")]),
    ):
        log.info("bench extract --modalities text: %s", name)
        runs[name] = timed(cmd)
    report = {
        "command": command(args) + " --modalities text",
        "machine": machine(),
        "text_model": base["text_model"],
        "transcripts": len(texts),
        "words": sum(len(t.split()) for t in texts),
        "runs": runs,
        "wall_ratio": round(runs["mmfuse"]["wall_s"] / runs["plain"]["wall_s"], 3),
        "cpu_ratio": round(runs["mmfuse"]["cpu_s"] / runs["plain"]["cpu_s"], 3),
    }
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    if args.out is not None:
        write_section(args.out, section(report))
        log.info("wrote the %s section of %s", NAME, args.out)
    return 0


def format_table(report: dict[str, Any]) -> str:
    runs = report["runs"]
    return "\n".join(
        [
            "| process | wall s | CPU-seconds |",
            "|---|---|---|",
            f"| `mmfuse extract --modalities text` (defaults) | {runs['mmfuse']['wall_s']:.2f} | "
            f"{runs['mmfuse']['cpu_s']:.2f} |",
            f"| plain loop (length-sorted batches of 16) | {runs['plain']['wall_s']:.2f} | "
            f"{runs['plain']['cpu_s']:.2f} |",
            f"| ratio mmfuse / plain | **{report['wall_ratio']:.2f}×** | {report['cpu_ratio']:.2f}× |",
        ]
    )


def section(report: dict[str, Any]) -> str:
    mach = report["machine"]
    return "\n".join(
        [
            "## Text-only extraction vs a plain loop (`mmfuse bench extract --modalities text`)",
            "",
            f"Command: `{report['command']}`",
            "",
            f"Machine: {mach['cpu_model']}, {mach['cores']} cores available, torch {mach['torch']}, "
            f"OMP_NUM_THREADS={mach['omp_num_threads']}, 1-minute load average at the end "
            f"{mach['load_avg_1min_at_end']}. Model `{report['text_model']}`; {report['transcripts']} transcripts "
            f"({report['words']} words, 4-40 each). Both are whole processes, one run each: interpreter and "
            "torch start-up and model loading included. mmfuse writes shards (tar, sidecar, statistics, "
            "dataset.json); the plain loop keeps the float16 rows in memory.",
            "",
            format_table(report),
        ]
    )
