"""dataset.json's fields, type- and range-checked in one place, when it is read.

Every reader of a shard directory gets dataset.json through :func:`shards.dataset.load_dataset_json`, which lists
:func:`dataset_field_problems`: a field every reader needs that is missing or of the wrong type, a count that is
not a whole number in ``[0, 2**53]``, a width outside ``[1, 65536]``, a frame rate or clip duration outside the
bounds extraction accepts (:data:`MAX_FPS`, :data:`MAX_DURATION_S`), statistics that
are not finite, and any number in the feature set that is NaN or infinite. Each problem names the field and quotes
its value (cut to a bounded length), so a hand-edited or hostile file is one clear error instead of a traceback
further on (an overflow sizing a member cap, a string summed as a count). :class:`shards.guard.ShardLimits` checks
the two numbers it sizes member caps from with the same :class:`Range`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mmfuse.settings import quoted
from shards.contract import CONTRACT_KEY, step_width
from shards.schema import MEMBERS, MODALITIES, ROLES, SAMPLE_RATE, MemberSpec

# Bounds on what an extraction may be asked for and what dataset.json may record (extract.config checks the
# settings, this module the file): shard readers size their member caps from them.
MAX_DURATION_S = 86400.0  # the longest clip: a day; longer is a recording to cut into clips, not a clip
MAX_FPS = 240.0  # frames per second: slow-motion phone video; FaceMesh on every frame of more is no feature
# What every reader of a shard directory needs from dataset.json, with its type (numbers: see the ranges below).
DATASET_FIELDS = {"feature_set": dict, "feature_set_hash": str, "dims": dict, "counts": dict, "shards": list}
ENTRY_FIELDS = {"name": str, "split": str}
MAX_COUNT = 2**53  # samples, rows, bytes: integers every JSON reader keeps exact
MAX_DIM = 1 << 16  # a feature width


@dataclass(frozen=True)
class Range:
    """The numbers a field may hold: ``[low, high]`` (``(low, high]`` with ``open_low``), whole with ``integer``."""

    low: float
    high: float
    integer: bool = False
    open_low: bool = False

    def problem(self, value: Any, field: str) -> str | None:
        """Why ``value`` of ``field`` is not in this range (naming both), or None."""
        kind = "an integer" if self.integer else "a number"
        if isinstance(value, bool) or not isinstance(value, int if self.integer else (int, float)):
            return f"'{field}' is {quoted(value)}, not {kind}"
        if isinstance(value, float) and not math.isfinite(value):
            return f"'{field}' is {quoted(value)}, not a finite number"
        inside = self.low < value <= self.high if self.open_low else self.low <= value <= self.high
        if inside:
            return None
        if self.low == self.high:
            return f"'{field}' is {quoted(value)}; it must be {_plain(self.low)}"
        bounds = f"{'(' if self.open_low else '['}{_plain(self.low)}, {_plain(self.high)}]"
        return f"'{field}' is {quoted(value)}, outside {bounds}"


def _plain(bound: float) -> str:
    """A bound as written in a message: whole numbers without a fraction or an exponent."""
    return str(int(bound)) if float(bound).is_integer() else f"{bound:g}"


COUNT = Range(0, MAX_COUNT, integer=True)
WIDTH = Range(1, MAX_DIM, integer=True)
DURATION = Range(0, MAX_DURATION_S, open_low=True)
FPS = Range(0, MAX_FPS, open_low=True)
RATE = Range(SAMPLE_RATE, SAMPLE_RATE, integer=True)
# Optional numbers of dataset.json itself, and of its feature set (fps may also be a text such as "native").
TOP_NUMBERS = {"samples": COUNT, "max_duration_s": DURATION}
FEATURE_SET_NUMBERS = {"sample_rate": RATE, "fps": FPS}


def dataset_field_problems(obj: Any) -> list[str]:
    """Every problem of a dataset.json document's fields, one string each naming the field (see the module)."""
    problems = _typed(obj, DATASET_FIELDS, "")
    if not isinstance(obj, dict):
        return problems
    problems += [p for name, r in TOP_NUMBERS.items() if name in obj for p in [r.problem(obj[name], name)] if p]
    for i, entry in enumerate(obj["shards"] if isinstance(obj.get("shards"), list) else []):
        problems += _typed(entry, ENTRY_FIELDS, f"shards[{i}].")
        if isinstance(entry, dict):
            problems += [] if "samples" in entry else [f"no field 'shards[{i}].samples'"]
            numbers = {name: entry[name] for name in ("samples", "bytes") if name in entry}
            problems += [p for name, v in numbers.items() for p in [COUNT.problem(v, f"shards[{i}].{name}")] if p]
    if isinstance(obj.get("dims"), dict):
        problems += [p for sym, v in obj["dims"].items() for p in [WIDTH.problem(v, f"dims.{sym}")] if p]
    if isinstance(obj.get("counts"), dict):
        problems += _count_problems(obj["counts"])
    if isinstance(obj.get("feature_set"), dict):
        problems += _feature_set_problems(obj["feature_set"])
    problems += stats_field_problems(obj.get("stats", {}))
    if CONTRACT_KEY in obj:
        problems += contract_problems(obj[CONTRACT_KEY], obj.get("dims"))
    if not isinstance(obj.get("missing_shards", []), list) or not all(
        isinstance(name, str) for name in obj.get("missing_shards", [])
    ):
        problems.append(f"'missing_shards' is {quoted(obj['missing_shards'])}, not a list of shard names")
    if not isinstance(obj.get("complete", True), bool):
        problems.append(f"'complete' is {quoted(obj['complete'])}, not true or false")
    return problems


