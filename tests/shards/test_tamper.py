"""Shards and dataset.json that were tampered with are noticed: per-member digests and the split in each shard's
sidecar, and dataset.json checked against the sidecars, read through a guarded path."""

from __future__ import annotations

import io
import json
import re
import shutil
import tarfile
from pathlib import Path

import pytest

from mmfuse.cli import main
from shards import SchemaError, ShardDataset, iter_shard, load_dataset_json
from shards.inspect import format_summary, inspect_dataset
from shards.sidecar import member_digest
from tests.train.test_data import write_shards
from train.data import DataConfig, make_loader, num_batches

LAYOUT = {"train": [3, 2], "valid": [3], "test": [3]}
FAST = ["batch_size=1", "num_workers=0", "model.hidden=12", "model.num_heads=3", "device=cpu", "epochs=1"]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pristine")
    write_shards(root, LAYOUT)
    return root


@pytest.fixture()
def shards(pristine: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "shards"))


def edit_member(shard: Path, member: str, edit) -> None:
    """Rewrite ``shard`` with ``member``'s bytes replaced by ``edit(bytes)`` (same size, same headers)."""
    with tarfile.open(shard) as tin:
        members = [(info, tin.extractfile(info).read()) for info in tin]
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tout:
        for info, data in members:
            if info.name == member:
                data = edit(data)
            info.size = len(data)
            tout.addfile(info, io.BytesIO(data))


def flip_data_bit(data: bytes) -> bytes:
    """One bit flipped in the first value after the .npy header (the data, not the header)."""
    header_len = int.from_bytes(data[8:10], "little")  # format 1.0: magic (6), version (2), header length (2)
    start = 10 + header_len
    return data[:start] + bytes([data[start] ^ 1]) + data[start + 1 :]


def verify(root: Path, capsys) -> tuple[int, str]:
    rc = main(["inspect", str(root), "--verify"])
    captured = capsys.readouterr()
    return rc, captured.out + captured.err


def train_cli(root: Path, run: Path, capsys, *extra: str) -> tuple[int, str]:
    rc = main(["train", "--shards", str(root), "--model", "late", "--run-dir", str(run), *FAST, *extra])
    captured = capsys.readouterr()
    return rc, captured.out + captured.err


def keys(root: Path | ShardDataset, split: str, skip: bool = False) -> tuple[list[str], list[str]]:
    loader = make_loader(root, split, DataConfig(num_workers=0, normalise=False, skip_bad_samples=skip), train=False)
    return [k for batch in loader for k in batch["key"]], loader.bad_samples


def test_sidecars_record_every_members_digest(pristine: Path, capsys) -> None:
    side = json.loads((pristine / "valid-000000.json").read_text())
    samples = list(iter_shard(pristine / "valid-000000.tar"))
    assert list(side["digests"]) == side["keys"] == [s["__key__"] for s in samples] and side["split"] == "valid"
    with tarfile.open(pristine / "valid-000000.tar") as tar:
        for info in tar:
            key, _, member = info.name.partition(".")
            assert side["digests"][key][member] == member_digest(tar.extractfile(info).read())
    assert sum(len(d) for d in side["digests"].values()) == len(tarfile.open(pristine / "valid-000000.tar").getnames())
    rc, out = verify(pristine, capsys)
    assert rc == 0 and "read back: OK" in out and "warning" not in out


def test_flipped_bits_in_a_feature(shards: Path, capsys) -> None:
    edit_member(shards / "valid-000000.tar", "valid0__c1.text_feat.npy", flip_data_bit)
    rc, out = verify(shards, capsys)
    assert rc == 1 and "1 PROBLEM(S)" in out
    assert "shard valid-000000.tar: sample valid0__c1: member valid0__c1.text_feat.npy digest mismatch" in out


def test_edited_label_is_refused_by_verify_and_training(shards: Path, capsys) -> None:
    def relabel(data: bytes) -> bytes:
        assert b'"label": -1.5' in data
        return data.replace(b'"label": -1.5', b'"label": -9.5')  # same size

    edit_member(shards / "valid-000000.tar", "valid0__c0.meta.json", relabel)
    rc, out = verify(shards, capsys)
    assert rc == 1 and "sample valid0__c0: member valid0__c0.meta.json digest mismatch" in out
    with pytest.raises(SchemaError, match=r"shard valid-000000.tar: sample valid0__c0: member valid0__c0.meta.json "):
        keys(shards, "valid")
    read, bad = keys(shards, "valid", skip=True)
    assert read == ["valid0__c1", "valid0__c2"] and len(bad) == 1 and "meta.json digest mismatch" in bad[0]


