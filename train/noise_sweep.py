"""Robustness curves of a checkpoint (``mmfuse eval --noise-sweep``): every modality the network uses, corrupted
by each kind of ``train.robustness`` at rising levels, scored with the metrics of ``train.trainer.evaluate``.

The Gaussian noise's std is each feature's train-split std in the units the fusion model sees (:func:`input_std`):
the checkpoint's recorded train statistics (those of dataset.json when it was trained) divided by what the
network divides that feature by before fusing (its train-split standardisation), so 1 for every standardised
feature. Features without recorded statistics (the 4 video geometry features) take theirs from one pass over the
train split of the shards being scored, computed once per command and not cached.

Level 0 is the clean network (scored once and shared by every curve). Each curve's area (``area_under_curve``:
trapezoid over the levels, divided by the level range) is the main metric's mean over the swept range: MAE
(lower is more robust) for regression, accuracy for classification, mean per-label accuracy for multilabel.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shards import Progress
from shards.dataset import ShardDataset
from shards.stats import RunningStats
from train.config import TrainConfig, TrainConfigError
from train.data import make_loader
from train.jsonout import dumps
from train.pipeline import FusionPipeline
from train.robustness import KINDS, MAIN_METRIC, Corruption, area_under_curve, corrupting, sweep_levels
from train.runtime import Dist
from train.stages import GEOM_INPUT
from train.trainer import evaluate

Tick = Callable[[int, int], None]


def input_std(
    net: FusionPipeline,
    recorded: ShardDataset,
    shards: ShardDataset,
    config: TrainConfig,
    dims: dict[str, int],
    modalities: Sequence[str],
    streamed: dict[str, np.ndarray] | None = None,
) -> dict[str, torch.Tensor]:
    """Per modality, the (D,) train-split std of each feature of the fusion model's input (see the module
    docstring). ``recorded``: the checkpoint's statistics; ``shards``: where to stream the train split from
    for the features they miss; ``dims``: the input width per modality; ``streamed``: a dict that keeps the
    streamed std per modality, to pass again with other checkpoints of the same shards and data settings."""
    out = {}
    streamed = {} if streamed is None else streamed
    for m in modalities:
        std = _recorded_std(recorded, m)
        if std is None or len(std) < dims[m]:
            if m not in streamed:
                streamed[m] = streamed_std(shards, config, m)
            full = streamed[m]
            std = full if std is None else np.concatenate([std, full[len(std) :]])
        if len(std) != dims[m]:
            raise TrainConfigError(f"train statistics of {m} have width {len(std)}, its inputs {dims[m]}")
        out[m] = torch.as_tensor(std, dtype=torch.float32) / _divisor(net, m, dims[m])
    return out


def _recorded_std(dataset: ShardDataset, modality: str) -> np.ndarray | None:
    c = dataset.contracts.get(modality)
    stats = None if c is None else dataset.train_stats(c.feature)  # the statistics of the record's feature member
    return None if stats is None or not stats.count else stats.std


def _divisor(net: FusionPipeline, modality: str, width: int) -> torch.Tensor:
    """What the network divides ``modality``'s features by before fusing (1 where it does not standardise)."""
    if modality in net.encoders:  # end to end: the encoder's output, standardised with the recorded statistics
        return getattr(net, f"{modality}_std").detach().float().cpu()
    if modality in net.normalise.modalities:
        return getattr(net.normalise, f"{modality}_std").detach().float().cpu()
    return torch.ones(width)


def streamed_std(shards: ShardDataset, config: TrainConfig, modality: str) -> np.ndarray:
    """(D,) std of ``modality``'s loader input (video: landmarks then geometry) over the valid steps of the train
    split of ``shards``, in one pass."""
    if "train" not in shards.splits:
        raise TrainConfigError(
            f"gaussian noise on {modality}: {'the video geometry features have' if modality == 'video' else 'it has'} "
            f"no recorded train statistics, and the shards in {shards.root} have no train split to compute them from"
        )
    data = dataclasses.replace(config.data, modalities=(modality,), num_workers=0, raw=False)
    stats = RunningStats()
    for batch in make_loader(shards, "train", data, train=False):
        x = batch[modality].double()
        if GEOM_INPUT in batch and modality == "video":
            x = torch.cat([x, batch[GEOM_INPUT].double()], -1)
        stats.update(x[batch[f"{modality}_mask"]].numpy())
    if not stats.count:
        raise TrainConfigError(f"gaussian noise on {modality}: the train split of {shards.root} has no valid step")
    return stats.std


