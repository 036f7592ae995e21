"""Gaussian variational information bottleneck (Alemi et al. 2017), as used by ITHP.

An encoder head maps features h to q(z | h) = N(mu, diag sigma^2). With the prior r(z) = N(0, I),

    I(H; Z) <= E_h KL(q(z | h) || r(z)),   KL = 0.5 * sum_d (mu_d^2 + sigma_d^2 - log sigma_d^2 - 1),

so the KL term is an upper bound on the information the bottleneck keeps; it is a loss to minimise
(``loss = +kl``). The KL is summed over latent dimensions and averaged over valid positions.

Masks, (B, T) or (B,) for pooled inputs, follow the convention of shards/schema.py (True = valid). Padded
positions never contribute to the KL.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from fusion.estimators.critics import Estimate, full_precision


class VIBOutput(NamedTuple):
    """``z`` (..., Dz) the bottleneck sample (the mean in eval mode); ``mu``, ``logvar`` (..., Dz);
    ``kl`` the scalar KL(q || N(0, I)), summed over Dz and averaged over valid positions."""

    z: Tensor
    mu: Tensor
    logvar: Tensor
    kl: Tensor


def gaussian_kl(mu: Tensor, logvar: Tensor, mask: Tensor | None = None) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) summed over the last dim, averaged over valid positions.

    mu, logvar: (B, D) or (B, T, D); mask: None, (B,) or (B, T) bool with True = valid. Returns a float32
    scalar; 0 when no position is valid.
    """
    with full_precision(mu.device):
        mu, logvar = mu.float(), logvar.float()
        per_position = 0.5 * (mu**2 + logvar.exp() - logvar - 1.0).sum(-1)
    if mask is None:
        return per_position.mean()
    if mask.shape != per_position.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match positions {tuple(per_position.shape)}")
    mask = mask.to(torch.bool)
    # where(), not multiplication, so NaN/inf in padded positions cannot leak into the sum.
    total = torch.where(mask, per_position, torch.zeros_like(per_position)).sum()
    return total / mask.sum().clamp_min(1)


def reparameterise(mu: Tensor, logvar: Tensor) -> Tensor:
    """A draw z = mu + exp(logvar / 2) * eps, eps ~ N(0, I), of the shape of mu (..., D); always float32.

    The noise is drawn and the sample formed in float32 with autocast off: bf16 would keep 8 bits of eps,
    and fp16 ``exp`` overflows for logvar above ~22.
    """
    with full_precision(mu.device):
        mu, logvar = mu.float(), logvar.float()
        return mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, device=mu.device, dtype=torch.float32)


class GaussianVIB(nn.Module):
    """Gaussian bottleneck head: h (B, Din) or (B, T, Din) -> ``VIBOutput`` with z (..., Dz).

    Training mode draws z = mu + sigma * eps (``reparameterise``: float32 under autocast); eval mode returns
    z = mu, so evaluation is deterministic. z at padded positions is computed like any other (mask it
    downstream); only the KL
    ignores them. ``estimate(h, mask)`` returns ``Estimate(kl, kl)``: an upper bound on I(H; Z) and the
    loss to minimise.
    """

    def __init__(self, in_dim: int, latent_dim: int) -> None:
        super().__init__()
        self.head = nn.Linear(in_dim, 2 * latent_dim)
        self.latent_dim = latent_dim

    def forward(self, h: Tensor, mask: Tensor | None = None) -> VIBOutput:
        mu, logvar = self.head(h).chunk(2, dim=-1)
        if self.training:
            z = reparameterise(mu, logvar)
        else:
            z = mu
        return VIBOutput(z, mu, logvar, gaussian_kl(mu, logvar, mask))

    def estimate(self, h: Tensor, mask: Tensor | None = None) -> Estimate:
        kl = self(h, mask).kl
        return Estimate(kl, kl)
