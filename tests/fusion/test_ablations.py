"""Every ablation switch removes one thing: built from the same seed, the full model and its ablation start with
bit-identical parameters, draw the same random numbers in a training forward, and differ in exactly the named
loss terms. And in each method's default its own mechanism is on: it carries gradient."""

from __future__ import annotations

import pytest
import torch
from test_models import make_batch

from fusion import build_model

# (model, switch, task, loss keys whose value changes, buffers that differ, extra settings of both models)
ABLATIONS = [
    ("tcmax", {"tc_weight": 0.0}, "regression", {"product_negative", "joint_negative"}, set(), {}),
    ("tcmax", {"tc_weight": 0.0}, "classification", {"product_negative", "joint_negative"}, set(), {}),
    # gates open in the full model (loc_bias 3 at eval): the KGS terms are the same, only the UPN's own terms go
    ("mim", {"gates": False}, "regression", {"purified", "penalty"}, set(), {"loc_bias": 3.0}),
    ("ithp", {"bottleneck": False}, "regression", {"kl0", "kl1"}, set(), {}),
    ("bc_pmjrs", {"mi_min": False}, "regression", {"mi_min", "club_fit"}, {"lambda_min"}, {}),
    ("bc_pmjrs", {"mi_max": False}, "regression", {"mi_max"}, {"lambda_max"}, {}),
    ("bc_pmjrs", {"ltp_ltd": False}, "regression", set(), set(), {}),
]
IDS = [f"{name}-{next(iter(switch))}-{task}" for name, switch, task, *_ in ABLATIONS]
TASKS = {"regression": {}, "classification": {"task": "classification", "num_classes": 3}}


def pair(name: str, switch: dict, task: str, extra: dict):
    models = []
    for settings in ({}, switch):
        torch.manual_seed(0)
        config = {"dims": {"text": 21, "audio": 27, "video": 11}, "hidden": 15, "num_heads": 3, "num_layers": 1}
        models.append(build_model(name, **config, **TASKS[task], **extra, **settings))
    return models


@pytest.mark.parametrize(("name", "switch", "task", "changed", "buffers", "extra"), ABLATIONS, ids=IDS)
def test_ablation_starts_from_the_same_parameters(name, switch, task, changed, buffers, extra) -> None:
    full, ablated = pair(name, switch, task, extra)
    params, other = dict(full.named_parameters()), dict(ablated.named_parameters())
    assert params.keys() == other.keys()
    assert all(torch.equal(params[k], other[k]) for k in params)  # bit for bit
    full_buffers, other_buffers = dict(full.named_buffers()), dict(ablated.named_buffers())
    assert full_buffers.keys() == other_buffers.keys()
    assert {k for k in full_buffers if not torch.equal(full_buffers[k], other_buffers[k])} == buffers


@pytest.mark.parametrize(("name", "switch", "task", "changed", "buffers", "extra"), ABLATIONS, ids=IDS)
def test_ablation_changes_exactly_the_named_terms(name, switch, task, changed, buffers, extra) -> None:
    full, ablated = pair(name, switch, task, extra)
    batch = make_batch(task)
    with torch.no_grad():
        a, b = full.eval()(batch), ablated.eval()(batch)
    keys = a.losses.keys() | b.losses.keys()
    differ = {k for k in keys if k not in a.losses or k not in b.losses or not torch.equal(a.losses[k], b.losses[k])}
    assert differ == changed
    torch.testing.assert_close(a.prediction, b.prediction, rtol=0, atol=0)


@pytest.mark.parametrize(("name", "switch", "task", "changed", "buffers", "extra"), ABLATIONS, ids=IDS)
def test_ablation_draws_the_same_random_numbers_in_training(name, switch, task, changed, buffers, extra) -> None:
    """Dropout masks and the methods' own noise (gate noise, latent samples) stay paired after the forward."""
    states = []
    for model in pair(name, switch, task, extra):
        torch.manual_seed(7)
        model.train()(make_batch(task))
        states.append(torch.get_rng_state())
    assert torch.equal(states[0], states[1])


# ---- each default's mechanism carries gradient --------------------------------------------------------------


@pytest.mark.parametrize("task", ["regression", "classification"])
def test_tcmax_default_negative_term_carries_gradient(task: str) -> None:
    full, ablated = pair("tcmax", {"tc_weight": 0.0}, task, {})
    shares, off = full.mechanism(make_batch(task)), ablated.mechanism(make_batch(task))
    assert shares["grad_share/product_negative"] >= 0.1, shares
    assert off["grad_share/product_negative"] == 0.0 and off["grad_share/joint_negative"] >= 0.1, off


def test_ithp_default_kl_is_nonzero_and_carries_gradient() -> None:
    full, ablated = pair("ithp", {"bottleneck": False}, "regression", {})
    out = full.train()(make_batch())
    assert out.losses["kl0"].item() > 0 and out.losses["kl1"].item() > 0
    assert full.mechanism(make_batch())["grad_share/kl0"] > 0
    assert ablated.mechanism(make_batch())["grad_share/kl0"] == 0.0


def test_bc_pmjrs_default_mi_terms_reach_the_encoders() -> None:
    model = pair("bc_pmjrs", {}, "regression", {})[0].train()
    out = model(make_batch())
    encoders = [p for p in model.encoders.parameters()]
    for key in ("mi_min", "mi_max"):
        grads = torch.autograd.grad(out.losses[key], encoders, retain_graph=True, allow_unused=True)
        assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0, key
    shares = model.mechanism(make_batch())
    assert shares["grad_share/mi_min"] > 0 and shares["grad_share/mi_max"] > 0
    assert set(shares) == {"grad_share/task", "grad_share/mi_min", "grad_share/mi_max"}  # q's own fit left out
    assert sum(shares.values()) == pytest.approx(1.0)


def test_mim_default_gates_carry_gradient_to_the_mask_learners() -> None:
    model = pair("mim", {}, "regression", {})[0].train()
    out = model(make_batch())
    upn = list(model.upn.parameters())
    grads = torch.autograd.grad(out.losses["purified"] + out.losses["penalty"], upn, allow_unused=True)
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0
    assert model.mechanism(make_batch())["grad_share/penalty"] > 0
