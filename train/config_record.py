"""The training settings as config.json and checkpoints record them, and every form read back.

Written (:meth:`train.config.TrainConfig.to_dict`): one flat mapping with each setting under its dotted key, the
section first as on the command line (``data.modalities``, ``optim.lr``, ``run.epochs``; ``model``, ``mode``,
``task``... outside every section), and each setting of the fusion model as ``model.KEY`` (``model.hidden``). A
dotted key names the same setting whatever fields are added later.

Read (:func:`read_record`): that form, and the one written before it, which named every setting by its bare name
(``lr``, ``modalities``) and held the model's settings in the mapping ``model_settings``. A bare name is read by
the section it was in when such records were written (``BARE_NAMES``), not by today's sections, so a field added
later under the same name in another section leaves an old run readable (resume, eval, predict).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

MODEL = "model."  # the prefix of the fusion model's settings, as on the command line (model.hidden=24)

# Every bare name config.json and checkpoints recorded before the dotted keys, by the section it was in then.
# Frozen: the record of a run written before the dotted keys holds these names and no other.
_BARE_SECTIONS = {
    "": ("model", "mode", "task", "num_classes", "grad_checkpointing", "unfreeze_top_k", "unfreeze_after"),
    "data": (
        *("batch_size", "num_workers", "shuffle_buffer", "modalities", "label_key", "skip_bad_samples"),
        "align_words",
    ),
    "optim": ("lr", "encoder_lr", "weight_decay", "schedule", "warmup_steps", "grad_accum", "clip_norm"),
    "run": (
        *("epochs", "max_steps", "eval_every", "log_every", "checkpoint_every", "seed", "device", "amp", "compile"),
        "selection",
    ),
}
BARE_NAMES = {n: f"{section}.{n}" if section else n for section, names in _BARE_SECTIONS.items() for n in names}


def write_record(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` by dotted key with the model's as the mapping ``model_settings`` (what
    :func:`mmfuse.settings.as_dotted_dict` gives for a ``TrainConfig``) as recorded: the model's as ``model.KEY``."""
    out: dict[str, Any] = {}
    for key, value in settings.items():
        if key == "model_settings":
            out.update({f"{MODEL}{name}": v for name, v in (value or {}).items()})
        else:
            out[key] = value
    return out


def read_record(saved: Mapping[str, Any]) -> dict[str, Any]:
    """The settings of a config.json or a checkpoint, in any form recorded so far, as :func:`write_record` writes
    them now. Keys that name no setting are kept, for the reader of the settings to report."""
    out: dict[str, Any] = {}
    for key, value in saved.items():
        if key == "model_settings" and isinstance(value, Mapping):
            out.update({f"{MODEL}{name}": v for name, v in value.items()})
        else:
            out[BARE_NAMES.get(key, key)] = value
    return out


def split_model_settings(record: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A record in the form :func:`read_record` gives, as (its other settings, the fusion model's by their own
    names): ``{"optim.lr": 1e-3, "model.hidden": 24}`` -> ``({"optim.lr": 1e-3}, {"hidden": 24})``."""
    others = {key: value for key, value in record.items() if not key.startswith(MODEL)}
    return others, {key[len(MODEL) :]: value for key, value in record.items() if key.startswith(MODEL)}
