"""DataLoader workers that live across epochs: started once per (dataset, split, settings, rank), told each epoch.

``make_loader`` is called once per epoch (and once per evaluation), but its workers need not be: a
:class:`WorkerPool` holds a DataLoader with ``persistent_workers=True`` over an :class:`EpochSource`, whose workers
build the epoch's pipeline themselves (``build(epoch)``: the shard plan and shuffle seeds are a pure function of the
epoch) from a shared integer the training process sets before it asks for the epoch's first batch. So the second
epoch starts without forking, importing or opening anything new, and gives the same batches a fresh start would.

Pools are kept in :data:`POOLS`, at most :data:`MAX_POOLS` (training, validation and test of one run), the least
recently used one shut down when another is needed; :func:`close_pools` shuts them all down (``fit`` does when it
ends; the interpreter does at exit). A pool whose epoch failed is shut down, so an error never leaves a worker
behind; an epoch left early keeps it (the workers' unread batches are dropped when the next epoch starts). A pool
still busy with an epoch that was not finished or closed is not shared: the new epoch gets workers of its own, as
before pools existed.
"""

from __future__ import annotations

import atexit
import multiprocessing
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import Any

import torch

MAX_POOLS = 3
POOLS: OrderedDict[Hashable, WorkerPool] = OrderedDict()


class EpochSource(torch.utils.data.IterableDataset):
    """What each worker iterates: ``build(epoch)`` for the epoch in the shared ``epoch`` value at the start of the
    epoch (the pipeline then splits the shards between workers itself)."""

    def __init__(self, build: Callable[[int], Iterable[Any]], epoch: Any) -> None:
        self.build, self.epoch = build, epoch

    def __iter__(self) -> Iterator[Any]:
        return iter(self.build(self.epoch.value))


class WorkerPool:
    """``num_workers`` DataLoader workers kept across epochs (see the module docstring). Items cross the process
    boundary as the workers make them (``batch_size=None``: the DataLoader does no batching of its own); with
    ``pin_memory`` its pinning thread copies them into page-locked memory for non-blocking copies to a GPU."""

    def __init__(
        self, build: Callable[[int], Iterable[Any]], num_workers: int, prefetch_factor: int, pin_memory: bool = False
    ) -> None:
        self.epoch = multiprocessing.get_context().RawValue("q", 0)
        self.loader = torch.utils.data.DataLoader(
            EpochSource(build, self.epoch),
            batch_size=None,
            collate_fn=keep_batch,
            num_workers=num_workers,
            prefetch_factor=prefetch_factor,
            pin_memory=pin_memory,
            persistent_workers=True,
        )
        self.busy = False

    def run(self, epoch: int) -> Iterator[Any]:
        """The workers' items of ``epoch``, in the DataLoader's round-robin order."""
        self.epoch.value = epoch  # before iter(): that is what tells the (started or waiting) workers to begin
        return iter(self.loader)

    @property
    def pids(self) -> list[int]:
        """The worker processes' ids (empty before the first epoch and after :meth:`close`)."""
        iterator = self.loader._iterator
        return [] if iterator is None else [w.pid for w in getattr(iterator, "_workers", [])]

    def close(self) -> None:
        """Stop the workers (an error's traceback would otherwise keep them alive until garbage collection)."""
        iterator, self.loader._iterator = self.loader._iterator, None
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def keep_batch(batch: Any) -> Any:
    """DataLoader collate_fn: pass worker items through as they are (no auto-collation)."""
    return batch


class PooledBatches:
    """Stage (main process), the pipeline's source: the epoch's items from the pool under ``key`` (made with
    ``build``, ``num_workers``, ``prefetch_factor``, ``pin_memory`` when there is none), or from a pool of its own
    while that one is busy. ``persistent=False``: always a pool of its own, shut down when the epoch ends."""

    def __init__(
        self,
        key: Hashable,
        build: Callable[[int], Iterable[Any]],
        epoch: int,
        workers: tuple[int, int, bool],
        persistent: bool = True,
    ) -> None:
        self.key, self.build, self.epoch, self.workers, self.persistent = key, build, epoch, workers, persistent

    def __call__(self) -> Iterator[Any]:
        pool, own = POOLS.get(self.key), not self.persistent
        if pool is None or pool.busy or own:
            pool = WorkerPool(self.build, *self.workers)
            own = own or self.key in POOLS
            if not own:
                keep(self.key, pool)
        if POOLS.get(self.key) is pool:
            POOLS.move_to_end(self.key)
        pool.busy = True
        try:
            yield from pool.run(self.epoch)
        except GeneratorExit:  # the epoch was left early: the workers stay for the next one
            raise
        except BaseException:
            own = True
            raise
        finally:
            pool.busy = False
            if own or POOLS.get(self.key) is not pool:  # its own, failed, or let go while it was busy
                pool.close()
                if POOLS.get(self.key) is pool:
                    del POOLS[self.key]


def keep(key: Hashable, pool: WorkerPool) -> None:
    """Keep ``pool`` under ``key``, shutting the least recently used pool down if there would be too many."""
    POOLS[key] = pool
    while len(POOLS) > MAX_POOLS:
        _, old = POOLS.popitem(last=False)
        if not old.busy:
            old.close()


def close_pools() -> None:
    """Shut every kept pool's workers down (they start again on the next epoch that needs them)."""
    while POOLS:
        _, pool = POOLS.popitem()
        pool.close()


atexit.register(close_pools)
