"""``mmfuse train`` and ``mmfuse eval``: argument parsing and reporting around train.trainer."""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import statistics
import sys
from pathlib import Path
from typing import Any

from train.jsonout import dumps

# train.config (and through it torch and the models) is imported inside the commands: extraction workers
# re-import the `mmfuse` entry point when they start, and must not pay for torch there.

SHORT = {"t": "text", "a": "audio", "v": "video"}
SPLITS = ("train", "valid", "test")  # the splits `mmfuse extract` writes
RUN_FILES = (
    *("config.json", "metrics.jsonl", "curves.png", "events"),
    *("checkpoints/last.pt", "checkpoints/best.pt", "final.json"),
)
DEVICE_HELP = "auto, cpu, cuda or cuda:N (default auto: cuda when available, else cpu)"

TRAIN_EXAMPLES = """examples:
  mmfuse train --shards shards/ --model tcmax --run-dir runs/tcmax
  mmfuse train --shards shards/ --model ithp --run-dir runs/ithp mode=end_to_end epochs=3 model.beta=16
  mmfuse train --shards shards/ --model late --run-dir runs/late --seeds 1,2,3,4,5
  mmfuse train --shards shards/ --model late --run-dir runs/late --resume
  mmfuse train --shards shards/iemocap --model late --run-dir runs/emo task=multilabel label_key=neutral,happy,sad,angry
  torchrun --nproc-per-node 2 $(which mmfuse) train --shards shards/ --model mult --run-dir runs/mult
"""

PREDICT_EXAMPLES = """examples:
  mmfuse predict --checkpoint runs/tcmax/checkpoints/best.pt clip.mp4 --text "what a great movie"
  mmfuse predict --checkpoint runs/tcmax/checkpoints/best.pt clip.mov --json   # no transcript: text masked

The clip goes through exactly the extraction pipeline of the checkpoint's feature set (same models, layers,
fps, FaceMesh options); a machine whose models differ is refused with the differing fields named.
"""

EVAL_EXAMPLES = """examples:
  mmfuse eval --checkpoint runs/tcmax/checkpoints/best.pt --shards shards/ --split test --json
  mmfuse eval --checkpoint runs/tcmax/checkpoints/best.pt --shards shards/ --missing a    # audio removed
  mmfuse eval --checkpoint runs/tcmax/checkpoints/best.pt --shards shards/ --missing all  # every subset
"""


def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a fusion model by streaming shards",
        description="Train a registered fusion model on shards written by `mmfuse extract`, frozen features or "
        "end to end. Settings: defaults <- the model's preset <- --config <- KEY=VALUE (model.KEY for the model).",
        epilog=TRAIN_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--shards", required=True, type=Path, help="shard directory (with dataset.json)")
    p.add_argument("--model", default=None, help="model name (fusion.MODELS); default: late, or the resumed run's")
    p.add_argument("--run-dir", required=True, type=Path, help="output directory; never overwritten silently")
    p.add_argument("--config", type=Path, default=None, help="YAML file of setting overrides")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last checkpoint")
    p.add_argument("--seeds", default=None, help="comma-separated seeds: one run each, then a mean ± std table")
    p.add_argument(
        "--skip-bad-samples",
        action="store_true",
        help="skip (count and log) corrupt or foreign samples instead of stopping with an error naming them",
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="setting overrides, e.g. epochs=5 model.hidden=32")
    p.set_defaults(run=run_train)


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="score a checkpoint on a split, optionally with modalities removed",
        description="Evaluate a checkpoint on any split of shards with the same feature set.",
        epilog=EVAL_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--shards", required=True, type=Path)
    p.add_argument("--split", default="test", choices=SPLITS, help="split to score (default test)")
    p.add_argument("--missing", default="", help="modalities to remove: t, a, v, ta, ...; 'all' = every subset")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument(
        "--predictions",
        type=Path,
        metavar="FILE.csv",
        help="also write one row per sample: key, split, removed modalities, label(s), prediction(s)",
    )
    p.set_defaults(run=run_eval)


def add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="predict one raw clip with a checkpoint",
        description="Decode and encode one video as `mmfuse extract` would for the checkpoint's feature set, "
        "then print the network's prediction. Missing modalities (no transcript, audio or face) are masked.",
        epilog=PREDICT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("video", type=Path, metavar="VIDEO", help="media file (mp4, avi, mpg, mov, ...)")
    p.add_argument("--text", default=None, help="the clip's transcript; without it the text modality is masked")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(run=run_predict)


def _resumed_config(run_dir: Path) -> dict[str, Any] | None:
    record = run_dir / "config.json"
    return json.loads(record.read_text())["config"] if record.is_file() else None


def run_train(args: argparse.Namespace) -> int:
    from train.config import TrainConfigError, make_train_config
    from train.trainer import fit

    base = _resumed_config(args.run_dir) if args.resume else None
    if args.resume and base is None:
        raise TrainConfigError(f"--resume: {args.run_dir / 'config.json'} not found; nothing to resume")
    if base is not None and args.model and args.model != base["model"]:
        raise TrainConfigError(f"--resume: the run in {args.run_dir} trains {base['model']}, not {args.model}")
    overrides = [*args.overrides, *(["skip_bad_samples=true"] if args.skip_bad_samples else [])]
    config = make_train_config(args.model, args.config, overrides, base=base)
    if not args.seeds:
        with args.progress("train", "step") as bar:
            final = fit(config, args.shards, args.run_dir, resume=args.resume, progress=bar)
        _print_final(args.run_dir, final)
        return 0
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    results = {}
    for seed in seeds:
        seeded = make_train_config(config.model, None, [f"seed={seed}"], base=config.to_dict())
        run_dir = args.run_dir / f"seed-{seed}"
        with args.progress(f"train seed {seed}", "step") as bar:
            results[seed] = fit(seeded, args.shards, run_dir, resume=args.resume and run_dir.is_dir(), progress=bar)
    table = seeds_table(results)
    args.run_dir.mkdir(parents=True, exist_ok=True)
    (args.run_dir / "seeds.md").write_text(table + "\n")
    (args.run_dir / "seeds.json").write_text(dumps({str(k): v for k, v in results.items()}, indent=2) + "\n")
    print(table)
    print(f"runs: {args.run_dir}/seed-*; table: {args.run_dir / 'seeds.md'}")
    return 0


