"""Our shards load with plain webdataset and with Hugging Face datasets (webdataset builder)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shards import iter_shard


def ours(root: Path) -> dict[str, dict]:
    return {s["__key__"]: s for tar in sorted(root.glob("*.tar")) for s in iter_shard(tar)}


def test_plain_webdataset_reads_every_sample(bundled_dataset: Path) -> None:
    import webdataset as wds

    urls = [str(p) for p in sorted(bundled_dataset.glob("*.tar"))]
    got = {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False).decode()}
    expected = ours(bundled_dataset)
    assert got.keys() == expected.keys()
    for key, sample in expected.items():
        assert got[key]["meta.json"] == sample["meta.json"]
        for name in ("audio_feat.npy", "video_mask.npy"):
            np.testing.assert_array_equal(got[key][name], sample[name])


def test_hugging_face_datasets_loads_every_split(bundled_dataset: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from shards.hf import load_hf_dataset

    ds = load_hf_dataset(bundled_dataset, cache_dir=str(tmp_path / "cache"))
    assert {k: v.num_rows for k, v in ds.items()} == {"train": 2, "valid": 1, "test": 1}
    expected = ours(bundled_dataset)
    # rows as Python lists (datasets' numpy formatter imports a torchvision API that torchvision 0.26 dropped)
    test = ds["test"][0]
    assert test["__key__"] == "faces__face_noface"
    assert test["text_feat.npy"] is None  # its transcript is empty: the member is absent, not an error
    assert test["meta.json"]["modalities"]["text"]["status"] == "failed"
    np.testing.assert_allclose(
        np.asarray(test["audio_feat.npy"]), expected["faces__face_noface"]["audio_feat.npy"].astype(np.float32)
    )
    train = {row["__key__"]: row for row in ds["train"]}
    ids = expected["grid__bbaf2n"]["text_ids.npy"]
    np.testing.assert_array_equal(train["grid__bbaf2n"]["text_ids.npy"], ids)
