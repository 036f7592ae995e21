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

Tasks: classification (C classes; prediction = fused logits; the published form); multilabel (each of K labels
is a 2-class TCMax problem and the K losses are summed; prediction = logit(yes) - logit(no)); regression, with
``num_bins`` = 7 / 13 / 25 equal-width bins over [-label_range, label_range] and one of four forms
(``regression``):

- ``bins_head`` (default): the bound on the BINNED label, with free bin logits and the exact factorised
  negatives, trains the representation; a linear head on the pooled features [z_1; ...; z_M] predicts the raw
  (unrounded) label with the L1 task loss. The prediction is never snapped to a bin. The bound's heads are
  the critic only.
- ``bins`` (methods.md's R1, the literal adaptation): prediction = the expected bin centre under the bound's own
  bin logits. It SHRINKS predictions when the label needs more than one modality (below).
- ``constant_normaliser`` (formerly ``gaussian``): one score h(z) and bin logits -(centre - h(z))^2 / tau. Their
  normaliser is constant while h stays inside the grid, so the product-of-marginals term has little gradient
  (0.15 ± 0.08 of it on the claims competition task after training, 0.05x the positive term's on a training
  batch): in effect it is cross-entropy on Gaussian bin logits, not TCMax. Kept for comparison.
- ``continuous`` (methods.md's R2): T(z, y) = -(y - h(z))^2 / tau on the raw label, the batch's labels as the
  negatives' label marginal; prediction = h(z). It over-expands: for h = a (z_1 + z_2) on Gaussian data its
  population optimum is a = 1.107 (tests/fusion/test_estimators.py).

Why free bin logits shrink. For a critic f(z)[c] and independent modalities, the DV bound is the log-likelihood
of softmax(f) + log C minus the Jensen gap log E[N(z)] - E[log N(z)] of the per-sample normaliser
N(z) = sum_c exp f(z)[c]. An additive head cannot keep log N(z) constant when the label needs two modalities, so
``bins`` trades accuracy for a flatter N and pulls its expected-bin-centre predictions towards the centre;
``bins_head`` keeps the bound (and that pressure on the representation) but predicts with its own head.

The TC term and its switch. The loss is split into its terms (their sum is -bound): ``positive`` = -mean_i
f(z^i)[y_i], ``product_negative`` = w log-mean-exp of f over every recombined tuple (i_1, ..., i_M) with every
label (the product of the marginals) and ``joint_negative`` = (1 - w) log-mean-exp over the real tuples with
every label, w = ``tc_weight``; ``bins_head`` adds ``task``. w = 1 is TCMax. w = 0 removes exactly the total
correlation among the modalities: the same critic, heads, bins and label marginal, with the negatives drawn
from p(z_1, ..., z_M) u(y) instead of p(z_1) ... p(z_M) u(y), i.e. a DV bound on I(z; y) alone. Both models are
built identically (tests/fusion/test_ablations.py).

Mechanism, measured (``FusionModel.mechanism``, at every evaluation): ``grad_share/product_negative``, the
product-of-marginals term's share of the gradient. On the claims competition task (seeds 0-9, 400 steps, 256
validation samples): ``bins_head`` 0.45 ± 0.02 (test MAE 0.272 ± 0.007, late fusion 0.267 ± 0.011), ``bins``
0.50 (MAE 0.353), ``constant_normaliser`` 0.15 ± 0.08 (MAE 0.267); in classification 0.50 (accuracy 0.759,
late 0.756). There ``tc`` and ``dv_joint`` agree within 0.01 nats: text and audio are independent, so the
modalities share no total correlation for the term to find, and removing it (``tc_weight`` 0) changes nothing
(BENCHMARKS.md).

Deviations from the paper (and its code): the regression forms are ours (the paper's regression protocol is in
an appendix we could not read); tau is fixed at 1, never tuned; the log-partition uses logsumexp instead of the
code's mean-centring (a numerical defect we do not keep). The published uniform label marginal is kept for
classification and the binned forms; ``faithful`` has no effect.

Losses: ``positive``, ``product_negative``, ``joint_negative`` (+ ``task`` for ``bins_head``). Diagnostics: ``tc``
(the bound with the product negatives, in nats: with a uniform label marginal it bounds TC + log C - H(y), see
the estimator), ``dv_joint`` (the bound with the joint negatives), ``ce/fused`` (cross-entropy of the fused bin or
class logits), ``ce/<m>`` (each modality's term alone, linear and share heads with free logits, logged as the
published code does), ``mse/fused`` (``continuous``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusion.base import FusionConfig, FusionModel, FusionOutput, Inputs
from fusion.estimators.critics import mlp
from fusion.estimators.mine import log_mean_exp
from fusion.estimators.tcmax import sampled_tc_terms, squared_error_terms, tcmax_terms, tuple_sums
from fusion.layers import (
    OutputLinear,
    SequenceEncoder,
    bin_index,
    expected_value,
    masked_mean,
    regression_bins,
    task_loss,
)

TAU = 1.0  # temperature of the squared-error critics; fixed, as the published loss has no hyper-parameter
MAX_NEGATIVE_TERMS = 1 << 20  # (tuple, label) pairs enumerated exactly before sampling tuples instead
HEADS = ("linear", "share", "mlp")
REGRESSION = ("bins_head", "bins", "constant_normaliser", "continuous")
SQUARED_ERROR = ("constant_normaliser", "continuous")


@dataclass
class TCMaxConfig(FusionConfig):
    """TCMax settings. ``head``: linear (one Linear per modality, summed) | share (one Linear for every modality,
    averaged) | mlp (non-additive, sampled negatives). ``regression`` picks the form for regression labels:
    bins_head (default: the bound on binned labels trains the representation, a linear head on the pooled
    features predicts the raw label) | bins (free bin logits, prediction = expected bin centre; shrinks) |
    constant_normaliser (bin logits -(centre - h(z))^2: a constant normaliser, so the product-of-marginals term
    has almost no gradient and the loss is cross-entropy in effect) | continuous (-(y - h(z))^2 with the batch's
    labels as negatives; over-expands). ``tc_weight`` w in [0, 1]: the share of the negatives drawn from the
    product of the marginals (recombined tuples); 1 - w come from the real tuples. w = 0 removes exactly the
    total-correlation part and leaves a DV bound on I(z; y) with the same critic. See the module docstring."""

    num_bins: int = 7  # regression bins: 7 (integers), 13 (steps of 0.5) or 25 (steps of 0.25) over the range
    label_range: float = 3.0  # regression labels live in [-label_range, label_range]
    head: str = "linear"  # linear | share (exact factorised negatives) | mlp (sampled negatives)
    regression: str = "bins_head"  # bins_head | bins | constant_normaliser | continuous
    num_negatives: int = 256  # mlp head only: sampled recombinations per step
    tc_weight: float = 1.0  # ablation: 1 = TCMax (product-of-marginals negatives), 0 = the TC term removed

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
        if not 0.0 <= self.tc_weight <= 1.0:
            out.append(f"tc_weight: must be in [0, 1], got {self.tc_weight}")
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
    mechanism_keys = ("grad_share/product_negative", "diag/tc", "diag/dv_joint")  # the TC term and its bound
    uses_every_parameter = True  # missing modalities are masked, never skipped (FusionModel)

    def __init__(self, config: TCMaxConfig) -> None:
        super().__init__(config)
        c = config
        self.encoders = nn.ModuleDict(
            {m: SequenceEncoder(c.dims[m], c.hidden, c.num_layers, c.num_heads, c.dropout) for m in self.modalities}
        )
        self.dropout = nn.Dropout(c.dropout)
        self.form = c.regression if c.task == "regression" else c.task
        self.squared_error = self.form in SQUARED_ERROR
        if c.task == "regression":
            self.register_buffer("centres", regression_bins(c.num_bins, -c.label_range, c.label_range))
            self.num_logits = 1 if self.squared_error else c.num_bins
        else:
            self.num_logits = c.num_classes if c.task == "classification" else 2 * c.num_classes
        if c.head == "linear":
            self.heads = nn.ModuleDict(
                {m: OutputLinear(c.hidden, self.num_logits, bias=False) for m in self.modalities}
            )
        elif c.head == "share":
            self.shared = OutputLinear(c.hidden, self.num_logits, bias=False)
        else:
            self.critic = ConcatMLPCritic(c.hidden, len(self.modalities), self.num_logits)
        if c.head != "mlp":
            self.bias = nn.Parameter(torch.zeros(self.num_logits))
        # bins_head: the prediction, a linear head on the pooled features (the bound's heads are the critic)
        self.regressor = OutputLinear(c.hidden * len(self.modalities), 1) if self.form == "bins_head" else None

    def encode(self, inputs: Inputs) -> dict[str, Tensor]:
        """Pooled features z_m (B, H) per modality; zero rows where the sample lacks the modality."""
        z = {}
        for m in self.modalities:
            pooled = masked_mean(self.encoders[m](inputs.feats[m], inputs.masks[m]), inputs.masks[m])
            z[m] = self.dropout(pooled) * inputs.present[m][:, None]
        return z

    def head_outputs(self, z: dict[str, Tensor]) -> tuple[list[Tensor], Tensor]:
        """(per-modality terms, M tensors (B, K), empty for the mlp head; fused output (B, K)).

        K = ``num_logits``: classes, 2 per label (multilabel), bins (``bins``, ``bins_head``) or 1 (the score h
        of the squared-error critics). The fused output is bias + the sum of the terms for additive heads.
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
        prediction = self._prediction(z, fused, logits)
        if inputs.label is None:
            return FusionOutput(prediction, {}, {})
        positive, product, joint = self._terms(terms, z, fused, inputs.label)
        w = self.config.tc_weight
        losses = {"positive": -positive, "product_negative": w * product, "joint_negative": (1.0 - w) * joint}
        if self.regressor is not None:
            losses = {"task": task_loss(prediction, inputs.label, "regression"), **losses}
        with torch.no_grad():
            diagnostics = {
                "tc": (positive - product).detach(),
                "dv_joint": (positive - joint).detach(),
                **self._fit_diagnostics(terms, logits, prediction, inputs.label),
            }
        return FusionOutput(prediction, losses, diagnostics)

    def _fit_diagnostics(
        self, terms: list[Tensor], logits: Tensor, prediction: Tensor, label: Tensor
    ) -> dict[str, Tensor]:
        """``mse/fused`` (continuous) or ``ce/fused``, plus ``ce/<m>`` for each term when the terms are logits."""
        if self.form == "continuous":
            return {"mse/fused": (prediction - label.float()).pow(2).mean()}
        target = self._targets(label)
        out = {"ce/fused": self._cross_entropy(logits, target)}
        if not self.squared_error:
            for m, term in zip(self.modalities, terms, strict=False):  # empty for the mlp head
                out[f"ce/{m}"] = self._cross_entropy(term, target)
        return out

    def _logits(self, fused: Tensor) -> Tensor:
        """Class or bin logits (B, C): the fused output itself, or -(centre - h)^2 / tau (squared-error forms)."""
        if self.squared_error:
            return -(self.centres[None, :] - fused).pow(2) / TAU
        return fused

    def _targets(self, label: Tensor) -> Tensor:
        """Class indices: (B,) for regression bins and classes, (B, K) {0, 1} for multilabel."""
        if self.config.task == "regression":
            return bin_index(label, self.centres)
        return label.long()

    def _terms(
        self, terms: list[Tensor], z: dict[str, Tensor], fused: Tensor, label: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(positive, log-mean-exp over the product-of-marginals negatives, the same over the joint negatives).

        Both negative sets pair tuples with every label value of the label marginal; the product set recombines
        the modalities across the batch (TC), the joint set keeps each sample's real tuple (I(z; y) alone)."""
        if self.squared_error:
            return self._squared_error_terms(terms, z, fused[:, 0], label)
        target = self._targets(label)
        k = self.config.num_classes if self.config.task == "multilabel" else 1
        parts = []
        for j in range(k):
            y = target[:, j] if self.config.task == "multilabel" else target
            cols = slice(2 * j, 2 * j + 2) if self.config.task == "multilabel" else slice(None)
            if self.config.head == "mlp":
                critic = _ColumnCritic(self.critic, cols)
                feats = [z[m] for m in self.modalities]
                positive, product = sampled_tc_terms(critic, feats, y, self.config.num_negatives)
            else:
                positive, product = tcmax_terms([t[:, cols] for t in terms], y, self.bias[cols])
            parts.append((positive, product, log_mean_exp(fused[:, cols])))
        return tuple(torch.stack(p).sum() for p in zip(*parts, strict=True))  # type: ignore[return-value]

    def _squared_error_terms(
        self, terms: list[Tensor], z: dict[str, Tensor], h: Tensor, label: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``constant_normaliser``: binned targets, every bin centre as the label marginal; ``continuous``: raw
        labels, the batch's labels as the label marginal. h (B,) is the fused score of the real tuples."""
        if self.form == "constant_normaliser":
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
        positive, product = squared_error_terms(h, target, h_negative, label_values, TAU)
        return positive, product, squared_error_terms(h, target, h, label_values, TAU)[1]

    def _prediction(self, z: dict[str, Tensor], fused: Tensor, logits: Tensor) -> Tensor:
        if self.config.task == "regression":
            if self.regressor is not None:
                return self.regressor(torch.cat([z[m] for m in self.modalities], -1))[:, 0].float()
            if self.form == "continuous":
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
