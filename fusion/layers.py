"""Small layers and loss helpers shared by the model files (and tested as shared in tests/fusion).

Masks follow the one convention stated in shards/schema.py (bool, True = valid). Every layer here leaves
padded steps out of attention, pooling and losses, so the values stored at padded steps never change an output.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

# ---- masks and pooling -------------------------------------------------------------------------------


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of x (B, T, D) over valid steps of mask (B, T) -> (B, D); zeros for a sample with none."""
    weights = mask.to(x.dtype)[..., None]
    return (x * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def attention_padding(mask: Tensor) -> Tensor:
    """``key_padding_mask`` for ``nn.MultiheadAttention`` (True = ignore) from a validity mask (B, T).

    A sample with no valid step keeps its first step visible, so softmax never sees only -inf (which
    gives NaN); the caller masks that sample's output anyway. Tensor ops only (no host sync), so it compiles.
    """
    first = torch.zeros_like(mask)
    first[:, 0] = True
    return ~mask & ~(first & ~mask.any(1, keepdim=True))


def last_valid_length(mask: Tensor) -> Tensor:
    """(B,) index of the last valid step + 1 (at least 1), for packing recurrent inputs."""
    steps = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    return (mask * steps).amax(1).clamp_min(1)


def sinusoidal_positions(length: int, dim: int, device: torch.device | None = None) -> Tensor:
    """(length, dim) sinusoidal position table (Vaswani et al. 2017); odd ``dim`` supported."""
    pos = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim, device=device)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return table


# ---- encoders ----------------------------------------------------------------------------------------


class SequenceEncoder(nn.Module):
    """Per-modality encoder: linear projection to ``hidden``, sinusoidal positions, ``num_layers`` pre-norm
    transformer layers with key padding. x (B, T, Din), mask (B, T) -> (B, T, hidden), zero at invalid steps."""

    def __init__(self, in_dim: int, hidden: int, num_layers: int = 1, num_heads: int = 4, dropout: float = 0.1):
        super().__init__()
        self.proj = nn.Linear(in_dim, hidden)
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(hidden, num_heads, 2 * hidden, dropout, batch_first=True, norm_first=True)
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(hidden) if num_layers else nn.Identity()

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        h = self.proj(x) * math.sqrt(self.proj.out_features)
        h = self.dropout(h + sinusoidal_positions(x.shape[1], h.shape[-1], x.device))
        padding = attention_padding(mask)
        for layer in self.layers:
            h = layer(h, src_key_padding_mask=padding)
        return self.norm(h) * mask[..., None]


class CrossModalBlock(nn.Module):
    """MulT-style cross-modal layer: target steps attend to source steps (per sample), then a feed-forward.

    target (B, Tq, H) with mask (B, Tq); source (B, Tk, H) with mask (B, Tk) -> (B, Tq, H), zero at invalid
    target steps. A sample whose source is missing gets no update from it (only the feed-forward).
    """

    def __init__(self, hidden: int, num_heads: int = 4, dropout: float = 0.1) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(hidden)
        self.norm_kv = nn.LayerNorm(hidden)
        self.attn = nn.MultiheadAttention(hidden, num_heads, dropout=dropout, batch_first=True)
        self.norm_ff = nn.LayerNorm(hidden)
        self.ff = nn.Sequential(
            nn.Linear(hidden, 2 * hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(2 * hidden, hidden)
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, target: Tensor, target_mask: Tensor, source: Tensor, source_mask: Tensor) -> Tensor:
        kv = self.norm_kv(source)
        update, _ = self.attn(
            self.norm_q(target), kv, kv, key_padding_mask=attention_padding(source_mask), need_weights=False
        )
        has_source = source_mask.any(1)[:, None, None]
        h = target + self.dropout(update) * has_source
        h = h + self.dropout(self.ff(self.norm_ff(h)))
        return h * target_mask[..., None]


class AttentionPool(nn.Module):
    """Pool (B, T, H) with mask (B, T) to G vectors (B, G, H) by G learned queries (per sample)."""

    def __init__(self, hidden: int, num_queries: int = 1, num_heads: int = 4, dropout: float = 0.1) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(num_queries, hidden) / math.sqrt(hidden))
        self.attn = nn.MultiheadAttention(hidden, num_heads, dropout=dropout, batch_first=True)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        q = self.queries[None].expand(x.shape[0], -1, -1)
        out, _ = self.attn(q, x, x, key_padding_mask=attention_padding(mask), need_weights=False)
        return out * mask.any(1)[:, None, None]


