"""Training and evaluation that say success only when they did something: no valid split, a NaN loss, an absent
split, changed settings on resume, non-finite train statistics, and the paths the success messages name."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest

from mmfuse.cli import main
from shards.dataset import ShardDataset
from shards.schema import SchemaError
from train.checkpoint import load_checkpoint
from train.config import TrainConfigError, make_train_config
from train.inputs import DataError
from train.pipeline import FusionPipeline
from train.trainer import fit

FAST = ["batch_size=1", "num_workers=0", "log_every=1", "model.hidden=12", "model.num_heads=3", "device=cpu"]


def without_splits(bundled: Path, out: Path, *splits: str) -> Path:
    """A copy of the bundled shards whose dataset.json lists no shard of ``splits``."""
    shutil.copytree(bundled, out)
    ds = json.loads((out / "dataset.json").read_text())
    ds["shards"] = [s for s in ds["shards"] if s["split"] not in splits]
    ds["counts"] = {split: counts for split, counts in ds["counts"].items() if split not in splits}
    ds["samples"] = sum(s["samples"] for s in ds["shards"])
    (out / "dataset.json").write_text(json.dumps(ds))
    return out


def train_cli(shards: Path, run_dir: Path, *extra: str) -> int:
    return main(["train", "--shards", str(shards), "--model", "late", "--run-dir", str(run_dir), *FAST, *extra])


def named_paths(out: str) -> list[Path]:
    """The files a `mmfuse train` success message names: the selected checkpoint and the run directory's list."""
    run_dir = Path(re.search(r"run directory: (\S+) \(", out)[1])
    listed = re.search(r"run directory: \S+ \((.*)\)", out)[1].split(", ")
    chosen = Path(re.search(r"selected checkpoint: (\S+)", out)[1])
    return [chosen, *(run_dir / name for name in listed)]


def test_shards_without_a_valid_split_are_refused_unless_selection_last(
    bundled_dataset: Path, tmp_path: Path, capsys
) -> None:
    shards = without_splits(bundled_dataset, tmp_path / "shards", "valid")
    config = make_train_config("late", overrides=[*FAST, "epochs=1"])
    with pytest.raises(DataError, match="have no valid split .*selection needs one.*selection=last"):
        fit(config, shards, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()  # refused before anything is written
    assert train_cli(shards, tmp_path / "last", "epochs=1", "selection=last") == 0
    out = capsys.readouterr().out
    final = json.loads((tmp_path / "last" / "final.json").read_text())
    assert final["checkpoint"] == "checkpoints/last.pt" and final["selected_by"] == "last step (selection=last)"
    assert final["selected_step"] == load_checkpoint(tmp_path / "last" / "checkpoints" / "last.pt")["state"]["step"]
    assert final["selected_step"] == 2 and final["test"]["n"] == 1 and final["valid"] == {}
    assert "best.pt" not in out and "selected step 2 by last step (selection=last);" in out
    assert f"selected checkpoint: {tmp_path / 'last' / 'checkpoints' / 'last.pt'}" in out
    assert all(p.exists() for p in named_paths(out))


def test_success_messages_name_only_what_exists(bundled_dataset: Path, tmp_path: Path, capsys) -> None:
    assert train_cli(bundled_dataset, tmp_path / "run", "epochs=1") == 0
    out = capsys.readouterr().out
    paths = named_paths(out)
    assert all(p.exists() for p in paths), [p for p in paths if not p.exists()]
    names = {str(p.relative_to(tmp_path / "run")) for p in paths}
    assert {"checkpoints/best.pt", "checkpoints/last.pt", "final.json", "config.json", "events"} <= names
    final = json.loads((tmp_path / "run" / "final.json").read_text())
    assert (
        f"selected step {final['selected_step']} by valid mae; test: mae " in out
        and final["checkpoint"] == "checkpoints/best.pt"
    )
    ckpt = str(tmp_path / "run" / "checkpoints" / "best.pt")
    assert main(["eval", "--checkpoint", ckpt, "--shards", str(bundled_dataset), "--split", "valid"]) == 0
    assert "valid (removed: none): n=1 " in capsys.readouterr().out  # the bundled valid split has one clip


@pytest.mark.parametrize("log_every", [1, 100])
def test_a_non_finite_loss_stops_training_naming_the_step(
    bundled_dataset: Path, tmp_path: Path, monkeypatch, capsys, log_every: int
) -> None:
    """The finite check is read on the host only before a log line, a checkpoint or an evaluation: with a log line
    every step training stops at the bad step; with none due it runs on to the end of the epoch (step 4), and
    nothing from step 3 on is logged or saved either way."""
    original, forwards = FusionPipeline.forward, []

    def losses_times(factor: float, at: int | None = None):
        """The training forward, its losses times ``factor`` at training forward number ``at`` (every one: None)."""

        def forward(net, batch):
            out = original(net, batch)
            if net.training:
                forwards.append(1)
                if at is None or len(forwards) == at:
                    out.losses.update({k: v * factor for k, v in out.losses.items()})
            return out

        return forward

    fast = [s for s in FAST if not s.startswith("log_every=")]

    def train_two_epochs(run_dir: Path) -> int:
        args = ["--shards", str(bundled_dataset), "--model", "late", "--run-dir", str(run_dir), *fast, "epochs=2"]
        return main(["train", *args, f"log_every={log_every}"])

    monkeypatch.setattr(FusionPipeline, "forward", losses_times(math.nan, at=3))  # step 3: batch 1, grad_accum 1
    run = tmp_path / "run"
    assert train_two_epochs(run) == 1
    err = capsys.readouterr().err
    stopped = 3 if log_every == 1 else 4
    assert f"training stopped at step {stopped}: step 3 (epoch 1) had a loss of nan, gradient norm " in err
    assert "not finite" in err and "lower lr" in err and "amp=off" in err
    assert "Kept from before it: checkpoints/last.pt, checkpoints/best.pt" in err
    assert load_checkpoint(run / "checkpoints" / "last.pt")["state"]["step"] == 2  # the end of epoch 0, kept
    assert (run / "checkpoints" / "best.pt").is_file() and not (run / "final.json").exists()
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in logged) == 2 and {r["step"] for r in logged if "loss" in r} <= {1, 2}

    monkeypatch.setattr(FusionPipeline, "forward", losses_times(math.inf))
    assert train_two_epochs(tmp_path / "first") == 1
    err = capsys.readouterr().err
    assert "training stopped at step 1: step 1 (epoch 0) had a loss of inf" in err  # step 1 is always logged
    assert "No checkpoint had been saved" in err and "best.pt" not in err
    assert not (tmp_path / "first" / "checkpoints").exists() or not any((tmp_path / "first" / "checkpoints").iterdir())


