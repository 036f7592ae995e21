"""One training step, as ``fit`` runs it and ``mmfuse bench train`` times it: ``grad_accum`` micro-batches
forward (under autocast) and backward (through the GradScaler), then one optimiser step: unscale, clip each
parameter group on its own, step, advance the schedule.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from fusion.base import FusionOutput
from train.pipeline import check_token_ids
from train.run import Run, train_encoders


@dataclass
class Step:
    """What one ``train_step`` did. ``labelled``: samples with a label in its micro-batches. When it ended a full
    group: the last micro-batch's ``out`` and summed ``loss``; ``grad_norm``, the gradient norm before clipping,
    when the optimiser stepped (None otherwise, and when the scaler ``skipped`` the step)."""

    labelled: int = 0
    out: FusionOutput | None = None
    loss: torch.Tensor | None = None
    grad_norm: torch.Tensor | None = None
    skipped: bool = False  # the scaler skipped the optimiser step (inf/NaN gradients)

    @property
    def stepped(self) -> bool:
        return self.grad_norm is not None


def train_step(run: Run, batches: list[dict[str, Any]]) -> Step:
    """Forward and backward over ``batches`` (the loader's next ``grad_accum`` batches, fewer at the end of an
    epoch), then one optimiser step when they are a full group.

    A micro-batch with no labelled sample on any rank is skipped (unlabelled samples are kept out of losses).
    Under DDP a rank whose micro-batch has no label while another's has runs it anyway with zero weight, so
    every rank takes part in the same gradient reductions and steps. A group whose last micro-batch is skipped,
    or an epoch's incomplete last group, takes no optimiser step: its gradients carry on into the next group of
    the epoch (an epoch starts from zero gradients).
    """
    config = run.config
    if run.net.end_to_end:
        train_encoders(run)
    kept = [labelled_rows(batch) for batch in batches]
    counts = [len(rows["label"]) for rows in kept]
    anywhere = labelled_anywhere(run, counts)
    step, last = Step(labelled=sum(counts)), None
    for i, (batch, rows) in enumerate(zip(batches, kept, strict=True)):
        last = None
        if not anywhere[i]:
            continue
        sync = i == config.optim.grad_accum - 1
        check_token_ids(batch, run.net.text_vocab)  # on the host: no device sync
        if counts[i]:
            last = forward_backward(run, to_device(rows, run.d.device), sync=sync)
        else:  # labels on another rank only: a zero gradient through the same reduction
            last = forward_backward(run, to_device(placeholder_labels(batch), run.d.device), sync=sync, weight=0.0)
    if len(batches) == config.optim.grad_accum and last is not None:
        step.out, step.loss = last
        step.grad_norm = optimizer_step(run)
        step.skipped = step.grad_norm is None
    return step


def labelled_anywhere(run: Run, counts: list[int]) -> list[bool]:
    """For each micro-batch, whether any rank has a labelled sample in it (every rank decides the same). The
    counts are the host's: they are reduced on the CPU (``Dist.cpu_group``), never through the GPU's queue."""
    if not run.d.enabled:
        return [n > 0 for n in counts]
    flags = torch.zeros(run.config.optim.grad_accum, dtype=torch.int64)
    flags[: len(counts)] = torch.tensor([int(n > 0) for n in counts], dtype=torch.int64)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=run.d.cpu_group)
    return [bool(f) for f in flags.tolist()[: len(counts)]]


def placeholder_labels(batch: dict[str, Any]) -> dict[str, Any]:
    """``batch`` with its missing labels replaced by zeros, for a forward pass whose loss is weighted zero."""
    label = batch["label"]
    return {**batch, "label": torch.where(torch.isfinite(label), label, torch.zeros_like(label))}


def forward_backward(
    run: Run, batch: dict[str, Any], *, sync: bool, weight: float = 1.0
) -> tuple[FusionOutput, torch.Tensor]:
    """One micro-batch: forward under autocast, then backward of its summed losses over ``grad_accum`` (so a
    group's gradient is the mean over its micro-batches), times ``weight``, through the GradScaler. Returns the
    output and the summed losses times ``weight``."""
    # DDP: all-reduce gradients only on the micro-batch that ends a group (``sync``). ``no_sync`` is the DDP
    # module's own: under torch.compile ``run.model`` is the compiled wrapper
    with run.ddp.no_sync() if run.ddp is not None and not sync else nullcontext():
        with run.autocast():  # tensors only: a compiled forward would guard on (and recompile for) the keys
            out = run.model({k: v for k, v in batch.items() if isinstance(v, torch.Tensor)})
        loss = sum(out.losses.values())
        if weight != 1.0:
            loss = torch.nan_to_num(loss) * weight
        run.scaler.scale(loss / run.config.optim.grad_accum).backward()
    return out, loss


def optimizer_step(run: Run) -> torch.Tensor | None:
    """Unscale the accumulated gradients, clip each parameter group to ``clip_norm`` on its own, step through
    the scaler, clear the gradients, advance the schedule and ``run.step``. Returns the norm before clipping, or
    None when the scaler skipped the step (inf/NaN gradients under fp16): a skipped step does not advance the
    schedule or ``run.step``."""
    run.scaler.unscale_(run.optimizer)
    grad_norm = clip_grad_norm_per_group(run.optimizer, run.config.optim.clip_norm or float("inf"))
    stepped = run.scaler.step_and_update(run.optimizer)  # one host read of the scale per step, under fp16 only
    run.optimizer.zero_grad(set_to_none=True)
    if not stepped:
        return None
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
        k: (_pinned(v).to(device, non_blocking=True) if pin else v.to(device)) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }


def _pinned(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in page-locked memory (the loader's pinning thread has usually done it already)."""
    return tensor if tensor.is_pinned() else tensor.pin_memory()
