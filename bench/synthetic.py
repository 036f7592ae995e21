"""Synthetic fusion benchmark: every registered model, and single-modality baselines, trained in memory on
``fusion.synthetic.SyntheticTask`` (the label needs text or video *and* audio; half the video steps are
noise). Test metrics come from the step with the best validation MAE; mean ± std over seeds.

    python -m bench.synthetic --steps 300 --seeds 0,1,2 --out BENCHMARKS.md

writes (or replaces) the section between the ``synthetic`` markers of BENCHMARKS.md and prints the table.
Each method's own diagnostic is reported on the test set: ITHP's KL and reconstruction terms, TCMax's TC
estimate, MIM's gate rate on noisy vs clean video steps, BC-PMJRS's redundancy between each pair of its unimodal
representations as mutual information (the linear-Gaussian estimate and the held-out InfoNCE bound, fitted on the
validation split and scored on the test split: ``redundancy_measures``) and its MI-max bound.
"""

from __future__ import annotations

import argparse
import copy
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

import fusion
from bench.markdown import markers, replace_section
from fusion import build_model
from fusion.estimators import redundancy
from fusion.synthetic import SyntheticTask, take
from train.metrics import sentiment_metrics
from train.trainer import clip_grad_norm_per_group

BEGIN, END = markers("synthetic")
write_section = partial(replace_section, name="synthetic")  # (path, body)
SIZES = {"train": 2000, "valid": 500, "test": 1000}
SINGLE = {"late[t]": ("text",), "late[a]": ("audio",), "late[v]": ("video",)}
ALL = ("text", "audio", "video")
# Variants beside the defaults: MIM's published loc_bias 3 starts every gate saturated open (sigmoid(9)) and they
# stay open (fusion/models/mim.py: below a penalty cliff no setting moves them); starting the gates at the
# threshold with a 10x L0 penalty makes them move. TCMax with the finer 25-bin grid. BC-PMJRS with its
# information terms switched off in turn (the default row has both).
VARIANTS = {
    "mim[loc_bias=0 penalty=1]": ("mim", ALL, {"loc_bias": 0.0, "penalty_weight": 1.0}),
    "tcmax[25 bins]": ("tcmax", ALL, {"num_bins": 25}),
    "bc_pmjrs[no MI]": ("bc_pmjrs", ALL, {"mi_min": False, "mi_max": False}),
    "bc_pmjrs[MI-max only]": ("bc_pmjrs", ALL, {"mi_min": False}),
    "bc_pmjrs[MI-min only]": ("bc_pmjrs", ALL, {"mi_max": False}),
}


@dataclass
class RunResult:
    metrics: dict[str, float]
    diagnostics: dict[str, float]
    best_step: int
    seconds: float


