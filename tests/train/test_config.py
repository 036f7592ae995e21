"""Training settings: every shipped preset loads and builds its model; overrides and errors name the key."""

from __future__ import annotations

import pytest

import fusion
from train.config import PRESETS, TrainConfigError, check_model_settings, make_train_config, preset_path

DIMS = {"text": 21, "audio": 27, "video": 1438}


def test_every_model_has_a_preset() -> None:
    assert {p.stem for p in PRESETS.glob("*.yaml")} == set(fusion.MODELS)


@pytest.mark.parametrize("name", sorted(fusion.MODELS))
def test_every_preset_loads_and_builds(name: str) -> None:
    config = make_train_config(name)
    assert config.model == name
    check_model_settings(config, DIMS)
    model = fusion.build_model(name, **config.model_kwargs(DIMS))
    assert model.config.dims == DIMS


def test_precedence_defaults_preset_file_cli(tmp_path) -> None:
    extra = tmp_path / "mine.yaml"
    extra.write_text("lr: 0.005\nbatch_size: 8\nmodel_settings:\n  hidden: 24\n")
    config = make_train_config("ithp", extra, ["batch_size=4", "model.beta=16", "modalities=text,audio"])
    assert config.optim.lr == 0.005  # file over preset (1e-3)
    assert config.data.batch_size == 4  # command line over file
    assert config.model_settings["hidden"] == 24 and config.model_settings["beta"] == 16
    assert config.model_settings["gamma"] == 32.0  # from the preset
    assert config.data.modalities == ("text", "audio")
    assert config.optim.encoder_lr == 1e-5 and config.mode == "frozen"


def test_every_problem_is_reported_with_its_key() -> None:
    with pytest.raises(TrainConfigError) as info:
        make_train_config("late", overrides=["lr=fast", "epochs=0", "bogus=1", "model.hiden=3", "mode=e2e"])
    message = str(info.value)
    assert "unknown setting 'bogus'" in message
    assert "lr: 'fast' is not a number" in message
    with pytest.raises(TrainConfigError) as info:
        make_train_config("late", overrides=["epochs=0", "model.hiden=3", "mode=e2e", "model.task=x"])
    message = str(info.value)
    assert "epochs: must be >= 1, got 0" in message
    assert "model.hiden: not a setting of late" in message
    assert "mode: must be one of frozen, end_to_end" in message
    assert "model.task: not a setting of late (set it at the top level)" in message


def test_every_typo_and_bad_value_on_the_command_line_is_reported_at_once() -> None:
    with pytest.raises(TrainConfigError) as info:
        make_train_config("late", overrides=["lr=1e-3", "epohcs=3", "bacth_size=4", "amp=maybe", "model.dropout=x"])
    message = str(info.value)
    assert message.startswith(
        "invalid training settings:\n"
        "  unknown setting 'epohcs' (did you mean epochs?)\n"
        "  unknown setting 'bacth_size' (did you mean batch_size?)\n"
        "  model.dropout: 'x' is not a number\n"
        "  amp: must be one of auto, off, bf16, fp16, got 'maybe'\n"
        "valid keys: align_words, amp, batch_size, "
    )
    assert message.count("\n") == 5


def test_unknown_model_and_bad_override() -> None:
    with pytest.raises(TrainConfigError, match="model: unknown 'ithq'; valid models: bc_pmjrs"):
        make_train_config("ithq")
    with pytest.raises(TrainConfigError, match="is not KEY=VALUE"):
        make_train_config("late", overrides=["lr"])


def test_model_settings_checked_against_dims() -> None:
    config = make_train_config("late", overrides=["model.hidden=10", "model.num_heads=3"])
    with pytest.raises(TrainConfigError, match=r"hidden \(10\) must be a positive multiple of num_heads \(3\)"):
        check_model_settings(config, DIMS)


def test_presets_hold_overrides_only() -> None:
    for name in fusion.MODELS:
        text = preset_path(name).read_text()
        assert "dims" not in text and "task:" not in text, name


NUMBERS = [("1e-3", 1e-3), ("1E-3", 1e-3), ("3e-5", 3e-5), ("3E-5", 3e-5), (".5", 0.5), ("5.", 5.0), ("+2e-4", 2e-4)]