# ---- tasks -------------------------------------------------------------------------------------------


class OutputLinear(nn.Linear):
    """A model's output layer (its prediction, or logits a loss reads directly) computed in float32 under any
    autocast. Under fp16 the loss's gradient enters the network here multiplied by the loss scale: an L1 loss at
    batch 1 sends back +-1 x 65536, past fp16's largest value (65504), and an fp16 prediction would turn it into
    inf and make the scaler skip the step. In float32 only the gradient of the input, scaled down by the weights,
    goes back in the autocast dtype. Same parameters and state-dict keys as ``nn.Linear``."""

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


def task_loss(prediction: Tensor, label: Tensor, task: str, weight: Tensor | None = None, kind: str = "l1") -> Tensor:
    """Per-sample task loss averaged over samples with ``weight`` (B,) (bool or float; None = all).

    regression: prediction (B,), label (B,) float, ``kind`` "l1" or "mse"; classification: logits (B, C),
    label (B,) int, cross-entropy; multilabel: logits (B, K), label (B, K) {0, 1}, binary cross-entropy
    averaged over labels. Returns 0 (with a gradient path) when no sample has weight.
    """
    if task == "regression":
        diff = prediction.float().reshape(-1) - label.float().reshape(-1)
        per_sample = diff.abs() if kind == "l1" else diff.pow(2)
    elif task == "classification":
        per_sample = F.cross_entropy(prediction.float(), label.long().reshape(-1), reduction="none")
    elif task == "multilabel":
        per_sample = F.binary_cross_entropy_with_logits(prediction.float(), label.float(), reduction="none").mean(-1)
    else:
        raise ValueError(f"unknown task {task!r}")
    if weight is None:
        return per_sample.mean()
    weight = weight.to(per_sample.dtype)
    return (per_sample * weight).sum() / weight.sum().clamp_min(1.0)


def regression_bins(num_bins: int, low: float = -3.0, high: float = 3.0) -> Tensor:
    """Centres of ``num_bins`` equal-width bins covering [low, high] inclusive of both ends (7 -> integers
    -3..3, 13 -> steps of 0.5, 25 -> steps of 0.25 on the sentiment scale)."""
    if num_bins < 2:
        raise ValueError(f"regression needs at least 2 bins, got {num_bins}")
    return torch.linspace(low, high, num_bins)


def bin_index(label: Tensor, centres: Tensor) -> Tensor:
    """Index (B,) of the nearest bin centre for each float label (labels outside the range clip to an end)."""
    return (label.float().reshape(-1, 1) - centres.to(label.device)[None]).abs().argmin(1)


def expected_value(logits: Tensor, centres: Tensor) -> Tensor:
    """Regression prediction from bin logits (B, C): sum_c softmax(logits)_c * centre_c -> (B,)."""
    return (logits.float().softmax(-1) * centres.to(logits.device)).sum(-1)


# ---- gradient routing --------------------------------------------------------------------------------


def frozen_call(module: nn.Module, *args: Tensor) -> Tensor:
    """Call ``module`` with its parameters detached: gradients reach the inputs, never the module.

    Used where one network is both fitted by one loss and used as a fixed critic by another (CLUB's q):
    both losses can then be summed and back-propagated once.
    """
    params = {name: p.detach() for name, p in module.named_parameters()}
    buffers = dict(module.named_buffers())
    return functional_call(module, {**params, **buffers}, args)