def _typed(obj: Any, fields: Mapping[str, type], prefix: str) -> list[str]:
    if not isinstance(obj, dict):
        return [f"{prefix.rstrip('.') or 'the document'} is not an object"]
    problems = []
    for name, kind in fields.items():
        if name not in obj:
            problems.append(f"no field '{prefix}{name}'")
        elif not isinstance(obj[name], kind) or isinstance(obj[name], bool):
            problems.append(f"'{prefix}{name}' is not a {kind.__name__} ({type(obj[name]).__name__})")
    return problems


def _count_problems(counts: Mapping[str, Any]) -> list[str]:
    """``counts``: split -> status -> a count."""
    problems = []
    for split, statuses in counts.items():
        if not isinstance(statuses, dict):
            problems.append(f"'counts.{split}' is {quoted(statuses)}, not an object of counts by status")
            continue
        problems += [p for status, n in statuses.items() for p in [COUNT.problem(n, f"counts.{split}.{status}")] if p]
    return problems


def _feature_set_problems(feature_set: Mapping[str, Any]) -> list[str]:
    """Its frame rate and sample rate in range; no NaN or infinity anywhere in it (a hash of NaN is no identity)."""
    problems = []
    for name, allowed in FEATURE_SET_NUMBERS.items():
        value = feature_set.get(name)
        if value is not None and not (name == "fps" and isinstance(value, str)):
            problems += [p for p in [allowed.problem(value, f"feature_set.{name}")] if p]
    stack: list[tuple[str, Any]] = [("feature_set", feature_set)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, dict):
            stack.extend((f"{where}.{k}", v) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((f"{where}[{i}]", v) for i, v in enumerate(value))
        elif isinstance(value, float) and not math.isfinite(value):
            problems.append(f"'{where}' is {quoted(value)}, not a finite number")
    return sorted(set(problems), key=problems.index)


def stats_field_problems(stats: Any) -> list[str]:
    """``stats``: member -> ``count``, and ``mean`` and ``std`` lists of one length of finite numbers (std >= 0)."""
    if not isinstance(stats, dict):
        return [f"'stats' is {quoted(stats)}, not an object of statistics by member"]
    problems = []
    for member, entry in stats.items():
        if not isinstance(entry, dict):
            problems.append(f"'stats.{member}' is {quoted(entry)}, not an object with count, mean and std")
            continue
        problems += [p for p in [COUNT.problem(entry.get("count", 0), f"stats.{member}.count")] if p]
        values = {name: entry.get(name, []) for name in ("mean", "std")}
        for name, value in values.items():
            if not isinstance(value, list) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value
            ):
                problems.append(
                    f"the train statistics of {member} ({name}) are not all finite numbers, and standardising with "
                    "them would make every feature of it NaN"
                )
            elif name == "std" and any(v < 0 for v in value):
                problems.append(f"'stats.{member}.std' holds a negative standard deviation ({min(value)!r})")
        if all(isinstance(v, list) for v in values.values()) and len(values["mean"]) != len(values["std"]):
            problems.append(
                f"'stats.{member}' has {len(values['mean'])} means but {len(values['std'])} standard deviations"
            )
    return problems


DTYPES = ("bool", "uint8", "int16", "int32", "int64", "float16", "float32")  # what a declared member may hold
_MEMBER_NAME = re.compile(r"[a-z0-9_]+\.npy")


