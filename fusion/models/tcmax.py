"""TCMax (Yu, Wu, Yang, Lu, ICLR 2026): train a late-fusion model by maximising a Donsker-Varadhan lower
bound on the total correlation TC(z_1, ..., z_M, y), with the fused head as the critic.

Per modality m: x_m (B, T_m, D_m) -> ``SequenceEncoder`` -> masked mean z_m (B, H) -> head term g_m (B, C).
Fused output f = bias + sum over the modalities a sample has of g_m(z_m) (a missing modality adds 0).
The loss replaces cross-entropy:

    L = -mean_i f(z^i)[y_i] + log( 1/(B^M C) * sum over all (i_1..i_M, c) of exp(bias[c] + sum_m g_m(z_m^{i_m})[c]) )

Heads (``head``):

- ``linear`` (default, the published "sum" head): one Linear(H, C) per modality; the B^M * C negatives
  factorise exactly in O(B C M) (``fusion.estimators.tcmax.tcmax_bound``).
- ``share`` (the published share-head, the paper's best): ONE Linear(H, C) applied to every modality's z_m
  and averaged, g_m = W z_m / M. Also additive, so the same exact factorised negatives. We divide by the
  number of modalities the model uses, not by the number a sample has, so a missing modality adds 0 and
  the head stays additive (a per-sample divisor would not be).
- ``mlp``: a non-linear head on the concatenated z_m, with ``num_negatives`` sampled recombinations.

Tasks: classification (C classes; prediction = fused logits); multilabel (each of K labels is a 2-class
TCMax problem and the K losses are summed; prediction = logit(yes) - logit(no)); regression, with
``num_bins`` = 7 / 13 / 25 equal-width bins over [-label_range, label_range] and one of three critics
(``regression``):

- ``gaussian`` (default; our correction of R1): the head outputs one score h(z) = bias + sum_m g_m(z_m)
  and the bin logits are T(z, c) = -(centre_c - h(z))^2 / tau, tau = 1. Labels are binned; the negatives
  pair every recombination with every bin (the published uniform label marginal). Prediction = the expected
  bin centre under softmax over bins, as for ``bins``. The B^M sums of per-modality scores are enumerated
  exactly (scalars, no extra head calls) up to 2^20 (tuple, bin) terms, and sampled beyond.
- ``bins`` (methods.md's R1, the literal adaptation): free bin logits f(z)[c] with the exact factorised
  negatives. It SHRINKS predictions when the label needs more than one modality (see below).
- ``continuous`` (methods.md's R2): T(z, y) = -(y - h(z))^2 / tau, tau = 1, on the raw label; the negatives
  pair every recombination with every label of the batch (the empirical label marginal). Prediction = h(z).
  Exact enumeration up to 2^20 (tuple, label) terms, sampled beyond.

Why ``gaussian`` is the default. For a critic f(z)[c] and independent modalities (so that recombined tuples
follow the same law as real ones), the DV bound is log-likelihood of softmax(f) + log C minus the Jensen gap
log E[N(z)] - E[log N(z)] of the per-sample normaliser N(z) = sum_c exp f(z)[c]: it rewards a constant N(z),
which cross-entropy does not ask for. An additive head cannot make log N(z) constant when the label needs
two modalities (log N(z) is not a sum of per-modality terms; with one modality an MLP encoder can absorb it
into z), so ``bins`` trades accuracy for a flatter N and pulls predictions towards the centre. Gaussian bin
logits have a normaliser that is constant (relative ripple 2 exp(-pi^2 tau / spacing^2) ~ 1e-4 for 7 bins)
while h stays inside the grid, so the gap vanishes and the bound behaves like cross-entropy on those
logits. ``continuous`` draws its negative labels from the batch, densest near 0, so the bound pushes h away
from where labels are dense: for h = a (z_1 + z_2) on Gaussian data its population optimum is a = 1.107
(tests/fusion/test_estimators.py), i.e. it over-expands.

Measured: held-out MAE and least-squares slope of prediction on label, mean +- std over seeds 0, 1, 2;
linear head, 7 bins, Adam 3e-3, batch 64, 1500 steps; cross-entropy (CE) = the same model trained with
cross-entropy on free bin logits.

| task, label                                  | bins         | gaussian     | continuous   | CE           |
| signals as features, MLP encoders, s_t + s_a | 0.397 / 0.65 | 0.056 / 0.98 | 0.152 / 1.12 | 0.102 / 0.97 |
| same, label from text only (sqrt(2) s_t)     | 0.183 / 0.99 | 0.070 / 1.00 | 0.194 / 1.13 | 0.205 / 1.00 |
| ``fusion.synthetic`` sequences, s1 + s2      | 0.510 / 0.69 | 0.236 / 0.99 | 0.562 / 1.06 | 0.239 / 0.91 |
| same, label from s1 only (text and video)    | 0.212 / 0.97 | 0.233 / 0.98 | 0.541 / 1.08 | 0.236 / 0.95 |

``gaussian`` fixes the shrinkage and matches or beats CE in every row; it is 10 % behind ``bins`` in the
last row, the one case where the label needs one modality and the encoders can absorb its normaliser.
On the claims benchmark's competition task (``mmfuse bench claims``, 5 seeds, BENCHMARKS.md) the validation
MAE ranks the variants the same way: gaussian 0.262, share head 0.266, continuous 0.298, bins 0.348.

Deviations from the paper (and its code): ``gaussian`` and ``continuous`` are our regression critics (the
paper's regression protocol is in an appendix we could not read); tau is fixed at 1, never tuned; the
log-partition uses logsumexp instead of the code's mean-centring (a numerical defect we do not keep). The
published uniform label marginal is kept for classification, ``bins`` and ``gaussian``; ``faithful`` has no
effect.

Loss: ``tcmax``. Diagnostics: ``tc`` (the bound, in nats: with a uniform label marginal it bounds
TC + log C - H(y), see the estimator), ``ce/fused`` (cross-entropy of the fused bin or class logits),
``ce/<m>`` (each modality's term alone, linear and share heads with free logits, logged as the published
code does), ``mse/fused`` (``continuous``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusion.base import FusionConfig, FusionModel, FusionOutput, Inputs
from fusion.estimators.critics import mlp
from fusion.estimators.tcmax import sampled_tc_bound, squared_error_bound, tcmax_bound, tuple_sums
from fusion.layers import SequenceEncoder, bin_index, expected_value, masked_mean, regression_bins

TAU = 1.0  # temperature of the squared-error critics; fixed, as the published loss has no hyper-parameter
MAX_NEGATIVE_TERMS = 1 << 20  # (tuple, label) pairs enumerated exactly before sampling tuples instead
HEADS = ("linear", "share", "mlp")
REGRESSION = ("gaussian", "bins", "continuous")


@dataclass
class TCMaxConfig(FusionConfig):
    """TCMax settings. ``head``: linear (one Linear per modality, summed) | share (one Linear for every modality,
    averaged) | mlp (non-additive, sampled negatives). ``regression`` picks the critic for regression labels:
    gaussian (default: bin logits -(centre - h(z))^2, the bound behaves like cross-entropy) | bins (free bin
    logits, methods.md's R1; shrinks predictions when the label needs several modalities) | continuous
    (-(y - h(z))^2 with the batch's labels as negatives, R2; over-expands). See the module docstring."""

    num_bins: int = 7  # regression bins: 7 (integers), 13 (steps of 0.5) or 25 (steps of 0.25) over the range
    label_range: float = 3.0  # regression labels live in [-label_range, label_range]
    head: str = "linear"  # linear | share (exact factorised negatives) | mlp (sampled negatives)
    regression: str = "gaussian"  # gaussian (Gaussian bin logits) | bins (free bin logits) | continuous (R2)
    num_negatives: int = 256  # mlp head only: sampled recombinations per step

    def problems(self) -> list[str]:
        out = super().problems()
        if self.num_bins < 2:
            out.append(f"num_bins: must be >= 2, got {self.num_bins}")
        if self.label_range <= 0:
            out.append(f"label_range: must be positive, got {self.label_range}")
        if self.head not in HEADS:
            out.append(f"head: must be one of {', '.join(HEADS)}, got {self.head!r}")
        if self.regression not in REGRESSION:
            out.append(f"regression: must be one of {', '.join(REGRESSION)}, got {self.regression!r}")
        if self.num_negatives < 1:
            out.append(f"num_negatives: must be >= 1, got {self.num_negatives}")
        return out


class ConcatMLPCritic(nn.Module):
    """Non-additive critic for ``head="mlp"``: M tensors (N, H) -> MLP([z_1; ...; z_M]) (N, C)."""

    def __init__(self, hidden: int, num_modalities: int, out_dim: int) -> None:
        super().__init__()
        self.net = mlp(hidden * num_modalities, hidden, out_dim, num_layers=1)

    def forward(self, features: list[Tensor]) -> Tensor:
        return self.net(torch.cat(features, -1))


class TCMax(FusionModel):
    Config = TCMaxConfig
    uses_every_parameter = True  # missing modalities are masked, never skipped (FusionModel)

    def __init__(self, config: TCMaxConfig) -> None:
        super().__init__(config)
        c = config
        self.encoders = nn.ModuleDict(
            {m: SequenceEncoder(c.dims[m], c.hidden, c.num_layers, c.num_heads, c.dropout) for m in self.modalities}
        )
        self.dropout = nn.Dropout(c.dropout)
        self.squared_error = c.task == "regression" and c.regression != "bins"
        if c.task == "regression":
            self.register_buffer("centres", regression_bins(c.num_bins, -c.label_range, c.label_range))
            self.num_logits = 1 if self.squared_error else c.num_bins
        else:
            self.num_logits = c.num_classes if c.task == "classification" else 2 * c.num_classes
        if c.head == "linear":
            self.heads = nn.ModuleDict({m: nn.Linear(c.hidden, self.num_logits, bias=False) for m in self.modalities})
        elif c.head == "share":
            self.shared = nn.Linear(c.hidden, self.num_logits, bias=False)
        else:
            self.critic = ConcatMLPCritic(c.hidden, len(self.modalities), self.num_logits)
        if c.head != "mlp":
            self.bias = nn.Parameter(torch.zeros(self.num_logits))

    def encode(self, inputs: Inputs) -> dict[str, Tensor]:
        """Pooled features z_m (B, H) per modality; zero rows where the sample lacks the modality."""
        z = {}
        for m in self.modalities:
            pooled = masked_mean(self.encoders[m](inputs.feats[m], inputs.masks[m]), inputs.masks[m])
            z[m] = self.dropout(pooled) * inputs.present[m][:, None]
        return z

    def head_outputs(self, z: dict[str, Tensor]) -> tuple[list[Tensor], Tensor]:
        """(per-modality terms, M tensors (B, K), empty for the mlp head; fused output (B, K)).

        K = ``num_logits``: classes, 2 per label (multilabel), bins (``bins``) or 1 (the score h of the
        squared-error critics). The fused output is bias + the sum of the terms for additive heads.
        """
        if self.config.head == "mlp":
            return [], self.critic([z[m] for m in self.modalities])
        if self.config.head == "linear":
            terms = [self.heads[m](z[m]) for m in self.modalities]
        else:
            terms = [self.shared(z[m]) / len(self.modalities) for m in self.modalities]
        return terms, sum(terms) + self.bias

    def forward(self, batch: dict[str, Tensor]) -> FusionOutput:
        inputs = self.prepare(batch)
        z = self.encode(inputs)
        terms, fused = self.head_outputs(z)
        logits = self._logits(fused)
        prediction = self._prediction(fused, logits)
        if inputs.label is None:
            return FusionOutput(prediction, {}, {})
        estimate = self._bound(terms, z, fused, inputs.label)
        with torch.no_grad():
            diagnostics = {"tc": estimate.detach(), **self._fit_diagnostics(terms, logits, prediction, inputs.label)}
        return FusionOutput(prediction, {"tcmax": -estimate}, diagnostics)

    def _fit_diagnostics(
        self, terms: list[Tensor], logits: Tensor, prediction: Tensor, label: Tensor
    ) -> dict[str, Tensor]:
        """``mse/fused`` (continuous) or ``ce/fused``, plus ``ce/<m>`` for each term when the terms are logits."""
        if self.config.task == "regression" and self.config.regression == "continuous":
            return {"mse/fused": (prediction - label.float()).pow(2).mean()}
        target = self._targets(label)
        out = {"ce/fused": self._cross_entropy(logits, target)}
        if not self.squared_error:
            for m, term in zip(self.modalities, terms, strict=False):  # empty for the mlp head
                out[f"ce/{m}"] = self._cross_entropy(term, target)
        return out

    def _logits(self, fused: Tensor) -> Tensor:
        """Class or bin logits (B, C): the fused output itself, or -(centre - h)^2 / tau for ``gaussian``."""
        if self.squared_error:
            return -(self.centres[None, :] - fused).pow(2) / TAU
        return fused

    def _targets(self, label: Tensor) -> Tensor:
        """Class indices: (B,) for regression bins and classes, (B, K) {0, 1} for multilabel."""
        if self.config.task == "regression":
            return bin_index(label, self.centres)
        return label.long()

    def _bound(self, terms: list[Tensor], z: dict[str, Tensor], fused: Tensor, label: Tensor) -> Tensor:
        if self.squared_error:
            return self._squared_error_bound(terms, z, fused[:, 0], label)
        target = self._targets(label)
        k = self.config.num_classes if self.config.task == "multilabel" else 1
        estimates = []
        for j in range(k):
            y = target[:, j] if self.config.task == "multilabel" else target
            cols = slice(2 * j, 2 * j + 2) if self.config.task == "multilabel" else slice(None)
            if self.config.head == "mlp":
                critic = _ColumnCritic(self.critic, cols)
                feats = [z[m] for m in self.modalities]
                estimates.append(sampled_tc_bound(critic, feats, y, self.config.num_negatives).estimate)
            else:
                estimates.append(tcmax_bound([t[:, cols] for t in terms], y, self.bias[cols]).estimate)
        return torch.stack(estimates).sum()

    def _squared_error_bound(self, terms: list[Tensor], z: dict[str, Tensor], h: Tensor, label: Tensor) -> Tensor:
        """``gaussian``: binned targets, every bin centre as the label marginal; ``continuous``: raw labels,
        the batch's labels as the label marginal. h (B,) is the fused score of the real tuples."""
        if self.config.regression == "gaussian":
            target, label_values = self.centres[self._targets(label)], self.centres
        else:
            target, label_values = label.float(), label.float()
        if self.config.head == "mlp":
            b = h.shape[0]
            idx = torch.randint(0, b, (self.config.num_negatives, len(self.modalities)), device=h.device)
            h_negative = self.critic([z[m][idx[:, i]] for i, m in enumerate(self.modalities)])[:, 0]
        else:
            max_tuples = max(1, MAX_NEGATIVE_TERMS // label_values.numel())
            h_negative = tuple_sums([t[:, 0] for t in terms], max_tuples) + self.bias[0]
        return squared_error_bound(h, target, h_negative, label_values, TAU).estimate

    def _prediction(self, fused: Tensor, logits: Tensor) -> Tensor:
        if self.config.task == "regression":
            if self.config.regression == "continuous":
                return fused[:, 0].float()
            return expected_value(logits, self.centres)
        if self.config.task == "multilabel":
            pairs = fused.reshape(fused.shape[0], -1, 2)
            return pairs[..., 1] - pairs[..., 0]
        return fused

    def _cross_entropy(self, logits: Tensor, target: Tensor) -> Tensor:
        if self.config.task == "multilabel":
            return F.cross_entropy(logits.float().reshape(-1, 2), target.reshape(-1))
        return F.cross_entropy(logits.float(), target)


class _ColumnCritic(nn.Module):
    """The critic restricted to one label's logit columns (multilabel with the MLP head)."""

    def __init__(self, critic: nn.Module, cols: slice) -> None:
        super().__init__()
        self.critic = critic
        self.cols = cols

    def forward(self, features: list[Tensor]) -> Tensor:
        return self.critic(features)[:, self.cols]
