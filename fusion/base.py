"""The one interface every fusion model implements.

Batch in (a dict of tensors, as the training collate or the synthetic generator produces it):

- ``"text"`` / ``"audio"`` / ``"video"``: (B, T_m, D_m) float features (encoder outputs or shard features);
- ``"text_mask"`` / ...: (B, T_m) bool masks in the convention of shards/schema.py (True = valid step; a
  sample whose mask is all False is *missing* that modality); a modality absent from the batch is missing for
  every sample;
- ``"label"``: (B,) float for ``regression``, (B,) int for ``classification``, (B, K) {0, 1} for
  ``multilabel`` (optional at inference).

Out (``FusionOutput``): ``prediction`` ((B,) for regression, (B, C) logits for classification, (B, K) logits
for multilabel), ``losses`` (named, already weighted scalars; their sum is the objective), ``diagnostics``
(detached MI estimates, gate rates, weights; 0-dim tensors are logged, others are for analysis).

Optimiser groups: ``param_groups(lr)`` returns torch-optimiser dicts with a ``name``. A model whose groups
minimise different losses (the CLUB critics, MIM's purification gates) routes gradients inside its
forward with ``detach`` / ``frozen_call``, so ONE backward of ``sum(losses)`` gives every group exactly the
gradient of its own losses. That keeps one forward and one backward per step, and DDP works unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MODALITIES: tuple[str, ...] = ("text", "audio", "video")
TASKS: tuple[str, ...] = ("regression", "classification", "multilabel")
SHORT_NAMES: dict[str, str] = {"t": "text", "a": "audio", "v": "video"}


class FusionConfigError(ValueError):
    """A fusion model configuration problem; the message lists every problem and the valid keys."""


@dataclass
class FusionConfig:
    """Settings every model shares. Model files subclass this with their own hyper-parameters.

    ``dims`` maps each modality the model uses to its input feature size; its keys choose the modalities
    (any non-empty subset of text, audio, video).
    """

    dims: dict[str, int] = field(default_factory=dict)
    task: str = "regression"  # regression | classification | multilabel
    num_classes: int = 1  # classes (classification) or labels (multilabel); 1 for regression
    hidden: int = 64  # width of every modality's representation
    num_layers: int = 1  # transformer layers per modality encoder (0 = projection only)
    num_heads: int = 4  # attention heads; must divide hidden
    dropout: float = 0.1  # in the modality encoders and before each output layer
    modality_dropout: float = 0.0  # training only: drop each present modality of a sample with this probability
    faithful: bool = False  # reproduce the published code's behaviour where it departs from good practice

    def problems(self) -> list[str]:
        """Every problem with these settings (empty when valid); subclasses extend it."""
        out = []
        if not self.dims:
            out.append("dims: give the feature size of at least one modality, e.g. {'text': 768}")
        for name, dim in self.dims.items():
            if name not in MODALITIES:
                out.append(f"dims: unknown modality {name!r}; valid: {', '.join(MODALITIES)}")
            elif not isinstance(dim, int) or dim < 1:
                out.append(f"dims.{name}: must be a positive int, got {dim!r}")
        if self.task not in TASKS:
            out.append(f"task: must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.task == "classification" and self.num_classes < 2:
            out.append(f"num_classes: classification needs at least 2 classes, got {self.num_classes}")
        if self.task == "multilabel" and self.num_classes < 1:
            out.append(f"num_classes: multilabel needs at least 1 label, got {self.num_classes}")
        if self.hidden < 1 or self.num_heads < 1 or self.hidden % self.num_heads:
            out.append(f"hidden ({self.hidden}) must be a positive multiple of num_heads ({self.num_heads})")
        if self.num_layers < 0:
            out.append(f"num_layers: must be >= 0, got {self.num_layers}")
        if not 0.0 <= self.dropout < 1.0:
            out.append(f"dropout: must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.modality_dropout < 1.0:
            out.append(f"modality_dropout: must be in [0, 1), got {self.modality_dropout}")
        return out

    @property
    def modalities(self) -> tuple[str, ...]:
        """The modalities in use, in canonical order (text, audio, video)."""
        return tuple(m for m in MODALITIES if m in self.dims)

    @property
    def out_dim(self) -> int:
        """Width of the prediction: 1 (regression), C (classification) or K (multilabel)."""
        return 1 if self.task == "regression" else self.num_classes


def make_config(config_cls: type[FusionConfig], values: dict[str, Any]) -> FusionConfig:
    """Build ``config_cls`` from a plain dict, collecting unknown keys and invalid values into one error."""
    known = {f.name for f in dataclasses.fields(config_cls)}
    problems = [f"unknown key {k!r}" for k in values if k not in known]
    if problems:
        problems.append(f"valid keys for {config_cls.__name__}: {', '.join(sorted(known))}")
        raise FusionConfigError("; ".join(problems))
    config = config_cls(**values)
    problems = config.problems()
    if problems:
        raise FusionConfigError(f"invalid {config_cls.__name__}: " + "; ".join(problems))
    return config


class FusionOutput(NamedTuple):
    prediction: Tensor
    losses: dict[str, Tensor]
    diagnostics: dict[str, Tensor]


@dataclass
class Inputs:
    """A batch after ``FusionModel.prepare``: only the model's modalities, padding zeroed.

    ``feats[m]`` (B, T, D) is zero wherever ``masks[m]`` is False; ``present[m]`` (B,) says whether sample b
    has modality m at all (after modality dropout); ``label`` is the batch label or None.
    """

    feats: dict[str, Tensor]
    masks: dict[str, Tensor]
    present: dict[str, Tensor]
    label: Tensor | None

    @property
    def batch_size(self) -> int:
        return next(iter(self.feats.values())).shape[0]


class FusionModel(nn.Module):
    """Base class: subclasses set ``Config`` and implement ``forward(batch) -> FusionOutput``.

    ``uses_every_parameter``: a model sets it True when one backward of ``sum(losses)`` after a training forward
    gives every parameter that requires a gradient a gradient (zeros allowed, never None), whatever modalities
    are present: samples with all-False masks, a modality absent from the batch, every configuration the model
    accepts. Missing modalities must then be handled with tensor ops (masks, ``torch.where``), not by skipping
    modules. DDP can then run without ``find_unused_parameters`` (train/run.py). Default False: not claimed.
    """

    Config: ClassVar[type[FusionConfig]] = FusionConfig
    uses_every_parameter: bool = False
    # Loss keys that only fit an estimator's own critic (BC-PMJRS's CLUB likelihood): left out of the gradient
    # shares, whose question is what drives the representation and the prediction.
    critic_fit_losses: ClassVar[tuple[str, ...]] = ()
    # The evaluation metrics that show the method's own mechanism at work (``fnmatch`` patterns over ``fit``'s
    # metric names: ``grad_share/<loss>``, ``diag/<key>``); ``mmfuse bench models`` prints them beside the scores.
    # Empty for the baselines, which have no mechanism of their own.
    mechanism_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: FusionConfig) -> None:
        super().__init__()
        problems = config.problems()
        if problems:
            raise FusionConfigError(f"invalid {type(config).__name__}: " + "; ".join(problems))
        self.config = config
        self.modalities = config.modalities

    def forward(self, batch: dict[str, Tensor]) -> FusionOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """Optimiser parameter groups, each a dict with ``name``, ``params`` and ``lr``. Default: one group."""
        return [{"name": "model", "params": [p for p in self.parameters() if p.requires_grad], "lr": lr}]

    def mechanism(self, batch: dict[str, Tensor]) -> dict[str, float]:
        """How much each loss term drives the model, measured on one labelled ``batch`` (see ``gradient_shares``).

        Returns ``grad_share/<loss>`` for every loss key. Runs in eval mode (no dropout, deterministic gates) with
        gradients enabled and leaves no gradient behind; the trainer calls it on the first validation batch of
        every evaluation, so a method whose own term carries no gradient shows it in the logs.
        """
        return mechanism_shares(self, batch)

    def end_epoch(self, val_metrics: dict[str, float]) -> dict[str, float]:
        """Called by the trainer after each validation pass; models with epoch-level rules (BC-PMJRS's
        LTP/LTD weights) update buffers here and return what changed, for logging. Default: nothing."""
        return {}

    def prepare(self, batch: dict[str, Tensor]) -> Inputs:
        """Select this model's modalities, check shapes, zero padding, apply modality dropout (training)."""
        feats: dict[str, Tensor] = {}
        masks: dict[str, Tensor] = {}
        batch_size = _batch_size(batch, self.modalities)
        device = next((batch[m].device for m in self.modalities if m in batch), _param_device(self))
        for m in self.modalities:
            dim = self.config.dims[m]
            if m not in batch:  # the whole batch lacks this modality: one masked step of zeros
                feats[m] = torch.zeros(batch_size, 1, dim, device=device)
                masks[m] = torch.zeros(batch_size, 1, dtype=torch.bool, device=device)
                continue
            x = batch[m]
            if x.dim() != 3 or x.shape[0] != batch_size or x.shape[2] != dim:
                raise ValueError(f"batch[{m!r}] must be (B={batch_size}, T, {dim}), got {tuple(x.shape)}")
            mask = batch.get(f"{m}_mask")
            if mask is None:
                mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
            elif tuple(mask.shape) != tuple(x.shape[:2]):
                raise ValueError(f"batch['{m}_mask'] must be {tuple(x.shape[:2])}, got {tuple(mask.shape)}")
            mask = mask.to(torch.bool)
            # where(), not multiplication: NaN/inf or garbage in padded steps must not leak anywhere.
            feats[m] = torch.where(mask[..., None], x, torch.zeros((), dtype=x.dtype, device=x.device)).float()
            masks[m] = mask
        present = {m: masks[m].any(1) for m in self.modalities}
        if self.training and self.config.modality_dropout > 0:
            present = modality_dropout(present, self.config.modality_dropout)
            for m in self.modalities:
                masks[m] = masks[m] & present[m][:, None]
                feats[m] = feats[m] * present[m][:, None, None]
        return Inputs(feats, masks, present, batch.get("label"))


