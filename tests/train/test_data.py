"""Streaming data pipeline: collate, missing modalities, normalisation, exactly-once, equal batches, resume, bad data."""

from __future__ import annotations

import io
import math
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import AUDIO_DIM, TEXT_DIM

from shards import (
    SCHEMA_VERSION,
    SchemaError,
    ShardDataset,
    ShardWriter,
    build_dataset,
    feature_set_hash,
    load_dataset_json,
)
from shards.contract import builtin_contracts
from shards.io import atomic_write_json
from shards.stats import RunningStats
from train.batches import Normalise, collate
from train.data import DataConfig, make_loader, num_batches, plan_shards
from train.inputs import DataError, feature_dims
from train.memory import InMemorySource
from train.stages import ToInputs

DT, DA = 5, 7
FEATURE_SET = {
    "schema_version": SCHEMA_VERSION,
    "modalities": ["text", "audio", "video"],
    "extractors": {"text": {"name": "toy"}, "audio": {"name": "toy"}, "video": {"name": "mediapipe-facemesh"}},
}
BUILTIN = builtin_contracts()  # which member is each modality's feature, and its mask
LAYOUT = {"train": [5, 4, 6, 3, 5, 4], "valid": [3, 2, 4, 1, 3], "test": [5]}


def make_sample(key: str, split: str, rng: np.random.Generator, *, label=0.5, failed=()) -> dict:
    tt, ta, tv, n = (int(x) for x in rng.integers(2, 6, size=4))
    mods = {
        m: {"status": "failed" if m in failed else "ok", "error": "broken" if m in failed else None} for m in BUILTIN
    }
    s = {
        "__key__": key,
        "meta.json": {
            "schema_version": SCHEMA_VERSION, "key": key, "video_id": key.split("__")[0], "clip_id": key.split("__")[1],
            "split": split, "feature_set_hash": feature_set_hash(FEATURE_SET), "modalities": mods,
            "labels": {} if label is None else {"label": label, "annotation": "Positive"},
        },
    }  # fmt: skip
    text = rng.normal(2.0, 3.0, (tt, DT)).astype(np.float16)
    text[:, 0] = 0.5  # a constant feature: train std 0, so normalisation only centres it
    if "text" not in failed:
        s.update({"text_ids.npy": rng.integers(100, 999, tt).astype(np.int32), "text_feat.npy": text})
    if "audio" not in failed:
        s.update({
            "audio_wave.npy": rng.integers(-32768, 32767, n * 320).astype(np.int16),
            "audio_feat.npy": rng.normal(-1.0, 0.5, (ta, DA)).astype(np.float16),
            "audio_mask.npy": np.arange(ta) > 0,  # a late audio stream: first frame is padding
            "audio_time.npy": np.arange(ta, dtype=np.float32) / 50,
        })  # fmt: skip
    if "video" not in failed:
        s.update({
            "video_lmk.npy": rng.normal(0.0, 1.0, (tv, 478, 3)).astype(np.float16),
            "video_mask.npy": np.arange(tv) != 1,  # no face in frame 1
            "video_time.npy": np.arange(tv, dtype=np.float32) / 25,
            "video_geom.npy": rng.normal(0.0, 1.0, (tv, 4)).astype(np.float32),
        })  # fmt: skip
    return s