def seeds_table(results: dict[int, dict[str, Any]]) -> str:
    """Markdown table of test metrics, mean ± std over seeds (each run selected on validation)."""
    keys = sorted({k for r in results.values() for k, v in r.get("test", {}).items() if isinstance(v, float)})
    lines = [
        f"test metrics over seeds {', '.join(map(str, results))} (each selected on validation)",
        "",
        "| metric | mean ± std |",
        "|---|---|",
    ]
    for key in keys:
        values = [r["test"][key] for r in results.values() if not math.isnan(r["test"].get(key, math.nan))]
        if not values:
            continue
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        lines.append(f"| {key} | {statistics.fmean(values):.4f} ± {spread:.4f} |")
    return "\n".join(lines)


def _print_final(run_dir: Path, final: dict[str, Any]) -> None:
    """The selected checkpoint, its test metrics, and the files of the run directory that are there."""
    test = final.get("test") or {}
    shown = ", ".join(f"{k} {v:.4f}" for k, v in test.items() if isinstance(v, float))
    print(f"selected step {final['selected_step']} by {final['selected_by']}; test: {shown or 'no test split'}")
    print(f"selected checkpoint: {run_dir / final.get('checkpoint', 'checkpoints/best.pt')}")
    written = [name + ("/" if name == "events" else "") for name in RUN_FILES if (run_dir / name).exists()]
    print(f"run directory: {run_dir} ({', '.join(written)})")


def missing_sets(spec: str, modalities: tuple[str, ...]) -> list[tuple[str, ...]]:
    """The modality sets to remove for ``--missing``: '' -> [()], 'ta' -> [(text, audio)], 'all' -> every
    proper subset of the model's modalities (including the empty one)."""
    from train.config import TrainConfigError

    if spec == "all":
        return [combo for r in range(len(modalities)) for combo in itertools.combinations(modalities, r)]
    bad = sorted(set(spec) - set(SHORT))
    if bad:
        raise TrainConfigError(f"--missing {spec!r}: use letters t, a, v (e.g. ta) or 'all'")
    removed = tuple(SHORT[c] for c in SHORT if c in spec)
    if removed and set(removed) >= set(modalities):
        raise TrainConfigError(f"--missing {spec!r} removes every modality the model uses ({', '.join(modalities)})")
    return [removed]


def run_eval(args: argparse.Namespace) -> int:
    import torch

    from shards.dataset import ShardDataset, check_feature_set
    from train.checkpoint import load_checkpoint
    from train.inputs import DataError
    from train.predict import load_network, resolve_device
    from train.runtime import Dist
    from train.trainer import evaluate

    device = resolve_device(args.device)
    ckpt = load_checkpoint(args.checkpoint)
    dataset = ShardDataset.load(args.shards)
    if args.split not in dataset.splits:
        raise DataError(
            f"the shards in {args.shards} have no {args.split} split "
            f"(they have: {', '.join(dataset.splits) or 'no complete shard'})"
        )
    check_feature_set(ckpt["feature_set_hash"], dataset, what=f"checkpoint {args.checkpoint}")
    config, net = load_network(ckpt, device)
    d = Dist(device=torch.device(device))
    results, rows = {}, []
    for removed in missing_sets(args.missing, tuple(net.fusion.modalities)):
        name = "".join(m[0] for m in removed) or "none"
        scored: list[dict[str, Any]] = []
        with args.progress(f"eval {args.split}" + (f" -{name}" if removed else ""), "sample") as bar:
            results[name] = evaluate(net, dataset, args.split, config, drop=removed, progress=bar, rows=scored, d=d)
        rows += [{"key": r["key"], "split": args.split, "removed": name, **r} for r in scored]
    if not any(results.values()):
        raise DataError(f"split {args.split!r} of {args.shards} has no labelled sample to evaluate")
    if args.predictions is not None:
        write_predictions(args.predictions, rows)
    if args.json:
        if len(results) == 1:
            ((name, metrics),) = results.items()
            print(dumps({**metrics, "split": args.split, "missing": name}))
        else:
            print(dumps({"split": args.split, "missing": results}))
        return 0
    for name, metrics in results.items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        print(f"{args.split} (removed: {name}): n={metrics.get('n', 0)} {shown}", file=sys.stdout)
    return 0


def write_predictions(path: Path, rows: list[dict[str, Any]]) -> None:
    """``rows`` as CSV (columns in first-seen order), written atomically."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns or ["key", "split", "removed", "label", "prediction"])
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def run_predict(args: argparse.Namespace) -> int:
    from train.predict import format_result, predict_clip

    result = predict_clip(args.checkpoint, args.video, args.text, args.device)
    print(dumps(result) if args.json else format_result(result))
    return 0
