"""What ``mmfuse bench extract`` and its sweep share: the bundled media, the tiled manifest, one variant run in a
fresh interpreter, the machine description and the command line that reproduces a report."""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.sweep import spell, ticker
from extract.auto import usable_cores
from extract.extractors.base import ExtractionError

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]
MEDIA = ROOT / "examples" / "media"
SWEEP, QUICK_SWEEP = ((0, 1, 2, 3), (1, 2, 4, 8, 16)), ((0, 1), (1, 2))  # (worker counts, batch sizes)


def tile_manifest(path: Path, n: int, media: Path = MEDIA) -> Path:
    """A manifest of ``n`` clips cycling through the bundled ones: distinct ids, ``path`` to the bundled file."""
    sources = list(csv.DictReader((media / "manifest.csv").read_text().splitlines()))
    rows = []
    for i in range(n):
        src = sources[i % len(sources)]
        found = sorted((media / src["video_id"]).glob(src["clip_id"] + ".*"))
        media_file = next(f for f in found if f.suffix != ".align")
        rows.append(
            {
                "video_id": "tiled",
                "clip_id": f"{i:06d}-{src['clip_id']}",
                "path": str(media_file.relative_to(media)),
                "text": src["text"],
                "label": src["label"],
                "mode": "train",
            }
        )
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def measure_all(
    args: argparse.Namespace, title: str, plan: list[tuple[Any, ...]], base: dict[str, Any], tmp: Path
) -> dict[str, dict[str, Any]]:
    """Each ``(name, variant, manifest[, spec overrides])`` of ``plan`` measured in turn (:func:`measure`, output
    under ``tmp``), with a progress bar titled ``title``; the measurements by name."""
    runs = {}
    with args.progress(title, "run") as bar:
        tick = ticker(bar, len(plan))
        for name, variant, manifest, *overrides in plan:
            log.info("%s: running %s", title, name)
            spec = {**base, **(overrides[0] if overrides else {})}
            spec |= {"variant": variant, "manifest": str(manifest), "out": str(tmp / f"out-{name}")}
            runs[name] = measure(spec, tmp / f"{name}.json")
            tick()
    return runs


def measure(spec: dict[str, Any], result: Path) -> dict[str, Any]:
    """Run one variant in a fresh interpreter and return its measurements."""
    spec_path = result.with_suffix(".spec.json")
    spec_path.write_text(json.dumps({**spec, "result": str(result)}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.setdefault("GLOG_minloglevel", "2")
    proc = subprocess.run(
        [sys.executable, "-m", "bench.extract_variants", str(spec_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0 or not result.is_file():
        tail = "\n".join(proc.stderr.strip().splitlines()[-20:])
        raise ExtractionError(f"benchmark variant {spec['variant']} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(result.read_text())


def machine() -> dict[str, Any]:
    import torch

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu_model": model,
        "cores": usable_cores(),
        "torch": torch.__version__,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset"),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_avg_1min_at_end": round(os.getloadavg()[0], 2),
    }


def command(args: argparse.Namespace) -> str:
    parts = ["mmfuse bench extract", f"--clips {args.clips}", f"--workers {args.workers}"]
    parts += [f"--threads {args.threads}", f"--batch-size {args.batch_size}", f"--device {args.device}"]
    for flag in ("shard_size", "fps", "text_model", "audio_model"):
        if getattr(args, flag) is not None:
            parts.append(f"--{flag.replace('_', '-')} {getattr(args, flag)}")
    parts += [f"--repeat {args.repeat}"] if getattr(args, "repeat", 1) > 1 else []
    parts += ["--quick"] * args.quick + ["--json"] * args.json
    if args.sweep:
        parts += ["--sweep", f"--sweep-workers {spell(args.sweep_workers)}"]
        parts += [f"--sweep-batch-sizes {spell(args.sweep_batch_sizes)}"]
    parts += [f"--out {args.out}"] if args.out is not None else []
    parts += [f"--plot {args.plot}"] if args.plot is not None else []
    omp = os.environ.get("OMP_NUM_THREADS")
    return (f"OMP_NUM_THREADS={omp} " if omp else "") + " ".join(parts)
