"""``mmfuse eval --noise`` / ``--noise-sweep`` on the bundled shards, and every model's network under the sweep."""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

import fusion
from mmfuse.cli import main
from shards.dataset import ShardDataset
from train.checkpoint import checkpoint_dataset, load_checkpoint
from train.config import make_train_config
from train.inputs import feature_dims
from train.noise_sweep import input_std, run_sweep
from train.pipeline import FusionPipeline
from train.robustness import area_under_curve
from train.trainer import evaluate, fit

FAST = ["batch_size=1", "num_workers=0", "log_every=1", "model.hidden=12", "model.num_heads=3", "device=cpu"]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def checkpoint(bundled_dataset: Path, tmp_path_factory) -> str:
    run = tmp_path_factory.mktemp("noise") / "run"
    fit(make_train_config("late", overrides=[*FAST, "epochs=1"]), bundled_dataset, run)
    return str(run / "checkpoints" / "best.pt")


def eval_json(capsys, *argv: str) -> dict:
    capsys.readouterr()
    assert main(["eval", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_noise_changes_the_metrics_and_a_seed_repeats_them(bundled_dataset: Path, checkpoint: str, capsys) -> None:
    base = ["--checkpoint", checkpoint, "--shards", str(bundled_dataset), "--split", "train"]
    clean = eval_json(capsys, *base)
    noisy = eval_json(capsys, *base, "--noise", "a=4,v=4")
    again = eval_json(capsys, *base, "--noise", "a=4,v=4")
    other = eval_json(capsys, *base, "--noise", "a=4,v=4", "--seed", "1")
    assert noisy["noise"] == {"audio": 4.0, "video": 4.0} and noisy["noise_kind"] == "gaussian"
    assert noisy["n"] == clean["n"] == 2 and abs(noisy["mae"] - clean["mae"]) > 1e-4
    assert again["mae"] == noisy["mae"] and again["acc7"] == noisy["acc7"]  # identical numbers on a rerun
    assert other["mae"] != noisy["mae"]
    dropped = eval_json(capsys, *base, "--noise", "t=0.9", "--noise-kind", "drop")
    assert dropped["noise_kind"] == "drop" and dropped["mae"] != clean["mae"]
    assert main(["eval", *base, "--noise", "a=0"]) == 0  # level 0: the clean numbers, in the plain format
    line = capsys.readouterr().out.strip()
    assert line.startswith("train (noise: gaussian audio 0, seed 0): n=2 mae ") and f"mae {clean['mae']:.4f}" in line


def test_noise_sweep_writes_every_curve_as_json_and_png(
    bundled_dataset: Path, checkpoint: str, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "sweep" / "curves.json"
    base = ["--checkpoint", checkpoint, "--shards", str(bundled_dataset), "--split", "train"]
    report = eval_json(capsys, *base, "--noise-sweep", "--sweep-out", str(out))
    assert json.loads(out.read_text()) == report and out.with_suffix(".png").read_bytes()[:8] == PNG
    clean = eval_json(capsys, *base)
    assert report["metric"] == "mae" and report["split"] == "train" and report["seed"] == 0
    levels = {"gaussian": [0, 0.25, 0.5, 1, 2, 4], "drop": [0, 0.1, 0.3, 0.5, 0.7, 0.9]}
    assert set(report["curves"]) == set(levels)
    for kind, curves in report["curves"].items():
        assert set(curves) == {"text", "audio", "video"}
        for curve in curves.values():
            assert curve["levels"] == levels[kind] and len(curve["metrics"]) == 6
            assert all(p["n"] == 2 and "acc7" in p for p in curve["metrics"])
            assert curve["metrics"][0]["mae"] == pytest.approx(clean["mae"])  # level 0 is the clean network
            maes = [p["mae"] for p in curve["metrics"]]
            assert curve["auc"] == pytest.approx(area_under_curve(levels[kind], maes))
    assert len({p["mae"] for p in report["curves"]["gaussian"]["audio"]["metrics"]}) > 1

    assert main(["eval", *base, "--noise-sweep"]) == 0  # default: beside the checkpoint; a table per kind
    table = capsys.readouterr().out
    beside = Path(checkpoint).with_name("best.noise-train.json")
    assert json.loads(beside.read_text())["curves"] == report["curves"] and beside.with_suffix(".png").is_file()
    assert "| modality | 0 | 0.25 | 0.5 | 1 | 2 | 4 | AUC |" in table
    assert "| modality | 0 | 0.1 | 0.3 | 0.5 | 0.7 | 0.9 | AUC |" in table
    audio = report["curves"]["gaussian"]["audio"]
    assert f"| audio | {clean['mae']:.4f} |" in table and f"| {audio['auc']:.4f} |" in table
    assert f"robustness curves: {beside} and {beside.with_suffix('.png')}" in table


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--noise", "x=1"], "--noise 'x=1': unknown modality 'x'; use t, a, v (or text, audio, video)"),
        (["--noise", "a=-1"], "--noise 'a=-1': gaussian levels are finite numbers >= 0 (times the train std), got -1"),
        (["--noise", "a"], "--noise 'a': give MOD=LEVEL pairs, comma-separated, e.g. a=0.5 or t=0.2,v=1"),
        (["--noise", "a=2", "--noise-kind", "drop"], "drop levels are probabilities in [0, 1], got 2"),
        (["--noise", "a=1", "--missing", "t"], "--missing cannot be combined with --noise or --noise-sweep"),
        (["--noise", "a=1", "--noise-sweep"], "--noise-sweep sweeps every modality and level itself"),
        (["--sweep-out", "x.json"], "--sweep-out names the output of --noise-sweep; add --noise-sweep"),
    ],
)
def test_bad_noise_options_are_refused(bundled_dataset: Path, checkpoint: str, capsys, extra, message) -> None:
    capsys.readouterr()
    assert main(["eval", "--checkpoint", checkpoint, "--shards", str(bundled_dataset), *extra]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_every_model_runs_the_sweep(bundled_dataset: Path) -> None:
    """The corruption acts on the fusion inputs: each registered network (untrained, tiny) is scored at a level of
    each kind on every modality, level 0 being its clean evaluation."""
    dataset = ShardDataset.load(bundled_dataset)
    dims = feature_dims(dataset)
    for name in sorted(fusion.MODELS):
        config = make_train_config(name, overrides=FAST)
        torch.manual_seed(0)
        net = FusionPipeline(config, dims, dataset).eval()
        std = input_std(net, dataset, dataset, config, dims, net.fusion.modalities)
        assert std["text"].shape == (dims["text"],) and std["video"].shape == (dims["video"],)
        assert torch.allclose(std["audio"][std["audio"] > 1e-3], torch.tensor(1.0))  # standardised features: 1
        levels = {"gaussian": [4.0], "drop": [0.9]}
        report = run_sweep(net, dataset, "train", config, std, levels=levels)
        clean = evaluate(net, dataset, "train", config)
        for curves in report["curves"].values():
            for curve in curves.values():
                assert curve["metrics"][0]["mae"] == pytest.approx(clean["mae"]), name
                assert math.isfinite(curve["metrics"][1]["mae"]) and math.isfinite(curve["auc"]), name


def test_geometry_std_comes_from_the_train_split(bundled_dataset: Path, checkpoint: str) -> None:
    """The 4 video geometry features have no recorded statistics: their std is streamed from the train split; the
    landmarks' is the recorded one divided by the network's standardisation (1 where it standardises)."""
    ckpt = load_checkpoint(checkpoint)
    dataset = ShardDataset.load(bundled_dataset)
    config, recorded = make_train_config("late", overrides=FAST), checkpoint_dataset(ckpt)
    net = FusionPipeline(config, ckpt["dims"], recorded)
    std = input_std(net, recorded, dataset, config, ckpt["dims"], ["video"])["video"]
    rows = []
    for shard in sorted(bundled_dataset.glob("train-*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
        for name, data in members.items():
            if name.endswith(".video_geom.npy"):
                mask = np.load(io.BytesIO(members[name.replace("video_geom", "video_mask")]))
                rows.append(np.load(io.BytesIO(data))[mask])
    expected = np.concatenate(rows).astype(np.float64).std(0)
    assert len(rows) == 2 and torch.allclose(std[-4:], torch.as_tensor(expected, dtype=torch.float32), rtol=1e-4)
    landmarks = recorded.train_stats("video_lmk.npy").std
    floor = torch.as_tensor(landmarks < 1e-6)
    assert torch.equal(std[:-4][~floor], torch.ones(int((~floor).sum())))
