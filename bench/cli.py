"""``mmfuse bench extract|train|claims|models|gpu``: the throughput benchmarks of SPEC §8 (results go to
BENCHMARKS.md), the seed methods' claims on synthetic tasks built for them, and every model compared on a user's
own shards; and the GPU check's figures (``bench gpu``).

``--sweep`` turns either into a sweep: throughput against the worker count and against the batch size, printed
as a table and drawn as a PNG (``bench/extract_sweep.py``, ``bench/train_sweep.py``).
"""

from __future__ import annotations

from mmfuse.commands import Commands


def add_bench(commands: Commands) -> None:
    from bench.claims import add_arguments as add_claims_arguments
    from bench.extract import add_arguments as add_extract_arguments
    from bench.gpu import add_arguments as add_gpu_arguments
    from bench.models import add_arguments as add_models_arguments
    from bench.train import add_arguments as add_train_arguments

    kinds = commands.group(
        "bench",
        dest="bench",
        metavar="KIND",
        help="throughput benchmarks (extraction, streaming training)",
        description="Measure mmfuse against the naive way on this machine; every figure is printed with the "
        "command that made it, and --out BENCHMARKS.md records it. --sweep measures throughput against the "
        "number of workers and the batch size instead, and plots it (PNG under docs/bench/ beside --out).",
    )
    add_extract_arguments(
        kinds.add(
            "extract", help="extraction: pipeline vs naive per-clip loop vs ceilings (--sweep: vs workers, batch)"
        )
    )
    add_train_arguments(
        kinds.add(
            "train", help="training: streaming vs in-memory, frozen vs end to end, DDP (--sweep: vs workers, batch)"
        )
    )
    add_claims_arguments(
        kinds.add("claims", help="each seed method's claim on a task built for it: effect, p, verdict")
    )
    add_models_arguments(
        kinds.add("models", help="every fusion model on your shards: selected on valid, test mean ± std")
    )
    add_gpu_arguments(kinds.add("gpu", help="the timed half of make gpu-check: training steps and extraction on CUDA"))
