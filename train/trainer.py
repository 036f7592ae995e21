"""``fit``: the training loop, written out in one place (forward, losses, backward, clip, step, log, evaluate,
checkpoint), and ``evaluate``, which every command that scores a model goes through.

Run directory (``--run-dir``)::

    config.json        resolved settings, git revision, shard fingerprint (feature-set hash, dataset counts)
    metrics.jsonl      one JSON object per training log line and per evaluation
    events/            TensorBoard event files
    curves.png         learning curves (loss, validation metric)
    checkpoints/last.pt, best.pt   model, optimiser, scheduler, RNG, step and data position, config, feature set
    final.json         test metrics of the best (validation-selected) checkpoint

Selection is on the validation split only (``train.metrics.SELECTION``); the test split is evaluated once,
with the selected checkpoint, at the end.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from fusion.layers import task_loss
from shards import Progress
from shards.dataset import ShardDataset, check_feature_set
from train.checkpoint import load_checkpoint, save_checkpoint
from train.config import TrainConfig, check_model_settings
from train.data import DataConfig, make_loader, num_batches
from train.inputs import DataError, feature_dims
from train.logs import RunLog
from train.metrics import SELECTION, task_metrics
from train.pipeline import FusionPipeline
from train.runtime import (
    Dist,
    amp_dtype,
    git_revision,
    prepare_run_dir,
    rng_state,
    seed_everything,
    set_rng_state,
    setup_distributed,
    teardown_distributed,
    write_json,
)

log = logging.getLogger(__name__)


def data_config(config: TrainConfig, *, workers: int | None = None) -> DataConfig:
    return DataConfig(
        batch_size=config.data.batch_size,
        num_workers=config.data.num_workers if workers is None else workers,
        shuffle_buffer=config.data.shuffle_buffer,
        modalities=tuple(config.data.modalities),
        raw=config.mode == "end_to_end",
        label_key=config.data.label_key,
        multilabel=config.task == "multilabel",
        seed=config.run.seed,
        skip_bad_samples=config.data.skip_bad_samples,
        align_words=config.data.align_words,
    )


def lr_lambda(config: TrainConfig, total_steps: int):
    """Multiplier of the base learning rates at each optimiser step: linear warm-up, then the schedule."""

    def factor(step: int) -> float:
        if step < config.optim.warmup_steps:
            return (step + 1) / config.optim.warmup_steps
        if config.optim.schedule == "constant" or total_steps <= config.optim.warmup_steps:
            return 1.0
        progress = min(1.0, (step - config.optim.warmup_steps) / max(1, total_steps - config.optim.warmup_steps))
        if config.optim.schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


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
        return _fit(config, shards, run_dir, resume, d, progress if d.main else None)
    finally:
        teardown_distributed(d)


def _fit(
    config: TrainConfig, shards: Path, run_dir: Path, resume: bool, d: Dist, progress: Progress | None
) -> dict[str, Any]:
    dataset = ShardDataset.load(shards)
    dims = feature_dims(dataset, config.data.modalities)
    check_model_settings(config, dims)
    if d.main:
        prepare_run_dir(run_dir, resume)
    _barrier(d)
    last = run_dir / "checkpoints" / "last.pt"
    checkpoint = load_checkpoint(last) if resume and last.is_file() else None
    if checkpoint is not None:
        check_feature_set(checkpoint["feature_set_hash"], dataset, what=f"the run in {run_dir}")
    seed_everything(config.run.seed)
    net = FusionPipeline(config, dims, dataset).to(d.device)
    data = data_config(config)
    batches_per_epoch = num_batches(dataset, "train", data, train=True, rank=d.rank, world_size=d.world_size)
    if batches_per_epoch < config.optim.grad_accum:
        raise DataError(
            f"the train split of {shards} gives {batches_per_epoch} full batch(es) of {config.data.batch_size} per "
            f"rank (world size {d.world_size}), fewer than one optimiser step (grad_accum={config.optim.grad_accum}); "
            "lower batch_size or grad_accum"
        )
    steps_per_epoch = batches_per_epoch // config.optim.grad_accum
    total_steps = config.run.max_steps or config.run.epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(net.param_groups(config.optim.lr, config.optim.encoder_lr, config.optim.weight_decay))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config, total_steps))
    state = {"step": 0, "epoch": 0, "batch": 0, "best": None, "best_step": -1}
    if checkpoint is not None:
        net.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        state.update(checkpoint["state"])
        set_rng_state(checkpoint["rng"][min(d.rank, len(checkpoint["rng"]) - 1)])
    model: torch.nn.Module = net
    if d.enabled:
        model = DistributedDataParallel(net, find_unused_parameters=True)
    if config.run.compile:
        model = torch.compile(model)
    autocast = amp_dtype(config.run.amp, d.device)
    scaler = torch.amp.GradScaler("cuda", enabled=autocast == torch.float16)
    run_log = RunLog(run_dir, enabled=d.main)
    if d.main and checkpoint is None:
        write_json(run_dir / "config.json", _run_record(config, dataset, dims, shards, d))
    select_key, larger_is_better = SELECTION[config.task]
    log.info(
        "training %s (%s) on %s: %d steps, %d per epoch",
        config.model,
        config.mode,
        shards,
        total_steps,
        steps_per_epoch,
    )

    started = time.perf_counter()
    if progress is not None:
        progress(state["step"], total_steps)
    while state["step"] < total_steps and state["epoch"] < config.run.epochs:
        epoch = state["epoch"]
        loader = make_loader(
            dataset,
            "train",
            data,
            train=True,
            epoch=epoch,
            rank=d.rank,
            world_size=d.world_size,
            skip_batches=state["batch"],
        )
        net.train()
        optimizer.zero_grad(set_to_none=True)  # no micro-batch gradient carries over an epoch boundary
        fresh_epoch, labelled = state["batch"] == 0, 0
        for batch in loader:
            if net.end_to_end:  # the freeze / unfreeze schedule of the encoders
                net.set_encoders_trainable(config.unfreeze_top_k if state["step"] >= config.unfreeze_after else 0)
            batch = _to_device(_labelled(batch), d.device)
            labelled += len(batch["label"])
            if batch["label"].numel() == 0:  # nothing to learn from (unlabelled samples are kept out of losses)
                state["batch"] += 1
                continue
            last_micro = (state["batch"] + 1) % config.optim.grad_accum == 0
            # DDP: all-reduce gradients only on the micro-batch that ends an accumulation
            sync = model.no_sync() if isinstance(model, DistributedDataParallel) and not last_micro else nullcontext()
            with sync:
                with torch.autocast(d.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
                    out = model(batch)
                loss = sum(out.losses.values())
                scaler.scale(loss / config.optim.grad_accum).backward()
            state["batch"] += 1
            if state["batch"] % config.optim.grad_accum:
                continue
            scaler.unscale_(optimizer)
            grad_norm = clip_grad_norm_per_group(optimizer, config.optim.clip_norm or float("inf"))
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            state["step"] += 1
            if progress is not None:
                progress(state["step"], total_steps)
            if state["step"] % config.run.log_every == 0 or state["step"] == 1:
                run_log.train(
                    state["step"],
                    epoch,
                    float(loss.detach()),
                    out.losses,
                    out.diagnostics,
                    float(grad_norm),
                    scheduler.get_last_lr(),
                    time.perf_counter() - started,
                )
            if config.run.checkpoint_every and state["step"] % config.run.checkpoint_every == 0:
                _save(run_dir / "checkpoints" / "last.pt", net, optimizer, scheduler, state, config, dataset, dims, d)
            if state["step"] >= total_steps:
                break
        if fresh_epoch and _total(labelled, d) == 0:
            raise DataError(
                f"no sample of the train split in {shards} has a label under label_key={config.data.label_key!r} "
                f"(task={config.task}): check the key names against the samples' meta.json labels"
            )
        if loader.bad_samples:  # only with skip_bad_samples; otherwise the first bad sample raised
            run_log.note(state["step"], "skipped", {"epoch": epoch, "count": len(loader.bad_samples)})
            log.warning(
                "epoch %d: skipped %d bad sample(s): %s", epoch, len(loader.bad_samples), loader.bad_samples[:3]
            )
        stopped = state["step"] >= total_steps
        if not stopped or state["batch"] >= batches_per_epoch:  # the epoch ran to its end
            state["epoch"], state["batch"] = epoch + 1, 0
        if not stopped and (epoch + 1) % config.run.eval_every:
            _save(run_dir / "checkpoints" / "last.pt", net, optimizer, scheduler, state, config, dataset, dims, d)
            continue
        metrics = evaluate(net, dataset, "valid", config, d)
        run_log.eval(state["step"], epoch, "valid", metrics)
        changed = net.fusion.end_epoch(metrics)
        if changed:
            run_log.note(state["step"], "end_epoch", changed)
        score = metrics.get(select_key, math.nan)
        best = state["best"]
        if not math.isnan(score) and (best is None or (score > best if larger_is_better else score < best)):
            state["best"], state["best_step"] = score, state["step"]
            _save(run_dir / "checkpoints" / "best.pt", net, optimizer, scheduler, state, config, dataset, dims, d)
        _save(run_dir / "checkpoints" / "last.pt", net, optimizer, scheduler, state, config, dataset, dims, d)

    best_path = run_dir / "checkpoints" / "best.pt"
    if not best_path.is_file():  # no validation split or no finite score: the last state is the selection
        best_path = run_dir / "checkpoints" / "last.pt"
        _save(best_path, net, optimizer, scheduler, state, config, dataset, dims, d)
    _barrier(d)
    net.load_state_dict(load_checkpoint(best_path)["model"])
    final = {"selected_step": state["best_step"], "selected_by": f"valid {select_key}"}
    for split in ("valid", "test"):
        final[split] = evaluate(net, dataset, split, config, d)
        run_log.eval(state["best_step"], state["epoch"], f"{split} (selected)", final[split])
    if d.main:
        write_json(run_dir / "final.json", final)
        run_log.curves(select_key)
    run_log.close()
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
    ``prediction_row``)."""
    d = d or Dist()
    data = data_config(config, workers=min(config.data.num_workers, 1))
    dataset = ShardDataset.of(shards)
    listed = dataset.split_samples(split)
    if split not in dataset.splits:
        return {}
    net.eval()
    preds, labels = [], []
    autocast = amp_dtype(config.run.amp, d.device)
    read = 0
    for batch in make_loader(dataset, split, data, train=False, rank=d.rank, world_size=d.world_size):
        read += len(batch["key"])
        if progress is not None:
            progress(read, listed)
        batch = _to_device(_labelled(batch), d.device)
        if batch["label"].numel() == 0:
            continue
        for m in drop:
            batch = {k: v for k, v in batch.items() if not k.startswith(m)}
        with torch.autocast(d.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            out = net(batch)
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
    return metrics


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
    """``count`` summed over ranks (every rank calls this at the same point)."""
    if not d.enabled:
        return count
    total = torch.tensor([count], dtype=torch.int64, device=d.device)
    dist.all_reduce(total)
    return int(total)


def _labelled(batch: dict[str, Any]) -> dict[str, Any]:
    """The rows of a batch that have a finite label (unlabelled samples cannot be trained or scored)."""
    label = batch["label"]
    finite = torch.isfinite(label) if label.dim() == 1 else torch.isfinite(label).all(-1)
    if bool(finite.all()):
        return batch
    index = finite.nonzero().squeeze(1)
    out = {k: v[index] for k, v in batch.items() if isinstance(v, torch.Tensor)}
    out["key"] = [batch["key"][i] for i in index.tolist()]
    return out


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    pin = device.type == "cuda"
    return {
        k: (v.pin_memory().to(device, non_blocking=True) if pin else v.to(device)) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }


def _barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def _save(path: Path, net, optimizer, scheduler, state, config, dataset, dims, d: Dist) -> None:
    rngs: list[Any] = [rng_state()]
    if d.enabled:  # every rank's RNG, so each resumes its own stream
        rngs = [None] * d.world_size
        dist.all_gather_object(rngs, rng_state())
    if d.main:
        save_checkpoint(path, net, optimizer, scheduler, dict(state), config, dataset, dims, rngs)
    _barrier(d)


def _run_record(config: TrainConfig, dataset: ShardDataset, dims: dict[str, int], shards: Path, d: Dist) -> dict:
    return {
        "config": config.to_dict(),
        "git_revision": git_revision(),
        "shards": str(shards.resolve()),
        "feature_set_hash": dataset.feature_set_hash,
        "dataset_counts": dataset.counts,
        "dims": dims,
        "world_size": d.world_size,
        "device": str(d.device),
        "torch": str(torch.__version__),
    }
