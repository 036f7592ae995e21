"""BC-PMJRS reconstruction: gradient routing of the CLUB terms, per-sample attention, the LTP/LTD rule by hand."""

from __future__ import annotations

import pytest
import torch

from fusion import FusionConfigError, build_model
from fusion.models.bc_pmjrs import MissingMetricError
from fusion.synthetic import SyntheticTask, take
from train.trainer import clip_grad_norm_per_group

DIMS = {"text": 9, "audio": 7, "video": 5}


def tiny(dims=DIMS, **extra):
    torch.manual_seed(0)
    settings = {"dims": dict(dims), "hidden": 15, "num_heads": 3, "num_layers": 1, "club_hidden": 11, **extra}
    return build_model("bc_pmjrs", **settings)


def batch_of(b: int = 6, dims=DIMS, seed: int = 0, task: str = "regression"):
    g = torch.Generator().manual_seed(seed)
    batch = {}
    for i, (m, d) in enumerate(dims.items()):
        batch[m] = torch.randn(b, 4 + i, d, generator=g)
        batch[f"{m}_mask"] = torch.ones(b, 4 + i, dtype=torch.bool)
        batch[f"{m}_mask"][1, 2 + i :] = False  # sample 1 is shorter
    if task == "regression":
        batch["label"] = torch.rand(b, generator=g) * 6 - 3
    elif task == "classification":
        batch["label"] = torch.arange(b) % 3
    else:
        batch["label"] = (torch.rand(b, 2, generator=g) > 0.5).float()
    return batch


def grads(loss, params):
    return torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)


def is_zero(grad) -> bool:
    return grad is None or not grad.any()


def test_club_losses_route_gradients_to_their_own_group() -> None:
    model = tiny()
    model.train()
    out = model(batch_of())
    assert {"task", "mi_min", "club_fit", "mi_max"} == set(out.losses)
    club = list(model.clubs.parameters())
    encoders = list(model.encoders.parameters())
    # mi_min (CLUB estimate with q frozen) moves the encoders, never q ...
    assert all(is_zero(g) for g in grads(out.losses["mi_min"], club))
    assert not all(is_zero(g) for g in grads(out.losses["mi_min"], encoders))
    # ... club_fit (q's likelihood on detached inputs) moves q, never anything else
    others = [p for n, p in model.named_parameters() if not n.startswith("clubs.")]
    assert all(is_zero(g) for g in grads(out.losses["club_fit"], others))
    assert all(not is_zero(g) for g in grads(out.losses["club_fit"], club))
    # the task and MI-max terms never reach q
    for key in ("task", "mi_max"):
        assert all(is_zero(g) for g in grads(out.losses[key], club)), key
    groups = model.param_groups(1e-3)
    assert [g["name"] for g in groups] == ["model", "club"]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in club}
    assert groups[1]["lr"] == pytest.approx(1e-3 * model.config.club_lr_scale)  # q's own, higher rate


def test_mi_min_scores_the_unimodal_representations_before_mixing() -> None:
    model = tiny(dropout=0.0).eval()
    batch = batch_of()
    out = model(batch)
    # the CLUB term moves the encoders only: nothing of the global-local step, fusion or head
    mixing = [p for n, p in model.named_parameters() if n.startswith(("global_pools.", "cross.", "joint_proj."))]
    assert all(is_zero(g) for g in grads(out.losses["mi_min"], mixing))
    # and it is CLUB on the time-pooled encoder outputs, which see one modality each
    u, _ = model.unimodal(batch)
    expected = torch.stack([model.clubs[f"{a}_{b}"](u[a], u[b]).estimate for a, b in model.pairs]).mean()
    torch.testing.assert_close(out.losses["mi_min"], model.lambda_min * expected)
    changed = dict(batch, audio=torch.randn_like(batch["audio"]))
    u_changed, _ = model.unimodal(changed)
    torch.testing.assert_close(u_changed["text"], u["text"])  # text's representation ignores the audio


@pytest.mark.parametrize("off", [{"mi_min": False}, {"lambda_min": 0.0}])
def test_mi_min_off_leaves_no_q_to_train(off: dict) -> None:
    model = tiny(**off).train()
    out = model(batch_of())
    assert set(out.losses) == {"task", "mi_max"}
    assert len(model.clubs) == 3 and not any(p.requires_grad for p in model.clubs.parameters())  # built, frozen
    assert [g["name"] for g in model.param_groups(1e-3)] == ["model"]
    assert model.end_epoch({"task_loss": 1.0})["lambda_min"] == 0.0  # LTP/LTD keeps it off
    assert model.club_lag(batch_of(seed=1), batch_of(seed=2), steps=5).keys() == {
        "mi_refit/text-audio",
        "mi_refit/text-video",
        "mi_refit/audio-video",
    }


