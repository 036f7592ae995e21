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
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fusion.estimators.critics import Estimate, derangement, mlp

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
        return -0.5 * (((y.float() - mu) ** 2) / logvar.exp() + logvar + LOG_2PI).sum(-1)

    def learning_loss(self, x: Tensor, y: Tensor) -> Tensor:
        """Mean negative log-likelihood of q on the joint pairs (scalar). Trains q only: inputs are detached."""
        return -self.log_likelihood(x.detach(), y.detach()).mean()

    def forward(self, x: Tensor, y: Tensor) -> Estimate:
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x and y must have the same batch size, got {x.shape[0]} and {y.shape[0]}")
        mu, logvar = self.gaussian(x)
        y = y.float()
        inv_var = torch.exp(-logvar)
        # The log-variance and 2*pi terms are identical for positive and negative pairs and cancel.
        positive = -0.5 * (((y - mu) ** 2) * inv_var).sum(-1)
        if self.negatives == "all":
            y_mean = y.mean(0, keepdim=True)
            y_var = ((y - y_mean) ** 2).mean(0, keepdim=True)
            negative = -0.5 * ((y_var + (y_mean - mu) ** 2) * inv_var).sum(-1)
        else:
            y_neg = y[derangement(y.shape[0], device=y.device)]
            negative = -0.5 * (((y_neg - mu) ** 2) * inv_var).sum(-1)
        estimate = (positive - negative).mean()
        return Estimate(estimate, estimate)