def write_shards(root: Path, layout: dict = LAYOUT, special: dict | None = None) -> dict[str, dict]:
    """Shards of synthetic samples plus sidecars and dataset.json (as `mmfuse extract` writes them)."""
    root.mkdir(parents=True, exist_ok=True)
    rng, samples, planned = np.random.default_rng(7), {}, []
    for split, sizes in layout.items():
        for index, size in enumerate(sizes):
            name, stats = f"{split}-{index:06d}", {}
            writer = ShardWriter(root / f"{name}.tar", validate=False)
            for j in range(size):
                key = f"{split}{index}__c{j}"
                s = (special or {}).get(key) or make_sample(
                    key, split, rng, label=None if j == 1 else j - 1.5, failed=("audio",) if j == 2 else ()
                )
                writer.write(s)
                samples[key] = s
                for c in BUILTIN.values():
                    if split == "train" and c.feature in s:
                        rows = s[c.feature][s[c.mask]] if c.mask else s[c.feature]
                        stats.setdefault(c.feature, RunningStats()).update(rows)
            writer.commit()
            side = {
                "schema_version": SCHEMA_VERSION, "feature_set_hash": feature_set_hash(FEATURE_SET), "keys": writer.keys,
                "split": split, "digests": writer.digests, "bytes": (root / f"{name}.tar").stat().st_size, "clips": [{"key": k, "status": "ok"} for k in writer.keys],
                "dims": {"Dt": DT, "Da": DA, "landmarks": 478}, "stats": {m: st.to_json() for m, st in stats.items()},
            }  # fmt: skip
            atomic_write_json(root / f"{name}.json", side)
            planned.append((split, index))
    build_dataset(root, planned, FEATURE_SET)
    return samples


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    root = tmp_path_factory.mktemp("toy")
    return root, write_shards(root)


def keys_of(loader) -> list[str]:
    return [k for batch in loader for k in batch["key"]]


def model_batches(loader) -> list[dict]:
    """The loader's batches as the fusion models get them (``FusionPipeline`` applies ``normalise`` on the device)."""
    return [loader.normalise(batch) for batch in loader]


def test_collate_pads_and_masks() -> None:
    a = {"key": "a", "label": 1.0, "text": np.ones((2, 3), np.float32), "text_mask": np.array([True, True]),
         "audio": np.arange(4, dtype=np.float32).reshape(1, 4), "audio_mask": np.array([False])}  # fmt: skip
    b = {"key": "b", "label": math.nan, "text": np.full((3, 3), 2, np.float32), "text_mask": np.array([True, True, True]),
         "audio": np.arange(12, dtype=np.float32).reshape(3, 4), "audio_mask": np.array([True, False, True])}  # fmt: skip
    batch = collate([a, b])
    assert batch["key"] == ["a", "b"]
    assert torch.equal(batch["text"], torch.tensor([[[1.0] * 3, [1.0] * 3, [0.0] * 3], [[2.0] * 3] * 3]))
    assert batch["text_mask"].tolist() == [[True, True, False], [True, True, True]]
    assert torch.equal(batch["audio"][0], torch.tensor([[0.0, 1, 2, 3], [0] * 4, [0] * 4]))
    assert torch.equal(batch["audio"][1], torch.arange(12.0).reshape(3, 4))
    assert batch["audio_mask"].tolist() == [[False, False, False], [True, False, True]]
    assert batch["label"][0] == 1.0 and math.isnan(batch["label"][1])
    assert batch["text"].dtype == torch.float32 and batch["audio_mask"].dtype == torch.bool


def test_missing_modality_is_an_all_false_mask_not_a_dropped_sample(toy) -> None:
    root, samples = toy
    s = make_sample("v__c", "train", np.random.default_rng(0), failed=("audio", "video"))
    inputs = ToInputs(("text", "audio", "video"), {"text": DT, "audio": DA, "video": 1438}, True, "label", True)(s)
    assert inputs["audio"].shape == (1, DA) and not inputs["audio"].any() and inputs["audio_mask"].tolist() == [False]
    assert inputs["video_mask"].tolist() == [False]
    assert Normalise({}, {})(collate([inputs]))["video"].shape == (1, 1, 1438)  # landmarks, then the geometry
    assert inputs["audio_wave_mask"].tolist() == [False] and inputs["text_mask"].all()
    cfg = DataConfig(batch_size=64, num_workers=0, normalise=False)
    (batch,) = model_batches(make_loader(root, "valid", cfg, train=False))
    assert len(batch["key"]) == sum(LAYOUT["valid"])
    for i, key in enumerate(batch["key"]):
        failed = "audio_feat.npy" not in samples[key]
        assert batch["audio_mask"][i].any().item() is not failed
        if failed:
            assert not batch["audio"][i].any()


