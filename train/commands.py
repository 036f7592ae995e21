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

from mmfuse.commands import Commands
from train.jsonout import dumps

# The training modules (and through them torch and the models) are imported inside the commands: extraction workers
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
  mmfuse predict --checkpoint runs/tcmax/checkpoints/best.pt talk.mp4 --start 61.5 --end 68 --text "..."

The clip goes through exactly the extraction pipeline of the checkpoint's feature set (same models, layers,
fps, FaceMesh options); a machine whose models differ is refused with the differing fields named.
"""

EVAL_EXAMPLES = """examples:
  mmfuse eval --checkpoint runs/tcmax/checkpoints/best.pt --shards shards/ --split test --json
  mmfuse eval --checkpoint runs/tcmax/checkpoints/best.pt --shards shards/ --missing a    # audio removed
  mmfuse eval --checkpoint runs/tcmax/checkpoints/best.pt --shards shards/ --missing all  # every subset
  mmfuse eval --checkpoint runs/tcmax/checkpoints/best.pt --shards shards/ --noise a=0.5   # audio + 0.5 std noise
  mmfuse eval --checkpoint runs/tcmax/checkpoints/best.pt --shards shards/ --noise t=0.3,v=0.5 --noise-kind drop
  mmfuse eval --checkpoint runs/tcmax/checkpoints/best.pt --shards shards/ --noise-sweep --seed 1

Robustness (MultiBench's protocol): --noise corrupts the fusion model's inputs of the named modalities (t, a, v)
at each LEVEL. --noise-kind gaussian adds N(0, (LEVEL x std)^2) to every valid step, std being each feature's
train-split std (the checkpoint's recorded statistics; the 4 video geometry features, which have none, from one
pass over the train split of --shards); --noise-kind drop drops each valid step (mask off) with probability LEVEL,
a sample keeping one step unless LEVEL is 1. Draws are seeded by --seed and each batch's sample keys: reruns
give identical numbers. --noise-sweep scores every modality at gaussian levels 0, 0.25, 0.5, 1, 2, 4 and drop levels
0, 0.1, 0.3, 0.5, 0.7, 0.9, prints a table per kind with each curve's area (trapezoid over the levels / level
range, of MAE for regression, accuracy for classification, mean per-label accuracy for multilabel), and writes
JSON (every metric at every level) and a PNG plot to --sweep-out (default: beside the checkpoint,
CHECKPOINT_STEM.noise-SPLIT.json and .png).
"""


def add_train(commands: Commands) -> None:
    p = commands.add(
        "train",
        help="train a fusion model by streaming shards",
        description="Train a registered fusion model on shards written by `mmfuse extract`, frozen features or "
        "end to end. Settings: defaults <- the model's preset <- --config <- KEY=VALUE (model.KEY for the model); "
        "every setting, its default and meaning: docs/settings.md.",
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


def add_eval(commands: Commands) -> None:
    p = commands.add(
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
    p.add_argument("--noise", default="", metavar="MOD=LEVEL,...", help="corrupt modalities, e.g. a=0.5 or t=0.2,v=1")
    p.add_argument(
        "--noise-kind", default="gaussian", choices=("gaussian", "drop"), help="what --noise does (default gaussian)"
    )
    p.add_argument("--noise-sweep", action="store_true", help="robustness curves: every modality, kind and level")
    p.add_argument("--sweep-out", type=Path, default=None, metavar="FILE.json", help="the sweep's JSON (PNG beside)")
    p.add_argument("--seed", type=int, default=0, help="seed of the corruption draws (default 0)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument(
        "--predictions",
        type=Path,
        metavar="FILE.csv",
        help="also write one row per sample: key, split, removed modalities, label(s), prediction(s)",
    )
    p.set_defaults(run=run_eval)


def add_predict(commands: Commands) -> None:
    p = commands.add(
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
    p.add_argument("--start", type=seconds, metavar="S", help="the clip starts S seconds into the file (default 0)")
    p.add_argument("--end", type=seconds, metavar="S", help="the clip ends S seconds into the file (default: its end)")
    p.add_argument(
        "--max-duration",
        type=seconds,
        metavar="S",
        help="longest clip decoded, in seconds (default 3600, as extraction's max_duration_s)",
    )
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(run=run_predict)


def seconds(text: str) -> float:
    """A finite, non-negative number of seconds (argparse type: anything else is a usage error)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: seconds must be a finite number, 0 or more")
    return value


def _resumed_config(run_dir: Path) -> dict[str, Any] | None:
    record = run_dir / "config.json"
    return json.loads(record.read_text())["config"] if record.is_file() else None


