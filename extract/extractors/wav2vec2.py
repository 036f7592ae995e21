"""The exact batched wav2vec 2.0 forward, shared by extraction and end-to-end training.

A batch of waveforms (B, N) with their valid lengths (B,) goes through the model in one pass, with tensor
operations only (no per-clip Python loop, no host synchronisation, one graph under ``torch.compile``):

- the convolutional front end runs on the padded batch. A frame of a strided convolution without padding sees
  only the samples under it, so every valid frame of every layer is computed from valid samples alone. The one
  layer that mixes time, wav2vec2-base's group norm (one group per channel, normalised over the whole time
  axis), is computed over each clip's valid frames only (``masked_group_norm``); so a clip's features do not
  depend on what it is batched with, as if it ran alone;
- the frames are projected, zeroed past each clip's frame count and run once through the transformer with an
  attention mask. For wav2vec 2.0 and HuBERT encoders the layers are run here (``run_encoder``, checked equal to
  transformers' own encoder): transformers' LayerDrop decides each layer with a Python branch on a random
  tensor, which splits a compiled graph at every layer; here a dropped layer's output is discarded with
  ``torch.where`` (the same probability, and every parameter takes part, as DDP needs). Other families (WavLM)
  use transformers' encoder as it is.

``prepare_waves`` gives the batch exactly what extraction's ``wave_pieces`` gives one clip: clips shorter than
one frame zero-padded to the receptive field, then, with the checkpoint's ``do_normalize``, zero mean and unit
variance over each clip's samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

OWN_ENCODERS = ("Wav2Vec2Encoder", "Wav2Vec2EncoderStableLayerNorm", "HubertEncoder", "HubertEncoderStableLayerNorm")


def receptive_field(kernels: Sequence[int], strides: Sequence[int]) -> int:
    """Samples one output frame of a strided convolution stack sees."""
    field, jump = 1, 1
    for k, s in zip(kernels, strides, strict=True):
        field += (k - 1) * jump
        jump *= s
    return field


def prepare_waves(waves: Tensor, lengths: Tensor, receptive: int, normalise: bool) -> tuple[Tensor, Tensor]:
    """(B, N) float waveforms in [-1, 1] and their valid lengths (B,) -> the model's input and lengths: zeros
    past each length, at least ``receptive`` samples per clip (a shorter clip counts its zero padding, as
    ``wave_pieces`` pads it), and with ``normalise`` zero mean and unit variance over those samples."""
    waves = waves.float()
    if waves.shape[1] < receptive:
        waves = nn.functional.pad(waves, (0, receptive - waves.shape[1]))
    lengths = lengths.clamp_min(receptive)
    valid = torch.arange(waves.shape[1], device=waves.device)[None] < lengths[:, None]
    waves = torch.where(valid, waves, torch.zeros((), device=waves.device))
    if normalise:
        n = lengths[:, None].to(waves.dtype)
        mean = waves.sum(1, keepdim=True) / n
        var = (torch.where(valid, waves - mean, torch.zeros((), device=waves.device)) ** 2).sum(1, keepdim=True) / n
        waves = torch.where(valid, (waves - mean) / torch.sqrt(var + 1e-7), torch.zeros((), device=waves.device))
    return waves, lengths


def masked_group_norm(x: Tensor, valid: Tensor, norm: nn.GroupNorm) -> Tensor:
    """``norm`` (one group per channel) over the valid time steps only: x (B, C, T), valid (B, T) -> (B, C, T)
    in float32, as autocast runs group norm. Steps past a clip's end get finite values nobody reads."""
    if norm.num_groups != norm.num_channels:
        raise ValueError(f"group norm of {norm.num_groups} groups over {norm.num_channels} channels: not per channel")
    x = x.float()
    weight = valid[:, None].float()
    n = weight.sum(-1, keepdim=True).clamp_min(1.0)
    mean = (x * weight).sum(-1, keepdim=True) / n
    var = (((x - mean) * weight) ** 2).sum(-1, keepdim=True) / n
    out = (x - mean) / torch.sqrt(var + norm.eps)
    return out * norm.weight.float()[:, None] + norm.bias.float()[:, None] if norm.affine else out


def _group_norm_layer(layer: nn.Module, x: Tensor, lengths: Tensor) -> Tensor:
    x = layer.conv(x)
    valid = torch.arange(x.shape[-1], device=x.device)[None] < lengths[:, None]
    return layer.activation(masked_group_norm(x, valid, layer.layer_norm))


