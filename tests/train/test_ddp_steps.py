"""Optimiser steps of two gloo processes (CPU DDP) stay in lockstep: a rank without labels, the unfreeze schedule."""

from __future__ import annotations

import math
import multiprocessing
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
import torch

SETTINGS = ["batch_size=1", "num_workers=0", "model.hidden=12", "model.num_heads=3", "device=cpu", "grad_accum=2",
            "epochs=3", "selection=last"]  # fmt: skip


def _worker(rank: int, tmp: str, shards: str, overrides: list[str], unlabelled_rank: int) -> None:
    """Three epochs of one optimiser step each (``fit`` over the two train clips, both on each rank, as one group
    of two micro-batches); ``unlabelled_rank``'s labels are all missing. Saves this rank's parameters before the
    selected checkpoint is loaded, its step, and how many times the DDP wrapper was built, to ``tmp``."""
    import torch.distributed as dist

    import train.run
    import train.trainer
    from shards.dataset import ShardDataset
    from train.config import make_train_config
    from train.data import make_loader
    from train.runtime import Dist

    torch.set_num_threads(1)
    store = f"file://{tmp}/store"
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=2, timeout=timedelta(seconds=30))
    config = make_train_config("late", overrides=[*SETTINGS, *overrides])
    dataset = ShardDataset.load(Path(shards))
    batches = list(make_loader(dataset, "train", config.data, train=False))
    if rank == unlabelled_rank:
        batches = [{**b, "label": torch.full_like(b["label"], math.nan)} for b in batches]
    train.run.train_batches = lambda config, dataset, d: 2  # two clips give one batch per rank, too few for a step
    wrap, finish, wrappers = train.trainer.wrap, train.trainer.finish, []

    def counted_wrap(*args):
        wrappers.append(args)
        return wrap(*args)

    def saved_finish(job, run, parts):
        params = [p.detach().clone() for p in parts.net.parameters()]
        torch.save({"params": params, "step": run.step, "wrappers": len(wrappers)}, f"{tmp}/rank{rank}.pt")
        return finish(job, run, parts)

    train.trainer.wrap, train.trainer.finish = counted_wrap, saved_finish
    d = Dist(rank, 2, 0, torch.device("cpu"), True)
    train.trainer.fit(config, Path(shards), Path(tmp) / "run", d=d, source=lambda job, epoch, skip: list(batches))
    dist.destroy_process_group()


def launch_two_ranks(target: Callable[..., None], args: list[tuple], timeout: float) -> list[int | None]:
    """``target(*args[r])`` in a spawned process for ranks 0 and 1, which join a gloo group themselves; fails the
    test if a rank is still running after ``timeout`` seconds (killing it). Returns the two exit codes."""
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=target, args=args[r]) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
    assert not hung, "a rank hung"
    return [p.exitcode for p in procs]


def run_two_ranks(tmp: Path, shards: Path, overrides: list[str], unlabelled_rank: int = -1) -> list[dict]:
    args = [(r, str(tmp), str(shards), overrides, unlabelled_rank) for r in (0, 1)]
    assert launch_two_ranks(_worker, args, timeout=240) == [0, 0]
    return [torch.load(tmp / f"rank{r}.pt") for r in (0, 1)]


def assert_same_parameters(results: list[dict]) -> None:
    first, second = results
    assert all(torch.equal(a, b) for a, b in zip(first["params"], second["params"], strict=True))


@pytest.mark.integration
def test_a_rank_without_labels_keeps_step_with_the_other(bundled_dataset: Path, tmp_path: Path) -> None:
    results = run_two_ranks(tmp_path, bundled_dataset, [], unlabelled_rank=1)
    assert [r["step"] for r in results] == [3, 3]
    assert_same_parameters(results)


@pytest.mark.integration
def test_unfreezing_rebuilds_the_ddp_wrapper(bundled_dataset: Path, tmp_path: Path) -> None:
    overrides = ["mode=end_to_end", "unfreeze_after=1", "encoder_lr=0.01"]
    results = run_two_ranks(tmp_path, bundled_dataset, overrides)
    assert [r["step"] for r in results] == [3, 3]
    assert [r["wrappers"] for r in results] == [2, 2]  # built frozen, rebuilt once the encoders train
    assert_same_parameters(results)
