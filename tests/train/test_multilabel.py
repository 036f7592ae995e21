"""Multilabel targets from shards: label-key parsing, (B, K) batches, IEMOCAP emotions trained, evaluated, predicted."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from extract.import_mmsa import MULT_EMOTIONS, import_mmsa
from mmfuse.cli import main
from shards.io import ShardWriter, iter_shard
from tests.conftest import MEDIA
from tests.extract.test_import_mmsa import mult_split, write
from train.batches import collate
from train.checkpoint import load_checkpoint
from train.config import TrainConfigError, make_train_config
from train.data import DataConfig, make_loader
from train.inputs import DataError
from train.memory import InMemorySource
from train.predict import describe_prediction, format_result, load_network, predict_clip
from train.stages import ToInputs
from train.step import labelled_rows
from train.trainer import fit

EMOTIONS = ",".join(MULT_EMOTIONS)  # neutral,happy,sad,angry
FAST = ["num_workers=0", "log_every=1", "model.hidden=12", "model.num_heads=3", "device=cpu"]
SIZES = {"train": 6, "valid": 3, "test": 3}


def inputs(key: str, labels: dict, label_key: str, multilabel: bool = True) -> dict:
    """ToInputs on a sample with text only (absent): just the label and key matter here."""
    meta = {"key": key, "labels": labels, "modalities": {"text": {"status": "absent", "error": "none"}}}
    stage = ToInputs(("text",), {"text": 3}, False, label_key, False, multilabel)
    return stage({"__key__": key, "meta.json": meta})


# ---- label parsing ------------------------------------------------------------------------------------------


def test_label_vector_follows_the_key_order() -> None:
    labels = {"neutral": 0, "happy": True, "sad": 1.0, "angry": False}
    got = inputs("s0", labels, "sad, happy,angry")["label"]
    assert got.dtype == np.float32 and got.tolist() == [1.0, 1.0, 0.0]
    assert inputs("s0", labels, "angry,neutral,happy")["label"].tolist() == [0.0, 0.0, 1.0]
    batch = collate([inputs("a", labels, EMOTIONS), inputs("b", {**labels, "neutral": 1, "happy": 0}, EMOTIONS)])
    assert batch["label"].dtype == torch.float32 and batch["label"].tolist() == [[0, 1, 1, 0], [1, 0, 1, 0]]
    single = collate([inputs("a", {"label": 0.5}, "label", False), inputs("b", {"label": -1.0}, "label", False)])
    assert single["label"].shape == (2,) and single["label"].tolist() == [0.5, -1.0]  # one key: (B,) as before
    one = collate([inputs("a", {"happy": 1}, "happy"), inputs("b", {"happy": 0}, "happy")])
    assert one["label"].shape == (2, 1)  # multilabel with one key is still (B, K)


def test_a_missing_key_drops_the_sample() -> None:
    full = {"neutral": 0, "happy": 1, "sad": 0, "angry": 1}
    partial = {"neutral": 1, "happy": 0, "angry": 0}  # no "sad"
    samples = [inputs("a", full, EMOTIONS), inputs("b", partial, EMOTIONS), inputs("c", {}, EMOTIONS)]
    assert np.isnan(samples[1]["label"]).tolist() == [False, False, True, False]
    assert samples[1]["label"][[0, 1, 3]].tolist() == [1.0, 0.0, 0.0]
    batch = collate([*samples, inputs("d", {**full, "happy": 0}, EMOTIONS)])
    kept = labelled_rows(batch)
    assert kept["key"] == ["a", "d"]
    assert kept["label"].tolist() == [[0, 1, 0, 1], [0, 0, 0, 1]] and kept["text"].shape[0] == 2


@pytest.mark.parametrize("value", [2, 0.5, "yes", [0, 1], math.nan])
def test_a_non_binary_value_is_an_error_naming_sample_key_and_value(value) -> None:
    with pytest.raises(DataError) as info:
        inputs("vid__3", {"happy": value, "sad": 0}, "sad,happy")
    assert str(info.value) == (
        f"sample vid__3: label 'happy' is {value!r}, not 0/1 or a boolean; task=multilabel needs a binary label "
        "under every key of label_key (this sample has ['happy', 'sad'])"
    )


def test_config_takes_keys_from_the_command_line_and_yaml(tmp_path: Path) -> None:
    config = make_train_config("late", overrides=["task=multilabel", "label_key=neutral, happy,sad,angry"])
    assert (
        config.label_keys == MULT_EMOTIONS
        and config.num_classes == 4
        and config.data.label_key == "neutral,happy,sad,angry"
    )
    assert config.model_kwargs({"text": 5})["num_classes"] == 4
    yaml_file = tmp_path / "emotions.yaml"
    yaml_file.write_text("task: multilabel\nlabel_key: [sad, angry]\n")
    from_yaml = make_train_config("late", yaml_file)
    assert from_yaml.label_keys == ("sad", "angry") and from_yaml.num_classes == 2
    again = make_train_config("late", overrides=["num_workers=0"], base=from_yaml.to_dict())  # a checkpoint's config
    assert again.label_keys == ("sad", "angry") and again.num_classes == 2 and again.task == "multilabel"
    assert make_train_config("late", overrides=["task=multilabel", "label_key=happy", "num_classes=1"]).num_classes == 1
    assert config.data.multilabel and not make_train_config("late").data.multilabel


def test_config_problems_name_the_keys() -> None:
    def problems(*overrides: str) -> str:
        with pytest.raises(TrainConfigError) as info:
            make_train_config("late", overrides=list(overrides))
        return str(info.value)

    assert problems("label_key=neutral,happy") == (
        "invalid training settings:\n  label_key: task=regression takes one label key, got 2 (neutral, happy); "
        "use task=multilabel to train on several 0/1 labels"
    )
    assert "label_key: task=classification takes one label key, got 4 (neutral, happy, sad, angry)" in problems(
        "task=classification", "num_classes=3", f"label_key={EMOTIONS}"
    )
    assert problems("task=multilabel", f"label_key={EMOTIONS}", "num_classes=3") == (
        "invalid training settings:\n  num_classes: 3 differs from the 4 label key(s) of label_key "
        "(neutral, happy, sad, angry); with task=multilabel num_classes is the number of label keys: leave it out "
        "or set it to 4"
    )
    assert "label_key: 'happy,,sad' has an empty key" in problems("task=multilabel", "label_key=happy,,sad")
    assert "label_key: happy named more than once in 'happy,sad,happy'" in problems(
        "task=multilabel", "label_key=happy,sad,happy"
    )
    with pytest.raises(DataError, match=r"label_key: 2 keys \(happy, sad\) need multilabel=True"):
        make_loader("unused", "train", DataConfig(label_key="happy,sad"), train=False)
    with pytest.raises(DataError, match=r"label_key 'happy,sad' names 2 keys \(happy, sad\); several keys make a"):
        ToInputs(("text",), {"text": 3}, False, "happy,sad", False)


def test_prediction_names_each_label() -> None:
    logits = torch.tensor([0.0, 2.0, -1.0, 0.5])
    p = describe_prediction(logits, "multilabel", MULT_EMOTIONS)
    assert list(p["probabilities"]) == list(MULT_EMOTIONS)
    assert p["probabilities"]["happy"] == pytest.approx(1 / (1 + math.exp(-2.0)))
    assert p["labels"] == ["happy", "angry"]  # probability > 0.5, as the metrics count a positive
    result = {"video": "clip.mp4", "prediction": p, "modalities": {}, "model": "late", "feature_set_hash": "f" * 16}
    assert format_result(result).splitlines()[0] == (
        "clip.mp4: labels happy, angry (sigmoid: neutral: 0.500, happy: 0.881, sad: 0.269, angry: 0.622)"
    )
    with pytest.raises(DataError, match="2 label names \\(a, b\\) for 4 multilabel outputs"):
        describe_prediction(logits, "multilabel", ["a", "b"])


# ---- IEMOCAP emotions imported from a MulT pickle --------------------------------------------------------------


@pytest.fixture(scope="module")
def iemocap(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    """MulT-format IEMOCAP splits imported as shards; returns the shards and each sample's hand-built 0/1 vector."""
    tmp = tmp_path_factory.mktemp("iemocap")
    rng = np.random.default_rng(5)
    offsets = {"train": 0, "valid": 10, "test": 20}
    data = {split: mult_split(n, rng, iemocap=True, offset=offsets[split]) for split, n in SIZES.items()}
    import_mmsa(write(tmp / "iemocap_data.pkl", data), tmp / "shards", trust_pickle=True, shard_size=4)
    expected = {}
    for split, table in data.items():
        for i, pairs in enumerate(table["labels"]):  # (4, 2): (no, yes) per emotion, in MULT_EMOTIONS order
            j = offsets[split] + i
            expected[f"v{j}__{j}_0"] = np.array([float(np.argmax(p)) for p in pairs], np.float32)
    return tmp / "shards", expected


def test_batches_hold_each_samples_emotion_vector(iemocap) -> None:
    shards, expected = iemocap
    config = DataConfig(batch_size=4, num_workers=0, label_key=EMOTIONS, multilabel=True)
    seen = set()
    for split in SIZES:
        streamed = list(make_loader(shards, split, config, train=False))
        in_memory = list(InMemorySource.from_shards(shards, split, config))
        assert len(streamed) == len(in_memory)
        for batch, other in zip(streamed, in_memory, strict=True):
            assert batch["label"].dtype == torch.float32 and batch["label"].shape == (len(batch["key"]), 4)
            want = np.stack([expected[k] for k in batch["key"]])
            np.testing.assert_array_equal(batch["label"].numpy(), want)
            assert other["key"] == batch["key"]
            assert torch.equal(other["label"], batch["label"])
            seen.update(batch["key"])
    assert seen == set(expected)
    assert {tuple(v) for v in expected.values()} != {tuple(next(iter(expected.values())))}  # not all the same


def test_pipeline_dict_source_keeps_k_columns() -> None:
    data = {"text": torch.zeros(5, 2, 3), "text_mask": torch.ones(5, 2, dtype=torch.bool), "label": torch.eye(5, 4)}
    batches = list(InMemorySource(data, 2))
    assert [b["label"].shape for b in batches] == [(2, 4), (2, 4), (1, 4)]
    assert torch.equal(torch.cat([b["label"] for b in batches]), torch.eye(5, 4))


def hand_metrics(net, shards: Path, config, expected: dict[str, np.ndarray]) -> dict[str, float]:
    """Per-emotion accuracy of the network on the test split, counted by hand against the pickle's vectors."""
    correct, n = np.zeros(4), 0
    with torch.no_grad():
        for batch in make_loader(shards, "test", dataclasses.replace(config.data, num_workers=0), train=False):
            pred = (net(batch).prediction > 0).numpy()
            truth = np.stack([expected[k] for k in batch["key"]]) > 0.5
            correct += (pred == truth).sum(0)
            n += len(batch["key"])
    return {f"acc/{e}": correct[k] / n for k, e in enumerate(MULT_EMOTIONS)}


@pytest.mark.parametrize("model", ["late", "tcmax"])
def test_models_train_and_evaluate_per_emotion(iemocap, model: str, tmp_path: Path, capsys) -> None:
    shards, expected = iemocap
    overrides = [*FAST, "batch_size=2", "epochs=2", "task=multilabel", f"label_key={EMOTIONS}"]
    final = fit(make_train_config(model, overrides=overrides), shards, tmp_path / "run")
    names = {f"{kind}/{e}" for e in MULT_EMOTIONS for kind in ("acc", "f1")}
    for split in ("valid", "test"):
        metrics = final[split]
        assert names <= set(metrics) and metrics["n"] == SIZES[split]
        assert all(0.0 <= metrics[k] <= 1.0 for k in names)
        assert metrics["f1_mean"] == pytest.approx(np.mean([metrics[f"f1/{e}"] for e in MULT_EMOTIONS]))
        assert math.isfinite(metrics["task_loss"])
    assert final["selected_by"] == "valid f1_mean"
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(train_losses) == 6 and all(math.isfinite(x) for x in train_losses)  # 3 batches of 2, 2 epochs
    assert all(names <= set(r) for r in records if r["kind"] == "eval")

    best = tmp_path / "run" / "checkpoints" / "best.pt"
    ckpt = load_checkpoint(best)
    assert ckpt["config"]["data.label_key"] == EMOTIONS and ckpt["config"]["num_classes"] == 4
    assert ckpt["model_config"]["task"] == "multilabel" and ckpt["model_config"]["num_classes"] == 4
    config, net = load_network(ckpt)
    by_hand = hand_metrics(net, shards, config, expected)
    for key, value in by_hand.items():
        assert final["test"][key] == pytest.approx(value)

    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(best), "--shards", str(shards), "--split", "test", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["split"] == "test" and printed["n"] == SIZES["test"]
    for key in [*names, "acc_mean", "f1_mean"]:
        assert printed[key] == pytest.approx(final["test"][key]), key


