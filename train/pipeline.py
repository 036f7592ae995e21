"""The trainable network: optional text / audio encoders (end-to-end mode) in front of a fusion model.

``FusionPipeline.forward(batch)`` takes a loader batch (train/stages.py) and returns the fusion model's
``FusionOutput``. It first makes the batch the models' inputs on the batch's device (``train.batches.Normalise``:
float16 features to float32, video geometry joined, train-split standardisation when ``config.data.normalise``),
so the training process does no per-element work on batches. In end-to-end mode the text features are
recomputed from ``text_ids`` and the audio features from ``audio_wave`` with gradients, then standardised with
the same train-split statistics the frozen features get, so at initialisation both modes feed the fusion model
identical inputs. Video always uses the stored landmarks. One module, so DDP wraps it whole. Token ids must lie
in the text encoder's vocabulary: callers check a batch with ``check_token_ids`` before it leaves the host.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

import fusion
from fusion.base import FusionOutput
from shards.dataset import ShardDataset
from train.batches import Normalise
from train.config import TrainConfig, TrainConfigError
from train.encoders import AudioEncoder, TextEncoder
from train.inputs import DataError, has_video_geom
from train.stages import STD_FLOOR, vocab_message


class FusionPipeline(nn.Module):
    def __init__(self, config: TrainConfig, dims: dict[str, int], dataset: ShardDataset) -> None:
        super().__init__()
        self.fusion = fusion.build_model(config.model, **config.model_kwargs(dims))
        self.normalise = _normalise(config, dims, dataset)
        self.encoders = nn.ModuleDict()
        self.end_to_end = config.mode == "end_to_end"
        if self.end_to_end:
            extractors = dataset.extractors
            lacking = [m for m in ("text", "audio") if m in config.data.modalities and m not in extractors]
            if lacking:
                raise TrainConfigError(
                    f"mode=end_to_end recomputes {' and '.join(lacking)} features with the encoders of the shards' "
                    "feature set, but these shards name none (imported pre-computed features?); use mode=frozen "
                    "or drop those modalities"
                )
            if "text" in config.data.modalities and "text" in extractors:
                self.encoders["text"] = TextEncoder(extractors["text"], config.grad_checkpointing)
            if "audio" in config.data.modalities and "audio" in extractors:
                self.encoders["audio"] = AudioEncoder(extractors["audio"], config.grad_checkpointing)
        for m in self.encoders:
            mean, std = _stats(dataset, dataset.feature_member(m))
            self.register_buffer(f"{m}_mean", mean)
            self.register_buffer(f"{m}_std", std)

    @property
    def text_vocab(self) -> int | None:
        """The text encoder's vocabulary size (end to end with text), which the loaders check ``text_ids`` against."""
        return self.encoders["text"].vocab_size if "text" in self.encoders else None

    def set_encoders_trainable(self, top_k: int) -> None:
        """-1: every encoder layer trains; k >= 0: only the top k transformer layers (0 = frozen)."""
        for enc in self.encoders.values():
            enc.set_trainable(top_k)

    def param_groups(self, lr: float, encoder_lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """The fusion model's own groups, then one per encoder; no weight decay on biases and norms."""
        groups = []
        for g in self.fusion.param_groups(lr):
            groups += _split_decay({**g, "name": f"fusion.{g['name']}"}, weight_decay)
        for m, enc in self.encoders.items():
            groups += _split_decay(
                {"name": f"{m}_encoder", "params": list(enc.parameters()), "lr": encoder_lr}, weight_decay
            )
        return [g for g in groups if g["params"]]

    def forward(self, batch: dict[str, Any]) -> FusionOutput:
        batch = self.normalise(batch)  # a new dict; float32 inputs already normalised pass unchanged
        if self.end_to_end:
            if "text" in self.encoders and "text_ids" in batch:  # ids checked on the host (``check_token_ids``)
                feats = self.encoders["text"](batch["text_ids"], batch["text_ids_mask"])
                batch["text"] = self._standardise("text", feats, batch["text_ids_mask"])
                batch["text_mask"] = batch["text_ids_mask"] & batch["text_mask"].any(1, keepdim=True)
            if "audio" in self.encoders and "audio_wave" in batch:
                frames, _ = self.encoders["audio"](batch["audio_wave"], batch["audio_wave_mask"])
                mask = batch["audio_mask"]
                frames = _fit_length(frames, mask.shape[1])
                batch["audio"] = self._standardise("audio", frames, mask)
        # tensors only: a compiled fusion model would guard on (and recompile for) strings such as "key"
        return self.fusion({k: v for k, v in batch.items() if isinstance(v, Tensor)})

    def _standardise(self, m: str, x: Tensor, mask: Tensor) -> Tensor:
        mean, std = getattr(self, f"{m}_mean"), getattr(self, f"{m}_std")
        return torch.where(mask[..., None], (x.float() - mean) / std, torch.zeros((), device=x.device))


def check_token_ids(batch: dict[str, Any], vocab: int | None) -> None:
    """``DataError`` naming the sample when a batch's ``text_ids`` (B, T) leave [0, vocab): the loaders check each
    sample already; the training step, ``evaluate`` and ``predict`` also check each batch here, on the host before
    it moves to the device (no device synchronisation, and nothing for a compiled forward to trace), since an id
    past the embedding is a device-side assert on CUDA, which ends the process without saying which sample.
    Nothing to check without a text encoder (``vocab`` None) or ids."""
    if vocab is None or "text_ids" not in batch:
        return
    ids = batch["text_ids"]
    outside = (ids < 0) | (ids >= vocab)
    if not bool(outside.any()):
        return
    row, col = (int(i) for i in outside.nonzero()[0])
    key = batch["key"][row] if "key" in batch else f"at batch row {row}"
    raise DataError(vocab_message(key, int(ids[row, col]), vocab))


def _normalise(config: TrainConfig, dims: dict[str, int], dataset: ShardDataset) -> Normalise:
    """The loader batches' step to model inputs, with the statistics the loader's config asks for."""
    if not config.data.normalise:
        return Normalise({}, {})
    geom = has_video_geom(dataset) if config.data.video_geom is None else config.data.video_geom
    return Normalise.from_dataset(dataset, config.data.modalities, geom, dims)


def _stats(dataset: ShardDataset, member: str) -> tuple[Tensor, Tensor]:
    stats = dataset.train_stats(member)
    if stats is None:
        raise ValueError(f"dataset.json has no train statistics for {member}; end-to-end mode standardises with them")
    mean = torch.tensor(stats.mean, dtype=torch.float32)
    std = torch.tensor(stats.std, dtype=torch.float32)
    return mean, torch.where(std < STD_FLOOR, torch.ones_like(std), std)  # as the loader's Normalise


def _fit_length(x: Tensor, length: int) -> Tensor:
    """Crop or zero-pad the time axis of (B, T, D) to ``length`` (the stored mask's padded length)."""
    if x.shape[1] >= length:
        return x[:, :length]
    return torch.nn.functional.pad(x, (0, 0, 0, length - x.shape[1]))


def _split_decay(group: dict[str, Any], weight_decay: float) -> list[dict[str, Any]]:
    decay = [p for p in group["params"] if p.dim() >= 2]
    no_decay = [p for p in group["params"] if p.dim() < 2]
    out = [{**group, "params": decay, "weight_decay": weight_decay}]
    if no_decay:
        out.append({**group, "name": group["name"] + ".no_decay", "params": no_decay, "weight_decay": 0.0})
    return out
