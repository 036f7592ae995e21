"""Typed training settings: dataclass defaults <- the model's YAML preset <- ``--config FILE`` <- ``key=value``.

YAML files hold overrides only. Keys of the fusion model's own ``Config`` (``fusion.MODELS[name].Config``:
hidden, num_layers, beta, ...) go under ``model_settings`` in YAML, or as ``model.KEY=VALUE`` on the command
line. Every problem (unknown key, bad value) is collected and reported at once, naming the key. Runs record the
settings by dotted key (``optim.lr``, ``model.hidden``: :mod:`train.config_record`). Importing this module loads
no model and no pipeline: the functions that check a model's settings import the model registry (``fusion``).

Targets come from each sample's meta.json ``labels``: ``label_key`` names one key for regression and
classification (``label``, MMSA's sentiment score, by default), and one or more keys for ``task=multilabel``,
comma-separated on the command line (``label_key=neutral,happy,sad,angry``) or as a string or a list in YAML.
Multilabel targets are the (K,) 0/1 vectors of those keys in the order given, and ``num_classes`` is K: it
is filled in when not given, and a different value is reported.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmfuse.errors import MmfuseError
from mmfuse.settings import (
    NOT_A_SETTING,
    as_dotted_dict,
    build,
    canonical,
    coerce,
    flatten,
    parse_override,
    quoted,
    read_yaml,
    repeated_settings,
)
from shards.schema import MODALITIES
from train.config_record import read_record, split_model_settings, write_record
from train.errors import DataError

PRESETS = Path(__file__).resolve().parent / "configs"
MODES = ("frozen", "end_to_end")
AMP = ("auto", "off", "bf16", "fp16")
SCHEDULES = ("cosine", "linear", "constant")
SELECTIONS = ("valid", "last")
MAX_SEED = 2**32 - 1  # numpy's seeding range; torch's is wider


class TrainConfigError(MmfuseError, ValueError):
    """Invalid training settings; the message names every bad key and the valid ones."""


def label_keys(label_key: str) -> tuple[str, ...]:
    """The keys named by a ``label_key`` setting, in order: ``"neutral, happy"`` -> ("neutral", "happy")."""
    return tuple(k.strip() for k in label_key.split(","))


@dataclass
class DataConfig:
    """How batches are streamed; the defaults suit frozen-feature training. It is also the ``data`` section of
    ``TrainConfig``, where the fields marked ``NOT_A_SETTING`` are derived (``raw`` from the mode, ``multilabel``
    from the task, ``seed`` from the run's seed) or internal to the loader."""

    batch_size: int = 32  # samples per batch, per rank
    num_workers: int = 2  # DataLoader worker processes per rank (0 = read in the training process)
    shuffle_buffer: int = 256  # samples held by each worker's shuffle buffer (training); memory grows with it
    modalities: tuple[str, ...] = MODALITIES  # modalities to load; others are dropped right after validation
    # key of meta.json's labels used as the target ("label": MMSA sentiment); multilabel targets take several,
    # comma-separated ("neutral,happy,sad,angry"), each a 0/1 or boolean label
    label_key: str = "label"  # the meta.json label to train on; multilabel: comma-separated keys
    skip_bad_samples: bool = False  # count and log samples failing decode/validation instead of raising
    align_words: bool = False  # average audio / video frames per word of the manifest's timings (train/align.py)
    raw: bool = field(default=False, metadata=NOT_A_SETTING)  # also yield text_ids / audio_wave (end to end)
    multilabel: bool = field(default=False, metadata=NOT_A_SETTING)  # labels (B, K) 0/1, a column per key
    seed: int = field(default=0, metadata=NOT_A_SETTING)  # shuffles depend only on (seed, epoch, rank, worker)
    normalise: bool = field(default=True, metadata=NOT_A_SETTING)  # standardise with dataset.json's train stats
    drop_last: bool = field(default=True, metadata=NOT_A_SETTING)  # training: drop the last partial batch
    equalise: bool = field(default=True, metadata=NOT_A_SETTING)  # training: as many batches on every rank
    video_geom: bool | None = field(default=None, metadata=NOT_A_SETTING)  # the 4 geometry features; None: if stored
    prefetch_factor: int = field(default=2, metadata=NOT_A_SETTING)  # batches each worker prepares ahead
    # page-locked batches for non-blocking copies to a GPU; None: when CUDA is available (off on CPU)
    pin_memory: bool | None = field(default=None, metadata=NOT_A_SETTING)
    # end to end: the text encoder's vocabulary size, which every sample's text_ids must stay below (None: unchecked)
    text_vocab: int | None = field(default=None, metadata=NOT_A_SETTING)
    # keep the DataLoader workers from one epoch (one evaluation) to the next (train/workers.py)
    persistent_workers: bool = field(default=True, metadata=NOT_A_SETTING)

    def problems(self) -> list[str]:
        """Every invalid setting, each naming its key."""
        problems = []
        if self.batch_size < 1:
            problems.append(f"batch_size: must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            problems.append(f"num_workers: must be >= 0, got {self.num_workers}")
        if self.shuffle_buffer < 1:
            problems.append(f"shuffle_buffer: must be >= 1, got {self.shuffle_buffer}")
        unknown = [m for m in self.modalities if m not in MODALITIES]
        if not self.modalities or unknown:
            problems.append(f"modalities: a non-empty subset of {list(MODALITIES)}, got {list(self.modalities)}")
        keys = label_keys(self.label_key)
        if not all(keys):
            problems.append(
                f"label_key: {self.label_key!r} has an empty key; name keys of meta.json's labels, comma-separated"
            )
        elif len(keys) > 1 and not self.multilabel:
            problems.append(f"label_key: {len(keys)} keys ({', '.join(keys)}) need multilabel=True")
        return problems

    def check(self) -> None:
        """Raise :class:`DataError` listing every invalid setting."""
        problems = self.problems()
        if problems:
            raise DataError("invalid data config: " + "; ".join(problems))


@dataclass
class OptimConfig:
    """How the network is optimised: AdamW groups, the learning-rate schedule, accumulation and clipping."""

    lr: float = 1e-3  # fusion model
    encoder_lr: float = 2e-5  # text / audio encoders in end-to-end mode
    weight_decay: float = 0.01  # AdamW's, on every weight but biases and norms
    schedule: str = "cosine"  # cosine | linear | constant, after warm-up
    warmup_steps: int = 0  # optimiser steps of linear warm-up from 0 to the learning rates
    grad_accum: int = 1  # micro-batches per optimiser step
    clip_norm: float = 1.0  # max gradient norm of each optimiser group, clipped on its own; 0 disables clipping

    def problems(self) -> list[str]:
        out = []
        if self.schedule not in SCHEDULES:
            out.append(f"schedule: must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.grad_accum < 1:
            out.append(f"grad_accum: must be >= 1, got {self.grad_accum}")
        if self.warmup_steps < 0:
            out.append(f"warmup_steps: must be >= 0, got {self.warmup_steps}")
        for name in ("lr", "encoder_lr"):
            if not getattr(self, name) > 0:
                out.append(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.clip_norm < 0 or self.weight_decay < 0:
            out.append("clip_norm and weight_decay must be >= 0")
        return out


@dataclass
class RunConfig:
    """How long the run lasts, what it records and where it runs."""

    epochs: int = 10  # passes over the train split
    max_steps: int = 0  # > 0: stop after this many optimiser steps
    eval_every: int = 1  # epochs between validation passes
    log_every: int = 10  # optimiser steps between training log lines
    checkpoint_every: int = 0  # optimiser steps between mid-epoch checkpoints (0: end of each epoch only)
    seed: int = 0  # initialisation, shuffling, dropout: a run is repeated by its seed
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "auto"  # auto (bf16 on CUDA when supported, off on CPU) | off | bf16 | fp16
    compile: bool = False  # torch.compile the fusion model
    # valid: the checkpoint with the best validation score (shards without a valid split are refused) |
    # last: the last step's checkpoint, for shards without a valid split
    selection: str = "valid"

    def problems(self) -> list[str]:
        out = []
        for name in ("epochs", "eval_every", "log_every"):
            if getattr(self, name) < 1:
                out.append(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "checkpoint_every"):
            if getattr(self, name) < 0:
                out.append(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.amp not in AMP:
            out.append(f"amp: must be one of {', '.join(AMP)}, got {self.amp!r}")
        if self.selection not in SELECTIONS:
            out.append(f"selection: must be one of {', '.join(SELECTIONS)}, got {self.selection!r}")
        if not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            out.append(f"device: {self.device!r} must be auto, cpu, cuda or cuda:N")
        if not 0 <= self.seed <= MAX_SEED:
            out.append(f"seed: must be an integer in [0, {MAX_SEED}], got {quoted(self.seed)}")
        return out


def parse_seeds(text: str) -> list[int]:
    """``--seeds 1,2,3`` -> [1, 2, 3]; one TrainConfigError for anything else, every seed checked before any run
    starts (integers in [0, MAX_SEED], no repeats)."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError as exc:
        raise TrainConfigError(f"--seeds {quoted(text)}: give comma-separated integers, e.g. 1,2,3") from exc
    if not seeds:
        raise TrainConfigError("--seeds: give at least one seed")
    bad = [s for s in seeds if not 0 <= s <= MAX_SEED]
    if bad:
        raise TrainConfigError(f"--seeds: every seed must be in [0, {MAX_SEED}], got {quoted(bad)}")
    if len(set(seeds)) != len(seeds):
        raise TrainConfigError(f"--seeds {quoted(text)}: a seed is repeated")
    return seeds


@dataclass
class TrainConfig:
    """Every setting of ``mmfuse train``, in sections: what is trained (here), ``data`` (a :class:`DataConfig`,
    handed to the loaders as it is), ``optim`` and ``run``. A setting is given by its name alone (``lr=1e-3``,
    ``batch_size=8``) or with its section (``optim.lr=1e-3``); config.json records it with its section. Documented
    defaults; presets and flags override them."""

    model: str = "late"  # a name in fusion.MODELS
    model_settings: dict[str, Any] = field(default_factory=dict)  # overrides of the model's Config
    mode: str = "frozen"  # frozen: features from the shards | end_to_end: text ids / waveform through the encoders
    task: str = "regression"  # regression | classification | multilabel
    num_classes: int = 1  # classes (classification); multilabel: the number of label keys, filled in when not given
    grad_checkpointing: bool = False  # encoders, end-to-end mode
    unfreeze_top_k: int = -1  # end-to-end: train only the top k encoder layers (-1 all, 0 none)
    unfreeze_after: int = 0  # end-to-end: encoders stay frozen for this many optimiser steps
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        """What the data section derives from the rest: raw inputs in end-to-end mode, (B, K) labels for
        multilabel tasks, and the run's seed for every shuffle."""
        self.data = dataclasses.replace(
            self.data, raw=self.mode == "end_to_end", multilabel=self.task == "multilabel", seed=self.run.seed
        )

    def problems(self) -> list[str]:
        import fusion

        out = []
        if self.model not in fusion.MODELS:
            out.append(f"model: unknown {self.model!r}; valid models: {', '.join(sorted(fusion.MODELS))}")
        if self.mode not in MODES:
            out.append(f"mode: must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.unfreeze_after < 0:
            out.append(f"unfreeze_after: must be >= 0, got {self.unfreeze_after}")
        labels = self._label_problems()
        out += labels + [p for p in self.data.problems() if not (labels and p.startswith("label_key"))]
        out += self.optim.problems() + self.run.problems()
        if self.model in fusion.MODELS:
            known = {f.name for f in dataclasses.fields(fusion.MODELS[self.model].Config)}
            shared = {"dims", "task", "num_classes"}  # set from the shards and the task, not here
            valid = ", ".join(sorted(known - shared))
            for key in sorted(set(self.model_settings) - (known - shared)):
                hint = " (set it at the top level)" if key in shared else ""
                out.append(f"model.{key}: not a setting of {self.model}{hint}; valid: {valid}")
        return out

    @property
    def label_keys(self) -> tuple[str, ...]:
        """The keys of ``label_key``, in order: ("label",), or e.g. ("neutral", "happy", "sad", "angry")."""
        return label_keys(self.data.label_key)

    def _label_problems(self) -> list[str]:
        keys = self.label_keys
        if any(not k for k in keys):
            return []  # the data section reports it
        twice = sorted({k for k in keys if keys.count(k) > 1})
        if twice:
            return [f"label_key: {', '.join(twice)} named more than once in {self.data.label_key!r}"]
        if self.task in ("regression", "classification") and len(keys) > 1:
            return [
                f"label_key: task={self.task} takes one label key, got {len(keys)} ({', '.join(keys)}); "
                "use task=multilabel to train on several 0/1 labels"
            ]
        if self.task == "multilabel" and self.num_classes != len(keys):
            return [
                f"num_classes: {self.num_classes} differs from the {len(keys)} label key(s) of label_key "
                f"({', '.join(keys)}); with task=multilabel num_classes is the number of label keys: leave it out "
                f"or set it to {len(keys)}"
            ]
        return []

    def model_kwargs(self, dims: dict[str, int]) -> dict[str, Any]:
        """Settings for ``fusion.build_model``: the overrides plus dims and task from the data."""
        return {**self.model_settings, "dims": dims, "task": self.task, "num_classes": self.num_classes}

    def to_dict(self) -> dict[str, Any]:
        """The settings as config.json and checkpoints record them: one flat mapping of dotted key -> value
        (``optim.lr``, ``model.hidden``); :func:`make_train_config` reads it back as ``base``."""
        return write_record(as_dotted_dict(self))


def preset_path(model: str) -> Path:
    """The shipped YAML preset of a model (overrides only)."""
    return PRESETS / f"{model}.yaml"


def make_train_config(
    model: str | None = None,
    config_file: Path | str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    base: dict[str, Any] | None = None,
) -> TrainConfig:
    """Defaults <- ``base`` (a run's recorded config, in any form so far) <- the model's preset <- ``config_file``
    <- overrides. A file naming a setting twice is refused; within ``overrides`` (a list code composes) a later setting
    replaces an earlier one. The command line refuses a setting typed twice first (:func:`refuse_repeated`)."""
    saved, settings = split_model_settings(read_record(base or {}))
    values: dict[str, Any] = canonical(saved, TrainConfig)
    layers: list[dict[str, Any]] = []
    name = model or values.get("model") or "late"
    if preset_path(name).is_file() and base is None:
        layers.append(read_yaml(preset_path(name), TrainConfigError))
    if config_file is not None:
        layers.append(read_yaml(config_file, TrainConfigError))
    cli: dict[str, Any] = {"model_settings": {}}
    repeated = [p for layer in layers for p in repeated_settings(flatten(layer, TrainConfig), TrainConfig)]
    for token in overrides:
        key, value = parse_override(token, TrainConfigError)
        if key.startswith("model."):
            cli["model_settings"][key[len("model.") :]] = value
        else:
            cli[key] = value
    layers.append(cli)
    for layer in layers:
        layer = canonical(layer, TrainConfig)
        settings.update(layer.pop("model_settings", {}) or {})
        values.update(layer)
    if model is not None:
        values["model"] = model
    _label_settings(values)
    values["model_settings"], problems = _model_settings(str(values.get("model", "late")), settings)
    # every problem at once: unknown keys, unreadable values, the model's settings and values out of range
    problems = repeated + problems
    return build(TrainConfig, [values], TrainConfigError, "training settings", TrainConfig.problems, problems)


def refuse_repeated(overrides: list[str] | tuple[str, ...]) -> None:
    """Refuse command-line overrides that name a setting twice (``epochs=3 epochs=5``, or ``lr`` with ``optim.lr``):
    which value was meant is not known. Raises :class:`TrainConfigError` naming each."""
    problems = repeated_settings([parse_override(token, TrainConfigError)[0] for token in overrides], TrainConfig)
    if problems:
        raise TrainConfigError("invalid training settings:\n  " + "\n  ".join(problems))


def _model_settings(model: str, settings: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The model's settings read by the types of its ``Config`` fields (``model.beta=1e-3`` is a float), and
    the problems found; keys that are not fields are left to :meth:`TrainConfig.problems`."""
    import fusion

    if model not in fusion.MODELS:
        return settings, []
    hints = typing.get_type_hints(fusion.MODELS[model].Config)
    out, problems = dict(settings), []
    for key, value in settings.items():
        if key in hints:
            try:
                out[key] = coerce(hints[key], value)
            except ValueError as exc:
                if "unsupported type" not in str(exc):
                    problems.append(f"model.{key}: {exc}")
    return out, problems


def _label_settings(values: dict[str, Any]) -> None:
    """In place: ``label_key`` as recorded in config.json and checkpoints, "a,b,c" (a YAML list joined, spaces
    around keys dropped); with ``task=multilabel`` and no ``num_classes`` given, the number of keys."""
    if "label_key" in values:
        raw = values["label_key"]
        joined = ",".join(map(str, raw)) if isinstance(raw, (list, tuple)) else str(raw)
        values["label_key"] = ",".join(label_keys(joined))
    if values.get("task") == "multilabel" and "num_classes" not in values:
        values["num_classes"] = len(label_keys(values.get("label_key", DataConfig.label_key)))


def check_model_settings(config: TrainConfig, dims: dict[str, int]) -> None:
    """Build-time validation of the model settings against the data's dims (raises TrainConfigError)."""
    import fusion

    try:
        fusion.make_config(fusion.MODELS[config.model].Config, config.model_kwargs(dims))
    except fusion.FusionConfigError as exc:
        raise TrainConfigError(f"model settings: {exc}") from exc


# Settings a resumed run may change. They decide how long the run goes on, what it records and where it runs,
# not what a step computes: a step after the change is the step an uninterrupted run with the new value takes.
# epochs and max_steps lengthen or shorten the run (the learning-rate schedule then spans the new length from the
# step reached); log_every, eval_every and checkpoint_every only change what is written when; num_workers only how
# the same batches are read; device the hardware (the RNG streams are restored on it); skip_bad_samples only
# whether a corrupt sample stops the run. Everything else (lr, batch_size, seed, the model, amp, ...) would
# silently be overridden by the checkpoint (the optimiser's learning rates) or break the identity of the resumed
# run with an uninterrupted one (the batches, the numerics): a new run is the way to change it.
RESUMABLE = ("run.epochs", "run.max_steps", "run.log_every", "run.eval_every", "run.checkpoint_every")
RESUMABLE += ("data.num_workers", "run.device", "data.skip_bad_samples")


def resume_changes(saved: dict[str, Any], config: TrainConfig) -> dict[str, dict[str, Any]]:
    """The settings ``config`` changes from ``saved`` (a checkpoint's config, in any form recorded so far), as
    ``{key: {"from", "to"}}`` by the dotted keys config.json records; ``TrainConfigError`` naming every changed key
    outside ``RESUMABLE``."""
    old = make_train_config(saved.get("model"), None, [], base=saved).to_dict()
    new = config.to_dict()
    keys = sorted(set(old) | set(new))
    changes = {k: {"from": old.get(k), "to": new.get(k)} for k in keys if old.get(k) != new.get(k)}
    refused = [f"{k}: {v['from']!r} -> {v['to']!r}" for k, v in changes.items() if k not in RESUMABLE]
    if refused:
        raise TrainConfigError(
            "--resume: the run was trained with other settings; a resumed run may change only "
            f"{', '.join(RESUMABLE)}. Changed: {'; '.join(refused)}. Resume with the run's settings "
            "(see its config.json), or start a new run in another --run-dir"
        )
    return changes
