"""``mmfuse bench gpu``: the timed half of ``make gpu-check``, written to BENCHMARKS.md's GPU section.

    mmfuse bench gpu --junit gpu-check.xml --out BENCHMARKS.md

Two figures on the device: training steps of batch ``--batch-size`` (default 50 timed steps of 32, frozen
features streamed from synthetic shards of realistic shapes, ``bench.train_steps.timed_training``: every clock
reading waits for the device), with the wait for data against the whole step (target: under 50 %); and
extraction clips/s (the bundled clips tiled to ``--clips``, model loading excluded). With ``--junit`` (pytest's
``--junitxml`` of ``pytest -m gpu``) the section also lists every GPU test and its outcome. ``--device cpu
--quick`` runs the same on the CPU with tiny data (a smoke test of the section, not a GPU figure).
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path
from typing import Any

from bench.extract_runs import MEDIA
from bench.markdown import replace_section
from bench.train_runs import workdir

SECTION, WAIT_TARGET = "gpu-check", 0.5
QUICK_ARGS = {"steps": 3, "warmup": 1, "batch_size": 4, "samples": 16, "workers": 0, "clips": 2}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = __doc__.split("\n\n")[0]
    p.add_argument("--device", default="cuda", help="cuda or cuda:N (cpu only with --quick; default cuda)")
    p.add_argument("--steps", type=int, default=50, help="timed training steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed training steps before the clock starts")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--samples", type=int, default=256, help="synthetic train samples (read epoch after epoch)")
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers, and extraction's decode workers")
    p.add_argument("--clips", type=int, default=32, help="clips extracted (the bundled clips, tiled)")
    p.add_argument("--junit", type=Path, default=None, help="pytest --junitxml of `pytest -m gpu`: list its tests")
    p.add_argument("--quick", action="store_true", help="tiny data, encoders and step counts (a smoke test)")
    p.add_argument("--workdir", type=Path, default=None, help="keep the generated data here (default: a temp dir)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument("--out", type=Path, default=None, help="BENCHMARKS.md whose gpu-check section is replaced")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from extract.devices import DeviceError, resolve_device

    if args.device == "cpu" and not args.quick:
        raise DeviceError("bench gpu: --device cpu only with --quick (a smoke test); the figures are CUDA's")
    args.device = resolve_device(args.device)  # CUDA absent: one line, exit 1
    if args.quick:
        for key, value in QUICK_ARGS.items():
            setattr(args, key, value)
    with workdir(args) as work:
        report = benchmark(args, work)
    print(json.dumps(report, indent=1, sort_keys=True) if args.json else format_section(report))
    if args.out is not None:
        replace_section(args.out, format_section(report), SECTION)
    return 0


def benchmark(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The device, the timed training steps, the extraction rate and (with ``--junit``) the GPU tests."""
    return {
        "setup": setup(args),
        "training": training(args, work),
        "extraction": extraction(args, work),
        "tests": junit_results(args.junit) if args.junit is not None and args.junit.is_file() else None,
        "junit_missing": str(args.junit) if args.junit is not None and not args.junit.is_file() else None,
    }