def run_train(args: argparse.Namespace) -> int:
    from train.config import TrainConfigError, make_train_config, parse_seeds, refuse_repeated
    from train.trainer import fit

    base = _resumed_config(args.run_dir) if args.resume else None
    if args.resume and base is None:
        raise TrainConfigError(f"--resume: {args.run_dir / 'config.json'} not found; nothing to resume")
    if base is not None and args.model and args.model != base["model"]:
        raise TrainConfigError(f"--resume: the run in {args.run_dir} trains {base['model']}, not {args.model}")
    refuse_repeated(args.overrides)
    overrides = [*args.overrides, *(["skip_bad_samples=true"] if args.skip_bad_samples else [])]
    config = make_train_config(args.model, args.config, overrides, base=base)
    if not args.seeds:
        with args.progress("train", "step") as bar:
            final = fit(config, args.shards, args.run_dir, resume=args.resume, progress=bar)
        _print_final(args.run_dir, final)
        return 0
    # every seed's settings are checked before the first run starts, so a bad one cannot stop the series midway
    settings = config.to_dict()
    seeded = {s: make_train_config(config.model, None, [f"seed={s}"], base=settings) for s in parse_seeds(args.seeds)}
    results = {}
    for seed, seeded_config in seeded.items():
        run_dir = args.run_dir / f"seed-{seed}"
        with args.progress(f"train seed {seed}", "step") as bar:
            resume = args.resume and run_dir.is_dir()
            results[seed] = fit(seeded_config, args.shards, run_dir, resume=resume, progress=bar)
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

    from extract.devices import resolve_device
    from shards.dataset import ShardDataset, check_feature_set
    from train.checkpoint import load_checkpoint
    from train.inputs import DataError
    from train.predict import load_network
    from train.runtime import Dist
    from train.trainer import evaluate

    _check_eval_options(args)
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
    if args.noise or args.noise_sweep:
        return run_noise(args, ckpt, dataset, config, net, d)
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
        print(f"{args.split} (removed: {name}): n={metrics.get('n', 0)} {_shown(metrics)}", file=sys.stdout)
    return 0


def _shown(metrics: dict[str, Any]) -> str:
    """The metrics and gradient shares on one line; the model's diagnostics (``diag/...``) are in ``--json``."""
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float) and "diag/" not in k)


def _check_eval_options(args: argparse.Namespace) -> None:
    """Refuse options that do not go together, before anything is loaded."""
    from train.config import TrainConfigError

    if (args.noise or args.noise_sweep) and args.missing:
        raise TrainConfigError("--missing cannot be combined with --noise or --noise-sweep: run them one at a time")
    if args.noise and args.noise_sweep:
        raise TrainConfigError("--noise-sweep sweeps every modality and level itself: leave out --noise")
    if args.noise_sweep and args.predictions is not None:
        raise TrainConfigError("--predictions is not written by --noise-sweep; use --noise for one corruption")
    if args.sweep_out is not None and not args.noise_sweep:
        raise TrainConfigError("--sweep-out names the output of --noise-sweep; add --noise-sweep")


def run_noise(args: argparse.Namespace, ckpt: dict[str, Any], dataset: Any, config: Any, net: Any, d: Any) -> int:
    """``mmfuse eval --noise`` (one corruption) and ``--noise-sweep`` (robustness curves, train/noise_sweep.py)."""
    from train.checkpoint import checkpoint_dataset
    from train.inputs import DataError
    from train.noise_sweep import evaluate_noisy, input_std
    from train.robustness import Corruption, parse_noise

    modalities = tuple(net.fusion.modalities)
    levels = {} if args.noise_sweep else parse_noise(args.noise, args.noise_kind, modalities)
    noisy = modalities if args.noise_sweep else tuple(levels) if args.noise_kind == "gaussian" else ()
    dims = {m: int(ckpt["dims"][m]) for m in noisy}
    std = input_std(net, checkpoint_dataset(ckpt), dataset, config, dims, noisy)  # train-split std, gaussian only
    if args.noise_sweep:
        return _run_sweep(args, dataset, config, net, d, std)
    corruption, rows = Corruption(levels, args.noise_kind, std, args.seed), []
    named = ", ".join(f"{m} {level:g}" for m, level in levels.items())
    with args.progress(f"eval {args.split} {args.noise_kind} {named}", "sample") as bar:
        metrics = evaluate_noisy(net, dataset, args.split, config, corruption, d, rows=rows, progress=bar)
    if not metrics:
        raise DataError(f"split {args.split!r} of {args.shards} has no labelled sample to evaluate")
    if args.predictions is not None:
        noise = f"{args.noise_kind} " + ",".join(f"{m}={level:g}" for m, level in levels.items())
        write_predictions(args.predictions, [{"key": r["key"], "split": args.split, "noise": noise, **r} for r in rows])
    if args.json:
        noise = {"noise": levels, "noise_kind": args.noise_kind, "seed": args.seed}
        print(dumps({**metrics, "split": args.split, **noise}))
    else:
        print(f"{args.split} (noise: {args.noise_kind} {named}, seed {args.seed}): n={metrics['n']} {_shown(metrics)}")
    return 0


def _run_sweep(args: argparse.Namespace, dataset: Any, config: Any, net: Any, d: Any, std: dict[str, Any]) -> int:
    from train.inputs import DataError
    from train.noise_sweep import format_sweep, run_sweep, write_sweep

    with args.progress(f"noise sweep {args.split}", "eval") as bar:
        report = run_sweep(net, dataset, args.split, config, std, seed=args.seed, d=d, tick=bar)
    if not report["clean"]:
        raise DataError(f"split {args.split!r} of {args.shards} has no labelled sample to evaluate")
    report.update(checkpoint=str(args.checkpoint), shards=str(args.shards))
    out = args.sweep_out or args.checkpoint.with_name(f"{args.checkpoint.stem}.noise-{args.split}.json")
    json_path, png = write_sweep(report, out, title=f"{args.checkpoint} on {args.split}, seed {args.seed}")
    print(dumps(report) if args.json else format_sweep(report))
    print(f"robustness curves: {json_path} and {png}", file=sys.stderr if args.json else sys.stdout)
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

    window = (args.start, args.end)
    result = predict_clip(args.checkpoint, args.video, args.text, args.device, window, args.max_duration)
    print(dumps(result) if args.json else format_result(result))
    return 0