def make_data(task: SyntheticTask, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {split: task.sample(n, g) for split, n in SIZES.items()}


def evaluate(model: fusion.FusionModel, data: dict[str, torch.Tensor], batch_size: int = 500):
    """Predictions over a whole split in eval mode, plus the diagnostics averaged over batches."""
    model.eval()
    preds, diags = [], {}
    n = len(data["label"])
    with torch.no_grad():
        for start in range(0, n, batch_size):
            batch = take(data, torch.arange(start, min(n, start + batch_size)))
            out = model(batch)
            preds.append(out.prediction)
            for key, value in method_diagnostics(out, batch).items():
                diags.setdefault(key, []).append(value)
    model.train()
    return torch.cat(preds), {k: float(sum(v) / len(v)) for k, v in diags.items()}


def method_diagnostics(out: fusion.FusionOutput, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """The scalar diagnostics (MIM reports its gate rate on noisy vs clean video steps itself: the batch marks them
    in ``video_noisy``)."""
    return {k: float(v) for k, v in out.diagnostics.items() if v.dim() == 0}


def redundancy_measures(model: Any, data: dict[str, dict[str, Any]]) -> dict[str, float]:
    """``mi_linear/a-b`` and ``mi_infonce/a-b`` (nats) between the unimodal representations of each of the model's
    modality pairs, fitted on the valid split and scored on the test split (``fusion.estimators.redundancy``);
    empty for a model without ``unimodal``. Eval mode, no gradient; the model's train/eval mode is restored."""
    if not hasattr(model, "unimodal"):
        return {}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            (u_fit, has_fit), (u_eval, has_eval) = model.unimodal(data["valid"]), model.unimodal(data["test"])
    finally:
        model.train(was_training)
    return redundancy(u_fit, has_fit, u_eval, has_eval, list(model.pairs))


def validation_error(pred: torch.Tensor, label: torch.Tensor) -> tuple[float, float]:
    """(selection error, task loss): MAE and MAE for float labels; 1 - accuracy and cross-entropy for class
    indices (``pred`` holds logits)."""
    if label.dtype.is_floating_point:
        mae = float((pred - label).abs().mean())
        return mae, mae
    error = float((pred.argmax(-1) != label).float().mean())
    return error, float(torch.nn.functional.cross_entropy(pred.float(), label))


def fit_in_memory(
    name: str,
    dims: dict[str, int],
    data: dict[str, dict[str, torch.Tensor]],
    seed: int,
    steps: int = 300,
    batch_size: int = 64,
    lr: float = 3e-3,
    eval_every: int = 25,
    hidden: int = 32,
    settings: dict | None = None,
) -> tuple[fusion.FusionModel, int, float, float]:
    """Train ``name`` on the modalities of ``dims`` (modality -> width) with random batches of ``data["train"]``,
    validating every ``eval_every`` steps. Returns the model holding its best-validation weights (lowest MAE, or
    lowest error rate for class labels), that step, the training seconds and that validation MAE or error."""
    torch.manual_seed(seed)
    model = build_model(name, dims=dims, hidden=hidden, num_heads=4, num_layers=1, dropout=0.1, **(settings or {}))
    optimizer = torch.optim.AdamW(model.param_groups(lr), weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    n = len(data["train"]["label"])
    best = (math.inf, 0, copy.deepcopy(model.state_dict()))
    started = time.perf_counter()
    for step in range(1, steps + 1):
        batch = take(data["train"], torch.randint(0, n, (batch_size,), generator=g))
        out = model(batch)
        optimizer.zero_grad(set_to_none=True)
        sum(out.losses.values()).backward()
        clip_grad_norm_per_group(optimizer, 1.0)  # as the trainer does: each group on its own
        optimizer.step()
        if step % eval_every == 0 or step == steps:
            pred, _ = evaluate(model, data["valid"])
            val_error, val_loss = validation_error(pred, data["valid"]["label"])
            model.end_epoch({"task_loss": val_loss, "mae": val_error})
            if val_error < best[0]:
                best = (val_error, step, copy.deepcopy(model.state_dict()))
    seconds = time.perf_counter() - started
    model.load_state_dict(best[2])
    return model, best[1], seconds, best[0]


def train_one(
    name: str,
    modalities: tuple[str, ...],
    data: dict[str, dict[str, torch.Tensor]],
    task: SyntheticTask,
    seed: int,
    steps: int = 300,
    settings: dict | None = None,
    **training: Any,
) -> RunResult:
    """Train ``name`` on the given modalities (``fit_in_memory``); test metrics at the best validation MAE."""
    dims = {m: task.dims[m] for m in modalities}
    model, best_step, seconds, _ = fit_in_memory(name, dims, data, seed, steps, settings=settings, **training)
    pred, diagnostics = evaluate(model, data["test"])
    diagnostics.update(redundancy_measures(model, data))  # BC-PMJRS: MI between its unimodal representations
    return RunResult(sentiment_metrics(pred, data["test"]["label"]), diagnostics, best_step, seconds)


def runs() -> list[tuple[str, str, tuple[str, ...], dict]]:
    """(row label, model, modalities, settings): every registered model on all three with its defaults, the
    variants, then the single-modality baselines."""
    rows = [(name, name, ALL, {}) for name in sorted(fusion.MODELS)]
    rows += [(label, name, mods, settings) for label, (name, mods, settings) in VARIANTS.items()]
    rows += [(label, "late", mods, {}) for label, mods in SINGLE.items()]
    return rows


PAIRS = ("text-audio", "text-video", "audio-video")
DIAGNOSTIC_KEYS = {
    "ithp": ("kl0", "kl1", "rec_audio", "rec_video"),
    "tcmax": ("tc",),
    "mim": ("gate_rate/video_noisy", "gate_rate/video_clean"),
    "bc_pmjrs": tuple(f"{kind}/{pair}" for kind in ("mi_linear", "mi_infonce") for pair in PAIRS) + ("mi_max/infonce",),
}


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def table(results: dict[str, list[RunResult]]) -> str:
    lines = [
        "| model | modalities | MAE ↓ | Corr ↑ | Acc-2 non-0 ↑ | F1 non-0 ↑ | Acc-7 ↑ | s/run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    mods = {label: "".join(m[0] for m in modalities) for label, _, modalities, _ in runs()}
    for label, rs in results.items():
        cells = [mean_std([r.metrics[k] for r in rs]) for k in ("mae", "corr", "acc2_non0", "f1_non0", "acc7")]
        seconds = statistics.fmean(r.seconds for r in rs)
        lines.append(f"| {label} | {mods[label]} | " + " | ".join(cells) + f" | {seconds:.1f} |")
    lines += ["", "Method diagnostics on the test split (mean ± std over seeds):", ""]
    for label, name, _, _ in runs():
        if label not in results or name not in DIAGNOSTIC_KEYS:
            continue
        rs = results[label]
        keys = [k for k in DIAGNOSTIC_KEYS[name] if k in rs[0].diagnostics]
        lines.append(f"- **{label}**: " + ", ".join(f"{k} = {mean_std([r.diagnostics[k] for r in rs])}" for k in keys))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.synthetic", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated model seeds (the data are fixed)")
    parser.add_argument("--models", default="", help="comma-separated row labels to run (default: all)")
    parser.add_argument("--out", type=Path, default=None, help="BENCHMARKS.md to update")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (tiny models: 1 is fastest)")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    wanted = {s for s in args.models.split(",") if s}
    task = SyntheticTask()
    data = make_data(task)
    torch.set_num_threads(args.threads)
    results: dict[str, list[RunResult]] = {}
    for label, name, modalities, settings in runs():
        if wanted and label not in wanted:
            continue
        for seed in seeds:
            r = train_one(name, modalities, data, task, seed, steps=args.steps, settings=settings)
            results.setdefault(label, []).append(r)
            print(
                f"{label:10s} seed {seed}: MAE {r.metrics['mae']:.3f} corr {r.metrics['corr']:.3f} "
                f"(best step {r.best_step}, {r.seconds:.1f} s)",
                file=sys.stderr,
            )
    body = "\n".join(
        [
            "## Synthetic fusion task",
            "",
            "Command: `python -m bench.synthetic "
            f"--steps {args.steps} --seeds {args.seeds} --threads {args.threads} --out BENCHMARKS.md`",
            "",
            f"Data: `fusion.synthetic.SyntheticTask()` (label = s1 + s2; text and the clean half of the video steps "
            f"carry s1, audio carries s2), {SIZES['train']} / {SIZES['valid']} / {SIZES['test']} samples "
            f"(train / valid / test). Every model: hidden 32, one layer, AdamW 3e-3, batch 64, {args.steps} steps; "
            "test metrics at the best validation MAE. Machine: "
            f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}.",
            "",
            table(results),
        ]
    )
    print(body)
    if args.out is not None:
        write_section(args.out, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
