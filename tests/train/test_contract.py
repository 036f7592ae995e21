"""dataset.json's per-modality records are the contract between extraction and training.

A visual extractor that no project file knows of (tests/toy_visual.py, registered with one line) writes a feature
of another name and width than FaceMesh's landmarks; its shards verify and a model trains on them end to end. And
shards written before the records existed (their dataset.json without ``modalities``) still verify and train: the
records are derived from what the old fields say.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from conftest import MEDIA, ROOT, bundled_rows, write_manifest
from toy_visual import EMB, EMB_DIM, ENTRY

from extract import EXTRACTORS
from extract.pipeline import run_extract
from shards import iter_shard, load_dataset_json
from shards.dataset import ShardDataset
from shards.inspect import inspect_dataset
from train.checkpoint import checkpoint_dataset, load_checkpoint
from train.config import make_train_config
from train.predict import extract_config, predict_clip
from train.trainer import fit

FAST = ["batch_size=1", "num_workers=0", "log_every=1", "model.hidden=12", "model.num_heads=3", "device=cpu"]
PROJECT = ("extract", "shards", "train", "fusion", "mmfuse", "bench")


def test_a_new_visual_extractor_trains_with_no_other_file_aware_of_it(tmp_path: Path, tiny_cfg, monkeypatch) -> None:
    out = tmp_path / "out"
    manifest = write_manifest(tmp_path / "m.csv", bundled_rows())
    with monkeypatch.context() as mp:
        mp.setitem(EXTRACTORS, "colour-stats", ENTRY)  # the registry line
        # FaceMesh stays registered and the default; the settings choose this one to fill video
        run_extract(manifest, MEDIA, out, tiny_cfg(shard_size=2, **{"extractors.video": "colour-stats"}))
    # from here on the extractor is registered nowhere: training reads only the shards' records
    ds = load_dataset_json(out)
    video = ds["modalities"]["video"]
    assert (video["extractor"], video["feature"], video["width"], video["extra"]) == ("colour-stats", EMB, 7, {})
    assert (video["mask"], video["time"], video["raw"], video["settings"]) == (
        "video_mask.npy",
        "video_time.npy",
        None,
        {"fps": None},
    )
    assert video["members"][EMB] == {"role": "feature", "dtype": "float16", "shape": ["Tv", "Demb"], "required": True}
    assert ds["dims"]["Demb"] == EMB_DIM and ds["stats"][EMB]["count"] > 100 and len(ds["stats"][EMB]["mean"]) == 7
    assert ds["modalities"]["text"]["feature"] == "text_feat.npy" and ds["modalities"]["text"]["width"] == 21
    for entry in ds["shards"]:
        for s in iter_shard(out / entry["name"]):
            if s["meta.json"]["modalities"]["video"]["status"] == "ok":
                assert s[EMB].shape == (len(s["video_time.npy"]), EMB_DIM) and "video_lmk.npy" not in s
                assert 0 <= float(s[EMB].min()) and float(s[EMB].max()) <= 1
    assert inspect_dataset(out, verify=True)["verify"]["ok"]

    final = fit(make_train_config("late", overrides=[*FAST, "epochs=1"]), out, tmp_path / "run")
    assert final["test"]["n"] == 1 and np.isfinite(final["valid"]["mae"])
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert ckpt["dims"] == {"text": 21, "audio": 27, "video": EMB_DIM} and ckpt["state"]["step"] == 2
    assert ckpt["modalities"]["video"] == video and checkpoint_dataset(ckpt).feature_member("video") == EMB
    with monkeypatch.context() as mp:  # predict re-extracts a clip with the extractor the checkpoint records
        mp.setitem(EXTRACTORS, "colour-stats", ENTRY)
        cfg = extract_config(ckpt["feature_set"], "cpu", checkpoint_dataset(ckpt).contracts)
        assert cfg.extractors.video == "colour-stats" and cfg.extractors.text == "text"
        result = predict_clip(tmp_path / "run" / "checkpoints" / "last.pt", MEDIA / "grid" / "bbaf2n.mpg", "bin blue")
        assert result["modalities"]["video"]["status"] == "ok" and result["feature_set_hash"] == ds["feature_set_hash"]
    for package in PROJECT:  # no project file names the extractor or its member
        for path in (ROOT / package).rglob("*.py"):
            text = path.read_text()
            assert "colour-stats" not in text and "video_emb" not in text, path


def without_settings(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "settings"}


def test_shards_written_before_the_records_still_verify_and_train(bundled_dataset: Path, tmp_path: Path) -> None:
    """The bundled shards with dataset.json as this mmfuse wrote it before it recorded ``modalities`` (every other
    field is the same): the records derived from the old fields say what the recorded ones say, but the
    settings (an old record knows only the extractor's provenance)."""
    old = tmp_path / "old"
    shutil.copytree(bundled_dataset, old)
    obj = json.loads((old / "dataset.json").read_text())
    recorded = obj.pop("modalities")
    (old / "dataset.json").write_text(json.dumps(obj))
    assert "modalities" not in load_dataset_json(old)

    ds = ShardDataset.load(old)
    derived = {m: c.to_json() for m, c in ds.contracts.items()}
    assert {m: without_settings(r) for m, r in derived.items()} == {m: without_settings(r) for m, r in recorded.items()}
    assert derived["video"]["extra"] == {"video_geom.npy": 4} and derived["video"]["width"] == 478 * 3
    assert derived["video"]["settings"]["max_faces"] == 1
    assert inspect_dataset(old, verify=True)["verify"]["ok"]

    fit(make_train_config("late", overrides=[*FAST, "epochs=1"]), old, tmp_path / "run")
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert ckpt["dims"]["video"] == 478 * 3 + 4
    ckpt.pop("modalities")  # a checkpoint saved before the records: they are derived from its feature set and stats
    older = checkpoint_dataset(ckpt).contracts
    assert {m: without_settings(c.to_json()) for m, c in older.items()} == {
        m: without_settings(r) for m, r in recorded.items()
    }
