"""The pieces of a training step that ``fit`` (``train.trainer``) writes out around its forward, backward and
optimiser step: which micro-batches to train on and with what weight (host-side, before anything moves to the
device), the copy to the device, and the gradient clip of each parameter group on its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from train.pipeline import check_token_ids
from train.runtime import Dist


@dataclass
class Group:
    """The host's side of one optimiser step's micro-batches (``prepare_group``): per micro-batch, its rows to
    train on and the weight of their loss, or None when no rank has a label in it (skipped); ``labelled``, the
    samples with a label in them on this rank."""

    batches: list[tuple[dict[str, Any], float] | None]
    labelled: int


def prepare_group(micro: list[dict[str, Any]], text_vocab: int | None, d: Dist, grad_accum: int) -> Group:
    """Each micro-batch's labelled rows, its token ids checked (on the host, before any of it moves).

    Unlabelled samples are kept out of losses, and a micro-batch with no labelled sample on any rank is skipped.
    Under DDP a rank whose micro-batch has no label while another's has runs it anyway with its loss weighted
    zero, so every rank takes part in the same gradient reductions and steps."""
    kept = [labelled_rows(batch) for batch in micro]
    counts = [len(rows["label"]) for rows in kept]
    batches: list[tuple[dict[str, Any], float] | None] = []
    for batch, rows, anywhere in zip(micro, kept, labelled_anywhere(d, grad_accum, counts), strict=True):
        if not anywhere:
            batches.append(None)
            continue
        check_token_ids(batch, text_vocab)
        batches.append((rows, 1.0) if len(rows["label"]) else (placeholder_labels(batch), 0.0))
    return Group(batches, sum(counts))


def labelled_anywhere(d: Dist, grad_accum: int, counts: list[int]) -> list[bool]:
    """For each micro-batch, whether any rank has a labelled sample in it (every rank decides the same). The
    counts are the host's: they are reduced on the CPU (``Dist.cpu_group``), never through the GPU's queue."""
    if not d.enabled:
        return [n > 0 for n in counts]
    flags = torch.zeros(grad_accum, dtype=torch.int64)
    flags[: len(counts)] = torch.tensor([int(n > 0) for n in counts], dtype=torch.int64)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=d.cpu_group)
    return [bool(f) for f in flags.tolist()[: len(counts)]]


def placeholder_labels(batch: dict[str, Any]) -> dict[str, Any]:
    """``batch`` with its missing labels replaced by zeros, for a forward pass whose loss is weighted zero."""
    label = batch["label"]
    return {**batch, "label": torch.where(torch.isfinite(label), label, torch.zeros_like(label))}


def tensors(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The batch's tensors only (not its keys): a compiled forward would guard on the strings and recompile."""
    return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}


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
