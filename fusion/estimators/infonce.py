"""InfoNCE (van den Oord et al. 2018; Poole et al. 2019): a lower bound on I(X; Y).

For a batch of B i.i.d. pairs and critic scores S (B, B) with S[i, j] = T(x_i, y_j),

    I(X; Y) >= log B - L_NCE,   L_NCE = -(1/B) sum_i log( exp S[i, i] / sum_j exp S[i, j] ).

Because every term log softmax(S[i])[i] <= 0, the estimate can never exceed log B: InfoNCE saturates at
log B, so it is biased low whenever I(X; Y) is comparable to log B. It has low variance, which is why
it is the usual MI-maximisation term.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fusion.estimators.critics import Critic, Estimate, build_critic, full_precision, log_count


def infonce_from_scores(scores: Tensor, valid: Tensor | None = None) -> Tensor:
    """InfoNCE lower bound in nats from a (B, B) score matrix whose diagonal holds the positive pairs.

    Returns ``log B - cross_entropy(scores, diag)`` as a scalar, always <= log B. Computed in float32 with
    autocast off. ``valid`` (B,) bool keeps only those samples, as rows and as negatives (B = their number;
    0 with fewer than 2), without indexing them out: no host sync, so it compiles.
    """
    if scores.ndim != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"InfoNCE needs a square (B, B) score matrix, got shape {tuple(scores.shape)}")
    b = scores.shape[0]
    target = torch.arange(b, device=scores.device)
    with full_precision(scores.device):
        if valid is None:
            return log_count(target) - F.cross_entropy(scores.float(), target)
        valid = valid.to(torch.bool)
        masked = scores.float().masked_fill(~valid[None, :], torch.finfo(torch.float32).min)
        per_row = torch.where(valid, F.cross_entropy(masked, target, reduction="none"), 0.0)
        count = valid.sum().clamp_min(1).float()
        return count.log() - per_row.sum() / count


class InfoNCE(nn.Module):
    """InfoNCE estimator with its own critic.

    ``forward(x, y)`` with x (B, Dx), y (B, Dy) (row i of each is one joint sample) returns
    ``Estimate(estimate, loss)``: ``estimate`` is a lower bound on I(X; Y) in nats, capped at log B;
    ``loss = -estimate`` is what to minimise to tighten the bound (and, through x and y, to maximise MI).

    ``symmetric=True`` averages the x->y and y->x directions (both are valid lower bounds).
    """

    def __init__(
        self,
        x_dim: int,
        y_dim: int,
        critic: str | Critic = "separable",
        hidden_dim: int = 64,
        symmetric: bool = False,
    ) -> None:
        super().__init__()
        self.critic = build_critic(critic, x_dim, y_dim, hidden_dim)
        self.symmetric = symmetric

    def forward(self, x: Tensor, y: Tensor, valid: Tensor | None = None) -> Estimate:
        """The bound over the rows of x, y, or over the rows where ``valid`` (B,) bool is True."""
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x and y must have the same batch size, got {x.shape[0]} and {y.shape[0]}")
        scores = self.critic.matrix(x, y)
        estimate = infonce_from_scores(scores, valid)
        if self.symmetric:
            estimate = 0.5 * (estimate + infonce_from_scores(scores.T, valid))
        return Estimate(estimate, -estimate)