def test_eval_of_a_split_that_is_unknown_or_absent_is_an_error(bundled_dataset: Path, tmp_path: Path, capsys) -> None:
    fit(make_train_config("late", overrides=[*FAST, "epochs=1"]), bundled_dataset, tmp_path / "run")
    ckpt = str(tmp_path / "run" / "checkpoints" / "best.pt")
    with pytest.raises(SystemExit) as usage:
        main(["eval", "--checkpoint", ckpt, "--shards", str(bundled_dataset), "--split", "nosuch"])
    assert usage.value.code == 2 and "invalid choice: 'nosuch'" in capsys.readouterr().err
    shards = without_splits(bundled_dataset, tmp_path / "no-test", "test")
    assert main(["eval", "--checkpoint", ckpt, "--shards", str(shards)]) == 1
    assert "have no test split (they have: train, valid)" in capsys.readouterr().err


def test_resume_refuses_changed_settings_and_records_allowed_ones(
    bundled_dataset: Path, tmp_path: Path, capsys
) -> None:
    run = tmp_path / "run"
    assert train_cli(bundled_dataset, run, "epochs=1") == 0
    before = (run / "config.json").read_text()
    lr = json.loads(before)["config"]["optim.lr"]
    argv = ["train", "--shards", str(bundled_dataset), "--run-dir", str(run), "--resume"]
    capsys.readouterr()
    assert main([*argv, "lr=0.5", "batch_size=2", "epochs=2"]) == 1
    err = capsys.readouterr().err
    assert f"lr: {lr!r} -> 0.5" in err and "batch_size: 1 -> 2" in err and "epochs" not in err.split("Changed:")[1]
    assert (run / "config.json").read_text() == before  # nothing resumed, nothing rewritten
    assert main([*argv, "epochs=2", "log_every=2"]) == 0
    record = json.loads((run / "config.json").read_text())
    assert record["config"]["run.epochs"] == 2 and record["config"]["run.log_every"] == 2
    changes = {"run.epochs": {"from": 1, "to": 2}, "run.log_every": {"from": 1, "to": 2}}
    assert record["resumed"] == [{"step": 2, "changes": changes}]
    assert load_checkpoint(run / "checkpoints" / "last.pt")["state"]["step"] == 4
    with pytest.raises(TrainConfigError, match="model.hidden: 12 -> 15"):
        fit(make_train_config("late", overrides=[*FAST, "epochs=2", "model.hidden=15"]), bundled_dataset, run, True)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_train_statistics_are_refused(bundled_dataset: Path, tmp_path: Path, capsys, bad: float) -> None:
    shards = tmp_path / "shards"
    shutil.copytree(bundled_dataset, shards)
    ds = json.loads((shards / "dataset.json").read_text())
    ds["stats"]["audio_feat.npy"]["std"][0] = bad
    (shards / "dataset.json").write_text(json.dumps(ds))
    with pytest.raises(SchemaError, match="train statistics of audio_feat.npy \\(std\\) are not all finite"):
        ShardDataset.load(shards)
    assert train_cli(shards, tmp_path / "run", "epochs=1") == 1
    assert "audio_feat.npy" in capsys.readouterr().err
