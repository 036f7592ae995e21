"""config.json's settings: written by dotted key, read back in every form written so far, whatever fields are
added later; and reading the settings loads no model and no pipeline."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import train.config
from train.checkpoint import CHECKPOINT_VERSION, load_checkpoint
from train.config import (
    DataConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
    TrainConfigError,
    make_train_config,
    resume_changes,
)
from train.config_record import BARE_NAMES, read_record

ROOT = Path(__file__).resolve().parents[2]
OVERRIDES = ["epochs=3", "lr=3e-4", "batch_size=6", "modalities=text,audio", "model.hidden=24", "seed=7"]
# What config.json held for make_train_config("ithp", overrides=[*OVERRIDES, "selection=last"]) before the dotted
# keys: every setting by its bare name, the model's under model_settings (written from commit 7c1cd1d on).
RECORDED_BY_NAME = json.loads(
    '{"model": "ithp", "model_settings": {"hidden": 24, "beta": 8.0, "gamma": 32.0, "lam": 0.3, "b0_dim": 32, '
    '"b1_dim": 16}, "mode": "frozen", "task": "regression", "num_classes": 1, "grad_checkpointing": false, '
    '"unfreeze_top_k": -1, "unfreeze_after": 0, "batch_size": 6, "num_workers": 2, "shuffle_buffer": 256, '
    '"modalities": ["text", "audio"], "label_key": "label", "skip_bad_samples": false, "align_words": false, '
    '"lr": 0.0003, "encoder_lr": 1e-05, "weight_decay": 0.01, "schedule": "linear", "warmup_steps": 100, '
    '"grad_accum": 1, "clip_norm": 1.0, "epochs": 3, "max_steps": 0, "eval_every": 1, "log_every": 10, '
    '"checkpoint_every": 0, "seed": 7, "device": "auto", "amp": "auto", "compile": false, "selection": "last"}'
)
# And what it held before the settings had sections (make_train_config("ithp", overrides=OVERRIDES) before commit
# 7c1cd1d): the fields of one flat dataclass, in their order, without the later ``selection``.
RECORDED_FLAT = json.loads(
    '{"model": "ithp", "model_settings": {"hidden": 24}, "mode": "frozen", "modalities": ["text", "audio"], '
    '"task": "regression", "num_classes": 1, "label_key": "label", "epochs": 3, "max_steps": 0, "batch_size": 6, '
    '"num_workers": 2, "shuffle_buffer": 256, "lr": 0.0003, "encoder_lr": 2e-05, "weight_decay": 0.01, '
    '"schedule": "cosine", "warmup_steps": 0, "grad_accum": 1, "clip_norm": 1.0, "amp": "auto", '
    '"grad_checkpointing": false, "unfreeze_top_k": -1, "unfreeze_after": 0, "eval_every": 1, "log_every": 10, '
    '"checkpoint_every": 0, "seed": 7, "device": "auto", "compile": false, "skip_bad_samples": false, '
    '"align_words": false}'
)


@dataclass
class RunWithLr(RunConfig):
    """The run section with a field named like one of the optimiser's, as a later version may add."""

    lr: float = 0.5


def test_settings_are_recorded_by_dotted_key_and_read_back() -> None:
    config = make_train_config("ithp", overrides=[*OVERRIDES, "selection=last"])
    recorded = json.loads(json.dumps(config.to_dict()))  # as config.json holds it
    assert list(recorded)[:3] == ["model", "model.hidden", "model.beta"]
    assert (recorded["optim.lr"], recorded["data.modalities"], recorded["run.selection"]) == (
        3e-4,
        ["text", "audio"],
        "last",
    )
    undotted = {k for k in recorded if "." not in k}
    assert undotted == {
        "model",
        "mode",
        "task",
        "num_classes",
        "grad_checkpointing",
        "unfreeze_top_k",
        "unfreeze_after",
    }
    assert read_record(recorded) == recorded
    assert make_train_config(base=recorded) == config
    assert make_train_config("ithp", None, ["epochs=5"], base=recorded).run.epochs == 5


def test_config_json_written_before_the_dotted_keys_still_loads() -> None:
    assert make_train_config(base=RECORDED_BY_NAME) == make_train_config(
        "ithp", overrides=[*OVERRIDES, "selection=last"]
    )
    assert read_record(RECORDED_BY_NAME) == make_train_config(base=RECORDED_BY_NAME).to_dict()
    expected = TrainConfig(
        model="ithp",
        model_settings={"hidden": 24},
        data=DataConfig(batch_size=6, modalities=("text", "audio")),
        optim=OptimConfig(lr=3e-4),
        run=RunConfig(epochs=3, seed=7),
    )
    assert make_train_config(base=RECORDED_FLAT) == expected
    assert set(BARE_NAMES) | {"model_settings"} == set(RECORDED_BY_NAME) == set(RECORDED_FLAT) | {"selection"}


def test_an_old_run_resumes_when_a_later_field_takes_one_of_its_names(monkeypatch) -> None:
    """``lr`` in an old config.json is the optimiser's, even once the run section has an ``lr`` too."""
    monkeypatch.setattr(train.config, "RunConfig", RunWithLr)
    with pytest.raises(TrainConfigError, match="setting 'lr' is in several sections: write optim.lr or run.lr"):
        make_train_config("late", overrides=["lr=0.1"])  # typed now, the bare name is ambiguous
    config = make_train_config(base=RECORDED_BY_NAME)
    assert (config.optim.lr, config.run.lr, config.data.batch_size) == (3e-4, 0.5, 6)
    assert make_train_config(base=RECORDED_FLAT).optim.lr == 3e-4
    recorded = config.to_dict()
    assert (recorded["optim.lr"], recorded["run.lr"]) == (3e-4, 0.5) and make_train_config(base=recorded) == config
    assert resume_changes(RECORDED_BY_NAME, config) == {}


def test_a_resume_from_an_old_record_names_changes_by_dotted_key() -> None:
    config = make_train_config(base=RECORDED_BY_NAME, overrides=["epochs=5", "num_workers=0"])
    changes = resume_changes(RECORDED_BY_NAME, config)
    assert changes == {"data.num_workers": {"from": 2, "to": 0}, "run.epochs": {"from": 3, "to": 5}}
    with pytest.raises(TrainConfigError, match=r"Changed: model\.hidden: 24 -> 30; optim\.lr: 0\.0003 -> 0\.1\."):
        resume_changes(
            RECORDED_BY_NAME, make_train_config(base=RECORDED_BY_NAME, overrides=["lr=0.1", "model.hidden=30"])
        )


def test_a_checkpoint_gives_its_config_by_dotted_key_whatever_form_it_holds(tmp_path: Path) -> None:
    old = {"model": "tcmax", "model_settings": {"regression": "gaussian", "hidden": 8}, "lr": 0.01, "seed": 3}
    path = tmp_path / "old.pt"
    torch.save(
        {"mmfuse_checkpoint": CHECKPOINT_VERSION, "model_name": "tcmax", "model_config": {}, "config": old}, path
    )
    assert load_checkpoint(path)["config"] == {
        "model": "tcmax",
        "model.regression": "constant_normaliser",  # renamed since
        "model.hidden": 8,
        "optim.lr": 0.01,
        "run.seed": 3,
    }


def test_reading_the_settings_loads_no_model_and_no_pipeline() -> None:
    code = (
        "import sys, train.config; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'fusion', 'webdataset', 'train')))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert json.loads(out.replace("'", '"')) == ["train", "train.config", "train.config_record", "train.errors"]