def test_values_labels_and_video_geometry(toy) -> None:
    root, samples = toy
    cfg = DataConfig(batch_size=4, num_workers=0, normalise=False)
    for batch in model_batches(make_loader(root, "train", cfg, train=False)):
        for i, key in enumerate(batch["key"]):
            s = samples[key]
            tv, ta = len(s["video_mask.npy"]), len(s.get("audio_mask.npy", [0]))
            lmk = s["video_lmk.npy"].astype(np.float32).reshape(tv, -1)
            np.testing.assert_array_equal(batch["video"][i, :tv].numpy(), np.concatenate([lmk, s["video_geom.npy"]], 1))
            assert batch["video_mask"][i].tolist() == s["video_mask.npy"].tolist() + [False] * (
                batch["video"].shape[1] - tv
            )
            assert batch["audio_mask"][i, :ta].tolist() == s.get("audio_mask.npy", np.zeros(1, bool)).tolist()
            label = s["meta.json"]["labels"].get("label", math.nan)
            assert batch["label"][i].item() == label or (math.isnan(label) and math.isnan(batch["label"][i]))
    with pytest.raises(DataError, match="label 'annotation' is 'Positive', not a number"):
        next(iter(make_loader(root, "train", DataConfig(num_workers=0, label_key="annotation"), train=False)))


def test_normalise_equals_numpy_on_valid_positions(toy) -> None:
    root, _ = toy
    stats = load_dataset_json(root)["stats"]
    plain = model_batches(
        make_loader(root, "valid", DataConfig(batch_size=4, num_workers=0, normalise=False), train=False)
    )
    normed = model_batches(make_loader(root, "valid", DataConfig(batch_size=4, num_workers=0), train=False))
    assert stats["text_feat.npy"]["std"][0] < 1e-6  # the constant feature exercises the std floor
    for p, n in zip(plain, normed, strict=True):
        assert p["key"] == n["key"]
        for m, member in ((m, c.feature) for m, c in BUILTIN.items()):
            mean, std = np.array(stats[member]["mean"]), np.array(stats[member]["std"])
            if m == "video":
                mean, std = np.concatenate([mean, np.zeros(4)]), np.concatenate([std, np.ones(4)])
            std = np.where(std < 1e-6, 1.0, std)
            valid = p[f"{m}_mask"].numpy()[..., None]
            want = np.where(valid, (p[m].numpy() - mean) / std, 0.0)
            np.testing.assert_allclose(n[m].numpy(), want, rtol=1e-5, atol=1e-5)
            assert not n[m].numpy()[~p[f"{m}_mask"].numpy()].any()  # padding and masked steps stay 0


def test_missing_statistics_are_a_clear_error(tmp_path) -> None:
    write_shards(tmp_path, {"valid": [2]})
    with pytest.raises(DataError, match="no train-split statistics for text_feat.npy.*normalise=False"):
        make_loader(tmp_path, "valid", DataConfig(num_workers=0), train=False)
    assert len(keys_of(make_loader(tmp_path, "valid", DataConfig(num_workers=0, normalise=False), train=False))) == 2
    with pytest.raises(DataError, match=r"no complete shards for split 'train'; the shard directory has \['valid'\]"):
        make_loader(tmp_path, "train", DataConfig(num_workers=0, normalise=False), train=True)


