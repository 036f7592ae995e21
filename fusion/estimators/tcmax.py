"""TCMax (Yu et al., ICLR 2026): a Donsker-Varadhan lower bound on the total correlation
TC(z_1, ..., z_M, y) = KL(p(z_1, ..., z_M, y) || p(z_1) ... p(z_M) u(y)), with the fused head as critic.

    TC >= E_joint[f(z_1, ..., z_M)[y]] - log E_product[exp f(z_1, ..., z_M)[c]]

Positives are the real tuples (z_1^i, ..., z_M^i, y_i). Negatives are every cross-sample recombination
(z_1^{i_1}, ..., z_M^{i_M}) of the batch with every one of the C labels, so the label "marginal" u is
uniform over classes, as in the published code. With that choice the quantity bounded is
TC + KL(p(y) || u) = TC + log C - H(y), which equals TC for balanced labels.

For a critic that is a sum of per-modality heads, f(z)[c] = b[c] + sum_m h_m(z_m)[c] (per-modality linear
heads, or one concat-linear head, since W [z_1; ...; z_M] = sum_m W_m z_m), the B^M * C negatives factorise:

    log sum_{i_1..i_M, c} exp(b[c] + sum_m h_m(z_m^{i_m})[c]) = logsumexp_c (b[c] + sum_m logsumexp_i h_m(z_m^i)[c])

which costs O(B * C * M) (``factorised_log_partition``). Non-additive critics use K sampled recombinations
(``TCMaxSampled``). ``brute_force_log_partition`` enumerates all B^M tuples and is meant for tests only.

Shapes: ``logits`` is a sequence of M tensors (B, C), one per modality (h_m applied to that modality's
pooled features); ``y`` is (B,) integer labels in [0, C); features for the sampled form are (B, D_m).
Regression targets are binned by the model, not here.

Squared-error critics for regression, T(z, y) = -(y - h(z))^2 / tau with a scalar h = sum_m h_m(z_m)
(``squared_error_bound``): the negatives pair recombined tuples with a set of label values (the bin centres,
or the batch's labels). They do not factorise, but each tuple's score is the sum of M scalars, so
``tuple_sums`` enumerates all B^M of them exactly (no extra head calls) when that is affordable and samples
tuples otherwise.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from fusion.estimators.critics import Estimate, log_count
from fusion.estimators.mine import log_mean_exp

TupleCritic = Callable[[Sequence[Tensor]], Tensor]


def _check_logits(logits: Sequence[Tensor]) -> None:
    if len(logits) == 0:
        raise ValueError("TCMax needs logits for at least one modality, got an empty sequence")
    shapes = [tuple(t.shape) for t in logits]
    if any(len(s) != 2 for s in shapes) or len({s[1] for s in shapes}) != 1:
        raise ValueError(f"TCMax logits must all be (B, C) with the same C, got shapes {shapes}")


def factorised_log_partition(logits: Sequence[Tensor], bias: Tensor | None = None) -> Tensor:
    """log sum over all (i_1, ..., i_M, c) of exp(bias[c] + sum_m logits[m][i_m, c]), exactly, in O(B C M).

    ``logits``: M tensors (B_m, C); ``bias``: optional (C,) shared fusion bias. Computed in float32 with
    autocast disabled, so fp16/bf16 inputs neither overflow nor lose the logsumexp's precision.
    """
    _check_logits(logits)
    with torch.autocast(device_type=logits[0].device.type, enabled=False):
        per_class = sum(torch.logsumexp(t.float(), dim=0) for t in logits)  # (C,)
        if bias is not None:
            per_class = per_class + bias.float()
        return torch.logsumexp(per_class, dim=0)


def brute_force_log_partition(features: Sequence[Tensor], critic: TupleCritic, chunk: int = 4096) -> Tensor:
    """The same log-partition by enumerating every tuple: log sum_{i_1..i_M, c} exp(critic(tuple)[c]).

    ``features``: M tensors (B_m, D_m); ``critic`` maps M tensors (N, D_m) to (N, C) logits. Costs
    prod(B_m) critic calls; for tests and small batches only.
    """
    tuples = list(itertools.product(*(range(f.shape[0]) for f in features)))
    parts = []
    for start in range(0, len(tuples), chunk):
        idx = torch.tensor(tuples[start : start + chunk], device=features[0].device)
        out = critic([f[idx[:, m]] for m, f in enumerate(features)])
        parts.append(torch.logsumexp(out.float().reshape(-1), dim=0))
    return torch.logsumexp(torch.stack(parts), dim=0)


def tcmax_terms(logits: Sequence[Tensor], y: Tensor, bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The two terms of ``tcmax_bound``: (positive, log_mean_negative), 0-dim float32 each.

    positive = mean_i f(z^i)[y_i] (the real tuples); log_mean_negative = log of the mean of exp f over every
    recombined tuple and every label (the product of marginals, factorised). The bound is their difference.
    """
    _check_logits(logits)
    b, c = logits[0].shape
    if any(t.shape[0] != b for t in logits) or y.shape != (b,):
        raise ValueError(f"TCMax needs logits (B, C) for every modality and y (B,), got B={b}, y {tuple(y.shape)}")
    with torch.autocast(device_type=logits[0].device.type, enabled=False):
        fused = sum(t.float() for t in logits)
        if bias is not None:
            fused = fused + bias.float()
        positive = fused.gather(1, y.long()[:, None]).mean()
        log_mean_negative = factorised_log_partition(logits, bias) - len(logits) * log_count(y) - math.log(c)
    return positive, log_mean_negative


