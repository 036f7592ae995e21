"""BENCHMARKS.md is shared by several benchmarks: each owns one section between its own HTML-comment markers."""

from __future__ import annotations

from pathlib import Path


def markers(name: str) -> tuple[str, str]:
    """The begin / end markers of section ``name``."""
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def replace_section(path: Path, body: str, name: str) -> None:
    """Replace the text between ``name``'s markers in ``path``; if they are absent, insert the section after the
    file's first paragraph (below its title), or before its first heading or section when that comes first.
    Everything outside the markers is kept byte for byte."""
    begin, end = markers(name)
    block = f"{begin}\n{body}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        lines = text.splitlines(keepends=True)
        i = 1 if lines and lines[0].startswith("#") else 0
        while i < len(lines) and not lines[i].strip():
            i += 1
        while i < len(lines) and lines[i].strip() and not lines[i].startswith(("#", "<!--")):
            i += 1
        head, tail = "".join(lines[:i]).rstrip("\n"), "".join(lines[i:]).lstrip("\n")
        text = (head + "\n\n" if head else "") + block + "\n" + ("\n" + tail if tail else "")
    path.write_text(text)
