"""MIM: Hard-Concrete gates against hand computations, the L0 penalty, KGS weights, gradient routing between
the "upn" and "model" groups, eval determinism, padding, and a tiny training run where gates learn to drop
noisy steps. The shared properties (shapes, padding, subsets, state dict) are in test_models.py."""

from __future__ import annotations

import math

import pytest
import torch

from fusion import FusionConfigError, build_model
from fusion.models.mim import MIMConfig, hard_concrete_gate, inter_weights, l0_penalty

DIMS = {"text": 7, "audio": 5, "video": 3}


def tiny(dims: dict[str, int] | None = None, **extra: object):
    torch.manual_seed(0)
    return build_model("mim", dims=dict(dims or DIMS), hidden=9, num_heads=3, num_layers=1, **extra)


def make_batch(seed: int = 1, b: int = 6, dims: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    batch: dict[str, torch.Tensor] = {}
    for i, (m, d) in enumerate((dims or DIMS).items()):
        t = 5 + 2 * i
        batch[m] = torch.randn(b, t, d, generator=g)
        batch[f"{m}_mask"] = torch.arange(t)[None] < torch.randint(1, t + 1, (b,), generator=g)[:, None]
    batch["label"] = torch.rand(b, generator=g) * 6 - 3
    return batch


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_config_problems_are_collected() -> None:
    with pytest.raises(FusionConfigError) as info:
        build_model("mim", dims=DIMS, beta=0.0, gamma=0.1, threshold=1.5, fusion="concat", inter_weight=-1.0)
    message = str(info.value)
    for text in ("beta: must be > 0", "gamma (0.1) must be < 0", "threshold: must be in (0, 1)", "fusion:", "inter_"):
        assert text in message


def test_gate_matches_hand_computation_and_straight_through_gradient() -> None:
    config = MIMConfig(dims={"text": 1})  # beta 1/3, gamma -0.2, zeta 1, loc_bias 3, threshold 0.6
    alphas, noise = [-4.0, -1.0, -2.8, 0.5, -3.1], [0.5, 0.2, 0.5, 0.9, 0.7]
    alpha = torch.tensor([alphas], requires_grad=True)
    gate = hard_concrete_gate(alpha, torch.ones(1, 5, dtype=torch.bool), config, torch.tensor([noise]))
    expected, slopes = [], []
    for a, u in zip(alphas, noise, strict=True):
        s = _sigmoid((math.log(u) - math.log(1 - u) + a + 3.0) * 3.0)
        stretched = s * 1.2 - 0.2
        expected.append(1.0 if min(max(stretched, 0.0), 1.0) > 0.6 else 0.0)
        slopes.append(1.2 * 3.0 * s * (1 - s) if 0.0 < stretched < 1.0 else 0.0)  # d clip(soft) / d alpha
    assert gate.tolist() == [expected]  # exactly 0 / 1
    assert expected == [0.0, 1.0, 0.0, 1.0, 1.0]
    gate.sum().backward()
    torch.testing.assert_close(alpha.grad, torch.tensor([slopes]))
    assert alpha.grad[0, 0] == 0  # clipped at 0: no gradient
    assert alpha.grad[0, 2] > 0.1  # near the threshold: a large straight-through gradient


def test_gate_is_binary_forward_with_the_clipped_soft_gradient() -> None:
    config = MIMConfig(dims={"text": 1}, loc_bias=0.0)
    g = torch.Generator().manual_seed(0)
    alpha = (torch.randn(4, 9, generator=g) * 2).requires_grad_()
    u = torch.rand(4, 9, generator=g) * 0.98 + 0.01
    weights = torch.randn(4, 9, generator=g)
    gate = hard_concrete_gate(alpha, torch.ones(4, 9, dtype=torch.bool), config, u)
    assert ((gate == 0) | (gate == 1)).all() and 0 < gate.mean() < 1
    soft = (torch.sigmoid((alpha + torch.log(u) - torch.log1p(-u)) * 3) * 1.2 - 0.2).clamp(0, 1)
    assert torch.equal(gate, (soft > 0.6).float())
    (grad_gate,) = torch.autograd.grad((gate * weights).sum(), alpha)
    (grad_soft,) = torch.autograd.grad((soft * weights).sum(), alpha)
    torch.testing.assert_close(grad_gate, grad_soft)
    # no noise = the u = 1/2 gate
    mask = torch.ones(4, 9, dtype=torch.bool)
    assert torch.equal(hard_concrete_gate(alpha, mask, config), hard_concrete_gate(alpha, mask, config, u * 0 + 0.5))


def test_gates_are_zero_at_padding_with_no_gradient() -> None:
    config = MIMConfig(dims={"text": 1})
    alpha = torch.full((2, 4), 5.0, requires_grad=True)  # wide open wherever valid
    mask = torch.tensor([[True, True, False, False], [False, True, True, False]])
    gate = hard_concrete_gate(alpha, mask, config, torch.full((2, 4), 0.3))
    assert gate.tolist() == mask.float().tolist()
    gate.sum().backward()
    assert (alpha.grad[~mask] == 0).all()

    model = tiny()
    model.eval()
    batch = make_batch()
    with torch.no_grad():
        out = model(batch)
    for m in DIMS:
        gates, valid = out.diagnostics[f"gates/{m}"], batch[f"{m}_mask"]
        assert (gates[~valid] == 0).all() and ((gates == 0) | (gates == 1)).all()
        torch.testing.assert_close(out.diagnostics[f"gate_rate/{m}"], gates.sum() / valid.sum())


def test_l0_penalty_closed_form_over_valid_steps() -> None:
    config = MIMConfig(dims={"text": 1})
    alpha = torch.tensor([[-2.0, 0.5, 99.0], [1.0, -7.0, -99.0]])
    mask = torch.tensor([[True, True, False], [True, True, False]])
    shift = 3.0 - math.log(0.2) / 3  # loc_bias - beta log(-gamma / zeta)
    expected = sum(_sigmoid(a + shift) for a in (-2.0, 0.5, 1.0, -7.0)) / 4
    torch.testing.assert_close(l0_penalty(alpha, mask, config), torch.tensor(expected))


def test_inter_weights_sum_to_m_and_match_the_published_formula() -> None:
    losses = torch.tensor([0.3, 0.5, 0.9])
    lam_l, lam_a, lam_v = (losses / losses.sum()).tolist()
    d = (1 + lam_a) * (1 + lam_l) + (1 + lam_v) * (1 + lam_l) + (1 + lam_a) * (1 + lam_v)
    published = [
        3 * (1 + lam_a) * (1 + lam_v) / d,
        3 * (1 + lam_l) * (1 + lam_v) / d,
        3 * (1 + lam_l) * (1 + lam_a) / d,
    ]
    weights = inter_weights(losses)
    torch.testing.assert_close(weights, torch.tensor(published))
    assert weights.sum().item() == pytest.approx(3.0)
    assert weights[0] > weights[1] > weights[2]  # lower loss, larger weight
    pair = inter_weights(torch.tensor([0.2, 0.6]))
    assert pair.sum().item() == pytest.approx(2.0) and pair[0] > pair[1]
    torch.testing.assert_close(inter_weights(torch.tensor([0.4])), torch.tensor([1.0]))


def test_gradient_routing_between_groups() -> None:
    model = tiny()
    model.train()
    out = model(make_batch())
    groups = {g["name"]: g["params"] for g in model.param_groups(1e-3)}
    upn_ids = {id(p) for p in model.upn.parameters()}
    assert {id(p) for p in groups["upn"]} == upn_ids

    def grads(loss: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
        found = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, found, strict=True)]

    for key in ("purified", "penalty"):  # UPN-only terms
        assert all((g == 0).all() for g in grads(out.losses[key], groups["model"])), key
        assert any(g.abs().sum() > 0 for g in grads(out.losses[key], groups["upn"])), key
    total = sum(out.losses.values())
    model_only = total - out.losses["purified"] - out.losses["penalty"]
    for a, b in zip(grads(total, groups["model"]), grads(model_only, groups["model"]), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    # the model losses reach the UPN too (through the gates), as the published second step did
    assert any(g.abs().sum() > 0 for g in grads(out.losses["task"], groups["upn"]))


def test_eval_gates_deterministic_by_default_and_stochastic_when_faithful() -> None:
    batch = make_batch(b=16)
    for faithful in (False, True):
        model = tiny(loc_bias=0.0, faithful=faithful)  # gates near the threshold: sampling flips many
        model.eval()
        with torch.no_grad():
            torch.manual_seed(1)
            first = model(batch)
            torch.manual_seed(2)
            second = model(batch)
        same = all(torch.equal(first.diagnostics[f"gates/{m}"], second.diagnostics[f"gates/{m}"]) for m in DIMS)
        assert same is not faithful
        assert torch.equal(first.prediction, second.prediction) is not faithful


def test_penalty_is_the_weighted_sum_over_modalities(monkeypatch) -> None:
    """methods.md 5.3: L_pen = 0.1 * (penalty_l + penalty_a + penalty_v), not their mean."""
    import fusion.models.mim as mim

    values = {5: 0.2, 7: 0.3, 9: 0.7}  # by the modality's padded length in make_batch (text 5, audio 7, video 9)
    model = tiny(penalty_weight=0.1)
    monkeypatch.setattr(mim, "l0_penalty", lambda alpha, mask, c: torch.tensor(values[alpha.shape[1]]))
    out = model(make_batch())
    assert out.losses["penalty"].item() == pytest.approx(0.1 * (0.2 + 0.3 + 0.7))


def test_gates_off_keeps_every_step_and_trains_no_mask_learner() -> None:
    model = tiny(gates=False)
    model.train()
    batch = make_batch()
    out = model(batch)
    assert set(out.losses) == {"task", "unimodal", "purified", "penalty", "intra", "inter"}
    assert out.losses["purified"].item() == 0.0 and out.losses["penalty"].item() == 0.0
    for m in DIMS:
        assert out.diagnostics[f"gate_rate/{m}"].item() == 1.0
        assert torch.equal(out.diagnostics[f"gates/{m}"], batch[f"{m}_mask"].float())
    sum(out.losses.values()).backward()
    assert all(p.grad is None for p in model.upn.parameters())
    # with every step kept, the purified vector is the unmasked one: y_p = y_u, so intra-modal KGS is 0
    assert out.losses["intra"].item() == pytest.approx(0.0, abs=1e-12)


def test_hard_concrete_noise_is_float32_under_bf16_autocast(monkeypatch) -> None:
    import fusion.models.mim as mim

    seen = []
    original = mim.hard_concrete_gate

    def spy(alpha, mask, config, u=None):
        seen.append((alpha.dtype, None if u is None else u.dtype))
        return original(alpha, mask, config, u)

    monkeypatch.setattr(mim, "hard_concrete_gate", spy)
    model = tiny()
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(make_batch())
    assert seen == [(torch.float32, torch.float32)] * 3
    assert torch.isfinite(out.prediction.float()).all()


def test_loss_terms_and_diagnostics() -> None:
    model = tiny()
    model.eval()
    with torch.no_grad():
        out = model(make_batch())
    assert set(out.losses) == {"task", "unimodal", "purified", "penalty", "intra", "inter"}
    loss_p = torch.stack([out.diagnostics[f"loss_p/{m}"] for m in DIMS])
    assert out.diagnostics["teacher"].item() == loss_p.argmin().item()
    torch.testing.assert_close(out.losses["purified"], loss_p.sum())
    torch.testing.assert_close(out.losses["unimodal"], sum(out.diagnostics[f"loss_u/{m}"] for m in DIMS))
    weights = torch.stack([out.diagnostics[f"inter_weight/{m}"] for m in DIMS])
    torch.testing.assert_close(weights, inter_weights(loss_p))


def test_single_modality_inter_is_a_connected_zero_and_add_fusion_runs() -> None:
    model = tiny({"audio": 5})
    model.train()
    out = model(make_batch(dims={"audio": 5}))
    assert out.losses["inter"].item() == 0 and out.losses["inter"].requires_grad
    assert out.diagnostics["teacher"].item() == -1
    model = tiny(fusion="add")
    model.train()
    out = model(make_batch())
    sum(out.losses.values()).backward()
    assert out.prediction.shape == (6,) and model.fusion_proj.weight.grad.abs().sum() > 0


def _noisy_half(n: int, g: torch.Generator) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Half the steps (random places) carry the label in feature 0; the other half are N(0, 0.5^2) noise."""
    steps, dim = 6, 3
    label = torch.rand(n, generator=g) * 2 - 1
    noisy = torch.rand(n, steps, generator=g).argsort(1) < steps // 2
    clean = torch.zeros(n, steps, dim)
    clean[..., 0] = label[:, None]
    x = torch.where(noisy[..., None], torch.randn(n, steps, dim, generator=g) * 0.5, clean)
    return {"text": x, "label": label}, noisy


def test_gates_learn_to_keep_clean_steps_over_noisy_ones() -> None:
    # With the defaults (loc_bias 3, penalty 0.1) every gate starts saturated open (sigmoid(9)) and stays open
    # (fusion/models/mim.py: below a penalty cliff no setting tried moves them). Starting at the decision boundary
    # (loc_bias 0) with a strong L0 penalty, the penalty closes what the task does not need: the noisy steps.
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = build_model(
        "mim", dims={"text": 3}, hidden=8, num_heads=1, num_layers=0, dropout=0.0, loc_bias=0.0, penalty_weight=1.0
    )
    groups = model.param_groups(3e-2)
    groups[0]["lr"] = 1e-2  # the UPN group
    opt = torch.optim.Adam(groups)
    model.train()
    for _ in range(150):
        batch, _ = _noisy_half(32, g)
        out = model(batch)
        opt.zero_grad()
        sum(out.losses.values()).backward()
        opt.step()
    batch, noisy = _noisy_half(512, g)
    model.eval()
    with torch.no_grad():
        out = model(batch)
    gates = out.diagnostics["gates/text"]
    clean_rate, noisy_rate = gates[~noisy].mean().item(), gates[noisy].mean().item()
    assert clean_rate > noisy_rate + 0.25, (clean_rate, noisy_rate)  # seeds 0-9: gaps from 0.36 to 0.62
    assert out.losses["task"].item() < 0.3  # seeds 0-9: 0.10 to 0.19; predicting 0 gives E|y| = 0.5


def _packed_bilstm(lstm: torch.nn.LSTM, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The UPN's former BiLSTM: packed to each sample's last valid step (host-synced lengths), zeros after."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    from fusion.layers import last_valid_length

    packed = pack_padded_sequence(x, last_valid_length(mask).cpu(), batch_first=True, enforce_sorted=False)
    return pad_packed_sequence(lstm(packed)[0], batch_first=True, total_length=x.shape[1])[0]


@pytest.mark.parametrize("seed", range(6))
def test_unpacked_bilstm_matches_the_packed_one(seed: int) -> None:
    from fusion.models.mim import MaskedBiLSTM

    g = torch.Generator().manual_seed(seed)
    b, t, d, hidden = int(torch.randint(1, 9, (1,), generator=g)), int(torch.randint(1, 12, (1,), generator=g)), 6, 5
    torch.manual_seed(seed)
    ours = MaskedBiLSTM(d, hidden)
    torch.manual_seed(seed)
    packed = torch.nn.LSTM(d, hidden, batch_first=True, bidirectional=True)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in packed.state_dict().items()}
    for k, v in ours.state_dict().items():  # same names, same initialisation
        assert torch.equal(v, packed.state_dict()[k]), k
    mask = torch.rand(b, t, generator=g) < 0.7  # interior and leading gaps, and samples with no valid step
    mask[0] = torch.arange(t) < t  # one full-length sample
    if b > 2:
        mask[1] = False
    x = torch.randn(b, t, d, generator=g) * mask[..., None]  # zero at invalid steps, as the encoders give
    x.requires_grad_()
    expected = _packed_bilstm(packed, x, mask)
    got = ours(x, mask)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    weights = torch.randn(expected.shape, generator=g)
    grads = torch.autograd.grad((got * weights).sum(), [x, *ours.parameters()])
    expected_grads = torch.autograd.grad((expected * weights).sum(), [x, *packed.parameters()])
    for a, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-4)


def _reference_losses(model, prediction, inputs, pooled, y_u, y_p, y_upn, penalties):
    """The KGS loss selection as it was with host syncs (Python branches on which modalities are present, on
    which branch is better, and on the teacher index): the tensor version must give identical losses."""
    import torch.nn.functional as F

    from fusion.layers import task_loss
    from fusion.models.mim import _masked_mse

    c, label, present = model.config, inputs.label, inputs.present
    active = [m for m in model.modalities if bool(present[m].any())]
    zero = prediction.sum() * 0.0
    loss_u = {m: task_loss(y_u[m], label, c.task, present[m]) for m in active}
    loss_p = {m: task_loss(y_upn[m], label, c.task, present[m]) for m in active}
    intra = zero
    for m in active:
        better_purified = bool(loss_p[m].detach() < loss_u[m].detach())
        student, teacher = (y_u[m], y_p[m]) if better_purified else (y_p[m], y_u[m])
        intra = intra + _masked_mse(student, teacher.detach(), present[m])
    inter, teacher_index = zero, -1
    if len(active) >= 2:
        lp = torch.stack([loss_p[m].detach() for m in active])
        weights = inter_weights(lp)
        t = int(lp.argmin())
        target = pooled[active[t]].detach().float().softmax(-1)
        kl = zero
        for s in active:
            if s == active[t]:
                continue
            both = (present[active[t]] & present[s]).to(target.dtype)
            per_sample = F.kl_div(pooled[s].float().log_softmax(-1), target, reduction="none").sum(-1)
            kl = kl + (per_sample * both).sum() / both.sum().clamp_min(1.0)
        inter = 0.5 * (c.inter_temp * weights[t]) ** 2 * kl
        teacher_index = model.modalities.index(active[t])
    penalty = torch.stack([penalties[m] for m in active]).sum() if active else zero
    losses = {
        "task": task_loss(prediction, label, c.task),
        "unimodal": c.unimodal_weight * (sum(loss_u.values()) if active else zero),
        "purified": c.purified_weight * (sum(loss_p.values()) if active and c.gates else zero),
        "penalty": c.penalty_weight * penalty,
        "intra": c.intra_weight * intra,
        "inter": c.inter_weight * inter,
    }
    return losses, teacher_index


def _kgs_batches():
    full = make_batch(seed=3, b=7)
    some = make_batch(seed=4, b=7)
    some["audio_mask"][2] = False
    some["video_mask"][[0, 4]] = False
    some["text_mask"][4] = False
    no_audio = {k: v for k, v in make_batch(seed=5, b=7).items() if not k.startswith("audio")}
    text_only = {k: v for k, v in make_batch(seed=6, b=7).items() if k == "label" or k.startswith("text")}
    nothing = {"label": full["label"]}
    return [full, some, no_audio, text_only, nothing]


@pytest.mark.parametrize("extra", [{}, {"task": "classification", "num_classes": 3}, {"gates": False}])
@pytest.mark.parametrize("train", [False, True])
def test_kgs_losses_equal_the_host_synced_selection(monkeypatch, extra: dict, train: bool) -> None:
    from fusion.models.mim import MIM

    original, seen = MIM._losses, []

    def spy(self, prediction, inputs, pooled, y_u, y_p, y_upn, penalties, diagnostics):
        losses = original(self, prediction, inputs, pooled, y_u, y_p, y_upn, penalties, diagnostics)
        expected, teacher = _reference_losses(self, prediction, inputs, pooled, y_u, y_p, y_upn, penalties)
        seen.append(teacher)
        assert losses.keys() == expected.keys()
        for key in losses:
            assert torch.equal(losses[key], expected[key]), key  # bit for bit
        assert diagnostics["teacher"].item() == teacher
        return losses

    monkeypatch.setattr(MIM, "_losses", spy)
    model = tiny(**extra).train(train)
    for seed, batch in enumerate(_kgs_batches()):
        if "num_classes" in extra:
            batch["label"] = torch.randint(0, 3, batch["label"].shape, generator=torch.Generator().manual_seed(seed))
        torch.manual_seed(seed)
        out = model(batch)
        if train:
            sum(out.losses.values()).backward()
    assert len(seen) == 5 and seen[-2:] == [-1, -1]  # one modality, none: no teacher


def test_purified_loss_by_hand_gates_matches_forward_and_the_pooled_bias() -> None:
    from bench.claim_stats import purification_room

    model = tiny().eval()
    batch = make_batch()
    with torch.no_grad():
        out = model(batch)
    for m in DIMS:  # default eval gates are all open: the forward's purified loss is the one with every step kept
        assert out.diagnostics[f"gate_rate/{m}"].item() == 1.0
        torch.testing.assert_close(model.purified_loss(batch, m, batch[f"{m}_mask"]), out.diagnostics[f"loss_p/{m}"])
    nothing = torch.zeros_like(batch["video_mask"])  # every step closed: tanh(0) pools to 0, the head gives its bias
    expected = (model.heads["video"].bias - batch["label"]).abs().mean()
    torch.testing.assert_close(model.purified_loss(batch, "video", nothing), expected)

    noisy = batch["video_mask"].clone()
    noisy[:, 1:] = False  # only the first step marked as noise
    room = purification_room(model, {"test": {**batch, "video_noisy": noisy}})
    assert set(room) == {"purify_gain/video"}
    keep = batch["video_mask"] & ~noisy
    gain = model.purified_loss(batch, "video", batch["video_mask"]) - model.purified_loss(batch, "video", keep)
    assert room["purify_gain/video"] == pytest.approx(gain.item())
    assert purification_room(build_model("late", dims=DIMS, hidden=8), {"test": batch}) == {}
