"""import-mmsa on generated pickles with the structure of MMSA (aligned, unaligned), MMSA-FET and MulT files."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from extract.import_mmsa import FeatureImportError, import_mmsa
from mmfuse.cli import main
from shards import iter_shard
from shards.inspect import inspect_dataset

DT, DA, DV = 13, 5, 6
SIZES = {"train": 5, "valid": 2, "test": 2}


def mmsa_split(n: int, rng: np.random.Generator, aligned: bool, offset: int) -> dict:
    tt, ta, tv = (7, 7, 7) if aligned else (7, 11, 9)
    text_len = rng.integers(2, tt + 1, n)
    bert = np.zeros((n, 3, tt), np.int64)
    for i, length in enumerate(text_len):
        bert[i, 0, :length] = rng.integers(100, 200, length)
        bert[i, 1, :length] = 1
    table = {
        "id": np.array([f"vid{(offset + i) % 3}$_${offset + i}" for i in range(n)]),
        "raw_text": np.array([f"sentence {offset + i}" for i in range(n)]),
        "text": rng.normal(size=(n, tt, DT)).astype(np.float32) * (bert[:, 1, :, None] > 0),
        "text_bert": bert,
        "audio": rng.normal(size=(n, ta, DA)).astype(np.float32),
        "vision": rng.normal(size=(n, tv, DV)).astype(np.float32),
        "regression_labels": rng.uniform(-3, 3, n).astype(np.float32),
        "classification_labels": rng.integers(0, 3, n),
    }
    if not aligned:
        table["audio_lengths"] = rng.integers(1, ta + 1, n)
        table["vision_lengths"] = rng.integers(1, tv + 1, n)
        table["audio_lengths"][0] = 0  # a sample whose audio stream had no frames
    return table


def write(path: Path, obj) -> Path:
    path.write_bytes(pickle.dumps(obj))
    return path


def samples_of(out: Path) -> dict[str, dict]:
    return {s["__key__"]: s for tar in sorted(out.glob("*.tar")) for s in iter_shard(tar)}


@pytest.mark.parametrize("aligned", [False, True])
def test_mmsa_pickles(tmp_path: Path, aligned: bool) -> None:
    rng = np.random.default_rng(0)
    offsets = {"train": 0, "valid": 10, "test": 20}
    data = {split: mmsa_split(n, rng, aligned, offsets[split]) for split, n in SIZES.items()}
    ds = import_mmsa(write(tmp_path / "f.pkl", data), tmp_path / "out", trust_pickle=True, shard_size=3)
    assert ds["dims"] == {"Dt": DT, "Da": DA, "Dv": DV}
    assert {s: sum(c.values()) for s, c in ds["counts"].items()} == SIZES
    assert ds["feature_set"]["imported"]["format"] == "mmsa" and ds["feature_set"]["imported"]["aligned"] == aligned
    got = samples_of(tmp_path / "out")
    table = data["train"]
    for i in range(SIZES["train"]):
        s = got[f"vid{i % 3}__{i}"]
        meta = s["meta.json"]
        assert meta["labels"]["label"] == pytest.approx(float(table["regression_labels"][i]))
        assert meta["labels"]["classification"] == int(table["classification_labels"][i])
        assert meta["text"] == f"sentence {i}"
        mask = table["text_bert"][i, 1].astype(bool)
        np.testing.assert_array_equal(s["text_ids.npy"], table["text_bert"][i, 0][mask])
        np.testing.assert_allclose(s["text_feat.npy"], table["text"][i][mask], atol=1e-2)
        if aligned:  # audio and vision share the text's word axis
            np.testing.assert_allclose(s["video_feat.npy"], table["vision"][i][mask], atol=1e-2)
        else:
            n_v = table["vision_lengths"][i]
            np.testing.assert_allclose(s["video_feat.npy"], table["vision"][i][:n_v], atol=1e-2)
            assert s["video_mask.npy"].all() and len(s["video_time.npy"]) == n_v
    if not aligned:
        first = got["vid0__0"]["meta.json"]
        assert first["modalities"]["audio"]["status"] == "absent" and "audio_feat.npy" not in got["vid0__0"]
    verified = inspect_dataset(tmp_path / "out", verify=True)["verify"]
    assert verified["ok"] and verified["warnings"] == []  # the sidecars carry every member's digest


def test_mmsa_fet_single_table_with_modes(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    table = mmsa_split(6, rng, aligned=False, offset=0)
    table["mode"] = np.array(["train", "train", "valid", "test", "train", "valid"])
    ds = import_mmsa(write(tmp_path / "fet.pkl", table), tmp_path / "out", trust_pickle=True)
    assert ds["feature_set"]["imported"]["format"] == "mmsa-fet"
    assert {s: sum(c.values()) for s, c in ds["counts"].items()} == {"train": 3, "valid": 2, "test": 1}


def mult_split(n: int, rng: np.random.Generator, iemocap: bool, offset: int = 0) -> dict:
    text = rng.normal(size=(n, 6, 10)).astype(np.float32)
    text[:, :2] = 0  # MulT pads with zero rows
    audio = rng.normal(size=(n, 8, DA)).astype(np.float32)
    audio[0, 3, 1] = -np.inf
    labels = rng.integers(0, 2, (n, 4, 2)).astype(np.float32) if iemocap else rng.uniform(-3, 3, (n, 1, 1))
    ids = np.array([[f"v{offset + i}".encode(), str(offset + i).encode(), b"0"] for i in range(n)])
    return {"text": text, "audio": audio, "vision": rng.normal(size=(n, 4, DV)).astype(np.float32),
            "labels": labels, "id": ids}  # fmt: skip


@pytest.mark.parametrize("iemocap", [False, True])
def test_mult_pickles(tmp_path: Path, iemocap: bool) -> None:
    rng = np.random.default_rng(2)
    data = {
        "train": mult_split(4, rng, iemocap),
        "valid": mult_split(2, rng, iemocap, offset=10),
        "test": mult_split(2, rng, iemocap, offset=20),
    }
    ds = import_mmsa(write(tmp_path / "mult.pkl", data), tmp_path / "out", trust_pickle=True)
    assert ds["feature_set"]["imported"]["format"] == "mult" and ds["dims"] == {"Dt": 10, "Da": DA, "Dv": DV}
    s = samples_of(tmp_path / "out")["v0__0_0"]
    assert s["text_feat.npy"].shape == (4, 10)  # the two zero rows are padding
    assert "text_ids.npy" not in s
    assert np.isfinite(s["audio_feat.npy"].astype(np.float32)).all() and s["audio_feat.npy"][3, 1] == 0  # -inf -> 0
    labels = s["meta.json"]["labels"]
    if iemocap:
        assert set(labels) == {"neutral", "happy", "sad", "angry"}
        assert labels["happy"] == int(np.argmax(data["train"]["labels"][0, 1]))
    else:
        assert labels["label"] == pytest.approx(float(data["train"]["labels"][0, 0, 0]))


def test_refusals(tmp_path: Path, capsys) -> None:
    path = write(tmp_path / "f.pkl", {"train": mult_split(2, np.random.default_rng(3), False)})
    assert main(["import-mmsa", str(path), "--out", str(tmp_path / "out")]) == 1
    assert "loading a pickle can run any code it contains; pass --trust-pickle" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    twice = {
        "train": mult_split(2, np.random.default_rng(3), False),
        "test": mult_split(2, np.random.default_rng(3), False),
    }
    with pytest.raises(FeatureImportError, match=r"duplicate sample ids: v0__0_0 \(train, test\)"):
        import_mmsa(write(tmp_path / "twice.pkl", twice), tmp_path / "twice", trust_pickle=True)
    with pytest.raises(FeatureImportError, match="no train/valid/test tables and no 'mode' column"):
        import_mmsa(write(tmp_path / "odd.pkl", {"x": 1}), tmp_path / "odd", trust_pickle=True)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "a").write_text("x")
    with pytest.raises(FeatureImportError, match="is not empty"):
        import_mmsa(path, tmp_path / "full", trust_pickle=True)


def test_models_train_on_imported_features(tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(4)
    data = {split: mmsa_split(n, rng, False, 10 * k) for k, (split, n) in enumerate(SIZES.items())}
    path = write(tmp_path / "f.pkl", data)
    assert main(["import-mmsa", str(path), "--out", str(tmp_path / "shards"), "--trust-pickle"]) == 0
    assert "imported 9 samples" in capsys.readouterr().out
    argv = ["train", "--shards", str(tmp_path / "shards"), "--model", "tcmax", "--run-dir", str(tmp_path / "run"),
            "batch_size=2", "num_workers=0", "epochs=1", "model.hidden=12", "model.num_heads=3"]  # fmt: skip
    assert main(argv) == 0
    assert (tmp_path / "run" / "final.json").is_file()
    capsys.readouterr()
    argv[argv.index(str(tmp_path / "run"))] = str(tmp_path / "e2e")
    assert main([*argv, "mode=end_to_end"]) == 1
    assert "these shards name none (imported pre-computed features?)" in capsys.readouterr().err
