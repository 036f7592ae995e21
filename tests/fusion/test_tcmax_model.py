"""The TCMax model: its loss is the DV bound with every B^M * C recombination, bins, heads, missing modalities."""

from __future__ import annotations

import math

import pytest
import torch

from fusion import build_model
from fusion.estimators.tcmax import brute_force_log_partition
from fusion.layers import bin_index, expected_value, masked_mean, regression_bins

DIMS = {"text": 9, "audio": 7, "video": 5}


def batch_of(b: int, task: str = "regression", dims=DIMS, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    batch = {}
    for i, (m, d) in enumerate(dims.items()):
        batch[m] = torch.randn(b, 3 + i, d, generator=g)
        batch[f"{m}_mask"] = torch.ones(b, 3 + i, dtype=torch.bool)
    if task == "regression":
        batch["label"] = torch.rand(b, generator=g) * 6 - 3
    elif task == "classification":
        batch["label"] = torch.randint(0, 3, (b,), generator=g)
    else:
        batch["label"] = torch.randint(0, 2, (b, 2), generator=g).float()
    return batch


def pooled(model, batch):
    inputs = model.prepare(batch)
    return {
        m: masked_mean(model.encoders[m](inputs.feats[m], inputs.masks[m]), inputs.masks[m])
        * inputs.present[m][:, None]
        for m in model.modalities
    }


def test_bins_and_expected_value() -> None:
    torch.testing.assert_close(regression_bins(7), torch.arange(-3.0, 4.0))
    torch.testing.assert_close(regression_bins(13)[:3], torch.tensor([-3.0, -2.5, -2.0]))
    assert regression_bins(25)[1].item() == pytest.approx(-2.75)
    centres = regression_bins(7)
    labels = torch.tensor([0.4, 2.6, -5.0, 3.7, -0.6])
    assert bin_index(labels, centres).tolist() == [3, 6, 0, 6, 2]
    logits = torch.tensor([[0.0, 0, 0, 0, 0, 0, math.log(3.0)]])  # p = 1/9 each, 3/9 on +3
    assert expected_value(logits, centres).item() == pytest.approx((-3 - 2 - 1 + 0 + 1 + 2 + 9) / 9)


@pytest.mark.parametrize("num_modalities", [2, 3])
@pytest.mark.parametrize("task", ["regression", "classification"])
def test_loss_equals_brute_force_enumeration(task: str, num_modalities: int) -> None:
    dims = dict(list(DIMS.items())[:num_modalities])
    torch.manual_seed(0)
    model = build_model("tcmax", dims=dims, hidden=6, num_heads=2, task=task, num_classes=3, dropout=0.0)
    model.eval()
    with torch.no_grad():
        model.bias.copy_(torch.randn(model.num_logits))
    batch = batch_of(4, task, dims)
    out = model(batch)
    z = pooled(model, batch)
    feats = [z[m] for m in model.modalities]

    def critic(parts):
        return sum(model.heads[m](x) for m, x in zip(model.modalities, parts, strict=True)) + model.bias

    y = model._targets(batch["label"])
    b, c = 4, model.num_logits
    positive = critic(feats).gather(1, y[:, None]).mean()
    log_mean_negative = brute_force_log_partition(feats, critic) - num_modalities * math.log(b) - math.log(c)
    expected = -(positive - log_mean_negative)
    assert out.losses["tcmax"].item() == pytest.approx(expected.item(), abs=1e-5)
    assert out.diagnostics["tc"].item() == pytest.approx(-expected.item(), abs=1e-5)


def test_regression_prediction_is_expected_bin_centre() -> None:
    torch.manual_seed(1)
    model = build_model("tcmax", dims=DIMS, hidden=6, num_heads=2, num_bins=13).eval()
    batch = batch_of(5)
    z = pooled(model, batch)
    fused = sum(model.heads[m](z[m]) for m in model.modalities) + model.bias
    torch.testing.assert_close(model(batch).prediction, expected_value(fused, regression_bins(13)))


def test_missing_modality_adds_nothing_to_the_logits() -> None:
    torch.manual_seed(2)
    model = build_model("tcmax", dims=DIMS, hidden=6, num_heads=2, task="classification", num_classes=3).eval()
    batch = batch_of(4, "classification")
    batch["audio_mask"][1] = False
    z = pooled(model, batch)
    assert not z["audio"][1].any()
    fused = model.heads["text"](z["text"]) + model.heads["video"](z["video"]) + model.bias
    torch.testing.assert_close(model(batch).prediction[1], fused[1])


def test_multilabel_sums_one_binary_bound_per_label() -> None:
    torch.manual_seed(3)
    model = build_model("tcmax", dims=DIMS, hidden=6, num_heads=2, task="multilabel", num_classes=2).eval()
    batch = batch_of(4, "multilabel")
    out = model(batch)
    assert out.prediction.shape == (4, 2)
    z = pooled(model, batch)
    total = 0.0
    for k in range(2):
        cols = slice(2 * k, 2 * k + 2)
        logits = [model.heads[m](z[m])[:, cols] for m in model.modalities]
        fused = sum(logits) + model.bias[cols]
        y = batch["label"][:, k].long()
        log_z = torch.logsumexp(sum(torch.logsumexp(t, 0) for t in logits) + model.bias[cols], 0)
        total += -(fused.gather(1, y[:, None]).mean() - (log_z - 3 * math.log(4) - math.log(2)))
    assert out.losses["tcmax"].item() == pytest.approx(total.item(), abs=1e-5)
    fused = sum(model.heads[m](z[m]) for m in model.modalities) + model.bias
    torch.testing.assert_close(out.prediction, fused[:, 1::2] - fused[:, 0::2])


@pytest.mark.parametrize("task", ["regression", "classification"])
def test_mlp_head_uses_sampled_negatives(task: str) -> None:
    torch.manual_seed(4)
    model = build_model(
        "tcmax", dims=DIMS, hidden=6, num_heads=2, task=task, num_classes=3, head="mlp", num_negatives=64
    )
    model.train()
    out = model(batch_of(6, task))
    out.losses["tcmax"].backward()
    assert all(p.grad is not None for p in model.parameters())
    assert torch.isfinite(out.losses["tcmax"])


def test_training_raises_the_bound_and_learns_the_classes() -> None:
    torch.manual_seed(5)
    g = torch.Generator().manual_seed(5)
    n = 256
    y = torch.randint(0, 3, (n,), generator=g)
    centres = torch.randn(3, 4, generator=g) * 2
    batch = {
        "text": (centres[y][:, None, :] + 0.5 * torch.randn(n, 2, 4, generator=g)),
        "audio": torch.randn(n, 3, 5, generator=g),
        "label": y,
    }
    model = build_model(
        "tcmax",
        dims={"text": 4, "audio": 5},
        hidden=8,
        num_heads=2,
        task="classification",
        num_classes=3,
        num_layers=0,
        dropout=0.0,
    )
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    first = None
    for _ in range(60):
        out = model(batch)
        first = out.diagnostics["tc"].item() if first is None else first
        opt.zero_grad()
        out.losses["tcmax"].backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        final = model(batch)
    accuracy = (final.prediction.argmax(1) == y).float().mean().item()
    assert final.diagnostics["tc"].item() > first + 0.5
    assert accuracy > 0.9