def setup(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    cuda = args.device.startswith("cuda")
    return {
        "device": args.device,
        "device_name": torch.cuda.get_device_name(args.device) if cuda else "CPU",
        "gpus": torch.cuda.device_count() if cuda else 0,
        "torch": str(torch.__version__),
        "cuda": torch.version.cuda if cuda else None,
        "date": datetime.date.today().isoformat(),
        "command": command_line(args),
    }


def command_line(args: argparse.Namespace) -> str:
    parts = ["mmfuse bench gpu", f"--device {args.device}", f"--steps {args.steps}", f"--warmup {args.warmup}"]
    parts += [f"--batch-size {args.batch_size}", f"--samples {args.samples}", f"--workers {args.workers}"]
    parts += [f"--clips {args.clips}"] + (["--quick"] if args.quick else [])
    parts += [f"--junit {args.junit.name}"] if args.junit is not None else []
    return " ".join(parts + ([f"--out {args.out.name}"] if args.out is not None else []))


def training(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """``--steps`` timed steps of model ``late`` (frozen, streamed, ``--workers`` DataLoader workers) on the device."""
    from bench.train_steps import bench_data, timed_training, write_dataset

    shapes, _, fset, shard_size = bench_data(work, args.quick)
    write_dataset(work / "shards", args.samples, shapes, fset, shard_size=shard_size)
    overrides = [f"batch_size={args.batch_size}", f"num_workers={args.workers}", "seed=0", "mode=frozen"]
    overrides += ["model.hidden=12", "model.num_layers=1"] if args.quick else []
    result = timed_training(
        work / "shards", "late", overrides, source="stream", steps=args.steps, warmup=args.warmup, device=args.device
    )
    result["wait_fraction"] = result["data_wait_s_per_step"] / result["s_per_step"]
    result["wait_ok"] = result["wait_fraction"] < WAIT_TARGET
    return result


def extraction(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """``--clips`` clips (the bundled GRID clips, tiled) extracted on the device; clips/s excludes model loading
    and planning (``setup_s``); decode workers are started inside the timed part."""
    from extract.config import make_config
    from extract.pipeline import run_extract

    media = MEDIA
    clips = sorted(p.relative_to(media) for p in (media / "grid").glob("*.mpg"))
    manifest = work / "extract.csv"
    rows = [f"v{i % len(clips)},c{i},clip number {i},train,{clips[i % len(clips)]},0" for i in range(args.clips)]
    manifest.write_text("video_id,clip_id,text,mode,path,label\n" + "\n".join(rows) + "\n")
    settings: dict[str, Any] = {"workers": args.workers, "device": args.device, "shard_size": 16}
    encoders, described = image_encoders(work, args.quick)
    settings.update(encoders)
    started = time.perf_counter()
    summary = run_extract(manifest, media, work / "extracted", make_config(None, **settings))
    wall = time.perf_counter() - started
    timed = summary["wall_s"] - summary["setup_s"]
    return {
        "clips": summary["samples_written"],
        "seconds": timed,
        "clips_per_s": summary["samples_written"] / timed,
        "wall_s": wall,
        **described,
    }


def image_encoders(work: Path, quick: bool) -> tuple[dict[str, Any], dict[str, str]]:
    """Extraction settings for what this machine has, and their description: tiny encoders with ``quick``; else
    the defaults, with a random BERT of MiniLM's shapes where the bundled MiniLM is not installed (the GPU image),
    and no video where mediapipe is not (FaceMesh runs on the CPU: its cost is measured on the CPU machine)."""
    import importlib.util

    from bench.stand_ins import save_minilm_shaped_bert
    from extract.models import bundled_models

    found = importlib.util.find_spec("mediapipe") is not None
    settings: dict[str, Any] = {"modalities": ("text", "audio", "video") if found else ("text", "audio")}
    described = {
        "text_model": "default (bundled all-MiniLM-L6-v2)",
        "audio_model": "default (random:wav2vec2-small)",
        "video": "MediaPipe FaceMesh" if found else "not extracted (mediapipe is not installed)",
    }
    if quick:
        from bench.train_steps import save_tiny_encoders

        text, audio = save_tiny_encoders(work / "extract-models")
        settings.update(text_model=text, audio_model=audio)
        described.update(text_model=text, audio_model=audio)
    elif "all-MiniLM-L6-v2" not in bundled_models():
        settings["text_model"] = save_minilm_shaped_bert(work / "minilm-shaped-bert")
        described["text_model"] = "a random-init BERT of all-MiniLM-L6-v2's shapes (MiniLM is not installed)"
    return settings, described


def junit_results(path: Path) -> list[dict[str, str]]:
    """Each test case of a pytest ``--junitxml`` file: its id and outcome (passed, failed, error, skipped)."""
    import xml.etree.ElementTree as ET

    rows = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, detail = "passed", ""
        for kind in ("failure", "error", "skipped"):
            found = case.find(kind)
            if found is not None:
                outcome = {"failure": "failed"}.get(kind, kind)
                detail = (found.get("message") or "").splitlines()[0][:120] if found.get("message") else ""
                break
        name = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
        rows.append({"test": name, "outcome": outcome, "detail": detail})
    return rows


def format_section(report: dict[str, Any]) -> str:
    """The BENCHMARKS.md section: device, versions, date, command, the two figures, the GPU tests."""
    s, t, e = report["setup"], report["training"], report["extraction"]
    lines = [
        "## GPU check (`make gpu-check`)",
        "",
        f"Command: `{s['command']}`",
        "",
        f"Device: {s['device_name']} ({s['device']}; {s['gpus']} GPU(s) visible), torch {s['torch']}, "
        f"CUDA {s['cuda'] or 'none'}, measured {s['date']}.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| training, model `late` frozen, batch {t['batch_size']}: s/step ({t['steps']} timed steps) | "
        f"{t['s_per_step']:.4f} |",
        f"| training: samples/s | {t['samples_per_s']:.1f} |",
        f"| training: data wait s/step | {t['data_wait_s_per_step']:.4f} |",
        f"| training: data wait / step time (target < {WAIT_TARGET:.0%}) | {t['wait_fraction']:.1%} "
        f"(**{'met' if t['wait_ok'] else 'missed'}**) |",
        f"| extraction: clips/s ({e['clips']} clips, model loading excluded) | {e['clips_per_s']:.2f} |",
        "",
        f"Extraction encoders: text {e['text_model']}, audio {e['audio_model']}, "
        f"video {e.get('video', 'MediaPipe FaceMesh')}.",
    ]
    tests = report.get("tests")
    if report.get("junit_missing"):
        lines += ["", f"GPU tests: no outcomes: `{Path(report['junit_missing']).name}` was not written (pytest did not "
                  "finish: killed at its time limit, or it could not start)."]  # fmt: skip
    if tests is not None:
        counts = {k: sum(1 for r in tests if r["outcome"] == k) for k in ("passed", "failed", "error", "skipped")}
        lines += ["", "GPU tests (`pytest -m gpu`): " + ", ".join(f"{v} {k}" for k, v in counts.items()) + ".", ""]
        lines += ["| test | outcome |", "|---|---|"]
        lines += [f"| `{r['test']}` | {r['outcome']}{': ' + r['detail'] if r['detail'] else ''} |" for r in tests]
    return "\n".join(lines)
