"""Donsker-Varadhan (DV) and MINE (Belghazi et al. 2018): lower bounds on I(X; Y).

The DV representation of KL(p(x, y) || p(x) p(y)) gives, for any critic T,

    I(X; Y) >= E_p(x,y)[T] - log E_p(x)p(y)[exp T].

Positives are the batch pairs (x_i, y_i); negatives are shuffled pairs (x_i, y_perm(i)) drawn from the
product of marginals, or all B(B - 1) off-diagonal pairs. The log-mean-exp uses logsumexp, so it is
stable for any critic scale. On a finite batch, log-mean-exp is biased low (Jensen), which biases the
estimate *up* by O(1/N) for N negatives; use many negatives when the number itself matters.

MINE keeps the same estimate but corrects the biased mini-batch gradient of log E[exp T]: the denominator
E[exp T] is replaced by an exponential moving average across batches (kept in log space).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fusion.estimators.critics import Critic, Estimate, build_critic, derangement, full_precision, log_count


def log_mean_exp(scores: Tensor) -> Tensor:
    """log( mean(exp(scores)) ) over all entries, in float32 (autocast off), via logsumexp."""
    with full_precision(scores.device):
        flat = scores.float().reshape(-1)
        return torch.logsumexp(flat, dim=0) - log_count(flat)


def dv_bound(positive: Tensor, negative: Tensor) -> Tensor:
    """DV lower bound in nats: mean(positive) - log mean exp(negative). Any shapes; all entries used."""
    with full_precision(positive.device):
        return positive.float().mean() - log_mean_exp(negative)


def negative_scores(critic: Critic, x: Tensor, y: Tensor, negatives: str) -> Tensor:
    """Critic scores on product-of-marginals pairs: ``shuffle`` gives (B,), ``all`` gives (B(B - 1),)."""
    b = x.shape[0]
    if negatives == "shuffle":
        return critic(x, y[derangement(b, device=y.device)])
    if negatives == "all":
        scores = critic.matrix(x, y)
        off_diagonal = ~torch.eye(b, dtype=torch.bool, device=scores.device)
        return scores[off_diagonal]
    raise ValueError(f"unknown negatives {negatives!r}; valid: 'shuffle', 'all'")


class DV(nn.Module):
    """Plain Donsker-Varadhan estimator with its own critic.

    ``forward(x, y)`` with x (B, Dx), y (B, Dy) returns ``Estimate(estimate, loss)``: ``estimate`` is a
    lower bound on I(X; Y) in nats (up to the finite-batch bias above); ``loss = -estimate``.
    ``negatives``: ``shuffle`` (one shuffled pair per sample, O(B)) or ``all`` (every off-diagonal pair,
    O(B^2) critic calls, lower variance).
    """

    def __init__(
        self,
        x_dim: int,
        y_dim: int,
        critic: str | Critic = "concat",
        hidden_dim: int = 64,
        negatives: str = "shuffle",
    ) -> None:
        super().__init__()
        if negatives not in ("shuffle", "all"):
            raise ValueError(f"unknown negatives {negatives!r}; valid: 'shuffle', 'all'")
        self.critic = build_critic(critic, x_dim, y_dim, hidden_dim)
        self.negatives = negatives

    def scores(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """(positive (B,), negative (N,)) critic scores for a batch."""
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x and y must have the same batch size, got {x.shape[0]} and {y.shape[0]}")
        return self.critic(x, y), negative_scores(self.critic, x, y, self.negatives)

    def forward(self, x: Tensor, y: Tensor) -> Estimate:
        positive, negative = self.scores(x, y)
        estimate = dv_bound(positive, negative)
        return Estimate(estimate, -estimate)


class MINE(DV):
    """MINE: the DV estimate with the moving-average gradient correction.

    The loss's *value* is ``-estimate`` (same as DV), but its gradient with respect to the critic is

        -grad E_p[T] + grad E_q[exp T] / EMA(E_q[exp T]),

    i.e. the mini-batch denominator of grad log E_q[exp T] is replaced by an exponential moving average with
    rate ``ema_rate`` (the first batch initialises it). The average is updated only in training mode with
    gradients enabled, and is stored in log space in the ``log_ema`` buffer so large critic values never
    overflow.
    """

    def __init__(
        self,
        x_dim: int,
        y_dim: int,
        critic: str | Critic = "concat",
        hidden_dim: int = 64,
        negatives: str = "shuffle",
        ema_rate: float = 0.01,
    ) -> None:
        super().__init__(x_dim, y_dim, critic, hidden_dim, negatives)
        if not 0.0 < ema_rate <= 1.0:
            raise ValueError(f"ema_rate must be in (0, 1], got {ema_rate}")
        self.ema_rate = ema_rate
        self.register_buffer("log_ema", torch.tensor(float("nan")))

    def forward(self, x: Tensor, y: Tensor) -> Estimate:
        positive, negative = self.scores(x, y)
        log_batch = log_mean_exp(negative)
        estimate = positive.float().mean() - log_batch
        if not (self.training and torch.is_grad_enabled()):
            return Estimate(estimate, -estimate)
        with torch.no_grad():
            if self.ema_rate < 1.0:
                decayed = self.log_ema + math.log1p(-self.ema_rate)
                mixed = torch.logaddexp(decayed, log_batch + math.log(self.ema_rate))
                self.log_ema.copy_(torch.where(torch.isnan(self.log_ema), log_batch, mixed))
            else:
                self.log_ema.copy_(log_batch)
        # ratio = mean(exp T) / EMA has gradient grad(mean exp T) / EMA; adding (ratio - ratio.detach()),
        # which is zero in value, swaps in the corrected gradient while the loss's value stays -estimate.
        ratio = torch.exp(log_batch - self.log_ema)
        loss = -positive.float().mean() + log_batch.detach() + (ratio - ratio.detach())
        return Estimate(estimate, loss)
