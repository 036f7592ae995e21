"""Each seed method's claim, tested where it can show: one synthetic task per claim (``bench/claim_tasks.py``),
of the kind the method's paper used, the method against its own one-switch ablation and against ``late``,
``early`` and ``mult``, several seeds, a verdict.

    mmfuse bench claims --seeds 0,1,2,3,4,5,6,7,8,9 --out BENCHMARKS.md

A run trains one model in memory (AdamW, batch 64, hidden 32, one layer; the models' defaults otherwise),
evaluates the validation split every ``eval_every`` steps and keeps the weights with the best validation MAE
(error rate for class labels; selection on validation only); every measure is then taken on the test split, and
each method's mechanism (its loss terms' gradient shares, ``FusionModel.mechanism``) on 256 validation samples.
Each seed draws its own data and model initialisation; the arms of one claim share them, so every comparison is
paired by seed, and an ablation starts from the same weights as its method (tests/fusion/test_ablations.py).

A claim's effect is, per seed, the difference between two arms (or one arm's measure), signed so that a
positive value is what the method claims. Reported: mean ± std over seeds, the paired effect size
d = mean / std, an exact one-sided sign-flip permutation p-value (every assignment of signs to the per-seed
differences; 10 seeds resolve p to 1/1024) and that p adjusted by Holm's step-down method over every effect of
the run. Verdict: "reproduced" when the mean effect is positive and the adjusted p < 0.05; "inconclusive" when
the mean is positive but the adjusted p is not; "not reproduced" when the mean effect is zero or negative.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import signal
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from bench.claim_list import AFTER_THE_FACT, CLAIMS, Claim
from bench.claim_stats import (
    effect_values,
    holm,
    mean_std,
    noise_areas,
    probe_r2,
    purification_room,
    verdict,
)
from bench.markdown import replace_section
from bench.models import parse_seeds
from bench.sweep import ticker
from train.jsonout import dumps

NAME = "claims"
SIZES = {"train": 2000, "valid": 500, "test": 1000}
QUICK_SIZES = {"train": 192, "valid": 64, "test": 96}
MODEL = {"hidden": 32, "num_heads": 4, "num_layers": 1, "dropout": 0.1}  # as bench.synthetic.fit_in_memory
DEFAULT_SEEDS = "0,1,2,3,4,5,6,7,8,9"  # ten paired seeds: the exact sign-flip test resolves p to 1/1024
MECHANISM_SAMPLES = 256  # validation samples the gradient shares are measured on


CLAIM_KEYS = tuple(c.key for c in CLAIMS)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = __doc__.split("\n\n")[0]
    p.epilog = "\n\n".join(__doc__.split("\n\n")[1:])
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--seeds", default=DEFAULT_SEEDS, help="comma-separated seeds (data and init; default 0-9)")
    p.add_argument("--claims", default=",".join(CLAIM_KEYS), help=f"subset of {','.join(CLAIM_KEYS)}")
    p.add_argument("--steps", type=int, default=400, help="training steps per run (default 400)")
    p.add_argument("--eval-every", type=int, default=25, help="validation every N steps (default 25)")
    p.add_argument("--jobs", type=int, default=None, help="parallel processes (default: the cores)")
    p.add_argument("--quick", action="store_true", help="small data, 30 steps, 2 seeds: a smoke test")
    p.add_argument("--json", type=Path, default=None, help="also write every run's measures as JSON here")
    p.add_argument("--out", type=Path, default=None, help="BENCHMARKS.md whose claims section is replaced")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from train.config import TrainConfigError

    if args.quick:
        args.steps, args.eval_every = min(args.steps, 30), min(args.eval_every, 10)
        args.seeds = args.seeds if args.seeds != DEFAULT_SEEDS else "0,1"
    keys = [k.strip() for k in args.claims.split(",") if k.strip()]
    unknown = sorted(set(keys) - set(CLAIM_KEYS))
    if unknown or not keys:
        raise TrainConfigError(f"--claims: unknown {', '.join(unknown) or '(none)'}; valid: {', '.join(CLAIM_KEYS)}")
    seeds = parse_seeds(args.seeds)
    if args.steps < 1 or args.eval_every < 1:
        raise TrainConfigError("--steps and --eval-every must be >= 1")
    claims = [c for c in CLAIMS if c.key in keys]
    sizes = QUICK_SIZES if args.quick else SIZES
    jobs = [(c.key, seed, args.steps, args.eval_every, sizes) for c in claims for seed in seeds]
    started = time.perf_counter()
    with args.progress("bench claims", "run") as bar:
        measured = run_jobs(jobs, args.jobs or len(os.sched_getaffinity(0)), ticker(bar, len(jobs)))
    report = make_report(args, claims, seeds, sizes, measured, time.perf_counter() - started)
    text = format_report(report)
    print(text)
    if args.json is not None:
        args.json.write_text(dumps(report, indent=1, sort_keys=True) + "\n")  # standard JSON: NaN / inf -> null
    if args.out is not None:
        replace_section(args.out, text, NAME)
    return 0


def run_jobs(
    jobs: list[tuple], workers: int, tick: Callable[[], None]
) -> dict[tuple[str, int], dict[str, dict[str, float]]]:
    """(claim, seed) -> arm label -> measures, from one process per job (``workers`` at a time)."""
    results = {}
    if workers <= 1:
        for job in jobs:
            results[job[0], job[1]] = run_claim_seed(*job)
            tick()
        return results
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_ignore_sigint) as pool:
        futures = {pool.submit(run_claim_seed, *job): job for job in jobs}
        for future in as_completed(futures):
            job = futures[future]
            results[job[0], job[1]] = future.result()
            tick()
    return results


def _ignore_sigint() -> None:
    """Pool workers leave Ctrl-C to the parent, which stops the pool and exits with one line."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def run_claim_seed(
    key: str, seed: int, steps: int, eval_every: int, sizes: dict[str, int]
) -> dict[str, dict[str, float]]:
    """Every arm of claim ``key`` on the data of ``seed``: arm label -> measures (test metrics and diagnostics)."""
    import torch

    from bench.claim_tasks import TASKS, make_data

    torch.set_num_threads(1)
    claim = next(c for c in CLAIMS if c.key == key)
    task = TASKS[claim.task]
    data = make_data(task, seed, sizes)
    out = {}
    for arm in claim.arms:
        model, measures = train_in_memory(arm.model, task.dims, task.modalities, data, seed, steps, eval_every,
                                          {**task.settings, **arm.settings})  # fmt: skip
        measures.update(arm_measures(model, claim, data, measures))
        out[arm.label] = measures
    return out


