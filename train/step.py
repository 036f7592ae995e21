"""One training step, as ``fit`` runs it and ``mmfuse bench train`` times it: ``grad_accum`` micro-batches
forward (under autocast) and backward (through the GradScaler), then one optimiser step: unscale, clip each
parameter group on its own, step, advance the schedule.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from fusion.base import FusionOutput
from train.run import Run


@dataclass
class Step:
    """What one ``train_step`` did. ``labelled``: samples with a label in its micro-batches. When it ended in an
    optimiser step: the last micro-batch's ``out`` and summed ``loss``, and ``grad_norm``, the gradient norm
    before clipping (all three None otherwise)."""

    labelled: int = 0
    out: FusionOutput | None = None
    loss: torch.Tensor | None = None
    grad_norm: torch.Tensor | None = None

    @property
    def stepped(self) -> bool:
        return self.grad_norm is not None


def train_step(run: Run, batches: list[dict[str, Any]]) -> Step:
    """Forward and backward over ``batches`` (the loader's next ``grad_accum`` batches, fewer at the end of an
    epoch), then one optimiser step when they are a full group.

    A micro-batch with no labelled sample is skipped (unlabelled samples are kept out of losses). A group whose
    last micro-batch is skipped, or an epoch's incomplete last group, takes no optimiser step: its gradients
    carry on into the next group of the epoch (an epoch starts from zero gradients).
    """
    config, net = run.config, run.net
    if net.end_to_end:  # the freeze / unfreeze schedule of the encoders
        net.set_encoders_trainable(config.unfreeze_top_k if run.step >= config.unfreeze_after else 0)
    step, last = Step(), None
    for i, batch in enumerate(batches):
        batch = to_device(labelled_rows(batch), run.d.device)
        step.labelled += len(batch["label"])
        has_label = batch["label"].numel() > 0
        last = forward_backward(run, batch, sync=i == config.optim.grad_accum - 1) if has_label else None
    if len(batches) == config.optim.grad_accum and last is not None:
        step.out, step.loss = last
        step.grad_norm = optimizer_step(run)
    return step


def forward_backward(run: Run, batch: dict[str, Any], *, sync: bool) -> tuple[FusionOutput, torch.Tensor]:
    """One micro-batch: forward under autocast, then backward of its summed losses over ``grad_accum`` (so a
    group's gradient is the mean over its micro-batches) through the GradScaler. Returns the output and the
    summed losses."""
    # DDP: all-reduce gradients only on the micro-batch that ends a group (``sync``)
    no_sync = isinstance(run.model, DistributedDataParallel) and not sync
    with run.model.no_sync() if no_sync else nullcontext():
        with run.autocast():
            out = run.model(batch)
        loss = sum(out.losses.values())
        run.scaler.scale(loss / run.config.optim.grad_accum).backward()
    return out, loss


def optimizer_step(run: Run) -> torch.Tensor:
    """Unscale the accumulated gradients, clip each parameter group to ``clip_norm`` on its own, step through
    the scaler, clear the gradients, advance the schedule and ``run.step``. Returns the norm before clipping."""
    run.scaler.unscale_(run.optimizer)
    grad_norm = clip_grad_norm_per_group(run.optimizer, run.config.optim.clip_norm or float("inf"))
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    run.step += 1
    return grad_norm


def clip_grad_norm_per_group(optimizer: torch.optim.Optimizer, max_norm: float) -> torch.Tensor:
    """Clip the gradient of each parameter group to ``max_norm`` on its own; returns the norm over all groups
    before clipping (what one global clip would see, for logging).

    One global norm lets a group with a large gradient (a CLUB q fitting its likelihood) shrink every other
    group's step. A group and its weight-decay split (``name`` and ``name.no_decay``) are clipped as one.
    """
    groups: dict[str, list[torch.Tensor]] = {}
    for i, group in enumerate(optimizer.param_groups):
        groups.setdefault(str(group.get("name", i)).removesuffix(".no_decay"), []).extend(group["params"])
    norms = [torch.nn.utils.clip_grad_norm_(params, max_norm) for params in groups.values()]
    device = next((n.device for n in norms if n.device.type != "cpu"), torch.device("cpu"))
    return torch.linalg.vector_norm(torch.stack([n.float().to(device) for n in norms]))


def labelled_rows(batch: dict[str, Any]) -> dict[str, Any]:
    """The rows of a batch that have a finite label (unlabelled samples cannot be trained or scored)."""
    label = batch["label"]
    finite = torch.isfinite(label) if label.dim() == 1 else torch.isfinite(label).all(-1)
    if bool(finite.all()):
        return batch
    index = finite.nonzero().squeeze(1)
    out = {k: v[index] for k, v in batch.items() if isinstance(v, torch.Tensor)}
    out["key"] = [batch["key"][i] for i in index.tolist()]
    return out


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    pin = device.type == "cuda"
    return {
        k: (v.pin_memory().to(device, non_blocking=True) if pin else v.to(device)) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }
