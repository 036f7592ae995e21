"""MulT baseline (Tsai et al. 2019, "Multimodal Transformer for Unaligned Multimodal Language Sequences"), small.

Per modality m: x_m (B, T_m, D_m) -> ``SequenceEncoder`` -> h_m (B, T_m, H). For each target modality m and
each other modality s, a stack of ``cross_layers`` ``CrossModalBlock``s lets m's steps attend to s's steps
(m <- s), per sample and unaligned (no step correspondence is assumed). The M - 1 outputs for target m are
concatenated (B, T_m, (M - 1) H), mapped back to H by a Linear, passed through ``memory_layers`` pre-norm
self-attention layers with key padding (MulT's "memory" transformer) and a LayerNorm, then masked-mean pooled
to (B, H). A single-modality model uses its encoder output directly.

Fusion: the pooled vectors are concatenated in modality order, zeros for modalities a sample lacks, plus an
M-dim presence indicator -> MLP head -> (B,) regression, (B, C) or (B, K) logits.
Loss: ``task`` only (L1 for regression, cross-entropy, or binary cross-entropy). One parameter group.

Departures from the released MulT: per-modality transformer encoders (MulT uses 1-D convolutions only); the
pooled representation is the masked mean, not the last time step (which is padding for short sequences in a
padded batch); no causal mask; masks for padding and missing modalities throughout. ``faithful`` has no
effect: MulT is a reference architecture here, not a method whose released defects we reproduce.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fusion.base import FusionConfig, FusionModel, FusionOutput
from fusion.layers import CrossModalBlock, OutputLinear, SequenceEncoder, attention_padding, masked_mean, task_loss


@dataclass
class MulTConfig(FusionConfig):
    cross_layers: int = 1  # CrossModalBlock layers per directed modality pair (target <- source)
    memory_layers: int = 1  # self-attention layers over each target's concatenated cross-modal outputs (0 = none)

    def problems(self) -> list[str]:
        out = super().problems()
        if self.cross_layers < 1:
            out.append(f"cross_layers: must be >= 1, got {self.cross_layers}")
        if self.memory_layers < 0:
            out.append(f"memory_layers: must be >= 0, got {self.memory_layers}")
        return out


class MulT(FusionModel):
    Config = MulTConfig
    uses_every_parameter = True  # missing modalities are masked, never skipped (FusionModel)

    def __init__(self, config: MulTConfig) -> None:
        super().__init__(config)
        c, h = config, config.hidden
        mods = self.modalities
        self.encoders = nn.ModuleDict(
            {m: SequenceEncoder(c.dims[m], h, c.num_layers, c.num_heads, c.dropout) for m in mods}
        )
        targets = mods if len(mods) > 1 else ()
        self.cross = nn.ModuleDict(
            {
                f"{m}_{s}": nn.ModuleList(CrossModalBlock(h, c.num_heads, c.dropout) for _ in range(c.cross_layers))
                for m in targets
                for s in mods
                if s != m
            }
        )
        self.merge = nn.ModuleDict({m: nn.Linear((len(mods) - 1) * h, h) for m in targets})
        self.memory = nn.ModuleDict(
            {
                m: nn.ModuleList(
                    nn.TransformerEncoderLayer(h, c.num_heads, 2 * h, c.dropout, batch_first=True, norm_first=True)
                    for _ in range(c.memory_layers)
                )
                for m in targets
            }
        )
        self.memory_norm = nn.ModuleDict({m: nn.LayerNorm(h) for m in targets})
        width = len(mods) * (h + 1)
        self.head = nn.Sequential(nn.Linear(width, h), nn.ReLU(), nn.Dropout(c.dropout), OutputLinear(h, c.out_dim))

    def forward(self, batch: dict[str, Tensor]) -> FusionOutput:
        inputs = self.prepare(batch)
        encoded = {m: self.encoders[m](inputs.feats[m], inputs.masks[m]) for m in self.modalities}
        pooled = []
        for m in self.modalities:
            mask = inputs.masks[m]
            sequence = encoded[m] if len(self.modalities) == 1 else self.cross_modal(m, encoded, inputs.masks)
            pooled.append(masked_mean(sequence, mask) * inputs.present[m][:, None])
        presence = torch.stack([inputs.present[m] for m in self.modalities], 1).float()  # (B, M)
        logits = self.head(torch.cat([*pooled, presence], 1))
        prediction = logits.squeeze(-1) if self.config.task == "regression" else logits
        losses: dict[str, Tensor] = {}
        if inputs.label is not None:
            losses["task"] = task_loss(prediction, inputs.label, self.config.task)
        return FusionOutput(prediction, losses, {})

    def cross_modal(self, m: str, encoded: dict[str, Tensor], masks: dict[str, Tensor]) -> Tensor:
        """Target m's steps after attending to every other modality: (B, T_m, H), zero at invalid steps."""
        outputs = []
        for s in self.modalities:
            if s == m:
                continue
            h = encoded[m]
            for block in self.cross[f"{m}_{s}"]:
                h = block(h, masks[m], encoded[s], masks[s])
            outputs.append(h)
        h = self.merge[m](torch.cat(outputs, -1))
        padding = attention_padding(masks[m])
        for layer in self.memory[m]:
            h = layer(h, src_key_padding_mask=padding)
        return self.memory_norm[m](h) * masks[m][..., None]
