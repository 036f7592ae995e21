"""CLUB (Cheng et al. 2020): a contrastive log-ratio upper bound on I(X; Y), for MI minimisation.

With a variational Gaussian q(y | x) = N(mu(x), diag exp(logvar(x))),

    I_CLUB = E_p(x,y)[log q(y | x)] - E_p(x) E_p(y)[log q(y | x)]  >=  I(X; Y)

whenever q is close enough to p(y | x) (exactly: when KL(p(x, y) || q(y | x) p(x)) <= KL(p(x) p(y) ||
q(y | x) p(x)), which holds once q is fitted). So the usual loop alternates:

1. ``learning_loss(x, y)``: the negative log-likelihood of q on the joint pairs; minimise it with the
   estimator's own optimiser group (inputs are detached inside, so it only trains q);
2. ``forward(x, y)``: the CLUB estimate; its ``loss = +estimate`` is minimised by the *encoders* producing x
   and y (step only their optimiser group with it).

The negative term uses all B x B pairs in closed form (``negatives="all"``, O(B D) memory since
E_j (y_j - mu_i)^2 = Var_batch(y) + (mean(y) - mu_i)^2), or one shuffled y per x (``"sample"``, CLUB-S).

The bound only holds for a fitted q, and a q that takes one small step per encoder step lags behind moving
representations: its estimate is then not an MI estimate at all. ``club_lag`` checks this: it fits a fresh
copy of q (``refit_club``) to held-out, detached pairs and reports both estimates and their gap.
"""

from __future__ import annotations

import copy
import math
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from fusion.estimators.critics import Estimate, derangement, full_precision, mlp

LOG_2PI = math.log(2.0 * math.pi)


