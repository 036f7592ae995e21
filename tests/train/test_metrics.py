"""Metrics against values computed by hand (see the comments beside each number)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from train.metrics import classification_metrics, f1_score, multilabel_metrics, sentiment_metrics, task_metrics

PRED = [1.4, -0.6, 0.0, 2.5, -3.6, 0.4]
LABEL = [1.0, 0.0, -0.2, 3.0, -2.4, -1.0]


def test_sentiment_metrics_by_hand() -> None:
    m = sentiment_metrics(PRED, LABEL)
    assert set(m) == {"mae", "corr", "acc2_has0", "f1_has0", "acc2_non0", "f1_non0", "acc5", "acc7"}
    assert m["mae"] == pytest.approx(4.3 / 6)  # 0.4 + 0.6 + 0.2 + 0.5 + 1.2 + 1.4
    # has-0 over all six: pred >= 0 TFTTFT vs label >= 0 TTFTFF -> 3 agree
    assert m["acc2_has0"] == pytest.approx(3 / 6)
    # class True: tp 2, fp 2, fn 1 -> 4/7 (support 3); class False: tp 1, fp 1, fn 2 -> 2/5 (support 3)
    assert m["f1_has0"] == pytest.approx((4 / 7 + 2 / 5) / 2)
    # non-0 drops the label 0.0: pred > 0 T F T F T vs label > 0 T F T F F -> 4 of 5 (0.0 counts negative)
    assert m["acc2_non0"] == pytest.approx(4 / 5)
    assert m["f1_non0"] == pytest.approx(0.8)  # both classes 4/5
    # Acc-7: clip to [-3, 3], round half to even: pred 1 -1 0 2 -3 0 vs label 1 0 0 3 -2 -1
    assert m["acc7"] == pytest.approx(2 / 6)
    # Acc-5: clip to [-2, 2]: pred 1 -1 0 2 -2 0 vs label 1 0 0 2 -2 -1
    assert m["acc5"] == pytest.approx(4 / 6)
    assert m["corr"] == pytest.approx(np.corrcoef(PRED, LABEL)[0, 1])


def test_rounding_is_half_to_even_like_mmsa() -> None:
    # 2.5 -> 2 and -0.5 -> 0 under numpy rounding; the labels 2 and 0 then match
    assert sentiment_metrics([2.5, -0.5, 1.5], [2.0, 0.0, 2.0])["acc7"] == 1.0
    assert sentiment_metrics([3.4, -9.0], [3.0, -3.0])["acc7"] == 1.0  # clipped to the scale first
    assert sentiment_metrics([2.6], [3.0])["acc5"] == 1.0  # both clip to 2


def test_constant_predictions_have_undefined_correlation() -> None:
    assert math.isnan(sentiment_metrics([0.5, 0.5, 0.5], [1.0, -1.0, 2.0])["corr"])
    assert math.isnan(sentiment_metrics([1.0, 2.0], [0.0, 0.0])["acc2_non0"])


def test_accepts_tensors_and_checks_shapes() -> None:
    m = sentiment_metrics(torch.tensor(PRED), torch.tensor(LABEL))
    assert m["mae"] == pytest.approx(4.3 / 6, rel=1e-6)
    with pytest.raises(ValueError, match="differ in shape"):
        sentiment_metrics([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="at least one sample"):
        sentiment_metrics([], [])


def test_classification_metrics_by_hand() -> None:
    y = [0, 1, 2, 2, 2, 0]
    pred = [0, 2, 2, 2, 1, 1]
    logits = np.eye(3)[pred] * 2.0 - 1.0
    m = classification_metrics(logits, y)
    assert m["accuracy"] == pytest.approx(3 / 6)
    # class 0: 2/3 (support 2); class 1: 0 (support 1); class 2: tp 2 fp 1 fn 1 -> 2/3 (support 3)
    assert m["f1_weighted"] == pytest.approx((2 * 2 / 3 + 0 + 3 * 2 / 3) / 6)
    assert m["f1_macro"] == pytest.approx(4 / 9)
    assert classification_metrics(np.array(pred), y) == m


def test_f1_counts_classes_only_predicted() -> None:
    # class 1 is never true but predicted once: it scores 0 with support 0 (weighted ignores it, macro not)
    assert f1_score(np.array([0, 0]), np.array([0, 1]), "weighted") == pytest.approx(2 / 3)
    assert f1_score(np.array([0, 0]), np.array([0, 1]), "macro") == pytest.approx(1 / 3)


def test_multilabel_metrics_by_hand() -> None:
    logits = [[1.0, -1.0], [-1.0, 2.0], [3.0, 0.5]]
    labels = [[1, 0], [1, 1], [1, 0]]
    m = multilabel_metrics(logits, labels, names=["happy", "sad"])
    assert m["acc/happy"] == pytest.approx(2 / 3)
    assert m["f1/happy"] == pytest.approx(0.8)  # True: tp 2, fn 1 -> 4/5 with all the support
    assert m["acc/sad"] == pytest.approx(2 / 3)
    assert m["f1/sad"] == pytest.approx(2 / 3)
    assert m["f1_mean"] == pytest.approx((0.8 + 2 / 3) / 2)
    with pytest.raises(ValueError, match="2 label names for 3 labels"):
        multilabel_metrics(np.zeros((2, 3)), np.zeros((2, 3)), names=["a", "b"])


def test_task_metrics_dispatch() -> None:
    assert "acc7" in task_metrics("regression", PRED, LABEL)
    assert "f1_macro" in task_metrics("classification", [[0.2, 0.8]], [1])
    with pytest.raises(ValueError, match="unknown task 'ranking'"):
        task_metrics("ranking", PRED, LABEL)