def train_in_memory(
    name: str,
    dims: dict[str, int],
    modalities: tuple[str, ...],
    data: dict[str, dict[str, Any]],
    seed: int,
    steps: int,
    eval_every: int,
    settings: dict[str, Any] | None = None,
) -> tuple[Any, dict[str, float]]:
    """Train ``name`` on ``modalities`` of the in-memory ``data`` (``bench.synthetic.fit_in_memory``); return the
    model at its best validation error and its test measures (metrics, scalar diagnostics, best step, seconds,
    ``valid_error``: the validation MAE, or error rate for class labels)."""
    from bench.synthetic import evaluate, fit_in_memory
    from train.metrics import classification_metrics, sentiment_metrics

    model, best_step, seconds, valid_error = fit_in_memory(
        name, {m: dims[m] for m in modalities}, data, seed, steps, eval_every=eval_every,
        hidden=MODEL["hidden"], settings=settings,
    )  # fmt: skip
    pred, diagnostics = evaluate(model, data["test"])
    label = data["test"]["label"]
    metrics = sentiment_metrics(pred, label) if label.dtype.is_floating_point else classification_metrics(pred, label)
    measures = {**metrics, **diagnostics}
    measures.update(best_step=float(best_step), seconds=seconds, valid_error=valid_error)
    return model, measures


def arm_measures(
    model: Any, claim: Claim, data: dict[str, dict[str, Any]], measured: dict[str, float]
) -> dict[str, float]:
    """The claim's own measures: linear probes of frozen z_m, MIM's gate gap (from the test diagnostics in
    ``measured``), BC-PMJRS's redundancy (``redundancy_measures``: fitted on the validation split, scored on the
    test split) and its re-fitted CLUB, every model's robustness to Gaussian noise on each modality
    (``noise_areas``) and its gradient shares on validation samples."""
    import torch

    from bench.synthetic import redundancy_measures
    from fusion.synthetic import take

    out: dict[str, float] = {}
    if isinstance(getattr(model, "encoders", None), torch_module_dict()):
        for m, latent in claim.probes:
            if m in model.encoders:
                out[f"probe/{m}/{latent}"] = probe_r2(model, m, latent, data)
    clean, noisy = "gate_rate/video_clean", "gate_rate/video_noisy"
    if clean in measured and noisy in measured:
        out["gate_gap"] = measured[clean] - measured[noisy]
    out.update(purification_room(model, data))
    if hasattr(model, "club_lag"):
        out.update({k: v for k, v in model.club_lag(data["valid"], data["test"]).items() if k.startswith("mi_")})
        out.update(redundancy_measures(model, data))
    out.update(noise_areas(model, data, tuple(m for m in model.modalities if m in data["test"])))
    count = min(MECHANISM_SAMPLES, len(data["valid"]["label"]))
    out.update(model.mechanism(take(data["valid"], torch.arange(count))))
    return out


def torch_module_dict() -> type:
    from torch import nn

    return nn.ModuleDict


