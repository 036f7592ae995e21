"""Batches held in memory, in the streaming loader's format: small corpora, benchmarks and tests."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import webdataset as wds

from shards.dataset import ShardDataset
from train.batches import DropBad, Normalise, collate
from train.data import DataConfig, plan_shards, sample_stages
from train.inputs import has_video_geom
from train.stages import ShardList


class InMemorySource:
    """Batches in the loader's format from memory: model-input samples or an already padded dict of tensors.

    ``data`` is either a list of samples as :class:`train.stages.ToInputs` makes them (``key``, ``label`` — a
    number, or a (K,) 0/1 array for multilabel —, and ``x`` with ``x_mask`` arrays per input), padded per batch,
    or a dict of (N, ...) tensors sliced into batches (``label`` (N,) or (N, K); a ``key`` list is optional).
    Shuffling uses ``Random(f"{seed}-{epoch}")``; call :meth:`set_epoch`. Batches are as the streaming loader
    yields them (features float16 as stored, standardised by ``FusionPipeline`` on the device); ``normalise``
    applies :class:`train.batches.Normalise` here instead (float32 batches, which the network leaves as they are).
    """

    def __init__(
        self,
        data: Sequence[Mapping[str, Any]] | Mapping[str, Any],
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        normalise: Normalise | None = None,
    ) -> None:
        self.data, self.batch_size, self.shuffle, self.seed = data, batch_size, shuffle, seed
        self.drop_last, self.normalise, self.epoch = drop_last, normalise, 0
        if isinstance(data, Mapping):
            self.size = len(data["label"]) if "label" in data else len(next(iter(data.values())))
        else:
            self.size = len(data)

    @classmethod
    def from_shards(
        cls, shards: ShardDataset | str | Path, split: str, config: DataConfig, *, shuffle: bool = False
    ) -> InMemorySource:
        """Every sample of ``split`` read once into memory, with the same stages as streaming (a clear error, as
        ``make_loader`` gives, when normalising needs statistics the shards lack)."""
        config.check()
        dataset = ShardDataset.of(shards)
        tasks = plan_shards(dataset, split, train=False, seed=0, epoch=0, rank=0, world_size=1)
        pipeline = wds.DataPipeline(
            ShardList(tasks), *sample_stages(dataset, config, train=False, epoch=0, rank=0, split=split), DropBad()
        )
        geom = has_video_geom(dataset) if config.video_geom is None else config.video_geom
        if config.normalise:
            Normalise.from_dataset(dataset, config.modalities, geom)
        drop = config.drop_last and shuffle
        return cls(list(pipeline), config.batch_size, shuffle=shuffle, seed=config.seed, drop_last=drop)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        rounding = math.floor if self.drop_last else math.ceil
        return int(rounding(self.size / self.batch_size))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        order = list(range(self.size))
        if self.shuffle:
            random.Random(f"{self.seed}-{self.epoch}").shuffle(order)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            index = order[start : start + self.batch_size]
            batch = self._batch(index)
            yield self.normalise(batch) if self.normalise else batch

    def _batch(self, index: list[int]) -> dict[str, Any]:
        if not isinstance(self.data, Mapping):
            return collate([self.data[i] for i in index])
        idx = torch.tensor(index, dtype=torch.long)
        batch = {k: v[idx] for k, v in self.data.items() if isinstance(v, torch.Tensor)}
        keys = self.data.get("key")
        batch["key"] = [str(keys[i]) for i in index] if keys is not None else [str(i) for i in index]
        return batch