def front_end(model: Any, waves: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    """Prepared waveforms (B, N) and their lengths (B,) -> projected frames (B, T, D), zero past each clip's frame
    count, and the counts (B,)."""
    x = waves[:, None]
    for layer in model.feature_extractor.conv_layers:
        lengths = torch.div(lengths - layer.conv.kernel_size[0], layer.conv.stride[0], rounding_mode="floor") + 1
        if isinstance(getattr(layer, "layer_norm", None), nn.GroupNorm):
            if layer.gradient_checkpointing and layer.training:
                x = checkpoint(_group_norm_layer, layer, x, lengths, use_reentrant=False)
            else:
                x = _group_norm_layer(layer, x, lengths)
        else:  # no norm, or a norm per frame: padding never reaches a valid frame
            x = layer(x)
    proj = model.feature_projection(x.transpose(1, 2))
    hidden = proj[0] if isinstance(proj, tuple) else proj
    valid = torch.arange(hidden.shape[1], device=hidden.device)[None] < lengths[:, None]
    return hidden * valid[..., None].to(hidden.dtype), lengths


def run_encoder(encoder: nn.Module, hidden: Tensor, mask: Tensor, layer: int = -1) -> Tensor:
    """Hidden states of transformer ``layer`` (1-based, negative from the end, -1 = the encoder's output) for
    projected frames (B, T, D) with their frame mask (B, T). Padded frames must be zero (``front_end``)."""
    from transformers.masking_utils import create_bidirectional_mask

    layers = encoder.layers
    last = len(layers) if layer == -1 else (layer if layer > 0 else len(layers) + layer + 1)
    if type(encoder).__name__ not in OWN_ENCODERS:
        return _hooked_encoder(encoder, hidden, mask, last)
    stable = type(encoder).__name__.endswith("StableLayerNorm")
    # always built: transformers' skip of a mask with no padding tests it on the host (a GPU synchronisation)
    attention = create_bidirectional_mask(
        config=encoder.config, inputs_embeds=hidden, attention_mask=mask, allow_is_bidirectional_skip=False
    )
    hidden = hidden + encoder.pos_conv_embed(hidden)
    if not stable:
        hidden = encoder.layer_norm(hidden)
    hidden = encoder.dropout(hidden)
    drop = encoder.config.layerdrop if encoder.training else 0.0
    for block in list(layers)[:last]:
        out = block(hidden, attention_mask=attention)
        out = out[0] if isinstance(out, tuple) else out
        hidden = torch.where(torch.rand((), device=hidden.device) < drop, hidden, out) if drop > 0 else out
    return encoder.layer_norm(hidden) if stable and layer == -1 else hidden


def _hooked_encoder(encoder: nn.Module, hidden: Tensor, mask: Tensor, last: int) -> Tensor:
    """transformers' own encoder, with the output of layer ``last`` captured when it is not the last one."""
    captured: list[Tensor] = []
    hook = None
    if last != len(encoder.layers):
        hook = encoder.layers[last - 1].register_forward_hook(_Capture(captured))
    try:
        out = encoder(hidden, attention_mask=mask)
    finally:
        if hook is not None:
            hook.remove()
    return captured[-1] if captured else out.last_hidden_state


def encode_waves(model: Any, waves: Tensor, lengths: Tensor, layer: int = -1) -> tuple[Tensor, Tensor]:
    """Prepared waveforms (B, N) and lengths (B,) -> hidden states of ``layer`` (B, T, D), zero past each clip's
    frame count, and the counts (B,). Gradients flow when the caller allows them."""
    hidden, counts = front_end(model, waves, lengths)
    mask = torch.arange(hidden.shape[1], device=hidden.device)[None] < counts[:, None]
    states = run_encoder(model.encoder, hidden, mask, layer)
    return states * mask[..., None].to(states.dtype), counts


def encode_pieces(model: Any, pieces: list[Tensor], layer: int = -1) -> tuple[Tensor, Tensor]:
    """``encode_waves`` over prepared pieces of any lengths (each (N_i,), from ``wave_pieces``)."""
    lengths = torch.tensor([p.numel() for p in pieces], device=pieces[0].device)
    waves = nn.utils.rnn.pad_sequence([p.float() for p in pieces], batch_first=True)
    return encode_waves(model, waves, lengths, layer)


class _Capture:
    """Forward hook keeping a layer's output (a class, not a lambda, so modules stay picklable)."""

    def __init__(self, store: list[Tensor]) -> None:
        self.store = store

    def __call__(self, _module: Any, _inputs: Any, output: Any) -> None:
        self.store.append(output[0] if isinstance(output, tuple) else output)
