"""Typed extraction settings: dataclass defaults, a YAML file of overrides, then the command line's flags and
``KEY=VALUE`` settings."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from extract.auto import choose, encoder_threads, usable_cores
from extract.errors import ConfigError
from extract.models import DEFAULT_AUDIO_MODEL, DEFAULT_TEXT_MODEL
from mmfuse.settings import NOT_A_SETTING, build, parse_override, quoted, read_yaml, repeated_settings
from shards.dataset_fields import MAX_DURATION_S, MAX_FPS
from shards.schema import MODALITIES


@dataclass
class ExtractConfig:
    """Every setting of ``mmfuse extract``. YAML files and flags override these defaults."""

    text_model: str = DEFAULT_TEXT_MODEL  # BERT-family id or local path
    audio_model: str = DEFAULT_AUDIO_MODEL  # wav2vec2/HuBERT/WavLM id or path; random:NAME = seeded random init
    text_layer: int = -1  # hidden-state layer (-1: last)
    audio_layer: int = -1
    max_text_tokens: int = 512
    audio_chunk_s: float = 30.0  # long audio is encoded in windows of this length, in [1, MAX_AUDIO_CHUNK_S]
    fps: float | None = None  # None: native frame rate, capped at 30; else in (0, MAX_FPS = 240]
    shard_size: int = 256  # clips per shard
    workers: int | None = None  # decode + FaceMesh processes (0: inline; None = auto: chosen by extract.auto)
    batch_size: int | None = None  # clips per encoder batch (None = auto: chosen by extract.auto)
    device: str = "cpu"
    precision: str | None = None  # text and audio encoders: fp32, bf16 or fp16 (None = auto: fp32 on CPU, else bf16)
    modalities: tuple[str, ...] = MODALITIES
    raw: bool = True  # store audio_wave.npy for end-to-end fine-tuning
    max_duration_s: float = 3600.0  # longer clips are skipped with a recorded status; in (0, MAX_DURATION_S = 86400]
    max_faces: int = 1  # FaceMesh faces per frame; the largest is kept
    min_detection_confidence: float = 0.5  # in [0, 1]
    threads: int | None = None  # torch intra-op threads in the encoder process (None: the cores workers leave)
    asr: str | None = None  # local Whisper checkpoint: transcribe clips whose manifest text is empty
    asr_language: str | None = None  # Whisper language code or name for the ASR model (None: detect per window)
    rank: int = 0
    world_size: int = 1
    overwrite: bool = False
    # Which of workers, batch_size, threads and precision were chosen automatically, and from what (extract.auto).
    auto: tuple[str, ...] = field(default=(), metadata=NOT_A_SETTING)
    auto_reason: str = field(default="", metadata=NOT_A_SETTING)

    def validate(self) -> ExtractConfig:
        """``self`` with ``workers``, ``batch_size`` and ``threads`` left to auto filled in, or
        :class:`ConfigError` listing every problem of :meth:`problems`."""
        problems = self.problems()
        if problems:
            raise ConfigError("invalid extraction settings:\n  " + "\n  ".join(problems))
        cores = usable_cores()
        workers, batch_size, reason = choose(self.device, cores, self.modalities)
        self.auto_reason = self.auto_reason or reason
        if self.workers is None or self.batch_size is None:
            self.auto += tuple(n for n in ("workers", "batch_size") if getattr(self, n) is None)
            self.workers = workers if self.workers is None else self.workers
            self.batch_size = batch_size if self.batch_size is None else self.batch_size
        if self.threads is None and not os.environ.get("OMP_NUM_THREADS"):  # else torch follows OMP_NUM_THREADS
            self.threads = encoder_threads(cores, self.workers)
            self.auto += ("threads",)
        return self

    def problems(self) -> list[str]:
        """What is wrong with these values (ranges, choices, settings that need each other), one line each."""
        problems = []
        unknown = sorted(set(self.modalities) - set(MODALITIES))
        if unknown or not self.modalities:
            problems.append(f"modalities: {list(self.modalities)} must be a non-empty subset of {list(MODALITIES)}")
        for name in ("shard_size", "batch_size", "max_text_tokens", "max_faces", "world_size", "threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                problems.append(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.workers is not None and self.workers < 0:
            problems.append(f"workers: must be >= 0 or auto, got {self.workers}")
        if self.precision is not None and self.precision not in PRECISIONS:
            problems.append(f"precision: {self.precision!r} must be one of {', '.join(PRECISIONS)} or auto")
        if not 0 <= self.rank < self.world_size:
            problems.append(f"rank: {self.rank} must be in [0, world_size={self.world_size})")
        problems += [p for p in map(self._range_problem, RANGES) if p]
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            problems.append(f"device: {self.device!r} must be cpu, cuda or cuda:N")
        return problems + self._asr_problems()

    def _range_problem(self, name: str) -> str | None:
        """Why setting ``name`` (a number) is outside its bounds in :data:`RANGES` (NaN included), or None."""
        value = getattr(self, name)
        low, high, open_low = RANGES[name]
        if value is None and name == "fps":
            return None
        inside = low < value <= high if open_low else low <= value <= high  # False for NaN
        if inside:
            return None
        return f"{name}: must be {'>' if open_low else '>='} {low:g} and <= {high:g}, got {quoted(value)}"

    def _asr_problems(self) -> list[str]:
        if self.asr is None:
            return ["asr_language: set, but asr (the Whisper checkpoint) is not"] if self.asr_language else []
        problems = []
        if not self.asr.strip():
            problems.append("asr: empty path; give the directory of a local Whisper checkpoint")
        if "text" not in self.modalities:
            problems.append(f"asr: transcripts feed the text modality, which modalities {list(self.modalities)} omit")
        if "audio" not in self.modalities:
            problems.append(
                f"asr: no audio to transcribe with modalities {list(self.modalities)}; add audio "
                "(e.g. --modalities text,audio or text,audio,video)"
            )
        return problems


def make_config(yaml_path: Path | str | None = None, settings: Sequence[str] = (), **overrides: Any) -> ExtractConfig:
    """Defaults <- YAML overrides <- the command line: keyword overrides (its flags; ``None`` values are ignored)
    and ``settings``, ``KEY=VALUE`` tokens naming any field (``max_faces=2 audio_chunk_s=20``), as ``mmfuse
    train`` takes them. A setting given twice on the command line (two tokens, or a flag and a token) is refused,
    since which value was meant is not known. All problems are reported at once (unknown keys, unreadable values
    and values out of range together). Values are read as :mod:`mmfuse.settings` reads every setting (``1e-3``,
    ``yes``, ``text,audio``); ``auto`` for workers, batch_size or precision is their default (chosen from the
    machine)."""
    layers = [read_yaml(yaml_path, ConfigError)] if yaml_path is not None else []
    flags = {k: v for k, v in overrides.items() if v is not None}
    tokens = [parse_override(token, ConfigError) for token in settings]
    repeated = repeated_settings([*flags, *(key for key, _ in tokens)], ExtractConfig)
    if repeated:
        raise ConfigError("invalid extraction settings:\n  " + "\n  ".join(repeated))
    layers.append({**flags, **dict(tokens)})
    layers = [{k: None if k in AUTO_KEYS and _is_auto(v) else v for k, v in layer.items()} for layer in layers]
    return build(ExtractConfig, layers, ConfigError, "extraction settings", checks=ExtractConfig.problems).validate()


PRECISIONS = ("fp32", "bf16", "fp16")
MAX_AUDIO_CHUNK_S = 600.0  # an encoder window of 10 minutes: attention over 30,000 wav2vec 2.0 frames at most
# Numeric settings: (low, high, low excluded). The frame rate and clip length bounds are those dataset.json may
# record (shards.dataset_fields), since readers size the caps on every shard member from them.
RANGES = {
    "fps": (0.0, MAX_FPS, True),
    "max_duration_s": (0.0, MAX_DURATION_S, True),
    "audio_chunk_s": (1.0, MAX_AUDIO_CHUNK_S, False),
    "min_detection_confidence": (0.0, 1.0, False),
}
AUTO_KEYS = ("workers", "batch_size", "precision")  # settings whose default is chosen from the machine


def _is_auto(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower() == "auto"


def rank_from_env(env: dict[str, str] | None = None) -> tuple[int, int]:
    """``(rank, world_size)`` from torchrun (RANK/WORLD_SIZE) or SLURM (array task or job step), else (0, 1).

    An array task's rank counts from the array's first index in its steps (``--array=1-8`` and
    ``--array=0-14:2`` both give ranks 0..7), so any array of N tasks splits the plan N ways."""
    env = dict(os.environ if env is None else env)
    for r, w in (
        ("RANK", "WORLD_SIZE"),
        ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"),
        ("SLURM_PROCID", "SLURM_NTASKS"),
    ):
        if r in env and w in env:
            try:
                rank, world = int(env[r]), int(env[w])
                if r == "SLURM_ARRAY_TASK_ID":
                    first, step = int(env.get("SLURM_ARRAY_TASK_MIN", 0)), int(env.get("SLURM_ARRAY_TASK_STEP", 1))
                    rank = (rank - first) // max(step, 1)
            except ValueError:
                raise ConfigError(f"{r}={env[r]!r} / {w}={env[w]!r} are not integers") from None
            return rank, world
    return 0, 1


def local_device(device: str, env: dict[str, str] | None = None) -> str:
    """``cuda`` without an index under torchrun (LOCAL_RANK set) -> ``cuda:{LOCAL_RANK % device_count}``, so
    each rank of a node uses its own GPU; anything else is returned as given."""
    env = dict(os.environ if env is None else env)
    if device != "cuda" or "LOCAL_RANK" not in env:
        return device
    import torch

    count = torch.cuda.device_count()
    if count < 1:
        return device  # the CUDA check of run_extract reports it
    try:
        return f"cuda:{int(env['LOCAL_RANK']) % count}"
    except ValueError:
        raise ConfigError(f"LOCAL_RANK={env['LOCAL_RANK']!r} is not an integer") from None