def tcmax_bound(logits: Sequence[Tensor], y: Tensor, bias: Tensor | None = None) -> Estimate:
    """TCMax DV bound with the factorised negatives (additive critic f[c] = bias[c] + sum_m logits[m][:, c]).

    ``logits``: M tensors (B, C); ``y``: (B,) int labels; ``bias``: optional (C,). Returns
    ``Estimate(estimate, loss)``: ``estimate`` lower-bounds TC + log C - H(y) in nats (see module doc);
    ``loss = -estimate``, minimised by the model in place of cross-entropy.
    """
    positive, log_mean_negative = tcmax_terms(logits, y, bias)
    estimate = positive - log_mean_negative
    return Estimate(estimate, -estimate)


def sampled_tc_terms(
    critic: TupleCritic,
    features: Sequence[Tensor],
    y: Tensor | None = None,
    num_negatives: int = 256,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """The two terms of ``sampled_tc_bound``: (positive, log_mean_negative) over sampled recombinations."""
    if len(features) < 2 and y is None:
        raise ValueError("total correlation needs at least two variables (or one variable and labels)")
    b = features[0].shape[0]
    if any(f.shape[0] != b for f in features):
        raise ValueError(f"all features need the same batch size, got {[tuple(f.shape) for f in features]}")
    device = features[0].device
    idx = torch.randint(0, b, (num_negatives, len(features)), device=device, generator=generator)
    positive_out = critic(list(features)).float()
    negative_out = critic([f[idx[:, m]] for m, f in enumerate(features)]).float()
    if y is None:
        positive = positive_out.reshape(b)
        negative_out = negative_out.reshape(num_negatives)
    else:
        positive = positive_out.gather(1, y.long()[:, None]).squeeze(1)
    return positive.mean(), log_mean_exp(negative_out)


def sampled_tc_bound(
    critic: TupleCritic,
    features: Sequence[Tensor],
    y: Tensor | None = None,
    num_negatives: int = 256,
    generator: torch.Generator | None = None,
) -> Estimate:
    """DV total-correlation bound with K = ``num_negatives`` random recombinations as negatives.

    ``features``: M tensors (B, D_m), row i of each from the same sample. ``critic`` maps M tensors (N, D_m)
    to (N, C) logits when ``y`` (B,) is given (TCMax with labels: every negative tuple is scored with all C
    labels), or to (N,) / (N, 1) scores when ``y`` is None (plain TC(z_1, ..., z_M)). Each negative draws
    every index i_m independently and uniformly from the batch. ``estimate`` lower-bounds the total
    correlation in nats (up to the finite-sample bias of log-mean-exp); ``loss = -estimate``.
    """
    positive, log_mean_negative = sampled_tc_terms(critic, features, y, num_negatives, generator)
    estimate = positive - log_mean_negative
    return Estimate(estimate, -estimate)


# ---- squared-error critics for regression ---------------------------------------------------------------


def tuple_sums(scores: Sequence[Tensor], max_tuples: int = 1 << 17, generator: torch.Generator | None = None) -> Tensor:
    """Sums sum_m scores[m][i_m] over recombinations (i_1, ..., i_M) of the batch.

    ``scores``: M tensors (B,), one scalar per sample and modality. Returns every one of the B^M sums, flat
    (B^M,), when B^M <= ``max_tuples`` (the exact product of marginals); otherwise ``max_tuples`` sums over
    tuples whose indices are drawn independently and uniformly (an unbiased sample of the same set).
    """
    if len(scores) == 0 or any(s.dim() != 1 or s.shape != scores[0].shape for s in scores):
        raise ValueError(f"tuple_sums needs M >= 1 tensors (B,) of one size, got {[tuple(s.shape) for s in scores]}")
    b = scores[0].shape[0]
    if b ** len(scores) <= max_tuples:
        total = scores[0]
        for s in scores[1:]:
            total = (total[:, None] + s[None, :]).reshape(-1)
        return total
    idx = torch.randint(0, b, (max_tuples, len(scores)), device=scores[0].device, generator=generator)
    return sum(s[idx[:, m]] for m, s in enumerate(scores))


def squared_error_terms(
    h: Tensor, target: Tensor, h_negative: Tensor, label_values: Tensor, tau: float = 1.0
) -> tuple[Tensor, Tensor]:
    """The two terms of ``squared_error_bound``: (positive, log_mean_negative), 0-dim float32 each."""
    with torch.autocast(device_type=h.device.type, enabled=False):
        positive = -(target.float() - h.float()).pow(2).mean() / tau
        negative = -(label_values.float()[None, :] - h_negative.float()[:, None]).pow(2) / tau
        return positive, log_mean_exp(negative)


def squared_error_bound(
    h: Tensor, target: Tensor, h_negative: Tensor, label_values: Tensor, tau: float = 1.0
) -> Estimate:
    """DV bound with the critic T(z, y) = -(y - h(z))^2 / tau.

    ``h`` (B,) and ``target`` (B,): the critic's prediction and the label of each real tuple (positives);
    ``h_negative`` (N,): h on recombined tuples of the product of marginals; ``label_values`` (L,): the label
    marginal of the negatives, every value paired with every negative tuple (N * L negatives). ``estimate``
    lower-bounds KL(p(z_1, ..., z_M, y) || p(z_1) ... p(z_M) q(y)) for that label marginal q, up to the
    finite-sample bias of log-mean-exp; ``loss = -estimate``.
    """
    positive, log_mean_negative = squared_error_terms(h, target, h_negative, label_values, tau)
    estimate = positive - log_mean_negative
    return Estimate(estimate, -estimate)


class TCMax(nn.Module):
    """TCMax loss for additive heads: ``forward(logits, y, bias=None)`` -> ``Estimate`` (see ``tcmax_bound``).

    Has no parameters: the model's per-modality heads are the critic. ``logits``: M tensors (B, C), already
    masked/filled by the model for missing modalities; ``y``: (B,) class or bin indices.
    """

    def forward(self, logits: Sequence[Tensor], y: Tensor, bias: Tensor | None = None) -> Estimate:
        return tcmax_bound(logits, y, bias)


class TCMaxSampled(nn.Module):
    """TCMax / TC bound for a non-additive critic with ``num_negatives`` sampled recombinations.

    ``critic`` maps M tensors (N, D_m) to (N, C) logits (or (N,) scores without labels);
    ``forward(features, y=None)`` -> ``Estimate`` (see ``sampled_tc_bound``).
    """

    def __init__(self, critic: nn.Module, num_negatives: int = 256) -> None:
        super().__init__()
        if num_negatives < 1:
            raise ValueError(f"num_negatives must be >= 1, got {num_negatives}")
        self.critic = critic
        self.num_negatives = num_negatives

    def forward(self, features: Sequence[Tensor], y: Tensor | None = None) -> Estimate:
        return sampled_tc_bound(self.critic, features, y, self.num_negatives)
