"""mmfuse.settings: the one way every command reads its settings (types, numbers, sections, errors)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from extract.config import ConfigError, make_config
from mmfuse.errors import MmfuseError
from mmfuse.settings import as_dotted_dict, build, coerce, leaf_paths, parse_number


@dataclass
class Optim:
    lr: float = 1e-3
    steps: int = 10


@dataclass
class Data:
    steps: int = 2
    modalities: tuple[str, ...] = ("text",)


@dataclass
class Settings:
    name: str = "x"
    fps: float | None = None
    flag: bool = False
    optim: Optim = field(default_factory=Optim)
    data: Data = field(default_factory=Data)


class Bad(MmfuseError, ValueError):
    pass


@pytest.mark.parametrize(
    ("text", "number"),
    [("1e-3", 1e-3), ("1E-3", 1e-3), ("3e-5", 3e-5), (".5", 0.5), ("1_000", 1000), ("+2", 2), ("-2.5e+4", -25000.0)],
)
def test_numbers_as_people_type_them(text: str, number: float) -> None:
    assert parse_number(text) == number
    assert type(parse_number(text)) is type(number)


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "1e400", "1__0", "_1", "1e", "0x10", "", "one"])
def test_what_is_not_a_finite_number(text: str) -> None:
    with pytest.raises(ValueError, match="is not a (finite )?number"):
        parse_number(text)


def test_values_are_read_by_the_field_type() -> None:
    assert coerce(bool, "YES") is True and coerce(bool, "off") is False and coerce(bool, 0) is False
    assert coerce(int, "1e3") == 1000 and coerce(int, 4.0) == 4
    assert coerce(tuple[str, ...], "text, audio,") == ("text", "audio")
    assert coerce(tuple[str, ...], ["video"]) == ("video",)
    assert coerce(float | None, "None") is None and coerce(float | None, "25") == 25.0
    for tp, value, message in [
        (bool, "maybe", "is not a boolean"),
        (int, "2.5", "is not an integer"),
        (int, True, "is not a number"),
        (str, ["a"], "is not a string"),
        (dict[str, int], "a=1", "is not a mapping"),
    ]:
        with pytest.raises(ValueError, match=message):
            coerce(tp, value)


def test_sections_take_flat_dotted_and_nested_keys() -> None:
    paths = leaf_paths(Settings)
    assert paths["lr"] == paths["optim.lr"] == ("optim", "lr")
    assert "steps" not in paths  # two sections have it: only the dotted keys name it
    got = build(
        Settings, [{"lr": "1e-4"}, {"data": {"steps": "3"}, "optim.steps": "1_000", "modalities": "a,b"}], Bad, "s"
    )
    assert got == Settings(optim=Optim(1e-4, 1000), data=Data(3, ("a", "b")))
    assert build(Settings, [{"lr": 1}, {"optim.lr": 2}], Bad, "s").optim.lr == 2.0  # later layers win
    dotted = as_dotted_dict(got)
    assert dotted == {"name": "x", "fps": None, "flag": False, "optim.lr": 1e-4, "optim.steps": 1000,
                      "data.steps": 3, "data.modalities": ["a", "b"]}  # fmt: skip
    assert build(Settings, [dotted], Bad, "s") == got


def test_every_problem_is_reported_at_once_with_the_valid_keys() -> None:
    with pytest.raises(Bad) as info:
        build(Settings, [{"steps": 1, "lr": "fast", "flag": "maybe", "bogus": 0}], Bad, "test settings")
    message = str(info.value)
    assert message.startswith("invalid test settings:\n")
    assert "setting 'steps' is in several sections: write data.steps or optim.steps" in message
    assert "lr: 'fast' is not a number" in message and "flag: 'maybe' is not a boolean" in message
    assert "unknown setting 'bogus'" in message
    assert "valid keys: data.steps, flag, fps, lr, modalities, name, optim.steps" in message


def test_extraction_settings_read_numbers_in_yaml_as_people_type_them(tmp_path) -> None:
    path = tmp_path / "extract.yaml"
    path.write_text("fps: 2.5e1\naudio_chunk_s: 3e1\nshard_size: 1_000\nmin_detection_confidence: .25\nraw: no\n")
    cfg = make_config(path, batch_size="4")
    assert (cfg.fps, cfg.audio_chunk_s, cfg.shard_size, cfg.min_detection_confidence) == (25.0, 30.0, 1000, 0.25)
    assert cfg.raw is False and cfg.batch_size == 4
    with pytest.raises(ConfigError, match="shard_size: '1e-3' is not an integer") as info:
        make_config(path, shard_size="1e-3")
    assert isinstance(info.value, MmfuseError)


def test_unknown_keys_come_with_a_close_match_and_with_every_value_problem() -> None:
    def checks(s: Settings) -> list[str]:
        return [] if s.name in ("x", "y") else [f"name: must be x or y, got {s.name!r}"]

    with pytest.raises(Bad) as info:
        build(Settings, [{"nmae": "y", "optim.lrr": 1, "zzz": 0, "name": "z", "fps": "fast"}], Bad, "s", checks)
    assert str(info.value) == (
        "invalid s:\n"
        "  unknown setting 'nmae' (did you mean name?)\n"
        "  unknown setting 'optim.lrr' (did you mean optim.lr?)\n"
        "  unknown setting 'zzz'\n"
        "  fps: 'fast' is not a number\n"
        "  name: must be x or y, got 'z'\n"
        "valid keys: data.steps, flag, fps, lr, modalities, name, optim.steps"
    )


def test_extraction_settings_report_typos_and_bad_values_together(tmp_path) -> None:
    path = tmp_path / "extract.yaml"
    path.write_text("shard_sise: 8\nworkres: 2\n")
    with pytest.raises(ConfigError) as info:
        make_config(path, workers=-1, fps="fast", modalities="text,smell")
    message = str(info.value)
    assert message.startswith(
        "invalid extraction settings:\n"
        "  unknown setting 'shard_sise' (did you mean shard_size?)\n"
        "  unknown setting 'workres' (did you mean workers?)\n"
        "  fps: 'fast' is not a number\n"
        "  modalities: ['text', 'smell'] must be a non-empty subset of ['text', 'audio', 'video']\n"
        "  workers: must be >= 0 or auto, got -1\n"
        "valid keys: asr.model, "
    )


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8)
)  # 9^9 = 387 million strings from 9 lines


def test_yaml_aliases_are_refused_before_they_expand(tmp_path) -> None:
    from mmfuse.settings import read_yaml

    config = tmp_path / "bomb.yaml"
    config.write_text(BOMB)
    with pytest.raises(Bad, match=r"cannot read config .*bomb\.yaml: aliases \(\*name\) are not allowed in settings"):
        read_yaml(config, Bad)
    plain = tmp_path / "plain.yaml"
    plain.write_text("anchored: &one 1\nepochs: 3\n")  # an anchor alone is harmless
    assert read_yaml(plain, Bad) == {"anchored": 1, "epochs": 3}


def test_an_override_with_aliases_stays_text_and_its_error_is_cut() -> None:
    from mmfuse.settings import QUOTE_LIMIT, parse_override

    assert parse_override("modalities=[&a text, *a]", Bad) == ("modalities", "[&a text, *a]")  # kept as typed
    assert parse_override("modalities=[text, audio]", Bad) == ("modalities", ["text", "audio"])
    with pytest.raises(ValueError) as info:
        coerce(int, "9" * 5000 + "x")
    message = str(info.value)
    assert message.endswith("... (5003 characters) is not a number") and len(message) < QUOTE_LIMIT + 60


def test_yaml_numbers_are_decimal_as_in_yaml_1_2(tmp_path) -> None:
    from mmfuse.settings import parse_override, read_yaml
    from train.config import make_train_config

    config = tmp_path / "numbers.yaml"
    config.write_text("epochs: 010\nsteps: 1_000\nlr: 1e-3\nwhen: 1:30\nneg: -07\nhalf: .5\n")
    read = read_yaml(config, Bad)  # 1e-3 stays text here, read as a number by the field's type
    assert read == {"epochs": 10, "steps": 1000, "lr": "1e-3", "when": "1:30", "neg": -7, "half": 0.5}
    assert parse_override("epochs=010", Bad) == ("epochs", 10)  # YAML 1.1: octal 8
    assert parse_override("epochs=1:30", Bad) == ("epochs", "1:30")  # YAML 1.1: sexagesimal 90
    assert make_train_config("late", overrides=["epochs=010"]).run.epochs == 10
    with pytest.raises(Bad, match=r"optim\.steps: '1:30' is not a number"):
        build(Settings, [{"optim.steps": parse_override("x=1:30", Bad)[1]}], Bad, "test settings")


def test_a_key_given_twice_is_refused_naming_it(tmp_path) -> None:
    from mmfuse.cli import main
    from mmfuse.settings import parse_override, read_yaml
    from train.config import TrainConfigError, make_train_config, refuse_repeated

    config = tmp_path / "twice.yaml"
    config.write_text("name: a\noptim:\n  lr: 0.1\n  steps: 3\n  lr: 0.2\n")
    with pytest.raises(Bad) as info:
        read_yaml(config, Bad)
    assert str(info.value) == f"cannot read config {config}: key 'lr' is given twice: keep one (line 5, column 3)"
    with pytest.raises(Bad, match=r"^override 'model_settings': key 'beta' is given twice: keep one \(line 1"):
        parse_override("model_settings={beta: 1, beta: 2}", Bad)
    with pytest.raises(Bad, match=r"'lr' and 'optim\.lr' name the same setting: keep one"):
        build(Settings, [{"lr": 0.1, "optim": {"lr": 0.2}}], Bad, "test settings")
    assert build(Settings, [{"lr": 0.1}, {"optim": {"lr": 0.2}}], Bad, "test settings").optim.lr == 0.2  # layers
    with pytest.raises(TrainConfigError) as info:  # typed on the command line: refused
        refuse_repeated(["epochs=3", "model.hidden=8", "epochs=5", "model.hidden=9", "lr=0.1", "optim.lr=0.2"])
    assert "'epochs' is given 2 times: keep one" in str(info.value)
    assert "'model.hidden' is given 2 times: keep one" in str(info.value)
    assert "'lr' and 'optim.lr' name the same setting: keep one" in str(info.value)
    assert main(["train", "--shards", str(tmp_path), "--run-dir", str(tmp_path / "run"), "epochs=3", "epochs=5"]) == 1
    assert not (tmp_path / "run").exists()
    composed = make_train_config("late", overrides=["epochs=3", "model.hidden=8", "epochs=5", "model.hidden=9"])
    assert (composed.run.epochs, composed.model_settings["hidden"]) == (5, 9)  # a list code composes: later wins