# ---- a multilabel checkpoint through `mmfuse predict` ----------------------------------------------------------


def relabel(shards: Path, labels: dict[str, dict]) -> None:
    """Rewrite every shard's meta.json labels in place (same samples, same counts: dataset.json stays valid) and
    the member digests in its sidecar."""
    for tar in sorted(shards.glob("*.tar")):
        samples = list(iter_shard(tar))
        writer = ShardWriter(tar)
        for sample in samples:
            sample["meta.json"]["labels"] = labels[sample["__key__"]]
            writer.write({k: v for k, v in sample.items() if k != "__url__"})
        writer.commit()
        side = json.loads(tar.with_suffix(".json").read_text())
        tar.with_suffix(".json").write_text(json.dumps({**side, "digests": writer.digests}))


def test_predict_names_probabilities_by_label_key(bundled_dataset: Path, tmp_path: Path, capsys) -> None:
    shards = tmp_path / "shards"
    shutil.copytree(bundled_dataset, shards)
    labels = {
        "grid__bbaf2n": {"happy": 1, "sad": False},
        "grid__pwij3p": {"happy": 0, "sad": True},
        "grid__id2_vcd_swwp2s": {"happy": 1, "sad": 1},
        "faces__face_noface": {"happy": 0, "sad": 0},
    }
    relabel(shards, labels)
    overrides = [*FAST, "batch_size=1", "epochs=1", "task=multilabel", "label_key=happy,sad"]
    fit(make_train_config("late", overrides=overrides), shards, tmp_path / "run")
    checkpoint = tmp_path / "run" / "checkpoints" / "last.pt"
    config, net = load_network(load_checkpoint(checkpoint))
    with torch.no_grad():
        for batch in make_loader(shards, "train", dataclasses.replace(config.data, num_workers=0), train=False):
            if "grid__bbaf2n" in batch["key"]:
                i = batch["key"].index("grid__bbaf2n")
                assert batch["label"][i].tolist() == [1.0, 0.0]
                expected = torch.sigmoid(net(batch).prediction[i]).tolist()

    result = predict_clip(checkpoint, MEDIA / "grid" / "bbaf2n.mpg", "bin blue at f two now")
    p = result["prediction"]
    assert p["task"] == "multilabel" and list(p["probabilities"]) == ["happy", "sad"]
    assert [p["probabilities"]["happy"], p["probabilities"]["sad"]] == pytest.approx(expected, abs=1e-3)
    assert p["labels"] == [k for k, v in p["probabilities"].items() if v > 0.5]
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(checkpoint), str(MEDIA / "grid" / "bbaf2n.mpg"), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert list(printed["prediction"]["probabilities"]) == ["happy", "sad"]