def contract_problems(records: Any, dims: Any) -> list[str]:
    """``modalities`` (the per-modality records of :mod:`shards.contract`): each names its extractor, a feature
    member of its own members, a width in range that its shape and ``dims`` agree with, and members of known
    roles, dtypes and shapes; a member the schema declares keeps the schema's dtype and shape."""
    if not isinstance(records, dict):
        return [f"'{CONTRACT_KEY}' is {quoted(records)}, not an object of records by modality"]
    unknown = [m for m in records if m not in MODALITIES]
    problems = [f"'{CONTRACT_KEY}.{m}' is not a modality ({', '.join(MODALITIES)})" for m in unknown]
    for m, rec in records.items():
        problems += [] if m in unknown else _record_problems(m, rec, dims)
    return problems


def _record_problems(m: str, rec: Any, dims: Any) -> list[str]:
    """One modality's record, checked field by field, then its members, then the roles and width it names."""
    where = f"{CONTRACT_KEY}.{m}"
    problems = _typed(rec, RECORD_FIELDS, f"{where}.")
    if problems:
        return problems
    problems = [p for p in [WIDTH.problem(rec["width"], f"{where}.width")] if p]
    problems += _member_problems(m, rec["members"], where)
    if problems:
        return problems
    problems += _role_problems(rec, where)
    if problems:
        return problems
    feature = MemberSpec(**_spec_fields(rec["members"][rec["feature"]]), modality=m, required=True, doc="")
    if isinstance(dims, dict) and all(
        isinstance(a if isinstance(a, int) else dims.get(a), int) for a in feature.shape[1:]
    ):
        width = step_width(feature, dims)
        if width != rec["width"]:
            problems.append(f"'{where}.width' is {rec['width']}, but {rec['feature']} holds {width} per step")
    return problems


RECORD_FIELDS = {"extractor": str, "settings": dict, "feature": str, "width": int, "extra": dict, "members": dict}


def _spec_fields(entry: Mapping[str, Any]) -> dict[str, Any]:
    return {"dtype": entry["dtype"], "shape": tuple(entry["shape"]), "role": entry["role"]}


def _member_problems(modality: str, members: Mapping[str, Any], where: str) -> list[str]:
    """Each declared member: a ``<modality>_<name>.npy`` name, a role, a dtype, a (T, ...) shape and ``required``."""
    problems = []
    for name, entry in members.items():
        at = f"'{where}.members.{name}'"
        if not name.startswith(f"{modality}_") or not _MEMBER_NAME.fullmatch(name):
            problems.append(f"{at}: a member is named {modality}_<lowercase letters, digits, _>.npy")
        elif not isinstance(entry, dict) or entry.get("role") not in ROLES or entry.get("dtype") not in DTYPES:
            problems.append(f"{at} needs a role of {list(ROLES)} and a dtype of {list(DTYPES)}")
        elif not isinstance(entry.get("required"), bool) or not _shape_ok(entry.get("shape")):
            problems.append(f"{at} needs 'required' true or false and a shape [time, axes...] (names or sizes >= 1)")
        elif name in MEMBERS and (MEMBERS[name].dtype, MEMBERS[name].shape) != (entry["dtype"], tuple(entry["shape"])):
            problems.append(f"{at} is declared {MEMBERS[name].dtype} {list(MEMBERS[name].shape)} by the shard schema")
    return problems


def _shape_ok(shape: Any) -> bool:
    if not isinstance(shape, list) or not shape or not isinstance(shape[0], str):
        return False
    return all(isinstance(a, str) and a.isidentifier() or type(a) is int and 1 <= a <= MAX_DIM for a in shape)


def _role_problems(rec: Mapping[str, Any], where: str) -> list[str]:
    """The feature, mask, time and raw members and the extra inputs are members of the role they are named for."""
    problems = []
    named = {role: rec.get(role) for role in ("feature", "mask", "time", "raw")}
    named.update({f"extra.{name}": name for name in rec["extra"]})
    for field, name in named.items():
        role = field.split(".")[0]
        if name is None and role != "feature":
            continue
        if not isinstance(name, str) or rec["members"].get(name, {}).get("role") != role:
            problems.append(f"'{where}.{field}' is {quoted(name)}, not one of its members of role {role}")
    problems += [p for name, w in rec["extra"].items() for p in [WIDTH.problem(w, f"{where}.extra.{name}")] if p]
    return problems