@pytest.mark.parametrize("off", [{"mi_max": False}, {"lambda_max": 0.0}])
def test_mi_max_off_trains_no_label_critic(off: dict) -> None:
    model = tiny(**off).train()
    out = model(batch_of())
    assert set(out.losses) == {"task", "mi_min", "club_fit"}
    frozen = [*model.infonce.parameters(), *model.label_embedding.parameters()]
    assert frozen and not any(p.requires_grad for p in frozen)  # built (same initialisation), never trained
    trained = {id(p) for g in model.param_groups(1e-3) for p in g["params"]}
    assert not any(id(p) in trained for p in frozen)
    assert "mi_max/infonce" not in out.diagnostics
    assert model.end_epoch({"task_loss": 1.0})["lambda_max"] == 0.0


def test_ltp_ltd_off_keeps_the_weights() -> None:
    model = tiny(ltp_ltd=False, lambda_min=0.2, lambda_max=0.3)
    for loss in (1.0, 0.5, 2.0):
        assert model.end_epoch({"task_loss": loss}) == {}
    assert model.end_epoch({}) == {}  # needs no validation loss either
    assert (model.lambda_min.item(), model.lambda_max.item()) == pytest.approx((0.2, 0.3))


def test_faithful_mode_mixes_samples_like_the_released_code() -> None:
    # The default's per-sample attention is checked for every model in test_models.py.
    batch = batch_of()
    changed = dict(batch)
    for m in DIMS:
        changed[m] = batch[m].clone()
        changed[m][3] = torch.randn_like(batch[m][3]) * 5
    # faithful=True restores the released code's cross-sample attention: sample 0 now depends on sample 3
    faithful = tiny(faithful=True).eval()
    with torch.no_grad():
        before, after = faithful(batch).prediction, faithful(changed).prediction
    assert (after[0] - before[0]).abs() > 1e-6


def test_ltp_ltd_rule_step_by_step() -> None:
    model = tiny(lambda_min=0.1, lambda_max=0.1, ltp_eta=0.5, reset_after=3)
    steps = [  # (val task loss, expected lambda_min, expected lambda_max, LTP?)
        (1.0, 0.05, 0.15, 1.0),  # first epoch improves on +inf: LTP
        (0.8, 0.025, 0.225, 1.0),  # LTP again
        (0.9, 0.0375, 0.1125, 0.0),  # worse than 0.8: LTD
        (0.95, 0.05625, 0.05625, 0.0),  # LTD
        (0.99, 0.1, 0.1, 0.0),  # third LTD in a row: reset to the initial weights
        (0.7, 0.05, 0.15, 1.0),  # the streak starts over; best is still 0.8, so 0.7 improves
    ]
    for loss, lam_min, lam_max, ltp in steps:
        logged = model.end_epoch({"task_loss": loss, "other": 3.0})
        assert logged["lambda_min"] == pytest.approx(lam_min, rel=1e-6)
        assert logged["lambda_max"] == pytest.approx(lam_max, rel=1e-6)
        assert logged["ltp"] == ltp
    assert logged["best_task_loss"] == pytest.approx(0.7)
    assert int(model.ltp_streak) == 1


def test_ltp_ltd_clips_to_bounds_and_keeps_disabled_terms_off() -> None:
    model = tiny(lambda_min=0.02, lambda_max=0.9, ltp_eta=0.5, weight_bounds=(0.01, 1.0))
    logged = model.end_epoch({"task_loss": 1.0})
    assert (logged["lambda_min"], logged["lambda_max"]) == pytest.approx((0.01, 1.0))
    logged = model.end_epoch({"task_loss": 0.5})
    assert (logged["lambda_min"], logged["lambda_max"]) == pytest.approx((0.01, 1.0))  # already at the bounds
    logged = model.end_epoch({"task_loss": float("nan")})  # NaN never improves: LTD
    assert (logged["lambda_min"], logged["lambda_max"]) == pytest.approx((0.015, 0.5))
    off = tiny(lambda_min=0.0, ltp_eta=0.5)
    for loss in (1.0, 2.0, 3.0):
        assert off.end_epoch({"task_loss": loss})["lambda_min"] == 0.0


def test_end_epoch_names_the_missing_metric() -> None:
    model = tiny()
    with pytest.raises(MissingMetricError, match=r"val_metrics\['task_loss'\].*got keys \['loss'\]"):
        model.end_epoch({"loss": 1.0})
    with pytest.raises(KeyError):
        model.end_epoch({})


def test_weights_are_buffers_used_by_the_losses_and_checkpointed() -> None:
    model = tiny(ltp_eta=0.5)
    model.end_epoch({"task_loss": 1.0})  # lambda_min 0.05, lambda_max 0.15
    model.eval()
    with torch.no_grad():
        out = model(batch_of())
    pairs = [out.diagnostics[k] for k in ("mi/text-audio", "mi/text-video", "mi/audio-video")]
    torch.testing.assert_close(out.losses["mi_min"], 0.05 * torch.stack(pairs).mean())
    torch.testing.assert_close(out.losses["mi_max"], -0.15 * out.diagnostics["mi_max/infonce"])
    assert out.diagnostics["lambda_min"].item() == pytest.approx(0.05)
    state = model.state_dict()
    assert {"lambda_min", "lambda_max", "best_task_loss", "ltp_streak"} <= set(state)
    clone = tiny()
    clone.load_state_dict(state)
    assert clone.lambda_max.item() == pytest.approx(0.15) and clone.best_task_loss.item() == 1.0