def swap(root: Path, a: str, b: str, suffixes: tuple[str, ...] = (".tar", ".json")) -> None:
    for suffix in suffixes:
        (root / f"{a}{suffix}").rename(root / "swap.tmp")
        (root / f"{b}{suffix}").rename(root / f"{a}{suffix}")
        (root / "swap.tmp").rename(root / f"{b}{suffix}")


def test_shard_swapped_with_one_of_another_split(shards: Path, tmp_path: Path, capsys) -> None:
    loaded = ShardDataset.load(shards)  # planned before the swap: the workers' own check must catch it
    swap(shards, "train-000000", "test-000000")  # tar and sidecar, both valid, same sample count
    rc, out = verify(shards, capsys)
    assert rc == 1
    assert "its sidecar train-000000.json records split 'test', but the shard is read as split 'train'" in out
    with pytest.raises(SchemaError, match=r"train-000000.json records split 'test', but the shard is read as split"):
        ShardDataset.load(shards)
    rc, out = train_cli(shards, tmp_path / "run", capsys)
    assert rc == 1 and "records split 'test', but the shard is read as split 'train'" in out
    with pytest.raises(SchemaError, match=r"shard train-000000.tar: its sidecar train-000000.json records split"):
        keys(loaded, "train")
    read, bad = keys(loaded, "train", skip=True)
    assert read == ["train1__c0", "train1__c1"] and len(bad) == 1 and "records split 'test'" in bad[0]
    # a sidecar from before splits were recorded: each sample's meta.json still names its split
    for name in ("train-000000.json", "test-000000.json"):
        side = json.loads((shards / name).read_text())
        side.pop("split")
        (shards / name).write_text(json.dumps(side))
    with pytest.raises(SchemaError, match=r"shard train-000000.tar: sample test0__c0: meta.json says split 'test'"):
        keys(loaded, "train")


def test_tar_swapped_without_its_sidecar(shards: Path, capsys) -> None:
    swap(shards, "train-000000", "valid-000000", suffixes=(".tar",))
    rc, out = verify(shards, capsys)
    assert rc == 1 and "shard train-000000.tar: sample valid0__c0 is not in its sidecar's key list" in out
    with pytest.raises(SchemaError, match=r"sample valid0__c0 is not in its sidecar's key list \(train-000000.json\)"):
        keys(shards, "train")
    read, bad = keys(shards, "train", skip=True)
    assert read == ["train1__c0", "train1__c1"] and len(bad) == 3


def test_sample_missing_from_a_shard(shards: Path, capsys) -> None:
    shard = shards / "valid-000000.tar"
    with tarfile.open(shard) as tin:
        members = [(i, tin.extractfile(i).read()) for i in tin if not i.name.startswith("valid0__c2.")]
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tout:
        for info, data in members:
            tout.addfile(info, io.BytesIO(data))
    rc, out = verify(shards, capsys)
    assert rc == 1 and "shard valid-000000.tar holds 2 samples but its sidecar valid-000000.json lists 3" in out
    with pytest.raises(SchemaError, match="holds 2 samples but its sidecar valid-000000.json lists 3"):
        keys(shards, "valid")


def rewrite_dataset_json(root: Path, edit) -> None:
    obj = json.loads((root / "dataset.json").read_text())
    edit(obj)
    (root / "dataset.json").write_text(json.dumps(obj))


def test_duplicated_shard_entry(shards: Path, tmp_path: Path, capsys) -> None:
    assert num_batches(shards, "train", DataConfig(batch_size=1), train=False) == 5
    rewrite_dataset_json(shards, lambda ds: ds["shards"].append(dict(ds["shards"][0])))
    message = f"{shards / 'dataset.json'}: shards lists train-000000.tar 2 times"
    with pytest.raises(SchemaError, match=message):
        ShardDataset.load(shards)
    rc, out = verify(shards, capsys)
    assert rc == 1 and message in out and "samples in 4 shards read back" in out  # each shard read once
    rc, out = train_cli(shards, tmp_path / "run", capsys)
    assert rc == 1 and message in out