def mechanism_shares(model: nn.Module, batch: dict[str, Tensor]) -> dict[str, float]:
    """``grad_share/<loss>`` of ``model`` (a fusion model, or a module holding one as ``.fusion`` whose forward
    returns ``FusionOutput``) on ``batch``, in eval mode with gradients enabled, for every loss but the fusion
    model's ``critic_fit_losses``; the module's train/eval mode is restored."""
    skip = set(getattr(getattr(model, "fusion", model), "critic_fit_losses", ()))
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            losses = {k: v for k, v in model(batch).losses.items() if k not in skip}
            return {f"grad_share/{k}": v for k, v in gradient_shares(losses, model.parameters()).items()}
    finally:
        model.train(was_training)


def gradient_shares(losses: dict[str, Tensor], parameters: Any) -> dict[str, float]:
    """Each loss term's share of the gradient: ||d loss_k / d theta|| / sum_j ||d loss_j / d theta||.

    theta: every parameter in ``parameters`` that requires a gradient, all optimiser groups together
    (``mechanism_shares`` leaves out the losses that only fit an estimator's critic). The norms are of each
    term's own gradient, taken separately (terms whose gradients cancel each other both count in full). A term
    with no path to any parameter has share 0. Returns {} when no term has a gradient. Uses
    ``torch.autograd.grad``: no ``.grad`` is written.
    """
    params = [p for p in parameters if p.requires_grad]
    norms: dict[str, float] = {}
    keys = [k for k, v in losses.items() if v.requires_grad]
    for i, key in enumerate(keys):
        grads = torch.autograd.grad(losses[key], params, retain_graph=i < len(keys) - 1, allow_unused=True)
        norms[key] = math.sqrt(sum(float(g.float().pow(2).sum()) for g in grads if g is not None))
    norms.update({k: 0.0 for k in losses if k not in norms})
    total = sum(norms.values())
    return {k: v / total for k, v in norms.items()} if total > 0 else {}