def evaluate_noisy(
    net: FusionPipeline,
    shards: ShardDataset,
    split: str,
    config: TrainConfig,
    corruption: Corruption,
    d: Dist | None = None,
    rows: list[dict[str, Any]] | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """``train.trainer.evaluate`` of ``net`` with ``corruption`` on its fusion model's inputs."""
    with corrupting(net, corruption):
        return evaluate(net, shards, split, config, d=d, progress=progress, rows=rows)


def run_sweep(
    net: FusionPipeline,
    shards: ShardDataset,
    split: str,
    config: TrainConfig,
    std: dict[str, torch.Tensor],
    *,
    seed: int = 0,
    kinds: Sequence[str] = KINDS,
    levels: dict[str, Sequence[float]] | None = None,
    d: Dist | None = None,
    tick: Tick | None = None,
) -> dict[str, Any]:
    """Every modality of the network × kind × level: the metrics at each level and each curve's area (see the
    module docstring). ``std``: per modality, the Gaussian noise's unit (:func:`input_std`); ``levels``: per kind,
    instead of ``SWEEP_LEVELS``; ``tick(done, total)`` after each scoring."""
    modalities = tuple(net.fusion.modalities)
    chosen = {kind: sweep_levels(kind, (levels or {}).get(kind)) for kind in kinds}
    total = 1 + sum(len(modalities) * (len(v) - 1) for v in chosen.values())
    clean = evaluate(net, shards, split, config, d=d)
    done = 1
    if tick is not None:
        tick(done, total)
    metric = MAIN_METRIC[config.task]
    curves: dict[str, dict[str, Any]] = {}
    for kind, kind_levels in chosen.items():
        for m in modalities:
            points = []
            for level in kind_levels:
                if level == 0:
                    points.append(clean)
                    continue
                points.append(evaluate_noisy(net, shards, split, config, Corruption({m: level}, kind, std, seed), d))
                done += 1
                if tick is not None:
                    tick(done, total)
            values = [float(p.get(metric, math.nan)) for p in points]
            curves.setdefault(kind, {})[m] = {
                "levels": list(kind_levels),
                "metrics": points,
                "auc": area_under_curve(kind_levels, values),
            }
    return {"split": split, "seed": seed, "metric": metric, "clean": clean, "curves": curves}


def sweep_checkpoint(
    checkpoint: Path,
    shards: ShardDataset,
    split: str = "test",
    *,
    kinds: Sequence[str] = KINDS,
    levels: dict[str, Sequence[float]] | None = None,
    seed: int = 0,
    device: str = "auto",
    streamed: dict[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """:func:`run_sweep` of the checkpoint file ``checkpoint`` on ``split`` of ``shards`` (same feature set)."""
    from extract.devices import resolve_device
    from shards.dataset import check_feature_set
    from train.checkpoint import checkpoint_dataset, load_checkpoint
    from train.predict import load_network

    device = resolve_device(device)
    ckpt = load_checkpoint(checkpoint)
    check_feature_set(ckpt["feature_set_hash"], shards, what=f"checkpoint {checkpoint}")
    config, net = load_network(ckpt, device)
    modalities = tuple(net.fusion.modalities)
    dims = {m: int(ckpt["dims"][m]) for m in modalities}
    std = (
        input_std(net, checkpoint_dataset(ckpt), shards, config, dims, modalities, streamed)
        if "gaussian" in kinds
        else {}
    )
    d = Dist(device=torch.device(device))
    return run_sweep(net, shards, split, config, std, seed=seed, kinds=kinds, levels=levels, d=d)


def format_sweep(report: dict[str, Any]) -> str:
    """One markdown table per kind: the main metric at each level, one row per modality, and the curve's area."""
    metric, lines = report["metric"], []
    for kind, curves in report["curves"].items():
        levels = next(iter(curves.values()))["levels"]
        what = "Gaussian noise, level x train std" if kind == "gaussian" else "time steps dropped, level = probability"
        lines += [
            f"{report['split']} split, {what}: {metric} by level; AUC = area under the curve / level range",
            "",
            "| modality | " + " | ".join(f"{level:g}" for level in levels) + " | AUC |",
            "|---|" + "---|" * (len(levels) + 1),
        ]
        for m, curve in curves.items():
            values = [p.get(metric, math.nan) for p in curve["metrics"]]
            lines.append(f"| {m} | " + " | ".join(f"{v:.4f}" for v in values) + f" | {curve['auc']:.4f} |")
        lines.append("")
    return "\n".join(lines).rstrip()


def plot_sweep(report: dict[str, Any], path: Path, title: str = "") -> Path:
    """One panel per kind, one line per modality: the main metric against the level. A PNG at ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    kinds = list(report["curves"])
    fig = Figure(figsize=(4.2 * len(kinds), 3.2), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(kinds), squeeze=False)[0]
    for ax, kind in zip(axes, kinds, strict=True):
        for m, curve in report["curves"][kind].items():
            values = [p.get(report["metric"], math.nan) for p in curve["metrics"]]
            ax.plot(curve["levels"], values, marker="o", markersize=3, label=f"{m} (AUC {curve['auc']:.3g})")
        ax.set_xlabel("noise std / train std" if kind == "gaussian" else "share of steps dropped", fontsize=8)
        ax.set_ylabel(report["metric"], fontsize=8)
        ax.set_title(kind, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(title or f"{report['split']} split, seed {report['seed']}", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # glyphs missing from the default font in user-given paths
        warnings.simplefilter("ignore", UserWarning)
        fig.savefig(path, dpi=100)
    return path


def write_sweep(report: dict[str, Any], path: Path, title: str = "") -> tuple[Path, Path]:
    """``report`` as JSON at ``path`` (standard JSON: NaN -> null) and its plot beside it (``.png``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(dumps(report, indent=1) + "\n")
    tmp.replace(path)
    return path, plot_sweep(report, path.with_suffix(".png"), title)