@pytest.mark.parametrize("field", ["entry", "counts", "total"])
def test_dataset_json_counts_that_disagree_with_the_shards(shards: Path, tmp_path: Path, capsys, field) -> None:
    def edit(ds: dict) -> None:
        if field == "entry":
            ds["shards"][0]["samples"] = 100
        elif field == "counts":
            ds["counts"]["train"]["ok"] = 100
        else:
            ds["samples"] = 100

    rewrite_dataset_json(shards, edit)
    message = {
        "entry": "shards[0] (train-000000.tar) 'samples' is 100 but its sidecar train-000000.json lists 3 samples",
        "counts": "counts.train lists 100 samples (statuses other than skipped) but the sidecars of its train "
        "shards list 5",
        "total": "'samples' is 100 but the sidecars list 11",
    }[field]
    with pytest.raises(SchemaError, match=re.escape(f"dataset.json: {message}")):
        num_batches(shards, "train", DataConfig(batch_size=1), train=True)
    rc, out = verify(shards, capsys)
    assert rc == 1 and message in out
    rc, out = train_cli(shards, tmp_path / "run", capsys)
    assert rc == 1 and message in out


def test_dataset_json_bombs_and_foreign_files(tmp_path: Path, pristine: Path) -> None:
    root = tmp_path / "d"
    root.mkdir()
    path = root / "dataset.json"
    with open(path, "wb") as f:
        f.truncate(1 << 30)  # 1 GB declared, sparse on disk
    with pytest.raises(
        SchemaError, match=r"dataset.json: 1073741824 bytes, over the 67108864-byte cap; refused unread"
    ):
        ShardDataset.load(root)
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(SchemaError, match="dataset.json: JSON nested 100000 levels deep, over the limit of 64"):
        load_dataset_json(root)
    path.write_bytes(b'{"schema_version": 1, "x": "\xff"}')
    with pytest.raises(SchemaError, match="dataset.json is not valid JSON"):
        load_dataset_json(root)
    path.write_text('{"schema_version": 1, "feature_set": {}, "shards": {}, "dims": {}, "counts": {}}')
    with pytest.raises(
        SchemaError, match=r"dataset.json: no field 'feature_set_hash'; 'shards' is not a list \(dict\)"
    ):
        ShardDataset.load(root)
    good = json.loads((pristine / "dataset.json").read_text())
    good["shards"][1] = {"name": "train-000001.tar", "split": "train", "samples": "2"}
    path.write_text(json.dumps(good))
    with pytest.raises(SchemaError, match=r"'shards\[1\].samples' is '2', not an integer"):
        load_dataset_json(root)


def test_listed_shard_without_its_files(shards: Path) -> None:
    (shards / "valid-000000.json").unlink()
    (shards / "test-000000.tar").unlink()
    with pytest.raises(SchemaError) as info:
        ShardDataset.load(shards)
    assert "shards[2] (valid-000000.tar): sidecar valid-000000.json missing or unreadable" in str(info.value)
    assert "shards[3] (test-000000.tar) is not in" in str(info.value)


def test_sidecars_without_digests_are_a_warning(shards: Path, capsys) -> None:
    for path in shards.glob("*.json"):
        if path.name != "dataset.json":
            side = json.loads(path.read_text())
            side.pop("digests")
            path.write_text(json.dumps(side))
    summary = inspect_dataset(shards, verify=True)
    assert summary["verify"]["ok"] and len(summary["verify"]["warnings"]) == 4
    assert "warning: train-000000.json records no member digests (an older extraction): not checked" in (
        format_summary(summary)
    )
    assert verify(shards, capsys)[0] == 0
    edit_member(shards / "valid-000000.tar", "valid0__c0.meta.json", lambda d: d.replace(b"-1.5", b"-9.5"))
    read, bad = keys(shards, "valid")  # nothing to check the label against
    assert read == ["valid0__c0", "valid0__c1", "valid0__c2"] and bad == []
