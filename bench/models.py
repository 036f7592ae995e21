"""Every fusion model on your own shards, compared as a paper would compare them (``mmfuse bench models``).

Each model (default: every registered one, each with its preset) is trained with ``fit`` once per seed on the
shards; the checkpoint is selected on the validation split only, then scored once on the test split. The table
gives mean ± std over seeds of those test metrics, one row per model; the best mean of each column is in bold.
A second table gives each model's robustness: the area under each modality's Gaussian-noise curve (MultiBench's
protocol, as ``mmfuse eval --noise-sweep``) of the same checkpoints on the test split, at noise std 0, 0.5, 1 and
2 × the train-split std (3 extra passes over the test split per modality and run). Beside each model's scores:
its test MAE (error rate for class labels) as a multiple of the reference model's (``--reference``, late fusion by
default), paired by seed, and a third table with each method's own mechanism on the test split (the gradient share
of its terms, its gates, KL or MI terms: ``FusionModel.mechanism_keys``).

    mmfuse bench models --shards shards/mosi --seeds 1,2,3,4,5 --runs runs/compare epochs=30
    mmfuse bench models --shards shards/mosi --models late,mult,tcmax --seeds 1,2,3 --json compare.json

Runs are kept under ``--runs RUNS/<model>/seed-<s>`` (else a temporary directory). A run whose ``final.json``
is there, with the same settings and feature set, is read back instead of trained again, so an interrupted
comparison resumes where it stopped; so is each run's noise curve, kept in its ``noise-test.json``. ``KEY=VALUE``
settings apply to every model (``model.KEY`` only to the models that have that setting: the others are told apart
in the error message).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import shutil
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.markdown import replace_section
from bench.sweep import ticker
from train.config_record import read_record
from train.jsonout import dumps

NAME = "bench-models"
# Metrics shown in the table, in this order, where the task has them (JSON has every metric).
COLUMNS = ("mae", "corr", "acc2_has0", "f1_has0", "acc2_non0", "f1_non0", "acc5", "acc7",
           "accuracy", "f1_weighted", "f1_macro", "acc_mean", "f1_mean")  # fmt: skip
LOWER_IS_BETTER = {"mae", "task_loss"}
# Gaussian-noise levels (x train std) of the robustness table; the full sweep of `mmfuse eval` has 6 per kind.
NOISE_LEVELS = (0.0, 0.5, 1.0, 2.0)
NOISE_FILE = "noise-test.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = __doc__.split("\n\n")[0]
    p.epilog = "\n\n".join(__doc__.split("\n\n")[1:])
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--shards", required=True, type=Path, help="shard directory (extracted or from import-mmsa)")
    p.add_argument("--seeds", default="1,2,3,4,5", help="comma-separated seeds, one run each (default 1,2,3,4,5)")
    p.add_argument("--models", default=None, help="comma-separated model names (default: every registered model)")
    p.add_argument("--runs", type=Path, default=None, help="keep the runs here (default: a temporary directory)")
    p.add_argument("--config", type=Path, default=None, help="YAML file of setting overrides for every model")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON to this file")
    p.add_argument("--reference", default="late", help="model whose test MAE the others are divided by (default late)")
    p.add_argument("--out", type=Path, default=None, help="Markdown file whose bench-models section is replaced")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="settings for every model, e.g. epochs=10")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from fusion import MODELS
    from shards.dataset import load_dataset_json
    from train.config import TrainConfigError

    names = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else sorted(MODELS)
    unknown = [name for name in names if name not in MODELS]
    if unknown or not names:
        given = ", ".join(unknown) or "(none given)"
        raise TrainConfigError(f"--models: unknown {given}; valid: {', '.join(sorted(MODELS))}")
    if args.reference != "late" and args.reference not in names:
        raise TrainConfigError(f"--reference {args.reference}: not among the models compared ({', '.join(names)})")
    seeds = parse_seeds(args.seeds)
    dataset = load_dataset_json(args.shards)
    runs_dir = args.runs or Path(tempfile.mkdtemp(prefix="mmfuse-bench-models-"))
    try:
        with args.progress("bench models", "run") as bar:
            results = compare(args, names, seeds, dataset, runs_dir, ticker(bar, len(names) * len(seeds)))
    finally:
        if args.runs is None:
            shutil.rmtree(runs_dir, ignore_errors=True)
    report = make_report(args, names, seeds, dataset, results)
    text = format_report(report)
    print(text)
    if args.json is not None:
        args.json.write_text(dumps(report, indent=1, sort_keys=True) + "\n")  # standard JSON: NaN -> null
    if args.out is not None:
        replace_section(args.out, text, NAME)
    return 0


def parse_seeds(text: str) -> list[int]:
    """``--seeds 1,2,3`` -> [1, 2, 3]; a clear error for anything else (``train.config.parse_seeds``; also used by
    ``bench claims``)."""
    from train.config import parse_seeds as parse

    return parse(text)


def compare(
    args: argparse.Namespace,
    names: list[str],
    seeds: list[int],
    dataset: dict[str, Any],
    runs_dir: Path,
    tick: Callable[[], None],
) -> dict[str, dict[int, dict[str, Any]]]:
    """model -> seed -> ``fit``'s final metrics (``valid`` and ``test`` of the validation-selected checkpoint), with
    ``noise`` (:func:`noise_auc`)."""
    from shards.dataset import ShardDataset
    from train.config import make_train_config
    from train.trainer import fit

    shards = ShardDataset.load(args.shards)
    streamed: dict[str, Any] = {}  # the train-split std the recorded statistics lack, streamed once for every run
    results: dict[str, dict[int, dict[str, Any]]] = {}
    for name in names:
        for seed in seeds:
            config = make_train_config(name, args.config, [*args.overrides, f"seed={seed}"])
            run_dir = runs_dir / name / f"seed-{seed}"
            final = finished_run(run_dir, config.to_dict(), dataset["feature_set_hash"])
            if final is None:
                if run_dir.exists():  # an unfinished or different run: trained again from the start
                    shutil.rmtree(run_dir)
                final = fit(config, args.shards, run_dir)
            final["noise"] = noise_auc(run_dir, final, shards, config.run.device, streamed)
            results.setdefault(name, {})[seed] = final
            tick()
    return results


def finished_run(run_dir: Path, config: dict[str, Any], fs_hash: str) -> dict[str, Any] | None:
    """The final metrics of a finished run in ``run_dir`` made with exactly ``config`` on feature set ``fs_hash``."""
    try:
        record = json.loads((run_dir / "config.json").read_text())
        final = json.loads((run_dir / "final.json").read_text())
    except (OSError, ValueError):
        return None
    saved = record.get("config") if isinstance(record, dict) else None
    # a run recorded before config.json's dotted keys, with the same settings, is the same run
    if not isinstance(saved, dict) or read_record(saved) != config or record.get("feature_set_hash") != fs_hash:
        return None
    return final


def noise_auc(run_dir: Path, final: dict[str, Any], shards: Any, device: str, streamed: dict[str, Any]) -> dict:
    """``metric`` and ``auc`` (modality -> area under its Gaussian-noise curve at ``NOISE_LEVELS``, trapezoid /
    level range) of the run's selected checkpoint on the test split; the sweep is kept in ``NOISE_FILE`` in the
    run directory and read back while its levels are these."""
    from train.noise_sweep import sweep_checkpoint

    path = run_dir / NOISE_FILE
    try:
        report = json.loads(path.read_text())
        curves = report["curves"]["gaussian"]
        if any(c["levels"] != list(NOISE_LEVELS) for c in curves.values()):
            raise ValueError("other levels")
    except (OSError, ValueError, KeyError):
        checkpoint = run_dir / final.get("checkpoint", "checkpoints/best.pt")
        levels = {"gaussian": NOISE_LEVELS}
        report = sweep_checkpoint(
            checkpoint, shards, kinds=("gaussian",), levels=levels, device=device, streamed=streamed
        )
        path.write_text(dumps(report, indent=1) + "\n")
        curves = report["curves"]["gaussian"]
    return {"metric": report["metric"], "auc": {m: c["auc"] for m, c in curves.items()}}


def make_report(
    args: argparse.Namespace,
    names: list[str],
    seeds: list[int],
    dataset: dict[str, Any],
    results: dict[str, dict[int, dict[str, Any]]],
) -> dict[str, Any]:
    from train.config import TrainConfigError

    missing = [f"{name} seed {seed}" for name in names for seed in seeds if not results[name][seed].get("test")]
    if missing:
        raise TrainConfigError(
            f"no test metrics for {', '.join(missing[:3])}: the shards in {args.shards} have no labelled test "
            "split (bench models reports test metrics of validation-selected checkpoints)"
        )
    summary = {name: summarise([results[name][s]["test"] for s in seeds]) for name in names}
    reference = args.reference if args.reference in names else None
    ratio = {}
    if reference is not None:
        ratio = {name: summarise([{"ratio": headline_ratio(results[name][s]["test"], results[reference][s]["test"])}
                                  for s in seeds]).get("ratio") for name in names}  # fmt: skip
    mechanism = {name: summarise([mechanism_of(name, results[name][s]["test"]) for s in seeds]) for name in names}
    noise = {name: summarise([results[name][s]["noise"]["auc"] for s in seeds]) for name in names}
    metric = results[names[0]][seeds[0]]["noise"]["metric"]
    selected_by = results[names[0]][seeds[0]].get("selected_by", "")
    return {
        "shards": str(args.shards),
        "feature_set_hash": dataset["feature_set_hash"],
        "counts": dataset.get("counts", {}),
        "seeds": seeds,
        "overrides": list(args.overrides),
        "config_file": str(args.config) if args.config else None,
        "selected_by": selected_by,
        "command": command_line(args),
        "summary": summary,
        "reference": reference,
        "headline": headline(results[names[0]][seeds[0]]["test"])[0],
        "ratio": ratio,
        "mechanism": mechanism,
        "noise": {"kind": "gaussian", "levels": list(NOISE_LEVELS), "metric": metric, "auc": noise},
        "runs": {name: {str(s): results[name][s] for s in seeds} for name in names},
    }


def headline(test: dict[str, Any]) -> tuple[str, float]:
    """The number the ratio column compares: ("MAE", MAE) for a regression label, else ("error", 1 - accuracy)
    (the mean over labels for multilabel); ("", NaN) when the metrics have neither."""
    if isinstance(test.get("mae"), float):
        return "MAE", test["mae"]
    for key in ("accuracy", "acc_mean"):
        if isinstance(test.get(key), float):
            return "error", 1.0 - test[key]
    return "", math.nan


def headline_ratio(test: dict[str, Any], reference: dict[str, Any]) -> float:
    """``headline(test)`` over the reference run's (same seed); NaN where the reference's is 0 or undefined."""
    value, base = headline(test)[1], headline(reference)[1]
    return value / base if base > 0 else math.nan


def mechanism_of(name: str, test: dict[str, Any]) -> dict[str, Any]:
    """The test metrics of model ``name`` that match its ``mechanism_keys`` (empty for the baselines)."""
    from fusion import MODELS

    patterns = MODELS[name].mechanism_keys
    return {k: v for k, v in test.items() if any(fnmatch.fnmatchcase(k, p) for p in patterns)}


def summarise(metrics: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """metric -> {mean, std, n} over runs (std 0 for one run; NaN values are left out)."""
    keys = sorted({k for m in metrics for k, v in m.items() if isinstance(v, float)})
    out = {}
    for key in keys:
        values = [m[key] for m in metrics if isinstance(m.get(key), float) and not math.isnan(m[key])]
        if values:
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            out[key] = {"mean": statistics.fmean(values), "std": std, "n": len(values)}
    return out


def format_report(report: dict[str, Any]) -> str:
    summary = report["summary"]
    present = {k for s in summary.values() for k in s}
    columns = [c for c in COLUMNS if c in present]
    best = {}
    for c in columns:
        means = [s[c]["mean"] for s in summary.values() if c in s]
        best[c] = min(means) if c in LOWER_IS_BETTER else max(means)
    reference, ratio = report.get("reference"), report.get("ratio") or {}
    ratio_column = [f"{report['headline']} × {reference}"] if reference else []
    lines = [
        "## Models on these shards",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Shards `{report['shards']}` (feature set {report['feature_set_hash']}); seeds "
        f"{', '.join(map(str, report['seeds']))}; each run selected by {report['selected_by']}, then scored once "
        "on the test split. Mean ± std over seeds; the best mean of each column in bold"
        + (
            f"; {ratio_column[0]}: the test {report['headline']} over {reference}'s, paired by seed."
            if reference
            else "."
        ),
        "",
        "| model | " + " | ".join([*ratio_column, *columns]) + " |",
        "|---|" + "---|" * (len(ratio_column) + len(columns)),
    ]
    for name, s in summary.items():
        cells = []
        if reference:
            r = ratio.get(name)
            cells.append(f"{r['mean']:.2f} ± {r['std']:.2f}" if r else "")
        for c in columns:
            if c not in s:
                cells.append("")
                continue
            cell = f"{s[c]['mean']:.4f} ± {s[c]['std']:.4f}"
            cells.append(f"**{cell}**" if s[c]["mean"] == best[c] else cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join([*lines, "", *format_noise(report["noise"]), "", *format_mechanism(report["mechanism"])])


def format_mechanism(mechanism: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    """The mechanism table: per method, each of its mechanism measures on the test split, mean ± std."""
    if not any(mechanism.values()):
        return ["Mechanisms: none of these models has a mechanism of its own (baselines only)."]
    lines = [
        "Mechanisms on the test split: `grad_share/<loss>` is the term's share of the gradient on the first test "
        "batch, `diag/<key>` the model's own diagnostic averaged over the split (gate rates, KL or MI terms). "
        "Mean ± std over seeds; models without a mechanism of their own are left out.",
        "",
        "| model | measure | mean ± std |",
        "|---|---|---|",
    ]
    for name, measures in mechanism.items():
        lines += [f"| {name} | {key} | {m['mean']:.4f} ± {m['std']:.4f} |" for key, m in measures.items()]
    return lines


def format_noise(noise: dict[str, Any]) -> list[str]:
    """The robustness table: per model, the area under each modality's Gaussian-noise curve, mean ± std."""
    auc, metric = noise["auc"], noise["metric"]
    modalities = [m for m in ("text", "audio", "video") if any(m in s for s in auc.values())]
    levels = ", ".join(f"{level:g}" for level in noise["levels"])
    better = "lower" if metric in LOWER_IS_BETTER else "higher"
    lines = [
        f"Robustness: area under each modality's Gaussian-noise curve on the test split ({metric} at noise std "
        f"{levels} × the train-split std, trapezoid / level range; {better} is more robust). Mean ± std over seeds; "
        "the most robust of each column in bold.",
        "",
        "| model | " + " | ".join(modalities) + " |",
        "|---|" + "---|" * len(modalities),
    ]
    pick = min if metric in LOWER_IS_BETTER else max
    best = {m: pick(s[m]["mean"] for s in auc.values() if m in s) for m in modalities}
    for name, s in auc.items():
        cells = [f"{s[m]['mean']:.4f} ± {s[m]['std']:.4f}" if m in s else "" for m in modalities]
        cells = [
            f"**{c}**" if m in s and s[m]["mean"] == best[m] else c for m, c in zip(modalities, cells, strict=True)
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def command_line(args: argparse.Namespace) -> str:
    parts = ["mmfuse bench models", "--shards", str(args.shards), "--seeds", args.seeds]
    parts += ["--models", args.models] if args.models else []
    parts += ["--reference", args.reference] if args.reference != "late" else []
    parts += ["--config", str(args.config)] if args.config else []
    return " ".join([*parts, *args.overrides])