def make_report(
    args: argparse.Namespace,
    claims: list[Claim],
    seeds: list[int],
    sizes: dict[str, int],
    measured: dict[tuple[str, int], dict[str, dict[str, float]]],
    seconds: float,
) -> dict[str, Any]:
    """Per claim: every arm's measures (mean, std over seeds) and every effect's verdict; plus the raw runs."""
    from bench.train_runs import machine

    out_claims = []
    for claim in claims:
        per_seed = [measured[claim.key, s] for s in seeds]
        arms = {}
        for arm in claim.arms:
            keys = sorted({k for runs in per_seed for k in runs[arm.label]})
            arms[arm.label] = {k: mean_std([runs[arm.label].get(k, math.nan) for runs in per_seed]) for k in keys}
        effects = [{"text": e.text, "measure": e.measure, **verdict(effect_values(e, per_seed))} for e in claim.effects]
        out_claims.append(
            {"key": claim.key, "title": claim.title, "task": claim.task, "arms": arms, "effects": effects,
             "columns": [k for k in claim.columns if any(k in a for a in arms.values())]}
        )  # fmt: skip
    adjust_verdicts([e for c in out_claims for e in c["effects"]])
    return {
        "command": command_line(args),
        "machine": machine(1),
        "seeds": seeds,
        "sizes": sizes,
        "steps": args.steps,
        "eval_every": args.eval_every,
        "model": MODEL,
        "seconds": seconds,
        "claims": out_claims,
        "after_the_fact": list(AFTER_THE_FACT),
        "runs": {c.key: {str(s): measured[c.key, s] for s in seeds} for c in claims},
    }


def adjust_verdicts(effects: list[dict[str, Any]]) -> None:
    """Holm-adjust the p-values of every measured effect of the run (``p_holm``) and judge on the adjusted p."""
    measured = [e for e in effects if e["verdict"] != "not measured"]
    for e, adjusted in zip(measured, holm([e["p"] for e in measured]), strict=True):
        e["p_holm"] = adjusted
        e["verdict"] = verdict(e["values"], adjusted)["verdict"]


def _cell(stats: dict[str, float] | None, digits: int = 3) -> str:
    if not stats or math.isnan(stats["mean"]):
        return ""
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def format_report(report: dict[str, Any]) -> str:
    sizes = report["sizes"]
    lines = [
        "## Claims of the seed methods",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Each run: {sizes['train']} / {sizes['valid']} / {sizes['test']} samples (train / valid / test) drawn per "
        f"seed, hidden {report['model']['hidden']}, one layer, AdamW 3e-3, batch 64, {report['steps']} steps, "
        f"validation every {report['eval_every']} steps; the weights at the best validation MAE (error rate for "
        f"classes) are measured on the test split. Seeds {', '.join(map(str, report['seeds']))}; effects are paired "
        "by seed (mean ± std, d = mean / std, exact one-sided sign-flip p, and p Holm-adjusted over every row; the "
        "verdict reads the adjusted p). Machine: "
        f"{report['machine']}; {report['seconds'] / 60:.0f} min in all. Tasks: `bench/claim_tasks.py`.",
        "",
        "| claim | effect (positive = as claimed) | mean ± std | d | p | p (Holm) | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for claim in report["claims"]:
        for e in claim["effects"]:
            if e["verdict"] == "not measured":
                lines.append(f"| {claim['key']} | {e['text']} | | | | | not measured |")
                continue
            lines.append(
                f"| {claim['key']} | {e['text']} | {e['mean']:+.3f} ± {e['std']:.3f} | {e['d']:+.2f} | "
                f"{e['p']:.3f} | {e['p_holm']:.3f} | **{e['verdict']}** |"
            )
    lines += ["", "Chosen after a result of this benchmark was seen:", ""]
    lines += [f"- {choice}" for choice in report.get("after_the_fact", [])]
    for claim in report["claims"]:
        lines += ["", f"### {claim['title']}", "", f"Task `{claim['task']}`.", ""]
        classes = "accuracy" in next(iter(claim["arms"].values()))
        metrics = ("valid_error", "accuracy", "f1_macro") if classes else ("valid_error", "mae", "corr")
        names = ("valid error ↓", "test accuracy ↑", "test macro F1 ↑") if classes else ("valid MAE ↓", "test MAE ↓",
                                                                                       "test Corr ↑")  # fmt: skip
        # the selected step: an arm still improving at the last step was cut short by the run's length
        head = ["arm", *names, f"best step (of {report['steps']})", *claim["columns"]]
        lines += ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
        for label, stats in claim["arms"].items():
            cells = [label, *(_cell(stats.get(k)) for k in metrics), _cell(stats.get("best_step"), 0)]
            cells += [_cell(stats.get(k)) for k in claim["columns"]]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def command_line(args: argparse.Namespace) -> str:
    parts = ["mmfuse bench claims", "--seeds", args.seeds, "--steps", str(args.steps)]
    parts += ["--eval-every", str(args.eval_every)]
    parts += ["--claims", args.claims] if args.claims != ",".join(CLAIM_KEYS) else []
    return " ".join(parts + ["--quick"] * args.quick)