def test_pairs_with_fewer_than_two_joint_samples_are_skipped() -> None:
    batch = batch_of()
    batch["audio_mask"][1:] = False  # only sample 0 has audio
    model = tiny().train()
    out = model(batch)
    assert torch.isfinite(out.diagnostics["mi/text-video"])
    assert out.diagnostics["mi/text-audio"].isnan() and out.diagnostics["mi/audio-video"].isnan()  # undefined
    assert all(torch.isfinite(v) for v in out.losses.values())
    batch["video_mask"][1:] = False  # now no pair has two joint samples
    out = model(batch)
    assert out.losses["mi_min"].item() == 0.0 and out.losses["club_fit"].item() == 0.0
    single = tiny(dims={"audio": 7})
    out = single(batch_of(dims={"audio": 7}))
    assert set(out.losses) == {"task", "mi_max"}
    assert [g["name"] for g in single.param_groups(1e-3)] == ["model"]
    assert not len(single.clubs) and not len(single.cross) and not len(single.importance)


def test_importance_weights_cover_present_modalities() -> None:
    batch = batch_of()
    batch["video_mask"][2] = False
    model = tiny().eval()
    inputs = model.prepare(batch)
    present = torch.stack([inputs.present[m] for m in model.modalities], 1)
    projected = torch.randn(6, 3, 15)
    weights = model.fusion_weights(projected, present)
    torch.testing.assert_close(weights.sum(1), torch.ones(6))
    assert weights[2, 2] == 0 and (weights[present] > 0).all()
    none = model.fusion_weights(projected[:1], torch.zeros(1, 3, dtype=torch.bool))
    assert torch.equal(none, torch.zeros(1, 3))  # a sample with no modality gets no NaN
    mean = tiny(fusion="mean").eval()
    with torch.no_grad():
        out = mean(batch_of())
    for m in DIMS:
        assert out.diagnostics[f"importance/{m}"].item() == pytest.approx(1 / 3)


@pytest.mark.parametrize("task", ["classification", "multilabel"])
def test_label_embedding_per_task(task: str) -> None:
    extra = {"num_classes": 3 if task == "classification" else 2}
    model = tiny(task=task, **extra).train()
    out = model(batch_of(task=task))
    out.losses["mi_max"].backward()
    assert all(p.grad is not None and p.grad.any() for p in model.label_embedding.parameters())


def test_config_problems_are_collected() -> None:
    with pytest.raises(FusionConfigError) as info:
        tiny(
            num_global=0,
            weight_bounds=(1.0, 0.1),
            lambda_max=-1.0,
            ltp_eta=1.0,
            reset_after=0,
            fusion="concat",
            club_lr_scale=0.0,
        )
    message = str(info.value)
    for text in (
        "num_global",
        "weight_bounds",
        "lambda_max: must be >= 0",
        "ltp_eta",
        "reset_after",
        "fusion",
        "club_lr",
    ):
        assert text in message
    with pytest.raises(FusionConfigError, match="lambda_min: must be 0 \\(off\\) or inside weight_bounds"):
        tiny(lambda_min=2.0)


def test_running_q_keeps_up_and_independent_modalities_read_as_independent() -> None:
    """The lagging-q check. In ``SyntheticTask`` text and audio are independent (s1 vs s2), so the CLUB of their
    representations must stay near 0, and the q trained alongside the encoders must agree with a fresh q
    re-fitted to held-out pairs. Before MI-min moved ahead of the global-local step (and before per-group
    clipping), the same run gave a re-fitted CLUB(text; audio) of 83 nats and a running-minus-refit gap of -90."""
    task = SyntheticTask()
    g = torch.Generator().manual_seed(0)
    train, fit, held_out = task.sample(512, g), task.sample(256, g), task.sample(256, g)
    torch.manual_seed(0)
    model = build_model("bc_pmjrs", dims=dict(task.dims), hidden=16, num_heads=2, dropout=0.0, club_hidden=16)
    optimizer = torch.optim.AdamW(model.param_groups(3e-3), weight_decay=1e-4)
    for _ in range(150):
        out = model(take(train, torch.randint(0, 512, (32,), generator=g)))
        optimizer.zero_grad()
        sum(out.losses.values()).backward()
        clip_grad_norm_per_group(optimizer, 1.0)
        optimizer.step()
    lag = model.club_lag(fit, held_out, steps=300)
    assert abs(lag["mi_refit/text-audio"]) < 1.0  # measured 0.07
    for pair in ("text-audio", "text-video", "audio-video"):
        assert abs(lag[f"mi_gap/{pair}"]) < 2.0, pair  # running and re-fitted agree within 2 nats (measured < 0.6)
