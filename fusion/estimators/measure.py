"""Mutual information as a reported measure, not a training term: two estimators fitted on one split and scored
on another, each checked against a closed form (tests/fusion/test_mi_measure.py). All values are in nats.

Inputs are row-paired samples: x (N, Dx) and y (N, Dy), row i of each from the same draw of p(x, y).

- ``linear_gaussian_mi``: the Gaussian MI of the linear relation between x and y (CCA; Gelfand & Yaglom 1957,
  Kay 1992), I_G = -1/2 sum_i log(1 - rho_i^2) over the canonical correlations rho_i, i.e. the MI of the jointly
  Gaussian pair with the same covariance. It is exact for jointly Gaussian (x, y). In general it is NOT a bound
  in either direction. Above I: x = y = +-a with probability 2 eps, else x, y independent +-1, has correlation
  -> 1 (I_G -> inf) as a grows while I <= log 4; and, what matters for learned representations, several nonlinear
  features of one shared variable (c, c^2, ...) form several canonical pairs, each counted as a separate Gaussian
  channel (an untrained BC-PMJRS on the redundancy claim task reads 1.68-1.76 nats against the task's cap of
  1.556; its 2nd and 3rd canonical pairs are nonlinear functions of the shared c). Below I: dependence that is
  not linear is invisible (I_G = 0 for uncorrelated x and y). It is a lower bound whenever one side is Gaussian,
  and in general I(x; y) >= I_G - J(x) with J(x) >= 0 the negentropy of x (likewise for y), because
  h(x | y) <= h(x - x_hat(y)) <= the Gaussian entropy of the linear prediction error, with x_hat the best linear
  predictor of x from y. Each side is reduced to its leading principal components (``variance_kept`` of its
  variance, at most (N - 2) / 4 of them) and whitened with a shrinkage ``ridge`` relative to its mean variance,
  so a representation of rank < D does not blow up. With eval data the canonical directions are fitted on the
  fit split and the correlations of the paired canonical variates measured on the eval split (negative ones
  count 0): fitting noise then lowers the estimate instead of raising it, and independent x, y read about
  k / (4 N_eval) on average (k canonical pairs; 0.008 nats for k = 32, N_eval = 1000). Without eval data the
  in-sample estimate has its small-sample bias for Gaussian data, which depends only on N and the dimensions,
  subtracted (``gaussian_mi_bias``).
- ``heldout_infonce``: the InfoNCE lower bound (van den Oord et al. 2018; Poole et al. 2019, "On variational
  bounds of mutual information"), log K + mean_i [f(x_i, y_i) - logsumexp_j f(x_i, y_j)] over blocks of K eval
  rows, with a critic f built from scratch on the fit split and never shown the eval rows, so the value is a lower
  bound on I(x; y) in expectation for ANY distribution. It is capped at log K (the default K = 512 gives 6.24 nats,
  far above the <= 1.6 nats of the claim tasks) and biased low by how far f is from log p(y | x) / p(y) (+ const),
  plus a term that grows as I approaches log K. A neural critic trained by SGD on a few hundred rows of 32-dim
  representations overfits (held-out values far below 0), so f is the Gaussian log density ratio of canonical
  pairs (directions fitted on 80 % of the fit rows, correlations measured on the other 20 %) plus a separable MLP
  residual trained by InfoNCE for a fixed number of steps, with the state kept that scores best on those 20 %:
  the bound tracks I_G on Gaussian data and also sees dependence that is not linear.

``redundancy`` reports both for each pair of modalities of a multimodal representation.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fusion.estimators.critics import Critic, build_critic
from fusion.estimators.infonce import infonce_from_scores

EVAL_BLOCK = 512  # K: InfoNCE's eval block, cap log K = 6.24 nats, far above the ~1.6 nats of the claim tasks
MIN_ROWS = 16  # ``redundancy`` skips a pair with fewer rows (fit or eval) having both modalities


def _check_pairs(x: Tensor, y: Tensor, name: str, least: int = 3) -> None:
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"{name}: x and y must be (N, Dx) and (N, Dy) with one N, got {tuple(x.shape)}, {tuple(y.shape)}"
        )
    if x.shape[0] < least:
        raise ValueError(f"{name}: need at least {least} paired rows, got {x.shape[0]}")


def principal_whitener(
    x: Tensor, ridge: float = 1e-3, variance_kept: float = 1 - 1e-6, max_dims: int | None = None
) -> tuple[Tensor, Tensor]:
    """(mean (D,), W (D, k)) fitted on x (N, D), float64: (x - mean) @ W has ~identity covariance.

    k is the fewest leading principal components holding ``variance_kept`` of the variance (at most ``max_dims``
    and N - 1); each is scaled by 1 / sqrt(lambda_i + ridge * mean(lambda)), the shrinkage that keeps a direction
    of tiny variance from being blown up to unit variance."""
    x = x.double()
    mean = x.mean(0)
    centred = x - mean
    values, vectors = torch.linalg.eigh(centred.T @ centred / (len(x) - 1))
    values, vectors = values.flip(0).clamp_min(0.0), vectors.flip(1)
    total = values.sum()
    if not total > 0:
        return mean, vectors[:, :1] * 0.0
    kept = int((values.cumsum(0) < variance_kept * total).sum()) + 1
    kept = min(kept, len(values), len(x) - 1, max_dims or len(values))
    scale = (values[:kept] + ridge * total / len(values)).rsqrt()
    return mean, vectors[:, :kept] * scale


def gaussian_mi_bias(n: int, p: int, q: int) -> float:
    """E[plug-in Gaussian MI] - I for N = n Gaussian rows of p and q dimensions (any covariance; needs n > p + q).

    From E[log det S] = log det Sigma + sum_{i=1..d} psi((n - i) / 2) + d log(2 / (n - 1)) for the sample
    covariance S (n - 1 degrees of freedom), applied to I = 1/2 (log det S_x + log det S_y - log det S)."""

    def expected_log_det(d: int) -> float:
        return sum(
            torch.special.digamma(torch.tensor((n - i) / 2, dtype=torch.float64)).item() for i in range(1, d + 1)
        )

    return 0.5 * (expected_log_det(p) + expected_log_det(q) - expected_log_det(p + q))


def _gaussian_mi(rho: Tensor) -> float:
    rho = rho.clamp(0.0, 1.0 - 1e-12)
    return float(-0.5 * torch.log1p(-(rho**2)).sum())


def _correlations(u: Tensor, v: Tensor) -> Tensor:
    """Pearson correlation of each column of u (N, k) with the same column of v (N, k) -> (k,)."""
    u, v = u - u.mean(0), v - v.mean(0)
    return (u * v).sum(0) / (u.norm(dim=0) * v.norm(dim=0)).clamp_min(1e-30)


def canonical_directions(
    x: Tensor, y: Tensor, ridge: float = 1e-3, variance_kept: float = 1 - 1e-6, max_dims: int | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """CCA of x (N, Dx), y (N, Dy) after ``principal_whitener`` on each side (float64).

    Returns (mean_x, a_dirs (Dx, k), mean_y, b_dirs (Dy, k), rho (k,)): u = (x - mean_x) @ a_dirs and
    v = (y - mean_y) @ b_dirs are the canonical variates, ~unit variance, pair i with in-sample correlation rho_i
    (descending). Each side keeps at most ``max_dims`` and at most (N - 2) // 4 components."""
    cap = max(1, (len(x) - 2) // 4)
    max_dims = min(max_dims or cap, cap)
    mean_x, wx = principal_whitener(x, ridge, variance_kept, max_dims)
    mean_y, wy = principal_whitener(y, ridge, variance_kept, max_dims)
    cross = ((x.double() - mean_x) @ wx).T @ ((y.double() - mean_y) @ wy) / (len(x) - 1)
    left, rho, right_t = torch.linalg.svd(cross, full_matrices=False)
    return mean_x, wx @ left, mean_y, wy @ right_t.T, rho


def linear_gaussian_mi(
    x_fit: Tensor,
    y_fit: Tensor,
    x_eval: Tensor | None = None,
    y_eval: Tensor | None = None,
    ridge: float = 1e-3,
    variance_kept: float = 1 - 1e-6,
    max_dims: int | None = None,
) -> float:
    """Linear-Gaussian (CCA) estimate of I(x; y) in nats (see the module docstring for what it estimates).

    x_fit (N, Dx), y_fit (N, Dy) fit the whitening and the canonical directions (``canonical_directions``).
    With x_eval (M, Dx), y_eval (M, Dy): -1/2 sum_i log(1 - max(r_i, 0)^2) over the eval correlations r_i of the
    fitted canonical pairs. Without: the in-sample estimate minus its Gaussian small-sample bias
    (``gaussian_mi_bias``), floored at 0."""
    _check_pairs(x_fit, y_fit, "linear_gaussian_mi")
    if (x_eval is None) != (y_eval is None):
        raise ValueError("linear_gaussian_mi: pass both x_eval and y_eval, or neither")
    mean_x, a_dirs, mean_y, b_dirs, rho = canonical_directions(x_fit, y_fit, ridge, variance_kept, max_dims)
    if x_eval is None:
        bias = gaussian_mi_bias(len(x_fit), a_dirs.shape[1], b_dirs.shape[1])
        return max(0.0, _gaussian_mi(rho) - bias)
    _check_pairs(x_eval, y_eval, "linear_gaussian_mi (eval)")
    return _gaussian_mi(_correlations((x_eval.double() - mean_x) @ a_dirs, (y_eval.double() - mean_y) @ b_dirs))


def _blocks(n: int, block: int) -> list[Tensor]:
    """Consecutive index blocks of near-equal size, at most ``block`` rows each (every block >= block / 2)."""
    return list(torch.arange(n).tensor_split(max(1, math.ceil(n / block))))


class CanonicalCritic(Critic):
    """The Gaussian log density ratio on canonical variates plus a trainable residual.

    u = (x - mean_x) @ a_dirs, v = (y - mean_y) @ b_dirs (k canonical pairs, ~unit variance, fixed buffers) and
    T(x, y) = sum_i [rho_i u_i v_i - rho_i^2 (u_i^2 + v_i^2) / 2] / (1 - rho_i^2) + scale * residual(u, v):
    with scale = 0 this is log p(x, y) / (p(x) p(y)) + const for jointly Gaussian pairs with canonical correlations
    rho. ``residual`` (any ``Critic`` on (k, k) inputs) and ``scale`` (starts at 0) are the trainable part."""

    def __init__(self, directions: tuple[Tensor, Tensor, Tensor, Tensor], rho: Tensor, residual: Critic | None):
        super().__init__()
        mean_x, a_dirs, mean_y, b_dirs = (t.float() for t in directions)
        rho = rho.float().clamp(0.0, 0.999)
        for name, value in (("mean_x", mean_x), ("a_dirs", a_dirs), ("mean_y", mean_y), ("b_dirs", b_dirs)):
            self.register_buffer(name, value)
        self.register_buffer("cross", rho / (1 - rho**2))
        self.register_buffer("square", 0.5 * rho**2 / (1 - rho**2))
        self.residual = residual
        self.scale = nn.Parameter(torch.zeros(()))

    def matrix(self, x: Tensor, y: Tensor) -> Tensor:
        u, v = (x.float() - self.mean_x) @ self.a_dirs, (y.float() - self.mean_y) @ self.b_dirs
        scores = (u * self.cross) @ v.T - (self.square * u**2).sum(1)[:, None] - (self.square * v**2).sum(1)[None, :]
        if self.residual is not None:
            scores = scores + self.scale * self.residual.matrix(u, v)
        return scores


def fit_canonical_critic(
    x_fit: Tensor, y_fit: Tensor, residual: str | None = "separable", hidden_dim: int = 64, holdout: float = 0.2
) -> tuple[CanonicalCritic, Tensor, Tensor]:
    """A ``CanonicalCritic`` for x_fit (N, Dx), y_fit (N, Dy) and the (train, check) row indices it was built on.

    The canonical directions are fitted on the train rows (1 - ``holdout`` of them). Each rho_i is the adjusted
    correlation of pair i on the check rows, sqrt(max(0, 1 - (1 - r^2) (n - 1) / (n - 2))): a pair that only
    correlates on the rows it was fitted on gets weight ~0 instead of adding noise to every score. Call it under
    a seeded RNG: the split and the residual's initialisation draw from it."""
    n = len(x_fit)
    order = torch.randperm(n, device=x_fit.device)
    n_check = max(3, int(holdout * n))
    check, train = order[:n_check], order[n_check:]
    mean_x, a_dirs, mean_y, b_dirs, _ = canonical_directions(x_fit[train], y_fit[train])
    r = _correlations((x_fit[check].double() - mean_x) @ a_dirs, (y_fit[check].double() - mean_y) @ b_dirs)
    rho = (1 - (1 - r.clamp_min(0.0) ** 2) * (n_check - 1) / (n_check - 2)).clamp_min(0.0).sqrt()
    k = a_dirs.shape[1]
    net = None if residual is None else build_critic(residual, k, k, hidden_dim)
    return CanonicalCritic((mean_x, a_dirs, mean_y, b_dirs), rho, net).to(x_fit.device), train, check


def _train_residual(
    critic: CanonicalCritic,
    x: Tensor,
    y: Tensor,
    train: Tensor,
    check: Tensor,
    steps: int,
    batch_size: int,
    lr: float,
    check_every: int,
) -> None:
    """Adam on -InfoNCE over random batches of the ``train`` rows of x, y; leaves ``critic`` in the state (of step 0,
    every ``check_every``-th step and the last) with the best InfoNCE on the ``check`` rows."""
    optimiser = torch.optim.Adam([p for p in critic.parameters() if p.requires_grad], lr=lr)
    best, best_state = -math.inf, None
    for step in range(steps + 1):
        if step % check_every == 0 or step == steps:
            with torch.no_grad():
                value = float(infonce_from_scores(critic.matrix(x[check], y[check])))
            if value > best:
                best, best_state = value, {k: t.clone() for k, t in critic.state_dict().items()}
        if step == steps:
            break
        rows = train[torch.randperm(len(train), device=x.device)[:batch_size]]
        loss = -infonce_from_scores(critic.matrix(x[rows], y[rows]))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    critic.load_state_dict(best_state)


def heldout_infonce(
    x_fit: Tensor,
    y_fit: Tensor,
    x_eval: Tensor,
    y_eval: Tensor,
    residual: str | None = "separable",
    hidden_dim: int = 64,
    steps: int = 300,
    batch_size: int = 256,
    lr: float = 2e-3,
    check_every: int = 10,
    eval_block: int = EVAL_BLOCK,
    seed: int = 0,
) -> float:
    """Held-out InfoNCE lower bound on I(x; y) in nats with a fresh critic, capped at log of the eval block size
    (<= log ``eval_block``; M rows are cut into ceil(M / eval_block) near-equal blocks).

    The critic (``fit_canonical_critic``: the Gaussian log density ratio of the canonical pairs of the fit split,
    plus a ``residual`` critic of ``build_critic`` on the canonical variates, None for none) is built on
    x_fit (N, Dx), y_fit (N, Dy); its residual is trained for ``steps`` Adam steps on random batches of
    ``batch_size`` train rows (the batch's other rows are the negatives) and the state with the best InfoNCE on
    the check rows, checked every ``check_every`` steps and at step 0 (the Gaussian critic alone), is kept. Then
    it is frozen and scored on x_eval (M, Dx), y_eval (M, Dy) in consecutive blocks of at most ``eval_block``
    rows (the row-weighted mean of the blocks' bounds). Seeded by ``seed`` inside ``torch.random.fork_rng``: the
    same inputs give the same value and the caller's RNG is left as it was."""
    _check_pairs(x_fit, y_fit, "heldout_infonce", least=8)
    _check_pairs(x_eval, y_eval, "heldout_infonce (eval)")
    devices = [x_fit.device] if x_fit.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.enable_grad():
        torch.manual_seed(seed)
        xf, yf = x_fit.detach().float(), y_fit.detach().float()
        critic, train, check = fit_canonical_critic(xf, yf, residual, hidden_dim)
        if critic.residual is not None and steps > 0:
            _train_residual(critic, xf, yf, train, check, steps, batch_size, lr, check_every)
    critic.eval()
    total = 0.0
    with torch.no_grad():
        for rows in _blocks(len(x_eval), eval_block):
            rows = rows.to(x_eval.device)
            total += len(rows) * float(infonce_from_scores(critic.matrix(x_eval[rows].float(), y_eval[rows].float())))
    return total / len(x_eval)


def redundancy(
    u_fit: dict[str, Tensor],
    has_fit: dict[str, Tensor],
    u_eval: dict[str, Tensor],
    has_eval: dict[str, Tensor],
    pairs: list[tuple[str, str]],
    seed: int = 0,
) -> dict[str, float]:
    """``mi_linear/a-b`` (``linear_gaussian_mi``, held out) and ``mi_infonce/a-b`` (``heldout_infonce``) in nats for
    each pair (a, b), fitted on u_fit and scored on u_eval.

    u_*[m] (N, H_m) is modality m's representation and has_*[m] (N,) bool marks the rows that have m; a pair uses
    only the rows having both and is left out with fewer than ``MIN_ROWS`` such rows on either side."""
    out: dict[str, float] = {}
    for a, b in pairs:
        fit_rows, eval_rows = has_fit[a] & has_fit[b], has_eval[a] & has_eval[b]
        if int(fit_rows.sum()) < MIN_ROWS or int(eval_rows.sum()) < MIN_ROWS:
            continue
        fit, held = (u_fit[a][fit_rows], u_fit[b][fit_rows]), (u_eval[a][eval_rows], u_eval[b][eval_rows])
        out[f"mi_linear/{a}-{b}"] = linear_gaussian_mi(*fit, *held)
        out[f"mi_infonce/{a}-{b}"] = heldout_infonce(*fit, *held, seed=seed)
    return out
