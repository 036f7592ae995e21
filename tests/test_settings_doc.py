"""docs/settings.md is generated from the settings' dataclasses and kept current; every setting is documented."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mmfuse.settings import NOT_A_SETTING
from mmfuse.settings_doc import field_comments, main, render, settings_of

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Example:
    width: int = 3  # how wide
    # where it runs:
    # cpu or cuda
    device: str = "cpu"
    plain: bool = False
    derived: int = field(default=0, metadata=NOT_A_SETTING)  # never read from the user


def test_a_field_is_documented_by_its_comment_or_the_lines_above_it() -> None:
    assert field_comments(Example) == {
        "width": "how wide",
        "device": "where it runs: cpu or cuda",
        "plain": "",
        "derived": "never read from the user",
    }
    assert [(f.name, default) for f, default, _ in settings_of(Example)] == [
        ("width", 3),
        ("device", "cpu"),
        ("plain", False),
    ]


def test_docs_settings_md_is_current(tmp_path: Path, capsys) -> None:
    assert (ROOT / "docs" / "settings.md").read_text() == render(), "docs/settings.md is stale: run make settings-doc"
    stale = tmp_path / "settings.md"
    stale.write_text("old\n")
    assert main([str(stale), "--check"]) == 1 and stale.read_text() == "old\n"
    assert "is stale: run make settings-doc" in capsys.readouterr().err
    assert main([str(stale)]) == 0 and main([str(stale), "--check"]) == 0


def test_the_page_does_not_follow_the_registrys_insertion_order(monkeypatch) -> None:
    """An extractor registered again (a test's monkeypatch undone re-inserts it last) keeps its place."""
    from extract import EXTRACTORS

    before = render()
    entry = EXTRACTORS["facemesh"]
    monkeypatch.delitem(EXTRACTORS, "facemesh")
    monkeypatch.setitem(EXTRACTORS, "facemesh", entry)
    assert list(EXTRACTORS)[-1] == "facemesh" and render() == before


def test_every_setting_is_on_the_page_with_its_default_and_a_description() -> None:
    text = render()
    rows = re.findall(r"^\| `([^`]+)` \| (.*?) \| (.*?) \|", text, flags=re.M)
    keys = {key: (default, note) for key, default, note in rows}
    assert keys["facemesh.max_faces"] == ("`1`", "faces per frame; the largest is kept")
    assert keys["text.model"][1].endswith("(also `text_model`)")
    assert keys["optim.clip_norm"][0] == "`1.0`" and keys["model.tc_weight"][0] == "`1.0`"
    assert {"extractors.video", "asr.language", "run.selection", "data.label_key", "model.gates"} <= set(keys)
    assert "model.dims" not in keys and "data.pin_memory" not in keys  # filled in, not read from the user
    assert [key for key, (_, note) in keys.items() if not note] == []
    assert "Its preset also sets `lr=0.001`, `encoder_lr=1e-05`, `warmup_steps=100`, `schedule=linear`." in text


@pytest.mark.parametrize("command", ["extract", "train"])
def test_the_commands_help_points_to_the_page(command: str, capsys) -> None:
    from mmfuse.cli import main as mmfuse

    with pytest.raises(SystemExit):
        mmfuse([command, "--help"])
    assert "every setting, its default and meaning: docs/settings.md" in capsys.readouterr().out.lower()
