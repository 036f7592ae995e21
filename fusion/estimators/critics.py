"""Small critic networks T(x, y) shared by the mutual-information estimators, and the result type.

Every critic maps a batch of paired samples ``x`` (B, Dx) and ``y`` (B, Dy) to scores:

- ``critic(x, y)`` -> (B,): the paired scores T(x_i, y_i);
- ``critic.matrix(x, y)`` -> (Bx, By): all cross scores, entry [i, j] = T(x_i, y_j).

The estimators use the diagonal of ``matrix`` as positives (samples of the joint p(x, y)) and the
off-diagonal entries, or shuffled pairs, as negatives (samples of the product p(x) p(y)).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn


class Estimate(NamedTuple):
    """What every estimator's ``forward`` returns.

    ``estimate`` is the bound's value in nats (a scalar tensor that still carries gradients; detach it for
    logging). ``loss`` is the scalar to minimise for the estimator's purpose: ``-estimate`` for the lower
    bounds (InfoNCE, DV/MINE, TCMax), ``+estimate`` for the upper bounds used to minimise MI (CLUB, VIB).
    """

    estimate: Tensor
    loss: Tensor


def full_precision(device: torch.device) -> torch.autocast:
    """Autocast switched off on ``device``: inside, ops run in the dtypes they are given, so a block that
    calls ``.float()`` on its inputs computes in float32 under any autocast dtype (an fp32 island)."""
    return torch.autocast(device_type=device.type, enabled=False)


def log_count(x: Tensor, dim: int | None = None) -> Tensor:
    """log of the number of entries of x (along ``dim``, or in all), as a float32 tensor. A tensor, not
    ``math.log(x.numel())``: under torch.compile a Python float from a dynamic size pins that size."""
    ones = torch.ones_like(x, dtype=torch.float32)
    return (ones.sum() if dim is None else ones.sum(dim)).log()


def mlp(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2) -> nn.Sequential:
    """Plain MLP: ``num_layers`` hidden ReLU layers of width ``hidden_dim``, then a linear output."""
    layers: list[nn.Module] = []
    width = in_dim
    for _ in range(num_layers):
        layers += [nn.Linear(width, hidden_dim), nn.ReLU()]
        width = hidden_dim
    layers.append(nn.Linear(width, out_dim))
    return nn.Sequential(*layers)


class Critic(nn.Module):
    """Base class: subclasses implement ``matrix``; ``forward`` defaults to its diagonal."""

    def matrix(self, x: Tensor, y: Tensor) -> Tensor:
        """All cross scores: x (Bx, Dx), y (By, Dy) -> (Bx, By) with [i, j] = T(x_i, y_j)."""
        raise NotImplementedError

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Paired scores: x (B, Dx), y (B, Dy) -> (B,) with [i] = T(x_i, y_i)."""
        return self.matrix(x, y).diagonal()


class SeparableCritic(Critic):
    """T(x, y) = <g(x), h(y)> / sqrt(E) with MLP embeddings g, h of width E. ``matrix`` costs one matmul."""

    def __init__(self, x_dim: int, y_dim: int, hidden_dim: int = 64, embed_dim: int = 32) -> None:
        super().__init__()
        self.g = mlp(x_dim, hidden_dim, embed_dim)
        self.h = mlp(y_dim, hidden_dim, embed_dim)
        self.scale = 1.0 / math.sqrt(embed_dim)

    def matrix(self, x: Tensor, y: Tensor) -> Tensor:
        return self.g(x) @ self.h(y).T * self.scale

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return (self.g(x) * self.h(y)).sum(-1) * self.scale


class BilinearCritic(Critic):
    """T(x, y) = x^T W y (+ b). Contains the optimal critic for jointly Gaussian x, y only up to the
    quadratic terms, so it is a cheap baseline, not a universal one."""

    def __init__(self, x_dim: int, y_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(x_dim, y_dim))
        self.bias = nn.Parameter(torch.zeros(()))

    def matrix(self, x: Tensor, y: Tensor) -> Tensor:
        return x @ self.weight @ y.T + self.bias

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return ((x @ self.weight) * y).sum(-1) + self.bias


class ConcatCritic(Critic):
    """T(x, y) = MLP([x; y]). The most flexible critic; ``matrix`` evaluates the MLP Bx * By times."""

    def __init__(self, x_dim: int, y_dim: int, hidden_dim: int = 64, num_layers: int = 2) -> None:
        super().__init__()
        self.net = mlp(x_dim + y_dim, hidden_dim, 1, num_layers)

    def matrix(self, x: Tensor, y: Tensor) -> Tensor:
        bx, by = x.shape[0], y.shape[0]
        pairs = torch.cat([x[:, None, :].expand(bx, by, -1), y[None, :, :].expand(bx, by, -1)], dim=-1)
        return self.net(pairs).squeeze(-1)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.net(torch.cat([x, y], dim=-1)).squeeze(-1)


CRITICS: dict[str, type[Critic]] = {
    "separable": SeparableCritic,
    "bilinear": BilinearCritic,
    "concat": ConcatCritic,
}


def build_critic(critic: str | Critic, x_dim: int, y_dim: int, hidden_dim: int = 64) -> Critic:
    """A critic by name (``separable``, ``bilinear``, ``concat``) or the given module unchanged."""
    if isinstance(critic, nn.Module):
        return critic
    if critic not in CRITICS:
        raise ValueError(f"unknown critic {critic!r}; valid critics: {', '.join(sorted(CRITICS))}")
    if critic == "bilinear":
        return BilinearCritic(x_dim, y_dim)
    return CRITICS[critic](x_dim, y_dim, hidden_dim)


def derangement(n: int, device: torch.device | None = None) -> Tensor:
    """A random permutation of range(n) with no fixed point (a random cycle), for shuffled negatives.

    Pairing x_i with y_perm[i] then never reuses a positive pair, while every pair is still a draw from the
    product of marginals when the batch is i.i.d.
    """
    if n < 2:
        raise ValueError(f"shuffled negatives need a batch of at least 2 samples, got {n}")
    order = torch.randperm(n, device=device)
    perm = torch.empty_like(order)
    perm[order] = order.roll(-1)
    return perm
