"""TCMax (Yu, Wu, Yang, Lu, ICLR 2026): train a late-fusion model by maximising a Donsker-Varadhan lower
bound on the total correlation TC(z_1, ..., z_M, y), with the fused classifier head as the critic.

Per modality m: x_m (B, T_m, D_m) -> ``SequenceEncoder`` -> masked mean z_m (B, H) -> head g_m (B, C).
Fused logits f = bias + sum over the modalities a sample has of g_m(z_m) (a missing modality adds 0).
The loss replaces cross-entropy:

    L = -mean_i f(z^i)[y_i] + log( 1/(B^M C) * sum over all (i_1..i_M, c) of exp(bias[c] + sum_m g_m(z_m^{i_m})[c]) )

``head="linear"`` (default, the published "sum" head): the negatives factorise exactly in O(B C M)
(``fusion.estimators.tcmax.tcmax_bound``). ``head="mlp"``: a non-linear head on the concatenated z_m,
with ``num_negatives`` sampled recombinations (``TCMaxSampled``).

Tasks: classification (C classes; prediction = fused logits); regression (the labels are binned into
``num_bins`` = 7 / 13 / 25 equal-width bins over [-label_range, label_range]; prediction = the expected
bin centre under softmax(f), so MAE and correlation are computed on a continuous value); multilabel
(each of K labels is a 2-class TCMax problem and the K losses are summed; prediction = logit(yes) - logit(no)).

Loss: ``tcmax``. Diagnostics: ``tc`` (the bound, in nats: it bounds TC + log C - H(y), see the estimator),
``ce/fused`` and ``ce/<m>`` (each head's cross-entropy alone, logged as the published code does).
``faithful`` has no effect: the published loss, with its uniform label marginal, is what this computes;
the only code difference (mean- rather than max-centring before exp) is a numerical defect we do not keep.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusion.base import FusionConfig, FusionModel, FusionOutput
from fusion.estimators.critics import mlp
from fusion.estimators.tcmax import sampled_tc_bound, tcmax_bound
from fusion.layers import SequenceEncoder, bin_index, expected_value, masked_mean, regression_bins


@dataclass
class TCMaxConfig(FusionConfig):
    num_bins: int = 7  # regression only: 7 (integers), 13 (steps of 0.5) or 25 (steps of 0.25) over the range
    label_range: float = 3.0  # regression labels live in [-label_range, label_range]
    head: str = "linear"  # linear (exact factorised negatives) | mlp (sampled negatives)
    num_negatives: int = 256  # mlp head only

    def problems(self) -> list[str]:
        out = super().problems()
        if self.num_bins < 2:
            out.append(f"num_bins: must be >= 2, got {self.num_bins}")
        if self.label_range <= 0:
            out.append(f"label_range: must be positive, got {self.label_range}")
        if self.head not in ("linear", "mlp"):
            out.append(f"head: must be 'linear' or 'mlp', got {self.head!r}")
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

    def __init__(self, config: TCMaxConfig) -> None:
        super().__init__(config)
        c = config
        self.encoders = nn.ModuleDict(
            {m: SequenceEncoder(c.dims[m], c.hidden, c.num_layers, c.num_heads, c.dropout) for m in self.modalities}
        )
        self.dropout = nn.Dropout(c.dropout)
        if c.task == "regression":
            self.register_buffer("centres", regression_bins(c.num_bins, -c.label_range, c.label_range))
            self.num_logits = c.num_bins
        else:
            self.num_logits = c.num_classes if c.task == "classification" else 2 * c.num_classes
        if c.head == "linear":
            self.heads = nn.ModuleDict({m: nn.Linear(c.hidden, self.num_logits, bias=False) for m in self.modalities})
            self.bias = nn.Parameter(torch.zeros(self.num_logits))
        else:
            self.critic = ConcatMLPCritic(c.hidden, len(self.modalities), self.num_logits)

    def forward(self, batch: dict[str, Tensor]) -> FusionOutput:
        inputs = self.prepare(batch)
        z = {}
        for m in self.modalities:
            pooled = masked_mean(self.encoders[m](inputs.feats[m], inputs.masks[m]), inputs.masks[m])
            z[m] = self.dropout(pooled) * inputs.present[m][:, None]
        if self.config.head == "linear":
            per_modality = [self.heads[m](z[m]) for m in self.modalities]  # zero rows where m is missing
            fused = sum(per_modality) + self.bias
        else:
            per_modality = []
            fused = self.critic([z[m] for m in self.modalities])
        prediction = self._prediction(fused)
        losses: dict[str, Tensor] = {}
        diagnostics: dict[str, Tensor] = {}
        if inputs.label is not None:
            estimate, target = self._bound(per_modality, z, fused, inputs.label)
            losses["tcmax"] = -estimate
            diagnostics["tc"] = estimate.detach()
            with torch.no_grad():
                diagnostics["ce/fused"] = self._cross_entropy(fused, target)
                for m, logits in zip(self.modalities, per_modality, strict=False):  # empty for the mlp head
                    diagnostics[f"ce/{m}"] = self._cross_entropy(logits, target)
        return FusionOutput(prediction, losses, diagnostics)

    def _targets(self, label: Tensor) -> Tensor:
        """Class indices: (B,) for regression bins and classes, (B, K) {0, 1} for multilabel."""
        if self.config.task == "regression":
            return bin_index(label, self.centres)
        return label.long()

    def _bound(self, per_modality: list[Tensor], z: dict[str, Tensor], fused: Tensor, label: Tensor):
        target = self._targets(label)
        k = self.config.num_classes if self.config.task == "multilabel" else 1
        estimates = []
        for j in range(k):
            y = target[:, j] if self.config.task == "multilabel" else target
            cols = slice(2 * j, 2 * j + 2) if self.config.task == "multilabel" else slice(None)
            if self.config.head == "linear":
                estimates.append(tcmax_bound([t[:, cols] for t in per_modality], y, self.bias[cols]).estimate)
            else:
                critic = _ColumnCritic(self.critic, cols)
                feats = [z[m] for m in self.modalities]
                estimates.append(sampled_tc_bound(critic, feats, y, self.config.num_negatives).estimate)
        return torch.stack(estimates).sum(), target

    def _prediction(self, fused: Tensor) -> Tensor:
        if self.config.task == "regression":
            return expected_value(fused, self.centres)
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
