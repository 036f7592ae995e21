"""Every model under CPU autocast (fp16 and bf16), and the estimators' fp32 islands.

CPU autocast stands in for CUDA's: the same ops run in the low dtype, so a constant that fp16 cannot hold
(``masked_fill(-1e9)``) or a reduction left in bf16 shows up here without a GPU.
"""

from __future__ import annotations

import pytest
import torch
from test_models import NAMES, make_batch, tiny

from fusion.estimators.club import CLUB, club_bound
from fusion.estimators.infonce import infonce_from_scores
from fusion.estimators.mine import dv_bound, log_mean_exp
from fusion.estimators.tcmax import factorised_log_partition, squared_error_bound, tcmax_bound
from fusion.estimators.vib import gaussian_kl, reparameterise

DTYPES = [torch.float16, torch.bfloat16]


def batch_with_missing(seed: int) -> dict[str, torch.Tensor]:
    batch = make_batch(seed=seed)
    batch["audio_mask"][2] = False  # sample 2 has no audio
    batch["video_mask"][4] = False  # sample 4 has no video
    return batch


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_models_train_and_evaluate_under_autocast(name: str, dtype: torch.dtype) -> None:
    model = tiny(name)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.Adam(model.param_groups(lr=1e-2))
    model.train()
    for step in range(3):
        with torch.autocast("cpu", dtype=dtype):
            out = model(batch_with_missing(seed=step))
        losses = {k: v.float() for k, v in out.losses.items()}
        assert all(torch.isfinite(v) for v in losses.values()), losses
        opt.zero_grad()
        sum(losses.values()).backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
    moved = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert len(moved) > len(before) // 2, f"only {moved} changed"
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        out = model(batch_with_missing(seed=9))
    assert torch.isfinite(out.prediction.float()).all()
    assert all(torch.isfinite(v.float()).all() for v in out.losses.values())


def test_bc_pmjrs_fusion_weights_with_no_modality_under_fp16() -> None:
    model = tiny("bc_pmjrs").eval()
    batch = make_batch()
    for m in ("text", "audio", "video"):
        batch[f"{m}_mask"][3] = False  # sample 3 has nothing
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        out = model(batch)
    assert torch.isfinite(out.prediction.float()).all()


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        "scores": torch.randn(7, 7, generator=g) * 30,  # large enough that a bf16 logsumexp would drift
        "mu": torch.randn(7, 5, generator=g),
        "logvar": torch.randn(7, 5, generator=g) * 3,
        "y": torch.randn(7, 5, generator=g),
        "logits": [torch.randn(7, 3, generator=g) * 20 for _ in range(3)],
        "labels": torch.tensor([0, 1, 2, 1, 0, 2, 1]),
        "h": torch.randn(7, generator=g) * 3,
        "target": torch.randn(7, generator=g) * 2,
        "h_negative": torch.randn(343, generator=g) * 3,
        "centres": torch.linspace(-3, 3, 7),
        "weight": torch.tensor([1, 1, 0, 1, 1, 0, 1], dtype=torch.bool),
    }


ESTIMATES = {
    "log_mean_exp": lambda d: log_mean_exp(d["scores"]),
    "dv_bound": lambda d: dv_bound(d["scores"].diagonal(), d["scores"]),
    "infonce": lambda d: infonce_from_scores(d["scores"]),
    "gaussian_kl": lambda d: gaussian_kl(d["mu"], d["logvar"]),
    "club_all": lambda d: club_bound(d["mu"], d["logvar"], d["y"]).estimate,
    "club_weighted": lambda d: club_bound(d["mu"], d["logvar"], d["y"], weight=d["weight"]).estimate,
    "log_partition": lambda d: factorised_log_partition(d["logits"]),
    "tcmax_bound": lambda d: tcmax_bound(d["logits"], d["labels"]).estimate,
    "squared_error": lambda d: squared_error_bound(d["h"], d["target"], d["h_negative"], d["centres"]).estimate,
}


@pytest.mark.parametrize("name", list(ESTIMATES))
def test_estimators_compute_in_float32_under_bf16_autocast(name: str) -> None:
    inputs = _inputs()
    reference = ESTIMATES[name](inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = ESTIMATES[name](inputs)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, reference, atol=1e-6, rtol=1e-6)
    # bf16 inputs (what an autocast critic hands over) give the fp32 value of those same numbers
    low = {k: [t.bfloat16() for t in v] if isinstance(v, list) else v for k, v in inputs.items()}
    for k in ("scores", "mu", "logvar", "y", "h", "target", "h_negative"):
        low[k] = inputs[k].bfloat16()
    upcast = {k: [t.float() for t in v] if isinstance(v, list) else v.float() for k, v in low.items()}
    upcast["labels"], upcast["weight"] = inputs["labels"], inputs["weight"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = ESTIMATES[name](low)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, ESTIMATES[name](upcast), atol=1e-6, rtol=1e-6)


def test_club_weight_equals_dropping_rows() -> None:
    d = _inputs()
    keep = d["weight"]
    torch.testing.assert_close(
        club_bound(d["mu"], d["logvar"], d["y"], weight=keep).estimate,
        club_bound(d["mu"][keep], d["logvar"][keep], d["y"][keep]).estimate,
    )
    club = CLUB(5, 5, 9)
    torch.testing.assert_close(
        club.learning_loss(d["mu"], d["y"], keep), club.learning_loss(d["mu"][keep], d["y"][keep])
    )


def test_reparameterised_sample_is_float32_noise() -> None:
    d = _inputs()
    torch.manual_seed(0)
    reference = reparameterise(d["mu"], d["logvar"])
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = reparameterise(d["mu"].bfloat16(), d["logvar"].bfloat16())
    assert z.dtype == torch.float32
    torch.manual_seed(0)
    expected = d["mu"].bfloat16().float() + torch.exp(0.5 * d["logvar"].bfloat16().float()) * torch.randn(7, 5)
    torch.testing.assert_close(z, expected, atol=1e-6, rtol=1e-6)
    assert reference.dtype == torch.float32
