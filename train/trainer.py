"""``fit``: the training loop, written out in one place (forward, backward, clip, optimiser step), then progress,
log and checkpoint; at the end of each epoch evaluation, model selection and checkpointing (``end_of_epoch``).
The network, optimiser, schedule, scaler and loader are ``fit``'s locals; what the loop carries from step to step
is where training stands (``train.run.Run``). ``evaluate`` is what every command that scores a model goes
through.

Run directory (``--run-dir``)::

    config.json        resolved settings, git revision, shard fingerprint (feature-set hash, dataset counts)
    metrics.jsonl      one JSON object per training log line and per evaluation
    events/            TensorBoard event files
    curves.png         learning curves (loss, validation metric)
    checkpoints/last.pt, best.pt   model, optimiser, scheduler, RNG, step and data position, config, feature set
    final.json         valid and test metrics of the selected checkpoint (best.pt; last.pt with selection=last)

Selection is on the validation split only (``train.metrics.SELECTION``); the test split is evaluated once,
with the selected checkpoint, at the end.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Iterable
from contextlib import nullcontext
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from fusion.base import FusionOutput, mechanism_shares
from fusion.layers import task_loss
from shards import Progress
from shards.dataset import ShardDataset
from train.config import TrainConfig
from train.data import make_loader
from train.finite import FiniteWatch, NonFiniteLoss
from train.inputs import DataError
from train.metrics import SELECTION, task_metrics
from train.pipeline import FusionPipeline, check_token_ids
from train.run import (
    BatchSource,
    Job,
    Parts,
    Run,
    barrier,
    encoders_top_k,
    prepare,
    read_checkpoint,
    save,
    train_loader,
    wrap,
)
from train.runtime import Dist, amp_dtype, setup_distributed, teardown_distributed, write_json
from train.step import clip_grad_norm_per_group, labelled_rows, prepare_group, tensors, to_device
from train.workers import close_pools

__all__ = ["NonFiniteLoss", "clip_grad_norm_per_group", "evaluate", "fit", "prediction_row"]

log = logging.getLogger(__name__)

LAST, BEST = Path("checkpoints/last.pt"), Path("checkpoints/best.pt")


def fit(
    config: TrainConfig,
    shards: Path | str,
    run_dir: Path | str,
    resume: bool = False,
    progress: Progress | None = None,
    *,
    d: Dist | None = None,
    source: BatchSource = train_loader,
) -> dict[str, Any]:
    """Train ``config.model`` on the shards; returns the final test metrics (validation-selected).

    ``progress(steps done, steps in all)`` is called on rank 0 after each optimiser step. ``d``: a distributed job
    the caller has set up (and tears down); without it, ``fit`` joins the torchrun job or runs alone. ``source``:
    where each epoch's training batches come from (``train.run.BatchSource``); the shards' streaming loader unless
    a benchmark or a test hands in its own.

    Long: the training loop written out in one place. For each group of ``grad_accum`` micro-batches: forward
    under autocast and backward through the GradScaler (DDP reduces gradients on the group's last micro-batch
    only), then the optimiser step: unscale, clip each parameter group on its own, step, schedule; then progress,
    log line and checkpoint (``after_step``). At the end of each epoch evaluation, model selection and a checkpoint
    (``end_of_epoch``); at the end the selected checkpoint is scored (``finish``).
    """
    shards, run_dir = Path(shards), Path(run_dir)
    own = d is None
    d = setup_distributed(config.run.device) if d is None else d
    try:
        job, run, parts = prepare(config, shards, run_dir, d, resume=resume, progress=progress if d.main else None)
        net, optimizer, scheduler, scaler = parts
        accum, clip = config.optim.grad_accum, config.optim.clip_norm or math.inf
        steps, per_epoch = job.total_steps, job.batches_per_epoch // accum
        log.info("training %s (%s) on %s: %d steps, %d per epoch", config.model, config.mode, shards, steps, per_epoch)
        model, ddp, trainable = net, None, None  # what the forward goes through: net, in DDP and/or compiled
        job.started, watch = time.perf_counter(), FiniteWatch(d.device)
        if job.progress is not None:
            job.progress(run.step, job.total_steps)
        while run.step < job.total_steps and run.epoch < config.run.epochs:
            loader = source(job, run.epoch, run.batch)
            net.train()
            optimizer.zero_grad(set_to_none=True)  # no micro-batch gradient carries over an epoch boundary
            fresh, labelled, batches = run.batch == 0, 0, iter(loader)
            while run.step < job.total_steps and (micro := list(islice(batches, accum))):
                if (top_k := encoders_top_k(config, run.step) if net.end_to_end else 0) != trainable:
                    net.set_encoders_trainable(top_k)  # the encoders' schedule; DDP must cover what now trains
                    model, ddp = wrap(net, config, d)
                    trainable = top_k
                group = prepare_group(micro, net.text_vocab, d, accum)
                out, loss = None, None
                for i, item in enumerate(group.batches):
                    if item is None:  # no rank has a label in it
                        out, loss = None, None
                        continue
                    rows, weight = item
                    batch = to_device(rows, d.device)
                    # DDP's own no_sync: under torch.compile ``model`` is the compiled wrapper
                    with ddp.no_sync() if ddp is not None and i < accum - 1 else nullcontext():
                        with job.autocast():
                            out = model(tensors(batch))
                        loss = sum(out.losses.values())
                        if weight != 1.0:  # labels on another rank only: a zero gradient through the same reduction
                            loss = torch.nan_to_num(loss) * weight
                        scaler.scale(loss / accum).backward()  # a group's gradient: the mean over its micro-batches
                run.batch += len(micro)
                labelled += group.labelled
                if len(micro) < accum or loss is None:
                    continue  # an epoch's last, incomplete group or one ending unlabelled: its gradients carry on
                scaler.unscale_(optimizer)
                grad_norm = clip_grad_norm_per_group(optimizer, clip)
                stepped = scaler.step_and_update(optimizer)  # under fp16: torch's inf check, then the scale's read
                optimizer.zero_grad(set_to_none=True)
                watch.add(run.step + 1, run.epoch, loss, grad_norm if stepped else None)  # read before a log line
                if stepped:  # a step the scaler skipped (inf/NaN gradients) neither counts nor advances the schedule
                    scheduler.step()
                    run.step += 1
                    after_step(job, run, parts, out, loss, grad_norm, watch)
            check_labelled(job, fresh, labelled)
            check_finite(job, run, watch)
            note_skipped(job, run, loader)
            end_of_epoch(job, run, parts)
        return finish(job, run, parts)
    finally:
        close_pools()  # the data workers kept across epochs and evaluations
        if own:
            teardown_distributed(d)


def after_step(
    job: Job, run: Run, parts: Parts, out: FusionOutput, loss: torch.Tensor, grad_norm: torch.Tensor, watch: FiniteWatch
) -> None:
    """Progress, a log line every ``log_every`` steps (and after the first), a checkpoint every
    ``checkpoint_every`` steps; the finite check (a host synchronisation) before either, on those steps only."""
    config = job.config.run
    if job.progress is not None:
        job.progress(run.step, job.total_steps)
    logs = run.step % config.log_every == 0 or run.step == 1
    saves = bool(config.checkpoint_every) and run.step % config.checkpoint_every == 0
    if logs or saves:
        check_finite(job, run, watch)
    if logs:
        lr, elapsed = parts.scheduler.get_last_lr(), time.perf_counter() - job.started
        values = float(loss.detach()), out.losses, out.diagnostics, float(grad_norm), lr, elapsed
        job.log.train(run.step, run.epoch, *values)
    if saves:
        save(job.run_dir / LAST, job, run, parts)


def check_finite(job: Job, run: Run, watch: FiniteWatch) -> None:
    """``NonFiniteLoss`` when a step since the start had a non-finite loss or gradient norm on any rank."""
    kept = [p for p in (LAST, BEST) if job.run_dir and (job.run_dir / p).is_file()]
    watch.check(job.d, run.step, job.run_dir, kept)


def check_labelled(job: Job, fresh: bool, labelled: int) -> None:
    """A whole epoch (not a resumed remainder) without one labelled sample on any rank is a ``DataError``."""
    if fresh and _total(labelled, job.d) == 0:
        raise DataError(
            f"no sample of the train split in {job.shards} has a label under label_key={job.config.data.label_key!r} "
            f"(task={job.config.task}): check the key names against the samples' meta.json labels"
        )


def note_skipped(job: Job, run: Run, loader: Iterable[Any]) -> None:
    bad = getattr(loader, "bad_samples", [])  # only with skip_bad_samples; otherwise the first bad sample raised
    if bad:
        job.log.note(run.step, "skipped", {"epoch": run.epoch, "count": len(bad)})
        log.warning("epoch %d: skipped %d bad sample(s): %s", run.epoch, len(bad), bad[:3])


def end_of_epoch(job: Job, run: Run, parts: Parts) -> None:
    """Move the data position past a finished epoch. Every ``eval_every`` epochs and after the last step:
    evaluate on the validation split, let the fusion model react (``end_epoch``), and save ``best.pt`` when the
    selection metric improved. Then save ``last.pt``."""
    epoch, stopped = run.epoch, run.step >= job.total_steps
    if not stopped or run.batch >= job.batches_per_epoch:  # the epoch ran to its end
        run.epoch, run.batch = epoch + 1, 0
    if stopped or (epoch + 1) % job.config.run.eval_every == 0:
        metrics = evaluate(parts.net, job.dataset, "valid", job.config, job.d)
        job.log.eval(run.step, epoch, "valid", metrics)
        changed = parts.net.fusion.end_epoch(metrics)
        if changed:
            job.log.note(run.step, "end_epoch", changed)
        if job.config.run.selection == "valid" and select(job, run, metrics):
            save(job.run_dir / BEST, job, run, parts)
    save(job.run_dir / LAST, job, run, parts)


def select(job: Job, run: Run, metrics: dict[str, Any]) -> bool:
    """Whether ``metrics`` beat the best validation score so far (``SELECTION``); if so, they become the best."""
    key, larger_is_better = SELECTION[job.config.task]
    score, best = metrics.get(key, math.nan), run.best
    if math.isnan(score) or not (best is None or (score > best if larger_is_better else score < best)):
        return False
    run.best, run.best_step = score, run.step
    return True


def finish(job: Job, run: Run, parts: Parts) -> dict[str, Any]:
    """Evaluate the selected checkpoint on the validation and test splits; write final.json and the curves.
    final.json names the selected checkpoint (``checkpoint``, relative to the run directory), its step, and how it
    was selected: ``best.pt`` by the validation score, or ``last.pt`` with ``selection=last`` or when no
    validation score was finite (said so in ``selected_by``)."""
    select_key = SELECTION[job.config.task][0]
    # from state every rank holds alike, not each rank's view of the disk (node-local disks disagree)
    if job.config.run.selection == "valid" and run.best_step >= 0:
        chosen, step, by = BEST, run.best_step, f"valid {select_key}"
    else:
        chosen, step = LAST, run.step
        why = "selection=last" if job.config.run.selection == "last" else f"no finite valid {select_key}"
        by = f"last step ({why})"
        save(job.run_dir / LAST, job, run, parts)
    barrier(job.d)
    parts.net.load_state_dict(read_checkpoint(job.d, job.run_dir / chosen, part="model"))  # read by rank 0
    final = {"selected_step": step, "selected_by": by, "checkpoint": str(chosen)}
    for split in ("valid", "test"):
        final[split] = evaluate(parts.net, job.dataset, split, job.config, job.d)
        job.log.eval(step, run.epoch, f"{split} (selected)", final[split])
    if job.d.main:
        write_json(job.run_dir / "final.json", final)
        job.log.curves(select_key)
    job.log.close()
    barrier(job.d)  # every rank leaves together: one tearing its gloo group down while rank 0 still writes aborted
    return final


@torch.no_grad()
def evaluate(
    net: FusionPipeline,
    shards: ShardDataset | Path | str,
    split: str,
    config: TrainConfig,
    d: Dist | None = None,
    drop: tuple[str, ...] = (),
    progress: Progress | None = None,
    rows: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Metrics of ``net`` on every labelled sample of ``split`` (each once across ranks); ``drop`` removes
    modalities from every batch (incomplete-modality evaluation). Empty dict when the split has no samples.
    Multilabel metrics are named by label key (``acc/happy``, ``f1/happy``, ...). ``progress(samples read,
    samples in the split)`` is called after each batch (this rank's share under DDP). ``rows``, when given,
    receives one dict per scored sample of this rank: ``key``, ``label`` and ``prediction`` (see
    ``prediction_row``). Besides the task metrics: ``grad_share/<loss>``, each loss term's share of the gradient on
    this rank's first batch (``fusion.base.mechanism_shares``: whether the method's own terms drive it), and
    ``diag/<key>``, the model's scalar diagnostics averaged over the split (gate rates, KL terms, MI estimates)."""
    d = d or Dist()
    data = dataclasses.replace(config.data, text_vocab=net.text_vocab)
    dataset = ShardDataset.of(shards)
    listed = dataset.split_samples(split)
    if split not in dataset.splits:
        return {}
    net.eval()
    preds, labels = [], []
    diagnostics = Diagnostics()
    mechanism: dict[str, float] | None = None
    autocast = amp_dtype(config.run.amp, d.device)
    read = 0
    for batch in make_loader(dataset, split, data, train=False, rank=d.rank, world_size=d.world_size):
        read += len(batch["key"])
        if progress is not None:
            progress(read, listed)
        check_token_ids(batch, net.text_vocab)  # on the host, before the device
        batch = to_device(labelled_rows(batch), d.device)
        if batch["label"].numel() == 0:
            continue
        for m in drop:
            batch = {k: v for k, v in batch.items() if not k.startswith(m)}
        with torch.autocast(d.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            if mechanism is None:  # each loss term's gradient share, on this rank's first batch
                mechanism = mechanism_shares(net, batch)
            out = net(batch)
        diagnostics.add(out.diagnostics, len(batch["label"]))
        preds.append(out.prediction.float().cpu())
        labels.append(batch["label"].cpu())
        if rows is not None:
            scored = zip(batch["key"], labels[-1], preds[-1], strict=True)
            rows += [prediction_row(config, key, y, p) for key, y, p in scored]
    preds, labels = _gather(preds, d), _gather(labels, d)
    net.train()
    if preds is None or len(labels) == 0:
        return {}
    metrics = task_metrics(config.task, preds, labels, names=config.label_keys)
    metrics["task_loss"] = float(task_loss(preds, labels, config.task))
    metrics["n"] = int(len(labels))
    metrics.update(mechanism or {})
    metrics.update(diagnostics.means(d))
    return metrics


class Diagnostics:
    """The model's scalar diagnostics (0-dim tensors of ``FusionOutput.diagnostics``) averaged over an evaluation,
    weighted by batch size, reported as ``diag/<key>`` (under DDP over every rank's samples)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, values: dict[str, torch.Tensor], n: int) -> None:
        """A batch's diagnostics; a NaN one is undefined for that batch (e.g. an MI term over a pair of modalities
        with too few joint samples) and left out of its mean."""
        for key, value in values.items():
            if value.dim() == 0 and not math.isnan(scalar := float(value)):
                self.sums[key] = self.sums.get(key, 0.0) + scalar * n
                self.counts[key] = self.counts.get(key, 0) + n

    def means(self, d: Dist) -> dict[str, float]:
        parts: list[Any] = [(self.sums, self.counts)]
        if d.enabled:
            parts = [None] * d.world_size
            dist.all_gather_object(parts, (self.sums, self.counts))
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        for part_sums, part_counts in parts:
            for key, value in part_sums.items():
                sums[key] = sums.get(key, 0.0) + value
                counts[key] = counts.get(key, 0) + part_counts[key]
        return {f"diag/{k}": sums[k] / counts[k] for k in sorted(sums) if counts[k]}


def prediction_row(config: TrainConfig, key: str, label: torch.Tensor, prediction: torch.Tensor) -> dict[str, Any]:
    """One sample's label and prediction as plain values: regression -> the score; classification -> the
    predicted class (argmax); multilabel -> per label key, the label (0/1) and the sigmoid probability."""
    if config.task == "multilabel":
        names = config.label_keys
        return {
            "key": key,
            **{f"label/{n}": int(v) for n, v in zip(names, label.tolist(), strict=True)},
            **{f"prediction/{n}": float(v) for n, v in zip(names, torch.sigmoid(prediction).tolist(), strict=True)},
        }
    if config.task == "classification":
        return {"key": key, "label": int(label), "prediction": int(prediction.argmax())}
    return {"key": key, "label": float(label), "prediction": float(prediction)}


def _gather(parts: list[torch.Tensor], d: Dist) -> torch.Tensor | None:
    local = torch.cat(parts) if parts else None
    if not d.enabled:
        return local
    gathered: list[Any] = [None] * d.world_size
    dist.all_gather_object(gathered, local)
    parts = [g for g in gathered if g is not None]
    return torch.cat(parts) if parts else None


def _total(count: int, d: Dist) -> int:
    """``count`` summed over ranks (every rank calls this at the same point), through host memory."""
    if not d.enabled:
        return count
    total = torch.tensor([count], dtype=torch.int64)
    dist.all_reduce(total, group=d.cpu_group)
    return int(total)
