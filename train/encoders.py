"""Trainable text and audio encoders for end-to-end fine-tuning from the raw inputs stored in the shards.

Each wrapper loads exactly the model of the shards' feature set (``dataset.json``: model id or path, layer,
normalisation, chunking) and computes the same features extraction stored, but with gradients:

- ``TextEncoder``: ``text_ids`` (B, T) int64 + ``text_ids_mask`` -> hidden states of the configured layer
  (B, T, Dt);
- ``AudioEncoder``: ``audio_wave`` (B, N) float in [-1, 1] + ``audio_wave_mask`` -> wav2vec 2.0 frames of the
  configured layer (B, Ta, Da): one batched pass (``extract.extractors.wav2vec2``: padding never changes a
  clip's features, no host sync, one graph under ``torch.compile``); a batch holding a clip longer than the
  extraction chunk is encoded chunk by chunk, as extraction cut it.

A test checks that, at initialisation, both reproduce the features stored in the shards. Weights are
checked against the feature set's weight hash, so fine-tuning always starts from the extraction model.
``set_trainable(top_k)`` freezes everything but the top ``top_k`` transformer layers (-1: all, 0: none). The
audio model's convolutional front end is frozen through its own switch (``_freeze_parameters``): transformers'
feature encoder otherwise makes its input require grad in training mode, so a frozen front end would still be
back-propagated every step.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from extract.extractors.audio import build_random_wav2vec2, wave_pieces
from extract.extractors.wav2vec2 import encode_pieces, encode_waves, prepare_waves, receptive_field
from extract.models import RANDOM_PREFIX, resolve_model, weights_hash
from mmfuse.errors import MmfuseError
from shards.schema import SAMPLE_RATE

log = logging.getLogger(__name__)


class EncoderMismatch(MmfuseError, RuntimeError):
    """The encoder found for end-to-end training is not the one the shards were extracted with."""


def _check_hash(module: nn.Module, provenance: Mapping[str, Any], what: str) -> None:
    expected = provenance.get("weights_sha256")
    if expected and weights_hash(module) != expected:
        raise EncoderMismatch(
            f"{what} model {provenance.get('model')!r} found locally has different weights from the one the shards "
            f"were extracted with (weights hash {expected}); point to the same checkpoint or re-extract"
        )


def _set_top_k(layers: nn.ModuleList, everything: nn.Module, top_k: int) -> None:
    if top_k < 0:
        everything.requires_grad_(True)
        return
    everything.requires_grad_(False)
    for layer in list(layers)[len(layers) - top_k :] if top_k else []:
        layer.requires_grad_(True)


class TextEncoder(nn.Module):
    """The feature set's text transformer with gradients. forward(ids (B, T), mask (B, T)) -> (B, T, Dt)."""

    def __init__(self, provenance: Mapping[str, Any], gradient_checkpointing: bool = False) -> None:
        super().__init__()
        from transformers import AutoModel

        path = resolve_model(str(provenance["model"]), "text")
        # SDPA, fed a prepared mask (``key_mask``): no host synchronisation in the forward pass
        self.model = AutoModel.from_pretrained(path, local_files_only=True, attn_implementation="sdpa")
        _check_hash(self.model, provenance, "text")
        self.layer = int(provenance.get("layer", -1))
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable()

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.encoder.layer

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def vocab_size(self) -> int:
        """Rows of the token embedding: token ids must lie in [0, vocab_size)."""
        return int(self.model.get_input_embeddings().num_embeddings)

    def set_trainable(self, top_k: int) -> None:
        _set_top_k(self.layers, self.model, top_k)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        out = self.model(input_ids=ids.long(), attention_mask=key_mask(mask), output_hidden_states=self.layer != -1)
        return out.last_hidden_state if self.layer == -1 else out.hidden_states[self.layer]


def key_mask(mask: Tensor) -> Tensor:
    """The (B, 1, 1, T) boolean attention mask (True: attend to that key) that SDPA takes, from the tokens' (B, T)
    mask. Given the 2-D mask, transformers tests it on the host (``padding_mask.all()``) to leave it out when
    nothing is padded: a GPU synchronisation every training step. A sample with no valid token attends to every
    position, so no attention row is empty (its features are masked out after the encoder)."""
    keys = mask.bool()
    return (keys | ~keys.any(1, keepdim=True))[:, None, None, :]


class AudioEncoder(nn.Module):
    """The feature set's wav2vec 2.0-family model with gradients.

    forward(wave (B, N) float in [-1, 1], mask (B, N)) -> (frames (B, Ta, Da), frame counts (B,)).
    """

    def __init__(self, provenance: Mapping[str, Any], gradient_checkpointing: bool = False) -> None:
        super().__init__()
        model_id = str(provenance["model"])
        if model_id.startswith(RANDOM_PREFIX):
            self.model = build_random_wav2vec2(model_id[len(RANDOM_PREFIX) :])
        else:
            from transformers import AutoModel

            self.model = AutoModel.from_pretrained(resolve_model(model_id, "audio"), local_files_only=True)
        _check_hash(self.model, provenance, "audio")
        cfg = self.model.config
        self.layer = int(provenance.get("layer", -1))
        self.do_normalize = bool(provenance.get("do_normalize", True))
        self.stride = int(provenance.get("frame_stride_samples", 320))
        self.chunk = int(provenance.get("chunk_samples", 30 * SAMPLE_RATE))
        self.receptive = receptive_field(cfg.conv_kernel, cfg.conv_stride)
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable()

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.encoder.layers

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def set_trainable(self, top_k: int) -> None:
        _set_top_k(self.layers, self.model, top_k)
        front = self.model.feature_extractor
        if top_k < 0:
            front._requires_grad = True  # undoes _freeze_parameters
        else:
            front._freeze_parameters()  # requires_grad_(False) alone leaves the front end's own switch on

    def forward(self, wave: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        lengths = mask.sum(1)
        if wave.shape[1] <= self.chunk:  # every clip is one piece: one batched pass, no host sync
            return encode_waves(
                self.model, *prepare_waves(wave, lengths, self.receptive, self.do_normalize), self.layer
            )
        return self._chunked(wave, lengths)

    def _chunked(self, wave: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """A batch holding a clip longer than one chunk: each clip cut into chunks as extraction cuts it."""
        pieces: list[tuple[int, Tensor]] = []  # (clip index, prepared chunk), exactly as extraction prepares them
        for i, n in enumerate(lengths.tolist()):
            pieces += [
                (i, piece) for _, piece in wave_pieces(wave[i, :n], self.receptive, self.chunk, self.do_normalize)
            ]
        states, counts = encode_pieces(self.model, [piece for _, piece in pieces], self.layer)
        per_clip: list[list[Tensor]] = [[] for _ in range(wave.shape[0])]
        for k, ((i, _), n) in enumerate(zip(pieces, counts.tolist(), strict=True)):
            per_clip[i].append(states[k, :n])
        frames = [torch.cat(parts) for parts in per_clip]
        total = torch.tensor([f.shape[0] for f in frames], device=wave.device)
        return torch.nn.utils.rnn.pad_sequence(frames, batch_first=True), total
