"""The reported MI measures (fusion.estimators.measure) against closed forms: correlated Gaussians, a nonlinear
dependence, the redundancy claim task's cap, and ``redundancy_measures`` on a tiny BC-PMJRS."""

from __future__ import annotations

import math

import pytest
import torch

from bench.claim_tasks import LENGTHS, TASKS, make_data
from bench.synthetic import redundancy_measures
from fusion import build_model
from fusion.estimators import heldout_infonce, linear_gaussian_mi, redundancy
from fusion.estimators.measure import gaussian_mi_bias
from fusion.layers import masked_mean

RHO = torch.tensor([0.9, 0.6, 0.3, 0.0], dtype=torch.float64)
CLOSED = float(-0.5 * torch.log1p(-(RHO**2)).sum())  # 1.1007 nats


def embed(z: torch.Tensor, rank: int, g: torch.Generator) -> torch.Tensor:
    """z (N, 4) plus rank - 4 independent noise dims, scaled by factors in [0.3, 3] and rotated into 32 dims
    (rank < 32: a representation of rank < its width). An injective linear map: the MI is unchanged."""
    full = torch.cat([z, torch.randn(len(z), rank - 4, generator=g, dtype=z.dtype)], 1)
    scales = torch.empty(rank, dtype=z.dtype).uniform_(math.log(0.3), math.log(3.0), generator=g).exp()
    basis, _ = torch.linalg.qr(torch.randn(32, rank, generator=g, dtype=z.dtype))
    return ((full * scales) @ basis.T).float()


def correlated(n: int, seed: int = 0, independent: bool = False, rank: int = 32):
    """(x_fit, y_fit, x_eval, y_eval), n rows each: per-dimension correlations RHO between the 4 latent dims."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(2 * n, 4, generator=g, dtype=torch.float64)
    b = RHO * a + (1 - RHO**2).sqrt() * torch.randn(2 * n, 4, generator=g, dtype=torch.float64)
    if independent:
        b = b[torch.randperm(2 * n, generator=g)]
    x, y = embed(a, rank, g), embed(b, rank, g)
    return x[:n], y[:n], x[n:], y[n:]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("rank", [32, 12])
def test_linear_gaussian_mi_matches_the_closed_form(rank: int) -> None:
    x_fit, y_fit, x_eval, y_eval = correlated(2000, rank=rank)
    held_out = linear_gaussian_mi(x_fit, y_fit, x_eval, y_eval)
    in_sample = linear_gaussian_mi(x_fit, y_fit)  # bias-corrected
    assert held_out == pytest.approx(CLOSED, abs=0.1)  # measured 1.063 (rank 32), 1.088 (rank 12)
    assert in_sample == pytest.approx(CLOSED, abs=0.1)  # measured 1.084, 1.099
    x_fit, y_fit, x_eval, y_eval = correlated(2000, independent=True, rank=rank)
    assert 0.0 <= linear_gaussian_mi(x_fit, y_fit, x_eval, y_eval) < 0.05  # measured 0.004, 0.002
    assert 0.0 <= linear_gaussian_mi(x_fit, y_fit) < 0.05


def test_gaussian_mi_bias_matches_monte_carlo() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2000, 40, 8, generator=g, dtype=torch.float64)  # 2000 draws of 40 rows, p = 3, q = 5
    cov = torch.stack([torch.cov(sample.T) for sample in z])
    plug_in = 0.5 * (cov[:, :3, :3].logdet() + cov[:, 3:, 3:].logdet() - cov.logdet())
    assert float(plug_in.mean()) == pytest.approx(gaussian_mi_bias(40, 3, 5), abs=0.01)  # 0.218 nats


def test_heldout_infonce_is_a_tight_lower_bound_on_gaussians() -> None:
    x_fit, y_fit, x_eval, y_eval = correlated(2000)
    state = torch.random.get_rng_state()
    value = heldout_infonce(x_fit, y_fit, x_eval, y_eval)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
    assert CLOSED - 0.3 <= value <= CLOSED + 0.1  # measured 1.022
    assert heldout_infonce(x_fit, y_fit, x_eval, y_eval) == value  # deterministic
    x_fit, y_fit, x_eval, y_eval = correlated(2000, independent=True)
    assert abs(heldout_infonce(x_fit, y_fit, x_eval, y_eval)) < 0.05  # measured -0.022


def squared_pair_mi(noise: float) -> float:
    """I(a; a^2 + noise * e) for a, e ~ N(0, 1), by quadrature: h(y) - h(noise * e), y's density integrated over a."""
    a = torch.linspace(-8, 8, 4001, dtype=torch.float64)
    y = torch.linspace(-3, 40, 8001, dtype=torch.float64)
    phi_a = torch.exp(-0.5 * a**2) / math.sqrt(2 * math.pi)
    kernel = torch.exp(-0.5 * ((y[:, None] - a[None] ** 2) / noise) ** 2) / (noise * math.sqrt(2 * math.pi))
    density = (kernel * phi_a).sum(1) * (a[1] - a[0])
    h_y = float(-(density * density.clamp_min(1e-300).log()).sum() * (y[1] - y[0]))
    return h_y - 0.5 * math.log(2 * math.pi * math.e * noise**2)


