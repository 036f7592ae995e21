"""Late fusion baseline (decision level): one encoder and one prediction head per modality; the fused
prediction is the average of the heads' outputs over the modalities each sample has.

Per modality m: x_m (B, T_m, D_m) -> ``SequenceEncoder`` -> masked mean (B, H) -> head -> (B, out).
Loss: the task loss (L1 for regression, cross-entropy, or binary cross-entropy) on the fused prediction.
Diagnostics: each modality's own task loss on the samples that have it (detached).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fusion.base import FusionConfig, FusionModel, FusionOutput
from fusion.layers import OutputLinear, SequenceEncoder, masked_mean, task_loss


@dataclass
class LateConfig(FusionConfig):
    pass


class LateFusion(FusionModel):
    Config = LateConfig
    uses_every_parameter = True  # missing modalities are masked, never skipped (FusionModel)

    def __init__(self, config: LateConfig) -> None:
        super().__init__(config)
        c = config
        self.encoders = nn.ModuleDict(
            {m: SequenceEncoder(c.dims[m], c.hidden, c.num_layers, c.num_heads, c.dropout) for m in self.modalities}
        )
        self.heads = nn.ModuleDict(
            {m: nn.Sequential(nn.Dropout(c.dropout), OutputLinear(c.hidden, c.out_dim)) for m in self.modalities}
        )

    def forward(self, batch: dict[str, Tensor]) -> FusionOutput:
        inputs = self.prepare(batch)
        outputs, weights = [], []
        for m in self.modalities:
            pooled = masked_mean(self.encoders[m](inputs.feats[m], inputs.masks[m]), inputs.masks[m])
            outputs.append(self.heads[m](pooled))
            weights.append(inputs.present[m].float())
        stacked = torch.stack(outputs, 1)  # (B, M, out)
        w = torch.stack(weights, 1)[..., None]  # (B, M, 1)
        fused = (stacked * w).sum(1) / w.sum(1).clamp_min(1.0)
        prediction = fused.squeeze(-1) if self.config.task == "regression" else fused
        losses: dict[str, Tensor] = {}
        diagnostics: dict[str, Tensor] = {}
        if inputs.label is not None:
            losses["task"] = task_loss(prediction, inputs.label, self.config.task)
            with torch.no_grad():
                for i, m in enumerate(self.modalities):
                    single = stacked[:, i].squeeze(-1) if self.config.task == "regression" else stacked[:, i]
                    diagnostics[f"loss/{m}"] = task_loss(single, inputs.label, self.config.task, inputs.present[m])
        return FusionOutput(prediction, losses, diagnostics)
