"""``mmfuse extract`` takes any extraction setting as ``KEY=VALUE``, as ``mmfuse train`` does: after the manifest or
anywhere among the flags, read like YAML values, refused when given twice on the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from extract.config import ConfigError, make_config, resolved
from mmfuse.cli import build_parser, main, parse
from shards import load_dataset_json
from shards.io import iter_shard


def test_key_value_settings_reach_every_field() -> None:
    cfg = make_config(None, ["max_faces=2", "audio_chunk_s=20", "text_layer=-2", "precision=auto", "workers=0"])
    assert (cfg.max_faces, cfg.audio_chunk_s, cfg.text_layer, cfg.precision, cfg.workers) == (2, 20.0, -2, None, 0)
    assert "workers" not in resolved(cfg).auto and "batch_size" in resolved(cfg).auto  # auto: chosen from the machine


def test_yaml_then_flags_and_settings_and_nothing_given_twice(tmp_path: Path) -> None:
    yaml = tmp_path / "x.yaml"
    yaml.write_text("max_faces: 3\nfps: 10\n")
    cfg = make_config(yaml, ["max_faces=2"], fps=12.0)
    assert (cfg.max_faces, cfg.fps) == (2, 12.0)  # the command line overrides the file
    with pytest.raises(ConfigError) as twice:
        make_config(None, ["fps=25", "max_faces=2", "max_faces=4"], fps=12.0)
    assert str(twice.value) == (
        "invalid extraction settings:\n  'fps' is given 2 times: keep one\n  'max_faces' is given 2 times: keep one"
    )
    with pytest.raises(ConfigError) as wrong:
        make_config(None, ["max_fcaes=2", "audio_chunk_s=0.5", "fps"])
    assert str(wrong.value) == "override 'fps' is not KEY=VALUE"
    with pytest.raises(ConfigError) as wrong:
        make_config(None, ["max_fcaes=2", "audio_chunk_s=0.5"])
    assert "max_fcaes" in str(wrong.value) and "max_faces" in str(wrong.value)  # unknown, with the close name
    assert "audio.chunk_s: must be >= 1 and <= 600, got 0.5" in str(wrong.value)  # reported together


@pytest.mark.parametrize("command", ["extract", "train"])
def test_settings_are_taken_anywhere_on_the_line_and_other_tokens_stay_errors(command: str, capsys) -> None:
    head = ["extract", "m.csv", "--out", "o"] if command == "extract" else ["train", "--shards", "s", "--run-dir", "r"]
    args = parse(build_parser(), [*head, "a=1", "--no-progress", "b=2", "c.d=[1, 2]"])
    assert args.overrides == ["a=1", "b=2", "c.d=[1, 2]"] and args.no_progress
    split = 2 if command == "extract" else 1  # right after the positionals, then after the flags
    args = parse(build_parser(), [*head[:split], "a=1", *head[split:], "b=2", "c.d=[1, 2]"])
    assert args.overrides == ["a=1", "b=2", "c.d=[1, 2]"] and not args.no_progress
    for stray in (["--bogus"], ["-x=1"]):
        with pytest.raises(SystemExit) as usage:
            parse(build_parser(), [*head, "a=1", *stray])
        assert usage.value.code == 2 and f"unrecognized arguments: {stray[0]}" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        parse(build_parser(), ["inspect", "shards", "a=1"])  # no settings there
    assert usage.value.code == 2 and "unrecognized arguments: a=1" in capsys.readouterr().err


def test_extract_with_a_setting_given_as_key_value(tmp_path: Path, tiny_text_model: Path, capsys) -> None:
    manifest = tmp_path / "m.jsonl"
    text = "a transcript that is longer than eight word pieces once it is tokenised"
    manifest.write_text("".join(json.dumps({"video_id": "v", "clip_id": f"c{i}", "text": text}) + "\n" for i in (0, 1)))
    out = tmp_path / "out"
    flags = ["--out", str(out), "--modalities", "text", "--text-model", str(tiny_text_model), "--no-progress"]
    assert main(["extract", str(manifest), *flags, "max_text_tokens=8", "shard_size=1"]) == 0
    ds = load_dataset_json(out)
    assert len(ds["shards"]) == 2  # shard_size=1
    samples = [s for entry in ds["shards"] for s in iter_shard(out / entry["name"])]
    assert [s["text_ids.npy"].shape[0] for s in samples] == [8, 8]  # max_text_tokens=8, [CLS] ... [SEP] included
    assert main(["extract", str(manifest), *flags, "max_text_tokens=8", "--shard-size", "1", "shard_size=2"]) == 1
    assert "'shard_size' is given 2 times: keep one" in capsys.readouterr().err


def test_sections_by_registry_name_and_the_older_flat_names_give_one_config(tmp_path: Path) -> None:
    sections = make_config(
        None,
        ["text.model=m/t", "text.layer=-2", "text.max_tokens=77", "audio.model=m/a", "audio.layer=3"]
        + ["audio.chunk_s=20", "facemesh.max_faces=2", "facemesh.min_detection_confidence=0.25", "asr.model=m/w"]
        + ["asr.language=en"],
    )
    flat = make_config(
        None,
        ["text_model=m/t", "text_layer=-2", "max_text_tokens=77", "audio_model=m/a", "audio_layer=3"]
        + ["audio_chunk_s=20", "max_faces=2", "min_detection_confidence=0.25", "asr=m/w", "asr_language=en"],
    )
    assert sections == flat
    assert (flat.text.model, flat.text.layer, flat.text.max_tokens, flat.audio.chunk_s) == ("m/t", -2, 77, 20.0)
    assert (flat.facemesh.max_faces, flat.asr.model, flat.asr.language) == (2, "m/w", "en")
    assert (flat.text_model, flat.max_faces, flat.asr_language) == ("m/t", 2, "en")  # read by the old names too
    nested = tmp_path / "nested.yaml"
    nested.write_text(
        "text: {model: m/t, layer: -2, max_tokens: 77}\naudio: {model: m/a, layer: 3, chunk_s: 20}\n"
        "facemesh: {max_faces: 2, min_detection_confidence: 0.25}\nasr: {model: m/w, language: en}\n"
    )
    old = tmp_path / "old.yaml"  # a file written with the flat keys
    old.write_text(
        "text_model: m/t\ntext_layer: -2\nmax_text_tokens: 77\naudio_model: m/a\naudio_layer: 3\naudio_chunk_s: 20\n"
        "max_faces: 2\nmin_detection_confidence: 0.25\nasr: m/w\nasr_language: en\n"
    )
    assert make_config(nested) == make_config(old) == flat
    flags = make_config(None, text_model="m/t", audio_model="m/a", asr="m/w", asr_language="en")  # the SPEC's flags
    assert (flags.text.model, flags.audio.model, flags.asr.model, flags.asr.language) == ("m/t", "m/a", "m/w", "en")
    assert make_config(old, ["text.model=m/x"]).text.model == "m/x"  # the command line's section key wins


def test_a_setting_by_its_alias_and_its_section_key_on_one_line_is_refused() -> None:
    with pytest.raises(ConfigError) as twice:
        make_config(None, ["text_model=a", "text.model=b"])
    assert "'text_model' and 'text.model' name the same setting: keep one" in str(twice.value)
    with pytest.raises(ConfigError, match="'audio_model' and 'audio.model' name the same setting"):
        make_config(None, ["audio.model=b"], audio_model="a")  # the --audio-model flag and a section key
    with pytest.raises(ConfigError, match="'asr' and 'asr.model' name the same setting"):
        make_config(None, ["asr.model=/w"], asr="/w")


def test_unknown_section_keys_and_extractors_name_the_close_match() -> None:
    with pytest.raises(ConfigError) as wrong:
        make_config(None, ["facemesh.max_fcaes=2", "audio.chunk=3", "extractors.video=facemsh"])
    message = str(wrong.value)
    assert "unknown setting 'facemesh.max_fcaes' (did you mean facemesh.max_faces?)" in message
    assert "unknown setting 'audio.chunk' (did you mean audio.chunk_s?)" in message
    assert "extractors.video: 'facemsh' is not registered (did you mean facemesh?); registered for video: facemesh" in (
        message
    )
    with pytest.raises(ConfigError, match="extractors.text: 'asr' fills transcript"):
        make_config(None, ["extractors.text=asr"])


def test_another_registered_extractor_is_picked_by_setting(tmp_path: Path, monkeypatch) -> None:
    from toy_visual import ENTRY

    from extract import EXTRACTORS
    from extract.clip import decode_settings

    monkeypatch.setitem(EXTRACTORS, "colour-stats", ENTRY)
    assert make_config(None).extractors.video == "facemesh"  # registered, not chosen
    yaml = tmp_path / "x.yaml"
    yaml.write_text("extractors: {video: colour-stats}\nfps: 5\n")
    for cfg in (make_config(None, ["extractors.video=colour-stats", "fps=5"]), make_config(yaml)):
        assert (cfg.extractors.video, cfg.chosen("video")) == ("colour-stats", "colour-stats")
        (entry, settings), *_ = decode_settings(cfg).extractors
        assert entry is ENTRY and settings == ENTRY.load().Settings(fps=5.0)
