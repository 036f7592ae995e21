"""docs/settings.md, generated from the settings' own dataclasses: every key of ``mmfuse extract`` (the general
settings, ``extractors``, one section per registered extractor from its ``Settings``) and of ``mmfuse train`` (its
sections, then each model's ``model.*`` keys and preset), with its default and the comment on its line.

    python -m mmfuse.settings_doc docs/settings.md     # (make settings-doc) rewrite it; --check: exit 1 if stale

A setting is declared once, as a dataclass field whose trailing comment is its documentation; this page, the
command line and YAML files all derive from that declaration (``tests/test_settings_doc.py`` keeps the page
current).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import sys
import textwrap
import tokenize
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mmfuse.settings import NOT_A_SETTING, load_yaml, setting_aliases

HEADER = """# Settings

Generated from the settings' dataclasses by `make settings-doc` (`mmfuse/settings_doc.py`); a test keeps it
current. Every key is given as `KEY=VALUE` on the command line or as a key of the YAML file passed to
`--config`; a section's keys are dotted on the command line (`facemesh.max_faces=2`, `optim.lr=3e-4`) and nested
in YAML (`facemesh: {max_faces: 2}`). A training setting whose name no other section has may be given bare
(`lr=3e-4`). `None` is written `none` (or `auto` where the setting says so).
"""

MODEL_FILLED = ("dims", "task", "num_classes")  # a model's Config fields set from the shards and the task


def field_comments(cls: type) -> dict[str, str]:
    """Each field of ``cls`` (its own class body) -> its comment: the one ending its declaration, else the comment
    lines right above it."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    comments = {
        tok.start[0]: tok.string.lstrip("#").strip()
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT
    }

    def above(line: int) -> str:
        block = []
        while line - 1 in comments and lines[line - 2].lstrip().startswith("#"):
            line -= 1
            block.insert(0, comments[line])
        return " ".join(block)

    (body,) = ast.parse(source).body
    found = {}
    for node in body.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            found[node.target.id] = comments.get(node.end_lineno) or above(node.lineno)
    return found


def settings_of(cls: type, skip: tuple[str, ...] = ()) -> Iterator[tuple[dataclasses.Field, Any, str]]:
    """``(field, default, comment)`` for each setting of ``cls`` that is a value (sections are listed on their
    own), inherited ones first, comments from the class that declares the field."""
    comments: dict[str, str] = {}
    for base in reversed(cls.__mro__):
        if dataclasses.is_dataclass(base) and base.__module__ != "types":
            comments |= field_comments(base)
    for f in dataclasses.fields(cls):
        if f.metadata == NOT_A_SETTING or f.name in skip or dataclasses.is_dataclass(f.type):
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
        if dataclasses.is_dataclass(default):
            continue
        yield f, default, comments.get(f.name, "")


def table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]


def shown(value: Any) -> str:
    if isinstance(value, tuple):
        value = ",".join(map(str, value))
    return f"`{value}`" if value != "" else ""


def section_rows(cls: type, prefix: str, skip: tuple[str, ...] = ()) -> list[tuple[str, str, str]]:
    aliases: dict[str, list[str]] = {}
    for alias, target in setting_aliases(cls).items():
        aliases.setdefault(target, []).append(alias)
    rows = []
    for f, default, comment in settings_of(cls, skip):
        also = aliases.get(f.name, [])
        note = f"{comment} (also `{'`, `'.join(sorted(also))}`)" if also else comment
        rows.append((f"`{prefix}{f.name}`", shown(default), note))
    return rows


def where(cls: type) -> str:
    return Path(inspect.getsourcefile(cls) or "").resolve().relative_to(ROOT).as_posix()


ROOT = Path(__file__).resolve().parents[1]


def extract_section() -> list[str]:
    from extract.config import ExtractConfig, Extractors
    from extract.extractors.base import SHARED, section_name
    from extract.registry import EXTRACTORS

    out = ["## `mmfuse extract`", "", f"### General settings (`ExtractConfig`, `{where(ExtractConfig)}`)", ""]
    out += table(section_rows(ExtractConfig, ""), ("key", "default", ""))
    out += ["", "### `extractors`: which registered extractor fills each modality", ""]
    rows = []
    for f, default, _ in settings_of(Extractors):
        fits = sorted(k for k, e in EXTRACTORS.items() if e.modality == f.name)
        rows.append((f"`extractors.{f.name}`", shown(default), f"registered for {f.name}: {', '.join(fits)}"))
    out += table(rows, ("key", "default", ""))
    modalities = [f.name for f in dataclasses.fields(Extractors)]  # text, audio, video; then the others (asr)

    def place(key: str) -> tuple[int, str]:  # not the registry's insertion order, which tests may change
        modality = EXTRACTORS[key].modality
        return (modalities.index(modality) if modality in modalities else len(modalities), key)

    for key in sorted(EXTRACTORS, key=place):
        entry = EXTRACTORS[key]
        settings = entry.load().Settings
        name = section_name(key)
        out += ["", f"### `{name}`: {entry.name} ({entry.modality}; `{where(settings)}`)", ""]
        own = tuple(f.name for f in dataclasses.fields(settings) if f.metadata == SHARED)
        out += table(section_rows(settings, f"{name}.", skip=own), ("key", "default", ""))
        if own:
            out += ["", f"It also reads the general {', '.join(f'`{s}`' for s in own)}."]
    return out


def train_section() -> list[str]:
    import fusion
    from train.config import DataConfig, OptimConfig, RunConfig, TrainConfig, preset_path

    out = ["## `mmfuse train`", "", f"### General settings (`TrainConfig`, `{where(TrainConfig)}`)", ""]
    out += table(section_rows(TrainConfig, "", skip=("model_settings",)), ("key", "default", ""))
    for name, cls in (("data", DataConfig), ("optim", OptimConfig), ("run", RunConfig)):
        out += ["", f"### `{name}` (`{cls.__name__}`)", ""]
        out += table(section_rows(cls, f"{name}."), ("key", "default", ""))
    out += ["", "### `model.*`: each model's settings", ""]
    out += [
        "Each model's `Config` (`fusion/`), then its preset (`train/configs/NAME.yaml`), which `--model NAME` applies",
        f"before `--config` and `KEY=VALUE`. `{'`, `'.join(MODEL_FILLED)}` come from the shards and `task`.",
    ]
    for name in sorted(fusion.MODELS):
        config = fusion.MODELS[name].Config
        preset = load_yaml(preset_path(name).read_text()) or {}
        model_preset = preset.pop("model_settings", {}) or {}
        rows = [(*row, shown(model_preset.get(row[0].strip("`").removeprefix("model."), ""))) for row in
                section_rows(config, "model.", skip=MODEL_FILLED)]  # fmt: skip
        out += ["", f"#### `{name}` (`{config.__name__}`, `{where(config)}`)", ""]
        out += table(rows, ("key", "default", "", "preset"))
        if preset:
            others = ", ".join(f"`{k}={v}`" for k, v in preset.items())
            out += ["", f"Its preset also sets {others}."]
    return out


def render() -> str:
    return "\n".join([HEADER, *extract_section(), "", *train_section()]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write docs/settings.md from the settings' dataclasses.")
    parser.add_argument("path", type=Path)
    parser.add_argument("--check", action="store_true", help="exit 1 (writing nothing) when the file is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.path.read_text() if args.path.is_file() else ""
        if current != text:
            print(f"{args.path} is stale: run make settings-doc", file=sys.stderr)
            return 1
        return 0
    args.path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