class CLUB(nn.Module):
    """CLUB estimator. x (B, Dx), y (B, Dy); row i of each is one joint sample.

    ``forward`` returns ``Estimate(estimate, loss)`` with ``estimate`` an upper bound on I(X; Y) in nats
    (once q is fitted) and ``loss = +estimate`` (minimise it to reduce the MI between x and y).
    """

    def __init__(self, x_dim: int, y_dim: int, hidden_dim: int = 64, negatives: str = "all") -> None:
        super().__init__()
        if negatives not in ("all", "sample"):
            raise ValueError(f"unknown negatives {negatives!r}; valid: 'all', 'sample'")
        self.mu = mlp(x_dim, hidden_dim, y_dim, num_layers=1)
        # tanh keeps the log-variance in (-10, 10) so an early, badly fitted q cannot blow up the ratio.
        self.logvar = nn.Sequential(mlp(x_dim, hidden_dim, y_dim, num_layers=1), nn.Tanh())
        self.logvar_scale = 10.0
        self.negatives = negatives

    def gaussian(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(mu, logvar) of q(y | x), each (B, Dy), in float32."""
        return self.mu(x).float(), self.logvar_scale * self.logvar(x).float()

    def log_likelihood(self, x: Tensor, y: Tensor) -> Tensor:
        """log q(y_i | x_i) for each row, (B,), including the Gaussian normalising constant."""
        mu, logvar = self.gaussian(x)
        with full_precision(mu.device):
            return -0.5 * (((y.float() - mu) ** 2) / logvar.exp() + logvar + LOG_2PI).sum(-1)

    def learning_loss(self, x: Tensor, y: Tensor, weight: Tensor | None = None) -> Tensor:
        """Mean negative log-likelihood of q on the joint pairs (scalar), over the rows with ``weight`` (B,)
        (bool or float; None = all). Trains q only: inputs are detached."""
        nll = -self.log_likelihood(x.detach(), y.detach())
        if weight is None:
            return nll.mean()
        weight = weight.to(nll.dtype)
        return (nll * weight).sum() / weight.sum().clamp_min(1e-12)

    def forward(self, x: Tensor, y: Tensor, weight: Tensor | None = None) -> Estimate:
        """The estimate over the rows of x, y, or over the rows with ``weight`` (B,) (bool or float; None = all)."""
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x and y must have the same batch size, got {x.shape[0]} and {y.shape[0]}")
        mu, logvar = self.gaussian(x)
        return club_bound(mu, logvar, y, self.negatives, weight)


def club_bound(mu: Tensor, logvar: Tensor, y: Tensor, negatives: str = "all", weight: Tensor | None = None) -> Estimate:
    """The CLUB estimate from q(y | x) = N(mu, exp(logvar)) (B, Dy) and y (B, Dy), in float32 with autocast off.

    ``weight`` (B,) restricts every mean (the positives, the batch mean and variance of y, the negatives) to
    the rows with weight, as if the others were not in the batch; it takes no host sync, so a compiled model
    need not index rows out. ``"sample"`` negatives ignore it.
    """
    with full_precision(mu.device):
        mu, logvar, y = mu.float(), logvar.float(), y.float()
        w = torch.ones_like(y[:, 0]) if weight is None else weight.to(torch.float32)
        w = (w / w.sum().clamp_min(1e-12))[:, None]  # (B, 1), sums to 1 over the rows that count
        inv_var = torch.exp(-logvar)
        # The log-variance and 2*pi terms are identical for positive and negative pairs and cancel.
        positive = -0.5 * (((y - mu) ** 2) * inv_var).sum(-1)
        if negatives == "all":
            y_mean = (y * w).sum(0, keepdim=True)
            y_var = (((y - y_mean) ** 2) * w).sum(0, keepdim=True)
            negative = -0.5 * ((y_var + (y_mean - mu) ** 2) * inv_var).sum(-1)
        else:
            y_neg = y[derangement(y.shape[0], device=y.device)]
            negative = -0.5 * (((y_neg - mu) ** 2) * inv_var).sum(-1)
        estimate = ((positive - negative) * w[:, 0]).sum()
        return Estimate(estimate, estimate)


class Lag(NamedTuple):
    """``club_lag``'s result, CLUB estimates in nats on the evaluation pairs."""

    running: float  # with the q being trained alongside the encoders
    refit: float  # with a fresh q fitted to held-out pairs (``refit_club``)
    gap: float  # running - refit: negative when the running q under-estimates (lags behind the encoders)


def refit_club(
    club: CLUB,
    x: Tensor,
    y: Tensor,
    steps: int = 600,
    lr: float = 3e-3,
    batch_size: int = 256,
    holdout: float = 0.25,
    seed: int = 0,
) -> CLUB:
    """A fresh copy of ``club`` (same architecture, re-initialised) fitted to the pairs x (N, Dx), y (N, Dy).

    Adam for ``steps`` mini-batch steps on the first ``1 - holdout`` of the rows (detached). The parameters with
    the best log-likelihood on the last ``holdout`` of the rows (checked every ``steps // 20`` steps) are kept:
    a q that memorises its fitting pairs grows over-confident, and an over-confident q makes the estimate on
    new pairs noisy by tens of nats even for independent x and y. The global RNG is left untouched.
    """
    x, y = x.detach().float(), y.detach().float()
    cut = int(round(len(x) * (1.0 - holdout)))
    if cut < 2 or len(x) - cut < 2:
        raise ValueError(f"refit_club needs >= 2 fitting and >= 2 held-out pairs; got {len(x)} rows, {holdout=}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = copy.deepcopy(club).cpu()
        for module in fresh.modules():
            if isinstance(module, nn.Linear):
                module.reset_parameters()
    fresh = fresh.to(x.device).train()
    for p in fresh.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(fresh.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    check = max(1, steps // 20)
    best, best_state = -math.inf, copy.deepcopy(fresh.state_dict())
    for step in range(1, steps + 1):
        index = torch.randint(0, cut, (min(batch_size, cut),), generator=generator).to(x.device)
        loss = fresh.learning_loss(x[index], y[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % check == 0 or step == steps:
            with torch.no_grad():
                held_out = float(fresh.log_likelihood(x[cut:], y[cut:]).mean())
            if held_out > best:
                best, best_state = held_out, copy.deepcopy(fresh.state_dict())
    fresh.load_state_dict(best_state)
    return fresh.eval()


@torch.no_grad()
def club_estimate(club: CLUB, x: Tensor, y: Tensor) -> float:
    """The CLUB estimate in nats of ``club`` on x (N, Dx), y (N, Dy), with gradients off."""
    return float(club(x.float(), y.float()).estimate)


def club_lag(club: CLUB, fit: tuple[Tensor, Tensor], held_out: tuple[Tensor, Tensor], **refit: Any) -> Lag:
    """Does the running q of ``club`` still give an MI estimate? Fit a fresh q to the ``fit`` pairs
    ((N, Dx), (N, Dy), detached; ``refit`` goes to ``refit_club``), then compare both estimates on the
    ``held_out`` pairs. A gap of many nats means the running q lags behind the representations it scores."""
    fresh = refit_club(club, *fit, **refit)
    running, fitted = club_estimate(club, *held_out), club_estimate(fresh, *held_out)
    return Lag(running, fitted, running - fitted)
