"""Typed extraction settings: dataclass defaults, a YAML file of overrides, then the command line's flags and
``KEY=VALUE`` settings.

The general settings are :class:`ExtractConfig`'s fields; each registered extractor's own are a section named by
its registry name, declared once by its ``Settings`` dataclass in its module (``text: {model, layer,
max_tokens}``, ``facemesh: {max_faces, min_detection_confidence}``, ``asr: {model, language}``). Settings left to
``auto`` are chosen once, by :func:`resolved`, into a new config."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, make_dataclass
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

from extract.auto import choose, encoder_threads, resolve_precision, usable_cores
from extract.errors import ConfigError
from extract.extractors.base import range_problem, section_name
from extract.registry import EXTRACTORS, default_extractor
from mmfuse.settings import NOT_A_SETTING, build, leaf_paths, parse_override, read_yaml, repeated_settings
from shards.dataset_fields import MAX_DURATION_S, MAX_FPS
from shards.schema import MODALITIES


@dataclass
class Extractors:
    """Which registered extractor (``extract.EXTRACTORS``) fills each modality: ``extractors.video=NAME``. By
    default the one registered for it, or ``DEFAULT_EXTRACTORS``'s when several are."""

    text: str = field(default_factory=partial(default_extractor, "text"))
    audio: str = field(default_factory=partial(default_extractor, "audio"))
    video: str = field(default_factory=partial(default_extractor, "video"))
    DOTTED_ONLY: ClassVar[bool] = True  # extractors.text, never a bare text (the text extractor's section)