def modality_dropout(
    present: dict[str, Tensor], p: float, generator: torch.Generator | None = None
) -> dict[str, Tensor]:
    """Drop each present modality of each sample with probability ``p``, never all of a sample's modalities.

    ``present``: modality -> (B,) bool. When every present modality of a sample would be dropped, one of them,
    chosen uniformly, is kept. Samples with no modality at all stay as they are.
    """
    names = list(present)
    stacked = torch.stack([present[m] for m in names], 1)  # (B, M)
    device = stacked.device
    keep = stacked & (torch.rand(stacked.shape, device=device, generator=generator) >= p)
    lost_all = stacked.any(1) & ~keep.any(1)
    # drawn for every sample, used where needed: no host sync on whether any sample lost everything
    scores = torch.rand(stacked.shape, device=device, generator=generator) * stacked
    rescue = F.one_hot(scores.argmax(1), stacked.shape[1]).to(torch.bool)
    keep = keep | (rescue & lost_all[:, None])
    return {m: keep[:, i] for i, m in enumerate(names)}


def _batch_size(batch: dict[str, Tensor], modalities: tuple[str, ...]) -> int:
    for m in modalities:
        if m in batch:
            return int(batch[m].shape[0])
    if "label" in batch:
        return int(batch["label"].shape[0])
    raise ValueError(f"the batch holds none of this model's modalities ({', '.join(modalities)}) and no label")


def _param_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device
