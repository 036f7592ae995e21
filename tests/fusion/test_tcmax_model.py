"""The TCMax model: its loss is the DV bound with every B^M * C recombination, bins, heads, missing modalities,
and regression that neither shrinks nor stretches its predictions when the label needs two modalities."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from fusion import FusionConfigError, build_model
from fusion.estimators.tcmax import brute_force_log_partition
from fusion.layers import bin_index, expected_value, masked_mean, regression_bins
from fusion.models.tcmax import TCMax

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


def head_critic(model):
    """The fused head as a function of one tuple of pooled features: M tensors (N, H) -> (N, K)."""

    def critic(parts):
        if model.config.head == "share":
            terms = [model.shared(x) / len(parts) for x in parts]
        else:
            terms = [model.heads[m](x) for m, x in zip(model.modalities, parts, strict=True)]
        return sum(terms) + model.bias

    return critic


def test_bins_and_expected_value() -> None:
    torch.testing.assert_close(regression_bins(7), torch.arange(-3.0, 4.0))
    torch.testing.assert_close(regression_bins(13)[:3], torch.tensor([-3.0, -2.5, -2.0]))
    assert regression_bins(25)[1].item() == pytest.approx(-2.75)
    centres = regression_bins(7)
    labels = torch.tensor([0.4, 2.6, -5.0, 3.7, -0.6])
    assert bin_index(labels, centres).tolist() == [3, 6, 0, 6, 2]
    logits = torch.tensor([[0.0, 0, 0, 0, 0, 0, math.log(3.0)]])  # p = 1/9 each, 3/9 on +3
    assert expected_value(logits, centres).item() == pytest.approx((-3 - 2 - 1 + 0 + 1 + 2 + 9) / 9)


@pytest.mark.parametrize("head", ["linear", "share"])
@pytest.mark.parametrize("num_modalities", [2, 3])
@pytest.mark.parametrize("task", ["regression", "classification"])
def test_loss_equals_brute_force_enumeration(task: str, num_modalities: int, head: str) -> None:
    dims = dict(list(DIMS.items())[:num_modalities])
    torch.manual_seed(0)
    model = build_model(
        "tcmax", dims=dims, hidden=6, num_heads=2, task=task, num_classes=3, dropout=0.0, head=head, regression="bins"
    )
    model.eval()
    with torch.no_grad():
        model.bias.copy_(torch.randn(model.num_logits))
    batch = batch_of(4, task, dims)
    out = model(batch)
    z = pooled(model, batch)
    feats = [z[m] for m in model.modalities]
    critic = head_critic(model)
    y = model._targets(batch["label"])
    b, c = 4, model.num_logits
    positive = critic(feats).gather(1, y[:, None]).mean()
    log_mean_negative = brute_force_log_partition(feats, critic) - num_modalities * math.log(b) - math.log(c)
    expected = -(positive - log_mean_negative)
    assert sum(out.losses.values()).item() == pytest.approx(expected.item(), abs=1e-5)
    assert out.diagnostics["tc"].item() == pytest.approx(-expected.item(), abs=1e-5)


@pytest.mark.parametrize("head", ["linear", "share"])
@pytest.mark.parametrize("regression", ["constant_normaliser", "continuous"])
@pytest.mark.parametrize("num_modalities", [2, 3])
def test_squared_error_loss_equals_brute_force_enumeration(num_modalities: int, regression: str, head: str) -> None:
    """Every recombination (i_1, ..., i_M) of a batch of 4 with every bin centre (gaussian) or every label of
    the batch (continuous), scored by T(z, y) = -(y - h(z))^2 with h the fused scalar head."""
    dims = dict(list(DIMS.items())[:num_modalities])
    torch.manual_seed(1)
    model = build_model("tcmax", dims=dims, hidden=6, num_heads=2, dropout=0.0, head=head, regression=regression)
    model.eval()
    with torch.no_grad():
        model.bias.fill_(0.3)
    batch = batch_of(4, "regression", dims, seed=1)
    out = model(batch)
    z = pooled(model, batch)
    critic = head_critic(model)
    h = critic([z[m] for m in model.modalities])[:, 0]
    if regression == "constant_normaliser":
        target, values = model.centres[model._targets(batch["label"])], model.centres
    else:
        target, values = batch["label"], batch["label"]
    negatives = []
    for idx in itertools.product(range(4), repeat=num_modalities):
        h_tuple = critic([z[m][i : i + 1] for m, i in zip(model.modalities, idx, strict=True)])[0, 0]
        negatives.append(-((values - h_tuple) ** 2))
    negatives = torch.cat(negatives)
    assert len(negatives) == 4**num_modalities * len(values)
    expected = -(target - h).pow(2).mean() - (torch.logsumexp(negatives, 0) - math.log(len(negatives)))
    assert out.diagnostics["tc"].item() == pytest.approx(expected.item(), abs=1e-5)
    assert sum(out.losses.values()).item() == pytest.approx(-expected.item(), abs=1e-5)
    if regression == "constant_normaliser":
        torch.testing.assert_close(out.prediction, expected_value(-((model.centres - h[:, None]) ** 2), model.centres))
    else:
        torch.testing.assert_close(out.prediction, h)


def test_regression_prediction_is_expected_bin_centre() -> None:
    torch.manual_seed(1)
    model = build_model("tcmax", dims=DIMS, hidden=6, num_heads=2, num_bins=13, regression="bins").eval()
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
    assert sum(out.losses.values()).item() == pytest.approx(total.item(), abs=1e-5)
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
    sum(out.losses.values()).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(torch.isfinite(v) for v in out.losses.values())


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
        sum(out.losses.values()).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        final = model(batch)
    accuracy = (final.prediction.argmax(1) == y).float().mean().item()
    assert final.diagnostics["tc"].item() > first + 0.5
    assert accuracy > 0.9


# ---- share-head -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("task", "regression", "shape"),
    [
        ("regression", "constant_normaliser", (5,)),
        ("regression", "bins", (5,)),
        ("regression", "continuous", (5,)),
        ("classification", "constant_normaliser", (5, 3)),
        ("multilabel", "constant_normaliser", (5, 2)),
    ],
)
def test_share_head_is_one_linear_averaged_over_modalities(task: str, regression: str, shape: tuple) -> None:
    torch.manual_seed(6)
    model = build_model(
        "tcmax",
        dims=DIMS,
        hidden=6,
        num_heads=2,
        task=task,
        num_classes=3 if task != "multilabel" else 2,
        head="share",
        regression=regression,
    ).eval()
    assert not hasattr(model, "heads")
    assert tuple(model.shared.weight.shape) == (model.num_logits, 6) and model.shared.bias is None
    batch = batch_of(5, task)
    if task == "multilabel":
        batch["label"] = torch.randint(0, 2, (5, 2)).float()
    out = model(batch)
    assert tuple(out.prediction.shape) == shape
    z = pooled(model, batch)
    terms, fused = model.head_outputs(z)
    torch.testing.assert_close(fused, (sum(model.shared(z[m]) for m in model.modalities)) / 3 + model.bias)
    torch.testing.assert_close(terms[0], model.shared(z["text"]) / 3)
    batch["audio_mask"][2] = False  # a missing modality adds nothing; the divisor stays the model's M
    z = pooled(model, batch)
    torch.testing.assert_close(
        model.head_outputs(z)[1][2], (model.shared(z["text"][2]) + model.shared(z["video"][2])) / 3 + model.bias
    )


def test_share_head_loss_equals_brute_force_on_a_tiny_case() -> None:
    """Batch 3, two modalities, 4 classes: all 3^2 * 4 negatives enumerated against the factorised form."""
    torch.manual_seed(7)
    dims = {"text": 5, "audio": 3}
    model = build_model(
        "tcmax", dims=dims, hidden=4, num_heads=2, task="classification", num_classes=4, head="share", dropout=0.0
    ).eval()
    with torch.no_grad():
        model.bias.copy_(torch.tensor([0.5, -1.0, 0.0, 2.0]))
    batch = batch_of(3, "classification", dims, seed=7)
    batch["label"] = torch.tensor([0, 3, 1])
    z = pooled(model, batch)
    negatives = [
        model.shared(z["text"][i]) / 2 + model.shared(z["audio"][j]) / 2 + model.bias
        for i in range(3)
        for j in range(3)
    ]
    fused = (model.shared(z["text"]) + model.shared(z["audio"])) / 2 + model.bias
    positive = fused.gather(1, batch["label"][:, None]).mean()
    expected = positive - (torch.logsumexp(torch.cat(negatives), 0) - math.log(9 * 4))
    assert model(batch).diagnostics["tc"].item() == pytest.approx(expected.item(), abs=1e-5)


# ---- regression that needs two modalities ---------------------------------------------------------------


def signal_data(n: int, g: torch.Generator, label: str) -> dict[str, torch.Tensor]:
    """The latent signals fed in as features: text (n, 1, 2) = [s1, noise], audio (n, 1, 2) = [s2, noise];
    label = clip(s1 + s2, +-3) ("two") or clip(sqrt(2) s1, +-3) ("one", the same spread from text only)."""
    s1, s2 = torch.randn(n, generator=g), torch.randn(n, generator=g)
    y = s1 + s2 if label == "two" else math.sqrt(2.0) * s1
    return {
        "text": torch.stack([s1, torch.randn(n, generator=g)], -1)[:, None],
        "audio": torch.stack([s2, torch.randn(n, generator=g)], -1)[:, None],
        "label": y.clamp(-3.0, 3.0),
    }


def fit_and_score(label: str, loss: str, head: str, regression: str, steps: int = 400) -> tuple[float, float]:
    """Train on 4000 samples (batch 64, Adam 3e-3) with the TCMax loss or cross-entropy on the fused bin logits;
    return the held-out (2000 samples) MAE and least-squares slope of prediction on label."""
    g = torch.Generator().manual_seed(11)
    train, test = signal_data(4000, g, label), signal_data(2000, g, label)
    torch.manual_seed(0)
    model = build_model(
        "tcmax",
        dims={"text": 2, "audio": 2},
        hidden=8,
        num_heads=2,
        num_layers=0,
        dropout=0.0,
        head=head,
        regression=regression,
    )
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        idx = torch.randint(0, 4000, (64,), generator=g)
        batch = {k: v[idx] for k, v in train.items()}
        if loss == "tcmax":
            value = sum(model(batch).losses.values())
        else:
            _, fused = model.head_outputs(model.encode(model.prepare(batch)))
            value = F.cross_entropy(model._logits(fused), model._targets(batch["label"]))
        opt.zero_grad()
        value.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        pred = model(test).prediction
    y = test["label"]
    slope = ((y - y.mean()) * (pred - pred.mean())).sum() / (y - y.mean()).pow(2).sum()
    return (pred - y).abs().mean().item(), slope.item()


@pytest.mark.parametrize(("label", "head"), [("two", "linear"), ("two", "share"), ("one", "linear")])
def test_regression_does_not_shrink_when_the_label_needs_two_modalities(label: str, head: str) -> None:
    """The default regression critic against cross-entropy on the same head and 7 bins, on held-out samples.
    Measured (label two, linear head): cross-entropy MAE 0.077 / slope 0.95, default ``gaussian`` 0.043 / 0.99.
    Free bin logits (``regression="bins"``) fail it, 0.538 / 0.52; so does ``continuous`` (R2), 0.126 / 1.12,
    whose predictions over-expand. The single-modality label checks that the default does not regress there."""
    ce_mae, _ = fit_and_score(label, "ce", head, "bins")
    mae, slope = fit_and_score(label, "tcmax", head, TCMax.Config.regression)
    assert slope >= 0.9, f"predictions shrink towards the centre: slope {slope:.2f}"
    assert mae <= 1.2 * ce_mae, f"TCMax MAE {mae:.3f} vs cross-entropy {ce_mae:.3f}"


def test_unknown_head_and_regression_are_reported_together() -> None:
    with pytest.raises(FusionConfigError) as info:
        build_model("tcmax", dims=DIMS, head="concat", regression="ordinal")
    assert "head: must be one of linear, share, mlp, got 'concat'" in str(info.value)
    assert "regression: must be one of bins_head, bins, constant_normaliser, continuous, got 'ordinal'" in str(
        info.value
    )


def test_large_batches_sample_the_recombinations(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past MAX_NEGATIVE_TERMS (tuple, bin) pairs the tuples are drawn at random: same bound up to noise."""
    torch.manual_seed(8)
    model = build_model("tcmax", dims=DIMS, hidden=6, num_heads=2, dropout=0.0, regression="constant_normaliser")
    model.eval()
    batch = batch_of(16, seed=8)  # 16^3 = 4096 tuples
    with torch.no_grad():
        exact = model(batch).diagnostics["tc"].item()
        monkeypatch.setattr("fusion.models.tcmax.MAX_NEGATIVE_TERMS", 7 * 2048)  # 2048 sampled tuples
        sampled = model(batch).diagnostics["tc"].item()
    assert sampled != exact
    assert sampled == pytest.approx(exact, abs=0.05)


