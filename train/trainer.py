"""``fit``: the training loop, written out in one place: for each optimiser step, ``grad_accum`` micro-batches
forward and backward and one optimiser step (``train.step.train_step``), then progress, log and checkpoint; at
the end of each epoch evaluation, model selection and checkpointing (``end_of_epoch``). What the loop carries
is one ``train.run.Run``. ``evaluate`` is what every command that scores a model goes through.

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
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from fusion.base import mechanism_shares
from fusion.layers import task_loss
from shards import Progress
from shards.dataset import ShardDataset
from train.config import TrainConfig
from train.data import ShardLoader, make_loader
from train.finite import FiniteWatch, NonFiniteLoss
from train.inputs import DataError
from train.metrics import SELECTION, task_metrics
from train.pipeline import FusionPipeline, check_token_ids
from train.run import Run, barrier, build_run, read_checkpoint, save, train_loader
from train.runtime import Dist, amp_dtype, setup_distributed, teardown_distributed, write_json
from train.step import Step, clip_grad_norm_per_group, labelled_rows, to_device, train_step
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
) -> dict[str, Any]:
    """Train ``config.model`` on the shards; returns the final test metrics (validation-selected).
    ``progress(steps done, steps in all)`` is called on rank 0 after each optimiser step."""
    shards, run_dir = Path(shards), Path(run_dir)
    d = setup_distributed(config.run.device)
    try:
        run = build_run(config, shards, run_dir, d, resume=resume, progress=progress if d.main else None)
        log.info(
            "training %s (%s) on %s: %d steps, %d per epoch",
            config.model,
            config.mode,
            shards,
            run.total_steps,
            run.batches_per_epoch // config.optim.grad_accum,
        )
        run.started, watch = time.perf_counter(), FiniteWatch(run.d.device)
        if run.progress is not None:
            run.progress(run.step, run.total_steps)
        while run.step < run.total_steps and run.epoch < config.run.epochs:
            loader = train_loader(run)
            run.net.train()
            run.optimizer.zero_grad(set_to_none=True)  # no micro-batch gradient carries over an epoch boundary
            fresh, labelled, batches = run.batch == 0, 0, iter(loader)
            while run.step < run.total_steps and (micro := list(islice(batches, config.optim.grad_accum))):
                step = train_step(run, micro)
                if step.loss is not None:  # on the device: read before anything is logged or saved
                    watch.add(run.step if step.stepped else run.step + 1, run.epoch, step.loss, step.grad_norm)
                run.batch += len(micro)
                labelled += step.labelled
                if step.stepped:
                    after_step(run, step, watch)
            check_labelled(run, fresh, labelled)
            check_finite(run, watch)
            note_skipped(run, loader)
            end_of_epoch(run)
        return finish(run)
    finally:
        close_pools()  # the data workers kept across epochs and evaluations
        teardown_distributed(d)


def after_step(run: Run, step: Step, watch: FiniteWatch) -> None:
    """Progress, a log line every ``log_every`` steps (and after the first), a checkpoint every
    ``checkpoint_every`` steps; the finite check (a host synchronisation) before either, on those steps only."""
    if run.progress is not None:
        run.progress(run.step, run.total_steps)
    logs = run.step % run.config.run.log_every == 0 or run.step == 1
    saves = bool(run.config.run.checkpoint_every) and run.step % run.config.run.checkpoint_every == 0
    if logs or saves:
        check_finite(run, watch)
    if logs:
        run.log.train(
            run.step,
            run.epoch,
            float(step.loss.detach()),
            step.out.losses,
            step.out.diagnostics,
            float(step.grad_norm),
            run.scheduler.get_last_lr(),
            time.perf_counter() - run.started,
        )
    if saves:
        save(run, run.run_dir / LAST)


def check_finite(run: Run, watch: FiniteWatch) -> None:
    """``NonFiniteLoss`` when a step since the start had a non-finite loss or gradient norm on any rank."""
    kept = [p for p in (LAST, BEST) if run.run_dir and (run.run_dir / p).is_file()]
    watch.check(run.d, run.step, run.run_dir, kept)


def check_labelled(run: Run, fresh: bool, labelled: int) -> None:
    """A whole epoch (not a resumed remainder) without one labelled sample on any rank is a ``DataError``."""
    if fresh and _total(labelled, run.d) == 0:
        raise DataError(
            f"no sample of the train split in {run.shards} has a label under label_key={run.config.data.label_key!r} "
            f"(task={run.config.task}): check the key names against the samples' meta.json labels"
        )


def note_skipped(run: Run, loader: ShardLoader) -> None:
    if loader.bad_samples:  # only with skip_bad_samples; otherwise the first bad sample raised
        run.log.note(run.step, "skipped", {"epoch": run.epoch, "count": len(loader.bad_samples)})
        log.warning(
            "epoch %d: skipped %d bad sample(s): %s", run.epoch, len(loader.bad_samples), loader.bad_samples[:3]
        )


def end_of_epoch(run: Run) -> None:
    """Move the data position past a finished epoch. Every ``eval_every`` epochs and after the last step:
    evaluate on the validation split, let the fusion model react (``end_epoch``), and save ``best.pt`` when the
    selection metric improved. Then save ``last.pt``."""
    epoch, stopped = run.epoch, run.step >= run.total_steps
    if not stopped or run.batch >= run.batches_per_epoch:  # the epoch ran to its end
        run.epoch, run.batch = epoch + 1, 0
    if stopped or (epoch + 1) % run.config.run.eval_every == 0:
        metrics = evaluate(run.net, run.dataset, "valid", run.config, run.d)
        run.log.eval(run.step, epoch, "valid", metrics)
        changed = run.net.fusion.end_epoch(metrics)
        if changed:
            run.log.note(run.step, "end_epoch", changed)
        if run.config.run.selection == "valid" and select(run, metrics):
            save(run, run.run_dir / BEST)
    save(run, run.run_dir / LAST)


def select(run: Run, metrics: dict[str, Any]) -> bool:
    """Whether ``metrics`` beat the best validation score so far (``SELECTION``); if so, they become the best."""
    key, larger_is_better = SELECTION[run.config.task]
    score, best = metrics.get(key, math.nan), run.best
    if math.isnan(score) or not (best is None or (score > best if larger_is_better else score < best)):
        return False
    run.best, run.best_step = score, run.step
    return True


def finish(run: Run) -> dict[str, Any]:
    """Evaluate the selected checkpoint on the validation and test splits; write final.json and the curves.
    final.json names the selected checkpoint (``checkpoint``, relative to the run directory), its step, and how it
    was selected: ``best.pt`` by the validation score, or ``last.pt`` with ``selection=last`` or when no
    validation score was finite (said so in ``selected_by``)."""
    select_key = SELECTION[run.config.task][0]
    # from state every rank holds alike, not each rank's view of the disk (node-local disks disagree)
    if run.config.run.selection == "valid" and run.best_step >= 0:
        chosen, step, by = BEST, run.best_step, f"valid {select_key}"
    else:
        chosen, step = LAST, run.step
        why = "selection=last" if run.config.run.selection == "last" else f"no finite valid {select_key}"
        by = f"last step ({why})"
        save(run, run.run_dir / LAST)
    barrier(run.d)
    run.net.load_state_dict(read_checkpoint(run.d, run.run_dir / chosen, part="model"))  # read by rank 0
    final = {"selected_step": step, "selected_by": by, "checkpoint": str(chosen)}
    for split in ("valid", "test"):
        final[split] = evaluate(run.net, run.dataset, split, run.config, run.d)
        run.log.eval(step, run.epoch, f"{split} (selected)", final[split])
    if run.d.main:
        write_json(run.run_dir / "final.json", final)
        run.log.curves(select_key)
    run.log.close()
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
