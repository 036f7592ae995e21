"""DataLoader workers kept across epochs (train/workers.py), the shuffle buffer that yields while it fills, and
evaluation with the configured workers."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch

import train.stages
from shards import SchemaError, ShardDataset
from tests.train.test_data import write_shards
from train import trainer
from train.config import make_train_config
from train.data import DataConfig, make_loader
from train.stages import ShuffleSamples
from train.workers import POOLS, close_pools


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> ShardDataset:
    root = tmp_path_factory.mktemp("toy")
    write_shards(root, {"train": [5, 4, 6, 3], "valid": [3, 2]})
    return ShardDataset.load(root)


@pytest.fixture(autouse=True)
def no_pools():
    close_pools()
    yield
    close_pools()


def _epoch(dataset: ShardDataset | Path, config: DataConfig, epoch: int, train: bool = True) -> list[list[str]]:
    return [batch["key"] for batch in make_loader(dataset, "train", config, train=train, epoch=epoch)]


def _pids() -> list[int]:
    return sorted(pid for pool in POOLS.values() for pid in pool.pids)


def test_workers_persist_across_epochs_and_give_the_same_batches(toy) -> None:
    config = DataConfig(batch_size=3, num_workers=2, shuffle_buffer=4, normalise=False, seed=5)
    first = _epoch(toy, config, 0)
    pids = _pids()
    assert len(pids) == 2 and all(os.path.exists(f"/proc/{pid}") for pid in pids)
    second = _epoch(toy.root, config, 1)  # the same dataset.json, loaded again: the same pool
    assert _pids() == pids and len(POOLS) == 1
    again = _epoch(toy, config, 0)  # back to epoch 0 in the same workers: epoch 0's batches again
    assert _pids() == pids
    fresh = dataclasses.replace(config, persistent_workers=False)
    assert [_epoch(toy, fresh, e) for e in (0, 1)] == [first, second] and again == first
    assert first != second and sorted(sum(first, [])) != []
    close_pools()
    assert POOLS == {} and not any(os.path.exists(f"/proc/{pid}") and _alive(pid) for pid in pids)


def _alive(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ")[1][0] != "Z"


def test_an_epoch_left_early_keeps_the_workers_and_the_next_one_is_whole(toy) -> None:
    config = DataConfig(batch_size=2, num_workers=2, shuffle_buffer=4, normalise=False, seed=1)
    loader = make_loader(toy, "train", config, train=True, epoch=0)
    batches = iter(loader)
    next(batches)
    batches.close()
    pids = _pids()
    assert len(pids) == 2
    whole = _epoch(toy, config, 1)
    assert _pids() == pids
    assert whole == _epoch(toy, dataclasses.replace(config, persistent_workers=False), 1)


def test_a_failed_epoch_stops_its_workers(tmp_path: Path) -> None:
    write_shards(tmp_path, {"train": [3, 3]})
    config = DataConfig(batch_size=2, num_workers=2, normalise=False)
    dataset = ShardDataset.load(tmp_path)
    (tmp_path / "train-000001.tar").write_bytes(b"not a tar at all" * 64)
    with pytest.raises(SchemaError, match="train-000001.tar: not a readable tar"):
        _epoch(dataset, config, 0, train=False)
    assert POOLS == {}


def test_the_first_batch_comes_before_the_shuffle_buffer_fills(toy, monkeypatch) -> None:
    pulled = []
    original = train.stages.iter_raw_samples

    def counting(*args, **kwargs):
        for sample in original(*args, **kwargs):
            pulled.append(sample["__key__"])
            yield sample

    monkeypatch.setattr(train.stages, "iter_raw_samples", counting)
    config = DataConfig(batch_size=2, num_workers=0, shuffle_buffer=1000, normalise=False)
    batches = iter(make_loader(toy, "train", config, train=True))
    assert len(next(batches)["key"]) == 2
    assert len(pulled) <= 3 * 2 < toy.split_samples("train")  # not the whole split (a 1000-sample buffer's fill)
    stage = ShuffleSamples(100, 0, 0, 0, initial=4)
    source = iter(range(1000))
    out = stage(source)
    first = [next(out) for _ in range(4)]
    assert len(set(first)) == 4 and next(source) < 12  # 4 out after at most 11 in, not 100


def test_evaluation_uses_the_configured_workers(toy, monkeypatch) -> None:
    seen = []

    def fake_loader(dataset, split, data, **kwargs):
        seen.append(data.num_workers)
        return []

    monkeypatch.setattr(trainer, "make_loader", fake_loader)
    config = make_train_config("late", overrides=["num_workers=3", "model.hidden=8"])
    net = torch.nn.Module()
    net.text_vocab = None
    trainer.evaluate(net, toy, "valid", config)  # no batch to score: only the loader's settings matter here
    assert seen == [3]
