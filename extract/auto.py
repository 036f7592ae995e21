"""``--workers auto`` and ``--batch-size auto`` (the defaults), and the encoder's threads: what the machine's
sweeps found fastest, chosen from the device, the usable cores and the modalities (BENCHMARKS.md, "Extraction
defaults").

- CPU with audio or video: encoder batches of 2. The sweep on 2 cores: batch 1 and 2 beat 4, 8 and 16 by 12-20%
  (wav2vec 2.0 is the bottleneck and padding costs more than batching saves). One decode + FaceMesh worker
  per core but one (cores - 1): on 2 quiet cores 1 worker took 11.95 s against 16.33 s inline (0 workers)
  and 13.36 s with 2, for the same CPU-seconds (BENCHMARKS.md, "Extraction defaults"); FaceMesh and decoding
  are half the CPU work and run beside the encoders. One core: no worker (nothing to overlap with, and a
  worker costs its start-up). Audio without video: at most 2 workers (decoding alone is about a fifth of
  the CPU work).
- CPU, text only: no worker (there is nothing to decode; no pool is started) and batches of 16
  length-sorted transcripts, as a plain batched loop over the same model uses.
- CUDA: batches of 32 (audio batches are then sized by padded samples, 32 typical clips' worth:
  ``extract.extractors.audio.batch_plan``), and every other core decodes and runs FaceMesh for the GPU.

- Threads: the encoder process's torch threads are the cores the workers leave (at least one), unless
  ``threads`` or ``OMP_NUM_THREADS`` says otherwise: torch's default (every core) made the encoder and
  FaceMesh fight over the same cores.

None of these choices changes a feature beyond float rounding (torch's sums over another thread count round
differently, as on another machine): a clip's features do not depend on its batch mates or on the process that
decoded it, and the feature set records neither.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

CPU_MEDIA_BATCH = 2
CPU_TEXT_BATCH = 16
CUDA_BATCH = 32


def usable_cores() -> int:
    """Cores this process may run on (``os.sched_getaffinity``: a container's or ``taskset``'s limit), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


def choose(device: str, cpu_count: int, modalities: Sequence[str]) -> tuple[int, int, str]:
    """``(workers, batch_size, reason)`` for extracting ``modalities`` on ``device`` with ``cpu_count`` cores;
    ``reason`` is what the choice was made from, e.g. ``"2 CPU cores, cpu"``."""
    cores = max(1, int(cpu_count))
    media = any(m in modalities for m in ("audio", "video"))
    cuda = str(device).startswith("cuda")
    reason = f"{cores} CPU core{'s' if cores != 1 else ''}, {device}" + ("" if media else ", text only")
    if not media:
        return 0, CUDA_BATCH if cuda else CPU_TEXT_BATCH, reason
    if cuda:
        workers = max(1, cores - 1)
    else:  # without video a worker only decodes audio, which is cheap next to wav2vec 2.0 on a CPU
        workers = cores - 1 if "video" in modalities else min(2, cores - 1)
    return workers, CUDA_BATCH if cuda else CPU_MEDIA_BATCH, reason


def encoder_threads(cpu_count: int, workers: int) -> int:
    """Torch intra-op threads of the encoder process: the cores the decode workers leave, at least one.

    Torch's own default is every core, which the workers' FaceMesh also wants: on 2 cores with 1 worker, the
    pipeline with 2 encoder threads was 0.99× as fast as a naive loop on 2 threads, and with 1 thread 1.17×
    (BENCHMARKS.md, "Extraction defaults")."""
    return max(1, int(cpu_count) - workers)


ALL_AUTO = ("workers", "batch_size", "threads", "precision")


def describe(
    workers: int, batch_size: int, precision: str | None, auto: Sequence[str], reason: str, threads: int | None = None
) -> str:
    """The one line ``mmfuse extract`` logs about the settings in use, e.g.
    ``workers=1 batch_size=2 threads=1 precision=fp32 (auto: 2 CPU cores, cpu)``."""
    line = f"workers={workers} batch_size={batch_size}" + (f" threads={threads}" if threads else "")
    line += f" precision={precision}" if precision else ""
    if not auto:
        return line + " (as given)"
    chosen = "" if set(auto) >= set(ALL_AUTO) else ", ".join(auto) + " "
    return f"{line} ({chosen}auto: {reason})"


def resolve_precision(asked: str | None, device: str) -> str:
    """The encoder precision to use: ``asked`` when given, else fp32 on CPU and, on CUDA, bf16 where the GPU
    computes it natively (not emulated), else fp16."""
    if asked is not None:
        return asked
    if not str(device).startswith("cuda"):
        return "fp32"
    import torch

    try:
        native = torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch before 2.3 has no including_emulation (and reports native support only)
        native = torch.cuda.is_bf16_supported()
    return "bf16" if native else "fp16"
