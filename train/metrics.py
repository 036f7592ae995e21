"""One evaluation harness for every model (SPEC §7, §11).

Sentiment regression follows MMSA's conventions, computed over ALL samples unless stated:

- ``mae``: mean absolute error; ``corr``: Pearson correlation (NaN when either side is constant);
- ``acc2_has0`` / ``f1_has0``: negative (< 0) vs non-negative (>= 0), every sample;
- ``acc2_non0`` / ``f1_non0``: samples with label 0 dropped, negative (< 0) vs positive (> 0);
- ``acc5``: both sides clipped to [-2, 2] and rounded; ``acc7``: clipped to [-3, 3] and rounded. Rounding is
  numpy's (half to even), as MMSA does: 2.5 -> 2, -0.5 -> 0, 1.5 -> 2.

F1 is support-weighted over the classes present in either labels or predictions (scikit-learn's
``average="weighted"``, a class never predicted scores 0). Classification adds macro F1; multilabel
(IEMOCAP-style one-vs-rest emotions) gives per-label accuracy and weighted F1 and their means.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def _array(x: object, dtype=np.float64) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def f1_score(y_true: np.ndarray, y_pred: np.ndarray, average: str = "weighted") -> float:
    """F1 over the classes in ``y_true`` ∪ ``y_pred``: ``weighted`` by true support, or ``macro``."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"labels {y_true.shape} and predictions {y_pred.shape} differ in shape")
    if y_true.size == 0:
        return math.nan
    classes = np.union1d(y_true, y_pred)
    scores, support = [], []
    for c in classes:
        tp = np.sum((y_pred == c) & (y_true == c))
        fp = np.sum((y_pred == c) & (y_true != c))
        fn = np.sum((y_pred != c) & (y_true == c))
        denom = 2 * tp + fp + fn
        scores.append(0.0 if denom == 0 else 2 * tp / denom)
        support.append(np.sum(y_true == c))
    scores_arr, support_arr = np.array(scores), np.array(support, dtype=np.float64)
    if average == "macro":
        return float(scores_arr.mean())
    if average == "weighted":
        return float((scores_arr * support_arr).sum() / support_arr.sum()) if support_arr.sum() else 0.0
    raise ValueError(f"average must be 'weighted' or 'macro', got {average!r}")


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation; NaN when fewer than 2 samples or either side has zero variance."""
    if a.size < 2:
        return math.nan
    da, db = a - a.mean(), b - b.mean()
    denom = math.sqrt(float((da * da).sum()) * float((db * db).sum()))
    return float((da * db).sum() / denom) if denom > 0 else math.nan


def sentiment_metrics(pred: object, label: object) -> dict[str, float]:
    """MMSA-convention sentiment metrics for continuous predictions and labels (both (N,), any scale)."""
    p, y = _array(pred).reshape(-1), _array(label).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"predictions {p.shape} and labels {y.shape} differ in shape")
    if p.size == 0:
        raise ValueError("sentiment_metrics needs at least one sample")
    non0 = y != 0
    out = {
        "mae": float(np.abs(p - y).mean()),
        "corr": pearson(p, y),
        "acc2_has0": float(((p >= 0) == (y >= 0)).mean()),
        "f1_has0": f1_score(y >= 0, p >= 0),
        "acc2_non0": float(((p[non0] > 0) == (y[non0] > 0)).mean()) if non0.any() else math.nan,
        "f1_non0": f1_score(y[non0] > 0, p[non0] > 0) if non0.any() else math.nan,
        "acc5": float((np.round(np.clip(p, -2, 2)) == np.round(np.clip(y, -2, 2))).mean()),
        "acc7": float((np.round(np.clip(p, -3, 3)) == np.round(np.clip(y, -3, 3))).mean()),
    }
    return out


def classification_metrics(logits: object, label: object) -> dict[str, float]:
    """Accuracy, weighted and macro F1 for (N, C) logits / scores (or (N,) predicted classes) vs (N,) labels."""
    scores = _array(logits)
    pred = scores.argmax(-1) if scores.ndim == 2 else scores.astype(np.int64)
    y = _array(label, np.int64).reshape(-1)
    if pred.shape != y.shape:
        raise ValueError(f"predictions {pred.shape} and labels {y.shape} differ in shape")
    return {
        "accuracy": float((pred == y).mean()),
        "f1_weighted": f1_score(y, pred, "weighted"),
        "f1_macro": f1_score(y, pred, "macro"),
    }


def multilabel_metrics(logits: object, label: object, names: Sequence[str] | None = None) -> dict[str, float]:
    """Per-label accuracy and weighted F1 for (N, K) logits (positive when > 0) vs (N, K) {0, 1} labels.

    Keys ``acc/<name>``, ``f1/<name>`` per label (names default to the label index) plus ``acc_mean`` and
    ``f1_mean``, the unweighted means over labels.
    """
    scores, y = _array(logits), _array(label)
    if scores.shape != y.shape or scores.ndim != 2:
        raise ValueError(f"multilabel predictions and labels must both be (N, K), got {scores.shape}, {y.shape}")
    names = list(names) if names is not None else [str(k) for k in range(y.shape[1])]
    if len(names) != y.shape[1]:
        raise ValueError(f"{len(names)} label names for {y.shape[1]} labels")
    out: dict[str, float] = {}
    for k, name in enumerate(names):
        pred_k, y_k = scores[:, k] > 0, y[:, k] > 0.5
        out[f"acc/{name}"] = float((pred_k == y_k).mean())
        out[f"f1/{name}"] = f1_score(y_k, pred_k)
    out["acc_mean"] = float(np.mean([out[f"acc/{n}"] for n in names]))
    out["f1_mean"] = float(np.mean([out[f"f1/{n}"] for n in names]))
    return out


def task_metrics(task: str, prediction: object, label: object, names: Sequence[str] | None = None) -> dict[str, float]:
    """The metrics of ``task`` (regression -> sentiment, classification, multilabel); ``names`` name the
    multilabel columns (e.g. the label keys) and are ignored by the other tasks."""
    if task == "regression":
        return sentiment_metrics(prediction, label)
    if task == "classification":
        return classification_metrics(prediction, label)
    if task == "multilabel":
        return multilabel_metrics(prediction, label, names)
    raise ValueError(f"unknown task {task!r}; valid: regression, classification, multilabel")


# Which metric selects the best checkpoint on validation, and whether larger is better.
SELECTION: dict[str, tuple[str, bool]] = {
    "regression": ("mae", False),
    "classification": ("f1_weighted", True),
    "multilabel": ("f1_mean", True),
}