@pytest.mark.parametrize(("split", "world"), [("valid", 2), ("valid", 3), ("test", 2)])  # 5 shards; 1 shard < ranks
def test_eval_yields_every_key_once_across_ranks_and_workers(toy, split, world) -> None:
    root, samples = toy
    cfg = DataConfig(batch_size=2, num_workers=2, normalise=False)
    seen, lengths = Counter(), []
    for rank in range(world):
        loader = make_loader(root, split, cfg, train=False, rank=rank, world_size=world)
        keys = keys_of(loader)
        assert keys == keys_of(make_loader(root, split, cfg, train=False, rank=rank, world_size=world))  # fixed order
        assert len(loader) == math.ceil(len(keys) / 2) == sum(1 for _ in loader)
        seen.update(keys)
        lengths.append(len(keys))
    assert seen == Counter(k for k in samples if samples[k]["meta.json"]["split"] == split)  # each key once
    assert max(lengths) - min(lengths) <= 1  # balanced by dataset.json's sample counts (whole shards or strided)


def test_training_equal_batches_no_repeats_and_seeded_order(toy) -> None:
    root, _ = toy
    cfg = DataConfig(batch_size=3, num_workers=2, shuffle_buffer=8, normalise=False, seed=11)

    def epoch(e: int) -> list[list[list[str]]]:
        return [
            [b["key"] for b in make_loader(root, "train", cfg, train=True, epoch=e, rank=r, world_size=2)]
            for r in range(2)
        ]

    first = epoch(0)
    counts = [
        sum(
            t.count
            for t in plan_shards(ShardDataset.load(root), "train", train=True, seed=11, epoch=0, rank=r, world_size=2)
        )
        for r in range(2)
    ]
    assert sum(counts) == sum(LAYOUT["train"]) and abs(counts[0] - counts[1]) <= 1  # balanced by sample counts
    assert (
        len(first[0]) == len(first[1]) == min(counts) // 3 == num_batches(root, "train", cfg, train=True, world_size=2)
    )
    assert all(len(b) == 3 for rank in first for b in rank)
    flat = [k for rank in first for b in rank for k in b]
    assert len(flat) == len(set(flat))
    assert epoch(0) == first  # same seed and epoch: same batches
    second = epoch(1)
    assert second != first and len(second[0]) == len(second[1])  # a new shard and sample order each epoch


def test_skip_batches_resumes_mid_epoch(toy) -> None:
    root, _ = toy
    cfg = DataConfig(batch_size=2, num_workers=2, shuffle_buffer=5)
    full = list(make_loader(root, "train", cfg, train=True, epoch=3))
    rest = make_loader(root, "train", cfg, train=True, epoch=3, skip_batches=4)
    assert len(rest) == len(full) - 4
    tail = list(rest)
    assert len(tail) == len(full) - 4
    for a, b in zip(full[4:], tail, strict=True):
        assert a["key"] == b["key"]
        for name in ("text", "audio_mask", "video", "label"):
            assert (
                torch.equal(a[name].nan_to_num(), b[name].nan_to_num())
                if a[name].is_floating_point()
                else torch.equal(a[name], b[name])
            )


def corrupt_copy(src: Path, dst: Path, member: str) -> None:
    with tarfile.open(src) as tin, tarfile.open(dst, "w", format=tarfile.USTAR_FORMAT) as tout:
        for info in tin:
            data = tin.extractfile(info).read()
            if info.name == member:
                data = b"\x93NUMPY garbage"
            info.size = len(data)
            tout.addfile(info, io.BytesIO(data))