@dataclass
class ExtractConfig:
    """Every general setting of ``mmfuse extract``, and which extractor fills each modality. The settings read by
    :func:`make_config` are a subclass of it (:func:`config_class`) with one more section per registered
    extractor, named by its registry name, whose fields are its ``Settings`` (``text.model``,
    ``facemesh.max_faces``); their older flat names (``text_model``, ``max_faces``) are read, and give the value,
    as well. YAML files and the command line override these defaults."""

    fps: float | None = None  # None: native frame rate, capped at 30; else in (0, MAX_FPS = 240]
    shard_size: int = 256  # clips per shard
    workers: int | None = None  # decode + FaceMesh processes (0: inline; None = auto: chosen by extract.auto)
    batch_size: int | None = None  # clips per encoder batch (None = auto: chosen by extract.auto)
    device: str = "cpu"  # cpu | cuda | cuda:N: where the text and audio encoders run
    precision: str | None = None  # text and audio encoders: fp32, bf16 or fp16 (None = auto: fp32 on CPU, else bf16)
    modalities: tuple[str, ...] = MODALITIES  # which to extract (comma-separated on the command line)
    raw: bool = True  # store audio_wave.npy for end-to-end fine-tuning
    max_duration_s: float = 3600.0  # longer clips are skipped with a recorded status; in (0, MAX_DURATION_S = 86400]
    threads: int | None = None  # torch intra-op threads in the encoder process (None: the cores workers leave)
    rank: int = 0  # this process's share of the manifest (with world_size; set by torchrun or --rank)
    world_size: int = 1  # processes sharing the manifest, each writing its own shards
    overwrite: bool = False  # start over in an output directory written with other settings
    extractors: Extractors = field(default_factory=Extractors)
    # Set by resolved(): which of workers, batch_size, threads and precision were chosen automatically, from what.
    auto: tuple[str, ...] = field(default=(), metadata=NOT_A_SETTING)
    auto_reason: str = field(default="", metadata=NOT_A_SETTING)
    resolved: bool = field(default=False, metadata=NOT_A_SETTING)

    def validate(self) -> ExtractConfig:
        """``self``, or :class:`ConfigError` listing every problem of :meth:`problems`."""
        problems = self.problems()
        if problems:
            raise ConfigError("invalid extraction settings:\n  " + "\n  ".join(problems))
        return self

    def problems(self) -> list[str]:
        """What is wrong with these values (ranges, choices, settings that need each other), one line each; the
        extractor sections' own (their ``Settings.problems``) included."""
        problems = []
        unknown = sorted(set(self.modalities) - set(MODALITIES))
        if unknown or not self.modalities:
            problems.append(f"modalities: {list(self.modalities)} must be a non-empty subset of {list(MODALITIES)}")
        for name in ("shard_size", "batch_size", "world_size", "threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                problems.append(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.workers is not None and self.workers < 0:
            problems.append(f"workers: must be >= 0 or auto, got {self.workers}")
        if self.precision is not None and self.precision not in PRECISIONS:
            problems.append(f"precision: {self.precision!r} must be one of {', '.join(PRECISIONS)} or auto")
        if not 0 <= self.rank < self.world_size:
            problems.append(f"rank: {self.rank} must be in [0, world_size={self.world_size})")
        if self.fps is not None:
            problems.append(range_problem("fps", self.fps, 0.0, MAX_FPS, open_low=True))
        problems.append(range_problem("max_duration_s", self.max_duration_s, 0.0, MAX_DURATION_S, open_low=True))
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            problems.append(f"device: {self.device!r} must be cpu, cuda or cuda:N")
        problems += self._choice_problems()
        for f in fields(self):
            if f.name not in GENERAL and hasattr(getattr(self, f.name), "problems"):
                problems += getattr(self, f.name).problems(self)
        return [p for p in problems if p]

    def _choice_problems(self) -> list[str]:
        """An ``extractors.<modality>`` naming no extractor registered for that modality."""
        problems = []
        for m in (m for m in MODALITIES if m in self.modalities):
            name, fits = getattr(self.extractors, m), sorted(k for k, e in EXTRACTORS.items() if e.modality == m)
            if name not in fits:
                what = "is not registered" if name not in EXTRACTORS else f"fills {EXTRACTORS[name].modality}"
                close = difflib.get_close_matches(name, fits, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                problems.append(f"extractors.{m}: {name!r} {what}{hint}; registered for {m}: {', '.join(fits)}")
        return problems

    def section(self, key: str) -> Any:
        """The settings of the extractor registered as ``key``: its ``Settings`` with the shared fields filled."""
        return EXTRACTORS[key].settings(self, key)

    def chosen(self, modality: str) -> str:
        """The registry name of the extractor that fills ``modality``."""
        return getattr(self.extractors, modality)

    def __getattr__(self, name: str) -> Any:
        """A section's setting by another of its names (``text_model`` or ``max_faces`` for ``text.model`` and
        ``facemesh.max_faces``), read only."""
        path = None if name.startswith("_") else leaf_paths(type(self)).get(name)
        if path is None or len(path) != 2:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(getattr(self, path[0]), path[1])

    def __reduce__(self) -> tuple:
        """Pickled by its sections' types and values (the class is made at run time, :func:`config_class`)."""
        sections = tuple((f.name, f.type) for f in fields(self) if f.name not in GENERAL)
        return _restore, (sections, {f.name: getattr(self, f.name) for f in fields(self)})


GENERAL = frozenset(f.name for f in fields(ExtractConfig))  # ExtractConfig's own fields: the rest are sections


def config_class() -> type[ExtractConfig]:
    """:class:`ExtractConfig` with one section per registered extractor (``extract.EXTRACTORS``), named by its
    registry name (``-`` read as ``_``), holding its ``Settings``: the type :func:`make_config` builds."""
    return _config_class(tuple((section_name(k), e.load().Settings) for k, e in EXTRACTORS.items()))


@functools.cache
def _config_class(sections: tuple[tuple[str, type], ...]) -> type[ExtractConfig]:
    clash = [name for name, _ in sections if name in GENERAL or not name.isidentifier()]
    if clash:
        raise ConfigError(f"extractors registered as {clash} clash with general settings; register them by other names")
    made = [(name, tp, field(default_factory=tp)) for name, tp in sections]
    return make_dataclass("ExtractConfig", made, bases=(ExtractConfig,), namespace={"__module__": __name__})


def _restore(sections: tuple[tuple[str, type], ...], values: dict[str, Any]) -> ExtractConfig:
    return _config_class(sections)(**values)


def make_config(yaml_path: Path | str | None = None, settings: Sequence[str] = (), **overrides: Any) -> ExtractConfig:
    """Defaults <- YAML overrides <- the command line: keyword overrides (its flags; ``None`` values are ignored)
    and ``settings``, ``KEY=VALUE`` tokens naming any setting (``facemesh.max_faces=2 audio.chunk_s=20``, or by
    an older flat name, ``max_faces=2 audio_chunk_s=20``), as ``mmfuse train`` takes them. A setting given twice
    on the command line (two tokens, a flag and a token, or two names of one setting) is refused, since which
    value was meant is not known. All problems are reported at once (unknown keys, unreadable values and values
    out of range together). Values are read as :mod:`mmfuse.settings` reads every setting (``1e-3``, ``yes``,
    ``text,audio``); ``auto`` for workers, batch_size or precision is their default, chosen from the machine by
    :func:`resolved` when extraction starts."""
    cls = config_class()
    layers = [read_yaml(yaml_path, ConfigError)] if yaml_path is not None else []
    flags = {k: v for k, v in overrides.items() if v is not None}
    tokens = [parse_override(token, ConfigError) for token in settings]
    repeated = repeated_settings([*flags, *(key for key, _ in tokens)], cls)
    if repeated:
        raise ConfigError("invalid extraction settings:\n  " + "\n  ".join(repeated))
    layers.append({**flags, **dict(tokens)})
    layers = [{k: None if k in AUTO_KEYS and _is_auto(v) else v for k, v in layer.items()} for layer in layers]
    return build(cls, layers, ConfigError, "extraction settings", checks=cls.problems).validate()


def resolved(cfg: ExtractConfig, precision: str | None = None) -> ExtractConfig:
    """A copy of ``cfg`` with every setting left to auto chosen (``cfg`` itself is not changed; a resolved one is
    returned as is): workers and batch_size by :func:`extract.auto.choose` from the device, the usable cores and
    the modalities, the encoder threads the cores the workers leave (unless OMP_NUM_THREADS is set: torch
    follows it), and the precision ``precision`` (the Ray engine's, asked of a cluster GPU) or, without it,
    :func:`extract.auto.resolve_precision`'s for the device. ``auto`` names those chosen, ``auto_reason`` what
    from."""
    if cfg.resolved:
        return cfg
    cores = usable_cores()
    workers, batch_size, reason = choose(cfg.device, cores, cfg.modalities)
    auto = [n for n in ("workers", "batch_size") if getattr(cfg, n) is None]
    workers = workers if cfg.workers is None else cfg.workers
    threads = cfg.threads
    if threads is None and not os.environ.get("OMP_NUM_THREADS"):  # else torch follows OMP_NUM_THREADS
        threads, auto = encoder_threads(cores, workers), [*auto, "threads"]
    if cfg.precision is None:
        auto.append("precision")
    return dataclasses.replace(
        cfg, workers=workers, batch_size=batch_size if cfg.batch_size is None else cfg.batch_size, threads=threads,
        precision=cfg.precision or precision or resolve_precision(None, cfg.device), auto=(*cfg.auto, *auto),
        auto_reason=cfg.auto_reason or reason, resolved=True,
    )  # fmt: skip


PRECISIONS = ("fp32", "bf16", "fp16")
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
