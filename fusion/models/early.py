"""Early fusion baseline (feature level): concatenate the modalities' raw features, then one network.

The modalities are not time-aligned (text tokens, 50 Hz audio, 25 fps video), so the raw features are
summarised per utterance before concatenation: for each modality the masked mean and standard deviation
over its valid steps, plus a presence flag (0 and zeros when the sample lacks the modality). The vector
[mean_t; std_t; 1_t; mean_a; std_a; 1_a; ...] goes through an MLP (``num_layers`` hidden layers of width
``hidden``, at least one) to the prediction. This is the classic concatenation baseline with no temporal
modelling and no per-modality encoder. Loss: the task loss (L1 for regression).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fusion.base import FusionConfig, FusionModel, FusionOutput
from fusion.layers import OutputLinear, masked_mean, task_loss


@dataclass
class EarlyConfig(FusionConfig):
    pass


class EarlyFusion(FusionModel):
    Config = EarlyConfig
    uses_every_parameter = True  # missing modalities are masked, never skipped (FusionModel)

    def __init__(self, config: EarlyConfig) -> None:
        super().__init__(config)
        c = config
        width = sum(2 * c.dims[m] + 1 for m in self.modalities)
        layers: list[nn.Module] = [nn.LayerNorm(width)]
        for _ in range(max(1, c.num_layers)):
            layers += [nn.Linear(width, c.hidden), nn.ReLU(), nn.Dropout(c.dropout)]
            width = c.hidden
        layers.append(OutputLinear(width, c.out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, batch: dict[str, Tensor]) -> FusionOutput:
        inputs = self.prepare(batch)
        parts = []
        for m in self.modalities:
            x, mask = inputs.feats[m], inputs.masks[m]
            mean = masked_mean(x, mask)
            var = masked_mean((x - mean[:, None]) ** 2, mask)
            parts += [mean, var.clamp_min(1e-8).sqrt() * inputs.present[m][:, None], inputs.present[m][:, None].float()]
        out = self.net(torch.cat(parts, -1))
        prediction = out.squeeze(-1) if self.config.task == "regression" else out
        losses = {} if inputs.label is None else {"task": task_loss(prediction, inputs.label, self.config.task)}
        return FusionOutput(prediction, losses, {})