def test_bad_samples_raise_naming_shard_and_member_or_are_skipped_and_counted(tmp_path) -> None:
    rng = np.random.default_rng(3)
    wrong = make_sample("valid1__c0", "valid", rng)
    wrong["audio_feat.npy"] = wrong["audio_feat.npy"].astype(np.float32)
    samples = write_shards(tmp_path, {"valid": [3, 2]}, special={"valid1__c0": wrong})
    cfg = DataConfig(batch_size=2, num_workers=1, normalise=False)
    with pytest.raises(
        SchemaError, match=r"shard valid-000001.tar: sample valid1__c0: audio_feat.npy has dtype float32"
    ):
        keys_of(make_loader(tmp_path, "valid", cfg, train=False))
    loader = make_loader(
        tmp_path, "valid", DataConfig(batch_size=2, num_workers=1, normalise=False, skip_bad_samples=True), train=False
    )
    assert sorted(keys_of(loader)) == sorted(k for k in samples if k != "valid1__c0")
    assert len(loader.bad_samples) == 1 and "valid-000001.tar" in loader.bad_samples[0]
    shard = tmp_path / "valid-000000.tar"
    corrupt_copy(shard, tmp_path / "x.tar", "valid0__c1.text_feat.npy")
    (tmp_path / "x.tar").replace(shard)
    with pytest.raises(SchemaError, match=r"shard valid-000000.tar: member valid0__c1.text_feat.npy cannot be decoded"):
        keys_of(make_loader(tmp_path, "valid", DataConfig(num_workers=0, normalise=False), train=False))
    loader = make_loader(
        tmp_path, "valid", DataConfig(num_workers=0, normalise=False, skip_bad_samples=True), train=False
    )
    assert sorted(keys_of(loader)) == ["valid0__c0", "valid0__c2", "valid1__c1"] and len(loader.bad_samples) == 2
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # truncated mid-shard
    with pytest.raises(SchemaError, match=r"shard valid-000000.tar: truncated or corrupt tar after sample \d"):
        keys_of(make_loader(tmp_path, "valid", DataConfig(num_workers=0, normalise=False), train=False))


def test_foreign_feature_set_sample_is_refused(tmp_path) -> None:
    foreign = make_sample("valid0__c1", "valid", np.random.default_rng(4))
    foreign["meta.json"]["feature_set_hash"] = "0123456789abcdef"
    write_shards(tmp_path, {"valid": [3]}, special={"valid0__c1": foreign})
    with pytest.raises(
        SchemaError,
        match=r"shard valid-000000.tar: sample valid0__c1: meta.json feature_set_hash 0123456789abcdef differs",
    ):
        keys_of(make_loader(tmp_path, "valid", DataConfig(num_workers=0, normalise=False), train=False))


def test_rank_short_of_batches_after_skipping_bad_samples_still_matches(tmp_path) -> None:
    wrong = make_sample("train1__c3", "train", np.random.default_rng(5))
    wrong["text_feat.npy"] = wrong["text_feat.npy"].astype(np.float32)  # wrong dtype in a member training reads
    write_shards(tmp_path, {"train": [4, 4]}, special={"train1__c3": wrong})
    cfg = DataConfig(batch_size=2, num_workers=0, shuffle_buffer=2, skip_bad_samples=True)
    loaders = [make_loader(tmp_path, "train", cfg, train=True, rank=r, world_size=2) for r in range(2)]
    batches = [list(loader) for loader in loaders]
    assert [len(b) for b in batches] == [2, 2] and [len(loader) for loader in loaders] == [2, 2]
    assert sum(len(loader.bad_samples) for loader in loaders) == 1
    short = next(b for b, loader in zip(batches, loaders, strict=True) if loader.bad_samples)
    assert short[1]["key"] == short[0]["key"]  # the short rank repeats its first batch instead of hanging DDP


def test_raw_inputs(toy) -> None:
    root, samples = toy
    cfg = DataConfig(batch_size=3, num_workers=0, raw=True, modalities=("text", "audio"))
    for batch in make_loader(root, "valid", cfg, train=False):
        assert (
            "video" not in batch
            and batch["text_ids"].dtype == torch.int64
            and batch["audio_wave"].dtype == torch.float32
        )
        for i, key in enumerate(batch["key"]):
            s = samples[key]
            tt = len(s["text_ids.npy"])
            assert (
                batch["text_ids"][i, :tt].tolist() == s["text_ids.npy"].tolist() and not batch["text_ids"][i, tt:].any()
            )
            assert batch["text_ids_mask"][i].sum() == tt
            if "audio_wave.npy" in s:
                n = len(s["audio_wave.npy"])
                np.testing.assert_array_equal(batch["audio_wave"][i, :n].numpy(), s["audio_wave.npy"] / 32768.0)
                assert batch["audio_wave_mask"][i].sum() == n
            else:
                assert not batch["audio_wave_mask"][i].any()
        assert batch["audio_wave"].abs().max() <= 1.0


