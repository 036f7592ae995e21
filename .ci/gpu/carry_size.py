"""What one GPU-machine call carries: the working tree that travels (tracked files and untracked files git does not
ignore) plus the ignored paths named in ``carry``. Prints the sizes; exits 1 when they are over the limit.

    python .ci/gpu/carry_size.py --limit-mib 64 gpu-wheels [more carried paths]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MIB = 1 << 20


def tree_files(root: Path) -> list[Path]:
    """The files of ``root``'s working tree that travel with a call (a deleted tracked file does not)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root, capture_output=True, check=True,
    ).stdout  # fmt: skip
    paths = {root / os.fsdecode(p) for p in listed.split(b"\0") if p}
    return sorted(p for p in paths if os.path.lexists(p))


def path_bytes(path: Path) -> int:
    """Bytes under ``path`` (a file, or a folder walked without following links)."""
    if path.is_symlink() or path.is_file():
        return path.lstat().st_size
    return sum((Path(d) / f).lstat().st_size for d, _, files in os.walk(path) for f in files)


def carry_report(root: Path, carried: list[Path]) -> dict[str, int]:
    """Bytes by part: ``tree`` and each carried path (relative to ``root``)."""
    sizes = {"tree": sum(p.lstat().st_size for p in tree_files(root))}
    for path in carried:
        full = path if path.is_absolute() else root / path
        if not full.exists():
            raise SystemExit(f"carry_size: {path} does not exist")
        sizes[str(path)] = path_bytes(full)
    return sizes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("carried", nargs="*", type=Path, help="ignored paths named in the call's carry")
    p.add_argument("--limit-mib", type=float, default=64.0)
    p.add_argument("--root", type=Path, default=ROOT)
    args = p.parse_args(argv)
    sizes = carry_report(args.root, args.carried)
    total = sum(sizes.values())
    for name, size in sizes.items():
        print(f"carry: {name}: {size / MIB:.1f} MiB")
    verdict = "within" if total <= args.limit_mib * MIB else "OVER"
    print(f"carry: total {total / MIB:.1f} MiB, {verdict} the {args.limit_mib:g} MiB one call carries")
    return 0 if verdict == "within" else 1


if __name__ == "__main__":
    sys.exit(main())
