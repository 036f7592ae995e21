"""The measures and statistics of ``mmfuse bench claims``: linear probes of a model's representations, the
redundancy between its unimodal representations, each claim's per-seed effect, its exact sign-flip p-value and the
verdict (see ``bench/claims.py``)."""

from __future__ import annotations

import itertools
import math
import statistics
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Effect:
    """Per seed: ``measure`` of arm ``better`` minus that of arm ``worse`` (or minus 0 when ``worse`` is None),
    negated when ``lower_is_better``: positive = as claimed."""

    text: str
    measure: str
    better: str
    worse: str | None = None
    lower_is_better: bool = False


def representation(model: Any, m: str, batch: dict[str, Any]):
    """z_m (N, H): masked time mean of modality m's encoder output, in eval mode, no gradient."""
    import torch

    from fusion.layers import masked_mean

    model.eval()
    with torch.no_grad():
        return masked_mean(model.encoders[m](batch[m], batch[f"{m}_mask"]), batch[f"{m}_mask"])


def probe_r2(model: Any, m: str, latent: str, data: dict[str, dict[str, Any]], ridge: float = 1e-3) -> float:
    """R^2 on the test split of a ridge regression of ``latent`` on the frozen z_m, fitted on the train split."""
    import torch

    def design(split: str):
        z = representation(model, m, data[split]).double()
        return torch.cat([z, torch.ones(len(z), 1, dtype=z.dtype)], 1), data[split][latent].double()

    x, y = design("train")
    w = torch.linalg.solve(x.T @ x + ridge * torch.eye(x.shape[1], dtype=x.dtype), x.T @ y)
    xt, yt = design("test")
    residual = ((yt - xt @ w) ** 2).sum()
    return float(1.0 - residual / ((yt - yt.mean()) ** 2).sum())


def sign_flip_p(differences: list[float]) -> float:
    """Exact one-sided p-value of a mean as large as observed when each per-seed difference's sign is random."""
    observed = statistics.fmean(differences)
    flips = list(itertools.product((1.0, -1.0), repeat=len(differences)))
    hits = sum(statistics.fmean(s * d for s, d in zip(signs, differences, strict=True)) >= observed - 1e-12
               for signs in flips)  # fmt: skip
    return hits / len(flips)


def effect_values(effect: Effect, per_seed: list[dict[str, dict[str, float]]]) -> list[float] | None:
    """Per-seed signed differences (positive = as claimed); None when a seed lacks the measure."""
    values = []
    for arms in per_seed:
        a = arms.get(effect.better, {}).get(effect.measure)
        b = 0.0 if effect.worse is None else arms.get(effect.worse, {}).get(effect.measure)
        if a is None or b is None or math.isnan(a) or math.isnan(b):
            return None
        values.append((b - a) if effect.lower_is_better else (a - b))
    return values


def verdict(values: list[float] | None, p: float | None = None) -> dict[str, Any]:
    """Mean, std, d, the sign-flip p and the verdict of per-seed effects. ``p``: judge on this p instead (an
    adjusted one, see ``holm``). "reproduced": mean > 0 and p < 0.05; "inconclusive": mean > 0, p >= 0.05;
    "not reproduced": mean <= 0."""
    if not values:
        return {"verdict": "not measured"}
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    raw = sign_flip_p(values)
    judged = raw if p is None else p
    return {
        "values": values,
        "mean": mean,
        "std": std,
        "d": mean / std if std > 0 else math.copysign(math.inf, mean) if mean else 0.0,
        "p": raw,
        "verdict": "not reproduced" if mean <= 0 else "reproduced" if judged < 0.05 else "inconclusive",
    }


def holm(ps: list[float]) -> list[float]:
    """Holm's step-down adjustment of ``ps`` (family-wise error over all of them), in the input order: the k-th
    smallest p is multiplied by (n - k + 1), made non-decreasing along that order, and capped at 1."""
    order = sorted(range(len(ps)), key=lambda i: ps[i])
    adjusted = [0.0] * len(ps)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(ps) - rank) * ps[i]))
        adjusted[i] = running
    return adjusted


def mean_std(values: list[float]) -> dict[str, float]:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return {"mean": math.nan, "std": math.nan}
    return {"mean": statistics.fmean(finite), "std": statistics.stdev(finite) if len(finite) > 1 else 0.0}


NOISE_LEVELS = (0.0, 0.5, 1.0, 2.0)  # Gaussian noise, in train-split stds, for the robustness areas


def noise_areas(model: Any, data: dict[str, dict[str, Any]], modalities: tuple[str, ...]) -> dict[str, float]:
    """``noise_auc/<m>``: area under the test metric (MAE, or accuracy for class labels) of ``model`` as Gaussian
    noise of ``NOISE_LEVELS`` x the train-split per-feature std is added to modality m's valid steps, divided by
    the level range (``train.robustness``; the same draws for every level and every model of a seed)."""
    from bench.synthetic import evaluate
    from train.robustness import area_under_curve, batch_generator, corrupt

    test, label = data["test"], data["test"]["label"]
    out = {}
    for m in modalities:
        std = data["train"][m][data["train"][f"{m}_mask"]].std(0)
        values = []
        for level in NOISE_LEVELS:
            batch = corrupt(test, m, "gaussian", level, std, batch_generator(0, m, "gaussian", None))
            pred, _ = evaluate(model, batch)
            correct = (pred.argmax(-1) == label).float().mean() if not label.dtype.is_floating_point else None
            values.append(float((pred - label).abs().mean()) if correct is None else float(correct))
        out[f"noise_auc/{m}"] = area_under_curve(NOISE_LEVELS, values)
    return out


def purification_room(model: Any, data: dict[str, dict[str, Any]]) -> dict[str, float]:
    """``purify_gain/<m>`` for every modality whose test split marks its noise steps (``<m>_noisy``), for a model
    with ``purified_loss`` (MIM): the purified branch's test loss with every valid step kept minus with exactly
    the noise steps closed. Positive: a perfect purifier would lower the loss the gates are trained on; zero or
    negative: the trained encoder leaves the gates nothing to gain. Eval mode; the model's mode is restored."""
    if not hasattr(model, "purified_loss"):
        return {}
    test, was_training = data["test"], model.training
    model.eval()
    out = {}
    for m in model.modalities:
        noisy = test.get(f"{m}_noisy")
        if noisy is not None:
            mask = test[f"{m}_mask"]
            gain = model.purified_loss(test, m, mask) - model.purified_loss(test, m, mask & ~noisy)
            out[f"purify_gain/{m}"] = float(gain)
    model.train(was_training)
    return out