def test_heldout_infonce_sees_dependence_the_linear_estimate_cannot() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 2, generator=g)
    b = a**2 - 1 + 0.3 * torch.randn(4000, 2, generator=g)  # uncorrelated with a, yet 2.28 nats of MI
    x = torch.cat([a, torch.randn(4000, 3, generator=g)], 1)
    y = torch.cat([b, torch.randn(4000, 3, generator=g)], 1)
    truth = 2 * squared_pair_mi(0.3)
    assert linear_gaussian_mi(x[:2000], y[:2000], x[2000:], y[2000:]) < 0.05
    assert (
        1.0 < heldout_infonce(x[:2000], y[:2000], x[2000:], y[2000:]) <= truth + 0.1
    )  # measured 1.97 (0.0005 without the residual)


def redundancy_cap(noise: float = 1.0, norm: float = 2.0) -> tuple[float, float]:
    """(cap, gaussian) for the redundancy task. Text and audio share only c; a text sequence of L steps
    c d + u1 d' + noise e_t (|d| = norm, d' orthogonal to d) holds c only through c + N(0, s) with s = noise^2 / (norm^2 L)
    (its masked time mean projected on d is sufficient), likewise audio. So for any representations of the two,
    I <= E_{L_t, L_a} I_L with I_L = -1/2 log(1 - 1 / ((1 + s_t)(1 + s_a))) (lengths uniform on LENGTHS, shown by
    the lengths being independent of everything else). ``gaussian``: the same formula at the mean s, the
    linear-Gaussian MI of the time means."""
    lt, la = range(LENGTHS["text"][0], LENGTHS["text"][1] + 1), range(LENGTHS["audio"][0], LENGTHS["audio"][1] + 1)

    def mi(s_t: float, s_a: float) -> float:
        return -0.5 * math.log(1 - 1 / ((1 + s_t) * (1 + s_a)))

    def s(length: float) -> float:
        return noise**2 / (norm**2 * length)

    cap = sum(mi(s(t), s(a)) for t in lt for a in la) / (len(lt) * len(la))
    gaussian = mi(sum(s(t) for t in lt) / len(lt), sum(s(a) for a in la) / len(la))
    return cap, gaussian


def test_both_estimates_respect_the_redundancy_tasks_cap() -> None:
    cap, gaussian = redundancy_cap()
    assert cap == pytest.approx(1.556, abs=1e-3) and gaussian == pytest.approx(1.549, abs=1e-3)
    data = make_data(TASKS["redundancy"], 0, {"valid": 500, "test": 1000})
    u = {split: {m: masked_mean(d[m], d[f"{m}_mask"]) for m in ("text", "audio")} for split, d in data.items()}
    assert u["valid"]["text"].shape == (500, 16) and u["valid"]["audio"].shape == (500, 12)
    present = {split: {m: torch.ones(len(d["label"]), dtype=torch.bool) for m in u[split]} for split, d in data.items()}
    out = redundancy(u["valid"], present["valid"], u["test"], present["test"], [("text", "audio")])
    assert set(out) == {"mi_linear/text-audio", "mi_infonce/text-audio"}
    assert out["mi_linear/text-audio"] == pytest.approx(gaussian, abs=0.1)  # measured 1.543
    assert cap - 0.3 <= out["mi_infonce/text-audio"] <= cap + 0.05  # measured 1.521
    assert out["mi_linear/text-audio"] <= cap + 0.05


def test_redundancy_skips_pairs_with_too_few_rows() -> None:
    x_fit, y_fit, x_eval, y_eval = correlated(100)
    few = torch.arange(100) < 10
    has = {"text": torch.ones(100, dtype=torch.bool), "audio": few}
    assert (
        redundancy({"text": x_fit, "audio": y_fit}, has, {"text": x_eval, "audio": y_eval}, has, [("text", "audio")])
        == {}
    )


def test_redundancy_measures_on_a_tiny_bc_pmjrs() -> None:
    task = TASKS["redundancy"]
    data = make_data(task, 0, {"valid": 64, "test": 96})  # the claims benchmark's quick sizes
    torch.manual_seed(0)
    dims = {m: task.dims[m] for m in task.modalities}  # text and audio: the model's one pair
    model = build_model("bc_pmjrs", dims=dims, hidden=15, num_heads=3, num_layers=1, club_hidden=11)
    model.train()
    out = redundancy_measures(model, data)
    assert model.training  # restored
    assert set(out) == {"mi_linear/text-audio", "mi_infonce/text-audio"}
    cap, _ = redundancy_cap()
    assert all(math.isfinite(v) and v < cap + 0.1 for v in out.values()), out
    assert redundancy_measures(object(), data) == {}
