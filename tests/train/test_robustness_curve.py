"""A model trained on clean data gets worse as its strongest modality gets noisier (MultiBench's robustness)."""

from __future__ import annotations

import torch

from bench.claim_tasks import ClaimTask, make_data
from bench.synthetic import evaluate, fit_in_memory
from train.robustness import SWEEP_LEVELS, area_under_curve, corrupt


def test_error_rises_with_noise_on_the_modality_that_carries_the_label() -> None:
    # text carries s1 with little noise, audio s2 / 2 under heavy noise: y = s1 + s2 / 2, text is the strong one
    task = ClaimTask("competition", ("text", "audio"))
    data = make_data(task, 0, {"train": 2000, "valid": 300, "test": 1000})
    model, _, _, _ = fit_in_memory("late", {m: task.dims[m] for m in task.modalities}, data, seed=0, hidden=16)
    levels = SWEEP_LEVELS["gaussian"]
    curves = {}
    for m in task.modalities:
        train = data["train"]
        std = train[m][train[f"{m}_mask"]].std(0)  # per-feature std over the train split's valid steps
        maes = []
        for level in levels:
            test = corrupt(data["test"], m, "gaussian", level, std, torch.Generator().manual_seed(0))
            pred, _ = evaluate(model, test)
            maes.append(float((pred - test["label"]).abs().mean()))
        curves[m] = maes
    text = curves["text"]
    # Every level adds the same draws, scaled, to the same 1000 samples, so level-to-level differences carry no
    # sampling noise of their own; 0.02 is about one standard error of a test MAE here (|error| spread ~0.3 /
    # sqrt(1000) ~ 0.01), allowed as slack for the flat start of the curve.
    for lower, higher in zip(text, text[1:], strict=False):
        assert higher >= lower - 0.02, text
    assert text[-1] > text[0] + 0.15, text  # 4 train stds of noise cost far more than the slack (seen: +0.28)
    # the sweep ranks the modalities: noise on the one that carries most of the label costs more
    assert area_under_curve(levels, text) > area_under_curve(levels, curves["audio"]) + 0.02, curves
