"""Land the GPU figures: copy the ``gpu-check`` section of a BENCHMARKS.md that came back from the GPU machine
into this checkout's BENCHMARKS.md, keeping everything else in it as it is.

    python .ci/gpu/land.py /path/to/returned/BENCHMARKS.md [--into BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.markdown import markers, replace_section  # noqa: E402

SECTION = "gpu-check"


def land(returned: Path, into: Path) -> str:
    """The section of ``returned``, now also in ``into``; SystemExit when ``returned`` has none."""
    begin, end = markers(SECTION)
    text = returned.read_text()
    if begin not in text or end not in text:
        raise SystemExit(f"land: {returned} has no {SECTION} section: did `make gpu-check-bench` finish?")
    body = text.split(begin + "\n", 1)[1].split("\n" + end, 1)[0]
    replace_section(into, body, SECTION)
    return body


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("returned", type=Path, help="BENCHMARKS.md as the GPU machine wrote it")
    p.add_argument("--into", type=Path, default=ROOT / "BENCHMARKS.md")
    args = p.parse_args(argv)
    print(land(args.returned, args.into))
    return 0


if __name__ == "__main__":
    sys.exit(main())