def test_in_memory_source_matches_streaming(toy) -> None:
    root, _ = toy
    cfg = DataConfig(batch_size=4, num_workers=0)
    streamed = list(make_loader(root, "valid", cfg, train=False))
    memory = InMemorySource.from_shards(root, "valid", cfg)
    assert len(memory) == len(streamed)
    for a, b in zip(streamed, memory, strict=True):
        assert (
            a["key"] == b["key"]
            and torch.equal(a["video"], b["video"])
            and torch.equal(a["audio_mask"], b["audio_mask"])
        )
    tensors = {
        "text": torch.arange(30.0).reshape(5, 3, 2),
        "text_mask": torch.ones(5, 3, dtype=torch.bool),
        "label": torch.arange(5.0),
    }
    src = InMemorySource(tensors, 2, shuffle=True, seed=1, drop_last=True)
    batches = list(src)
    assert len(src) == len(batches) == 2 and all(b["text"].shape == (2, 3, 2) for b in batches)
    for b in batches:
        assert [int(k) for k in b["key"]] == b["label"].long().tolist()
        assert torch.equal(b["text"], tensors["text"][b["label"].long()])
    src.set_epoch(1)
    assert [b["key"] for b in src] != [b["key"] for b in batches]  # reshuffled for the new epoch


def test_config_errors_are_collected() -> None:
    with pytest.raises(DataError, match=r"batch_size: must be >= 1.*modalities: a non-empty subset"):
        DataConfig(batch_size=0, modalities=("smell",)).check()


def test_bundled_shards_load_with_predicted_dims(bundled_dataset) -> None:
    dims = feature_dims(bundled_dataset)
    assert dims == {"text": TEXT_DIM, "audio": AUDIO_DIM, "video": 478 * 3 + 4}
    keys = []
    for split in ("train", "valid", "test"):
        for batch in model_batches(
            make_loader(bundled_dataset, split, DataConfig(batch_size=2, num_workers=0, raw=True), train=False)
        ):
            keys += batch["key"]
            for m, d in dims.items():
                assert batch[m].shape[0] == len(batch["key"]) and batch[m].shape[2] == d
                assert batch[f"{m}_mask"].shape == batch[m].shape[:2]
                assert torch.isfinite(batch[m]).all()
            assert batch["audio_wave"].shape[1] > 16000 * 0.5
    assert len(keys) == len(set(keys)) == 4
    train = make_loader(bundled_dataset, "train", DataConfig(batch_size=2, num_workers=0), train=True)
    assert len(train) == 1 and sorted(next(iter(train))["key"]) == ["grid__bbaf2n", "grid__pwij3p"]


def test_members_the_model_does_not_use_are_never_decoded(tmp_path) -> None:
    samples = write_shards(tmp_path, {"valid": [3]})
    shard = tmp_path / "valid-000000.tar"
    corrupt_copy(shard, tmp_path / "x.tar", "valid0__c1.audio_wave.npy")  # a raw input, read only end to end
    (tmp_path / "x.tar").replace(shard)
    frozen = DataConfig(num_workers=0, normalise=False)
    assert sorted(keys_of(make_loader(tmp_path, "valid", frozen, train=False))) == sorted(samples)
    text_only = DataConfig(num_workers=0, normalise=False, raw=True, modalities=("text",))
    assert sorted(keys_of(make_loader(tmp_path, "valid", text_only, train=False))) == sorted(samples)
    raw = DataConfig(num_workers=0, normalise=False, raw=True)
    with pytest.raises(SchemaError, match=r"member valid0__c1.audio_wave.npy cannot be decoded"):
        keys_of(make_loader(tmp_path, "valid", raw, train=False))