@pytest.mark.parametrize(("typed", "value"), NUMBERS)
def test_every_numeric_form_parses_on_the_command_line_and_in_yaml(tmp_path, typed: str, value: float) -> None:
    assert make_train_config("late", overrides=[f"lr={typed}"]).optim.lr == value
    assert make_train_config("ithp", overrides=[f"model.beta={typed}"]).model_settings["beta"] == value
    path = tmp_path / "numbers.yaml"
    path.write_text(f"lr: {typed}\nencoder_lr: {typed}\nmodel_settings:\n  beta: {typed}\n")
    config = make_train_config("ithp", path)
    assert (config.optim.lr, config.optim.encoder_lr, config.model_settings["beta"]) == (value, value, value)


def test_integers_take_underscores_and_whole_exponents_but_not_fractions() -> None:
    config = make_train_config("late", overrides=["max_steps=1_000", "shuffle_buffer=1e3", "batch_size=8.0"])
    assert (config.run.max_steps, config.data.shuffle_buffer, config.data.batch_size) == (1000, 1000, 8)
    assert isinstance(config.data.shuffle_buffer, int)
    with pytest.raises(TrainConfigError, match=r"batch_size: 2\.5 is not an integer"):
        make_train_config("late", overrides=["batch_size=2.5"])
    with pytest.raises(TrainConfigError, match="lr: '1e400' is not a finite number"):
        make_train_config("late", overrides=["lr=1e400"])
    with pytest.raises(TrainConfigError, match=r"model\.beta: 'big' is not a number"):
        make_train_config("ithp", overrides=["model.beta=big"])


def test_sections_take_flat_dotted_and_nested_keys_and_record_dotted(tmp_path) -> None:
    path = tmp_path / "sections.yaml"
    path.write_text("optim:\n  lr: 3e-4\ndata:\n  batch_size: 6\n  label_key: happy\nrun:\n  seed: 7\n")
    config = make_train_config("late", path, ["optim.grad_accum=2", "epochs=3", "mode=end_to_end"])
    assert (config.optim.lr, config.optim.grad_accum, config.run.epochs) == (3e-4, 2, 3)
    assert (config.data.batch_size, config.data.label_key) == (6, "happy")
    # what the data section derives: raw inputs end to end, scalar labels, the run's seed for every shuffle
    assert (config.data.raw, config.data.multilabel, config.data.seed) == (True, False, 7)
    recorded = config.to_dict()
    assert (recorded["optim.lr"], recorded["data.batch_size"], recorded["run.epochs"]) == (3e-4, 6, 3)
    assert recorded["data.modalities"] == ["text", "audio", "video"] and recorded["model.hidden"] == 64
    derived = {"data.raw", "data.multilabel", "data.normalise", "data.prefetch_factor"}
    assert not (derived | {"model_settings", "lr", "batch_size", "data", "optim", "run"}) & set(recorded)
    assert make_train_config("late", base=recorded) == config  # config.json -> the same settings
    with pytest.raises(TrainConfigError, match="unknown setting 'raw'"):
        make_train_config("late", overrides=["raw=true"])  # derived from mode, not a setting


def test_words_yaml_1_1_took_for_booleans_stay_words(tmp_path) -> None:
    """`amp=off` / `amp: off` is the setting "off" (YAML 1.1 read it as False); boolean settings still take it."""
    assert make_train_config("late", overrides=["amp=off"]).run.amp == "off"
    path = tmp_path / "words.yaml"
    path.write_text("amp: off\nskip_bad_samples: yes\ncompile: off\n")
    config = make_train_config("late", path)
    assert (config.run.amp, config.data.skip_bad_samples, config.run.compile) == ("off", True, False)


def test_every_seed_is_checked_before_any_run_starts(tmp_path, capsys) -> None:
    from mmfuse.cli import main
    from train.config import parse_seeds

    with pytest.raises(TrainConfigError, match=r"seed: must be an integer in \[0, 4294967295\], got 10000000000"):
        make_train_config("late", overrides=["seed=1e10"])
    assert parse_seeds("3, 1,2") == [3, 1, 2]
    with pytest.raises(TrainConfigError, match=r"--seeds: every seed must be in \[0, 4294967295\], got \[99999999999"):
        parse_seeds("1,99999999999999999999")
    with pytest.raises(TrainConfigError, match="a seed is repeated"):
        parse_seeds("1,2,1")
    with pytest.raises(TrainConfigError, match="give comma-separated integers"):
        parse_seeds("1,two")
    run_dir = tmp_path / "runs"
    argv = ["train", "--shards", str(tmp_path / "shards"), "--model", "late", "--run-dir", str(run_dir)]
    assert main([*argv, "--seeds", "1,99999999999999999999"]) != 0
    assert "every seed must be in" in capsys.readouterr().err
    assert not run_dir.exists()  # nothing created, nothing to refuse on a rerun
