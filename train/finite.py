"""The training loss's finite check without a host synchronisation per step.

Reading a CUDA tensor on the host (``bool``, ``float``, ``.item()``) waits for every kernel queued before it, so a
check after each step would stall the GPU's queue once per step. ``FiniteWatch.add`` instead folds each step's loss
and gradient norm into a record kept on the device with tensor operations only; ``FiniteWatch.check`` reads it
(one synchronisation, plus one all-reduce under DDP) and raises ``NonFiniteLoss`` naming the first non-finite
step. ``fit`` checks before it logs a step, saves a checkpoint or evaluates, so nothing computed after a
non-finite step is written: training may run on for up to ``log_every`` steps before it stops, and the
checkpoints keep the last finite state.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from mmfuse.errors import MmfuseError
from train.runtime import Dist


class NonFiniteLoss(MmfuseError, RuntimeError):
    """The training loss became NaN or inf; the run stopped, keeping what it had saved before."""


class FiniteWatch:
    """The first step whose loss (or, for a step the optimiser took, gradient norm) is NaN or inf, as a device
    record: ``at`` (-1 while every step was finite), its epoch, loss and gradient norm (NaN when it took no
    optimiser step)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.at = torch.full((), -1, dtype=torch.int64, device=device)
        self.epoch = torch.zeros((), dtype=torch.int64, device=device)
        self.values = torch.zeros(3, device=device)  # loss, gradient norm, whether there is one

    def add(self, at: int, epoch: int, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> None:
        """Fold in step ``at`` (tensor operations only: nothing is read on the host)."""
        loss = loss.detach().float().reshape(()).to(self.device)
        if grad_norm is None:
            norm, bad = torch.full((), float("nan"), device=self.device), ~torch.isfinite(loss)
        else:
            norm = grad_norm.detach().float().reshape(()).to(self.device)
            bad = ~(torch.isfinite(loss) & torch.isfinite(norm))
        has_norm = torch.full((), float(grad_norm is not None), device=self.device)
        first = bad & (self.at < 0)
        self.at = torch.where(first, torch.full_like(self.at, at), self.at)
        self.epoch = torch.where(first, torch.full_like(self.epoch, epoch), self.epoch)
        self.values = torch.where(first, torch.stack([loss, norm, has_norm]), self.values)

    def check(self, d: Dist, step: int, run_dir: Path | None, kept: list[Path]) -> None:
        """``NonFiniteLoss`` on every rank when any rank saw a non-finite step (every rank calls this at the same
        points). ``step``: where training stands; ``kept``: the checkpoints already in ``run_dir``."""
        found = (self.at >= 0).to(torch.int64)
        if d.enabled:
            found = found.to(d.device)
            dist.all_reduce(found, op=dist.ReduceOp.MAX)
        if not int(found):
            return
        at, epoch = int(self.at), int(self.epoch)
        if at < 0:
            what = "another rank's loss or gradient norm was not finite"
        else:
            loss, norm, has_norm = self.values.tolist()
            what = f"step {at} (epoch {epoch}) had a loss of {loss}" + (f", gradient norm {norm}" if has_norm else "")
            what += ", not finite"
        names = ", ".join(str(p) for p in kept)
        raise NonFiniteLoss(
            f"training stopped at step {step}: {what}. "
            f"{'Kept from before it: ' + names if kept else 'No checkpoint had been saved'} in {run_dir}. "
            "Start a new run with a lower lr (and encoder_lr), or amp=off"
        )