def test_bins_head_predicts_the_raw_label_with_its_own_head() -> None:
    """The default regression form: the bound on the binned label, plus an L1 head on the pooled features whose
    output is the prediction (never a bin centre)."""
    torch.manual_seed(9)
    model = build_model("tcmax", dims=DIMS, hidden=6, num_heads=2, dropout=0.0).eval()
    batch = batch_of(6, seed=9)
    with torch.no_grad():
        out = model(batch)
        z = pooled(model, batch)
        expected = model.regressor(torch.cat([z[m] for m in model.modalities], -1))[:, 0]
        bins = build_model("tcmax", dims=DIMS, hidden=6, num_heads=2, dropout=0.0, regression="bins").eval()
        bins.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("regressor.")})
        bound = bins(batch).diagnostics["tc"]
    torch.testing.assert_close(out.prediction, expected)
    assert not torch.isin(out.prediction, model.centres).any()
    assert out.losses["task"].item() == pytest.approx((expected - batch["label"]).abs().mean().item(), abs=1e-6)
    tc_terms = out.losses["positive"] + out.losses["product_negative"] + out.losses["joint_negative"]
    assert tc_terms.item() == pytest.approx(-bound.item(), abs=1e-5)  # the same bound as free bin logits


@pytest.mark.parametrize("weight", [-0.1, 1.5])
def test_tc_weight_outside_zero_one_is_rejected(weight: float) -> None:
    with pytest.raises(FusionConfigError, match=rf"tc_weight: must be in \[0, 1\], got {weight}"):
        build_model("tcmax", dims=DIMS, tc_weight=weight)
