"""``mmfuse bench extract|train``: the throughput benchmarks of SPEC §8 (results go to BENCHMARKS.md)."""

from __future__ import annotations

import argparse


def add_bench(sub: argparse._SubParsersAction) -> None:
    from bench.extract import add_arguments as add_extract_arguments
    from bench.train import add_arguments as add_train_arguments

    p = sub.add_parser(
        "bench",
        help="throughput benchmarks (extraction, streaming training)",
        description="Measure mmfuse against the naive way on this machine; every figure is printed with the "
        "command that made it, and --out BENCHMARKS.md records it.",
    )
    kinds = p.add_subparsers(dest="bench", required=True, metavar="KIND")
    add_extract_arguments(kinds.add_parser("extract", help="extraction: pipeline vs naive per-clip loop vs ceilings"))
    add_train_arguments(kinds.add_parser("train", help="training: streaming vs in-memory, frozen vs end to end, DDP"))
