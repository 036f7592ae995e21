"""The output contract between extraction and training: per modality, which member is *the* feature, its width,
and which members hold its mask, time stamps, raw input and extra inputs.

Each extractor declares the members it writes by role (:data:`shards.schema.ROLES`, on its
:class:`~shards.schema.MemberSpec`); extraction records the result per modality in dataset.json under
:data:`CONTRACT_KEY`, and every reader on the training side (inputs, stages, normalisation, alignment, statistics,
predict, noise sweep) reads that record, so a new extractor needs no change to any reader. One record::

    "video": {
      "extractor": "mediapipe-facemesh",      provenance name (imported features: "imported")
      "settings": {"max_faces": 1, ...},       the extractor's settings (ExtractConfig keys it reads)
      "feature": "video_lmk.npy",              the member the model gets, (T, ...) per step
      "width": 1434,                           its width per step: the product of its axes after time (478 * 3)
      "mask": "video_mask.npy",                (T,) bool, True = valid; null: every step is valid
      "time": "video_time.npy",                (T,) seconds on the clip clock; null: no word alignment
      "raw": null,                             the raw input of end-to-end training (text_ids.npy, audio_wave.npy)
      "extra": {"video_geom.npy": 4},          per-step inputs joined after the feature (``video_geom``), widths
      "members": {"video_lmk.npy": {"role": "feature", "dtype": "float16", "shape": ["Tv", 478, 3],
                  "required": true}, ...}      every member it writes, as the schema checks it
    }

A dataset.json written before the record existed is read as the built-in tables say (:func:`legacy_contracts`):
``text_feat.npy``, ``audio_feat.npy``, and ``video_lmk.npy`` with FaceMesh's geometry, or ``video_feat.npy`` for
imported features (``dims`` has ``Dv``, or, in a checkpoint's record without ``dims``, its statistics name it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from shards.schema import FEATURE_MEMBERS, MEMBERS, MODALITIES, N_LANDMARKS, STATS_MEMBERS, MemberSpec, SchemaError

CONTRACT_KEY = "modalities"  # dataset.json's (and a checkpoint's) field holding the records, by modality
IMPORTED = "imported"  # the extractor name of features imported from published pickles (extract.import_mmsa)
FACEMESH = "mediapipe-facemesh"  # the one video extractor that stored geometry before the record existed
GEOMETRY = "video_geom.npy"
SINGLE_ROLES = ("feature", "mask", "time", "raw")  # at most one member each per modality


@dataclass(frozen=True)
class ModalityContract:
    """One modality's record (see the module): its extractor and what each of its members is for."""

    modality: str
    extractor: str
    feature: str
    width: int
    members: dict[str, MemberSpec]
    settings: dict[str, Any] = field(default_factory=dict)
    mask: str | None = None
    time: str | None = None
    raw: str | None = None
    extra: dict[str, int] = field(default_factory=dict)

    @property
    def extra_width(self) -> int:
        """Width of the extra inputs joined after the feature (0 when there are none)."""
        return sum(self.extra.values())

    def averaged(self) -> tuple[str, ...]:
        """The per-step members word alignment averages: the feature and the extra members on its time axis."""
        steps = self.members[self.feature].shape[0]
        return tuple(
            name for name, s in self.members.items() if s.role in ("feature", "extra") and s.shape[:1] == (steps,)
        )

    def to_json(self) -> dict[str, Any]:
        """The record as dataset.json stores it."""
        return {
            "extractor": self.extractor,
            "settings": dict(self.settings),
            "feature": self.feature,
            "width": self.width,
            "mask": self.mask,
            "time": self.time,
            "raw": self.raw,
            "extra": dict(self.extra),
            "members": {
                name: {"role": s.role, "dtype": s.dtype, "shape": list(s.shape), "required": s.required}
                for name, s in self.members.items()
            },
        }

    @classmethod
    def from_json(cls, modality: str, obj: Mapping[str, Any]) -> ModalityContract:
        """A record read back (checked first by :func:`contract_problems`)."""
        members = {
            name: MemberSpec(
                m["dtype"], tuple(m["shape"]), modality, bool(m["required"]), f"from {obj['extractor']}", m["role"]
            )
            for name, m in obj["members"].items()
        }
        return cls(
            modality, obj["extractor"], obj["feature"], int(obj["width"]), members, dict(obj.get("settings") or {}),
            obj.get("mask"), obj.get("time"), obj.get("raw"), {k: int(v) for k, v in (obj.get("extra") or {}).items()},
        )  # fmt: skip


def declare(
    modality: str,
    extractor: str,
    outputs: Mapping[str, MemberSpec],
    dims: Mapping[str, Any] | None = None,
    settings: Mapping[str, Any] | None = None,
    joined: tuple[str, ...] = (),
) -> ModalityContract:
    """The record of an extractor that writes ``outputs`` (member -> spec with its role) for ``modality``.

    ``dims`` resolves the symbolic widths of its shapes (its provenance's ``dims``, e.g. ``{"Dt": 768}``);
    ``joined`` names the ``extra`` members the model may take after the feature (FaceMesh's geometry). An output
    spec without exactly one feature, or with two members of one role, is a SchemaError naming the extractor."""
    roles: dict[str, list[str]] = {}
    for name, spec in outputs.items():
        roles.setdefault(spec.role, []).append(name)
    counts = {role: len(roles.get(role, [])) for role in SINGLE_ROLES}
    problems = [f"{n} members of role {r}" for r, n in counts.items() if n > 1 or (r == "feature" and n != 1)]
    problems += [f"{n!r} (joined) is not one of its extra members" for n in joined if n not in roles.get("extra", [])]
    if problems:
        raise SchemaError(f"extractor {extractor} ({modality}): {'; '.join(problems)}; declare one member per role")
    feature = roles["feature"][0]
    single = {role: roles[role][0] if roles.get(role) else None for role in SINGLE_ROLES[1:]}
    return ModalityContract(
        modality,
        extractor,
        feature,
        step_width(outputs[feature], dims or {}),
        dict(outputs),
        settings=json_safe(dict(settings or {})),
        extra={name: step_width(outputs[name], dims or {}) for name in joined},
        **single,
    )


def step_width(spec: MemberSpec, dims: Mapping[str, Any]) -> int:
    """The width per step of a (T, ...) member: the product of its axes after time, symbols read from ``dims``."""
    sizes = [axis if isinstance(axis, int) else dims.get(axis) for axis in spec.shape[1:]]
    if any(not isinstance(s, int) for s in sizes):
        raise SchemaError(f"a member of shape {spec.shape} has a width no 'dims' entry gives ({dict(dims)})")
    return math.prod(sizes)


def json_safe(value: Any) -> Any:
    """``value`` with tuples as lists (as JSON gives it back), so a record compares equal after a round trip."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def read_contracts(obj: Mapping[str, Any]) -> dict[str, ModalityContract]:
    """The records of a dataset.json (or checkpoint) object, by modality in :data:`MODALITIES` order: the recorded
    ones, or for an object written before they were, the ones :func:`legacy_contracts` derives."""
    recorded = obj.get(CONTRACT_KEY)
    if not isinstance(recorded, Mapping):
        return legacy_contracts(obj)
    return {m: ModalityContract.from_json(m, recorded[m]) for m in MODALITIES if m in recorded}


def legacy_contracts(obj: Mapping[str, Any]) -> dict[str, ModalityContract]:
    """The records an older dataset.json (or checkpoint) implies, from what it holds: ``feature_set`` (the
    modalities and extractor names), ``dims`` and ``stats``. A modality whose width neither ``dims`` nor the train
    statistics give is left out (a reader asking for it says which width is missing)."""
    fs = obj.get("feature_set") if isinstance(obj.get("feature_set"), Mapping) else {}
    dims = obj.get("dims") if isinstance(obj.get("dims"), Mapping) else {}
    stats = obj.get("stats") if isinstance(obj.get("stats"), Mapping) else {}
    extractors = fs.get("extractors") if isinstance(fs.get("extractors"), Mapping) else {}
    found = {}
    for m in MODALITIES:
        name = (extractors.get(m) or {}).get("name") or (IMPORTED if "imported" in fs else None)
        video_feat = "Dv" in dims or (not dims and "video_feat.npy" in stats)
        feature = "video_feat.npy" if m == "video" and video_feat else FEATURE_MEMBERS[m]
        members = {n: s for n, s in MEMBERS.items() if s.modality == m and (s.role != "feature" or n == feature)}
        members[feature] = replace(members[feature], required=True)  # the alternative of the landmarks, here the one
        if m == "video" and feature == "video_feat.npy":
            members = {n: s for n, s in members.items() if n in (feature, "video_mask.npy", "video_time.npy")}
        width_dims = {**dims, "landmarks": dims.get("landmarks", N_LANDMARKS)}
        if feature in stats and isinstance(stats[feature], Mapping):
            width_dims.setdefault({"text": "Dt", "audio": "Da", "video": "Dv"}[m], len(stats[feature].get("mean", [])))
        if members[feature].shape[-1] not in width_dims and not isinstance(members[feature].shape[-1], int):
            continue
        joined = (GEOMETRY,) if m == "video" and name == FACEMESH and feature == FEATURE_MEMBERS[m] else ()
        settings = {k: v for k, v in (extractors.get(m) or {}).items() if k not in ("name", "version", "dims")}
        found[m] = declare(m, name or "unknown", members, width_dims, settings, joined)
    return found


def builtin_contracts(widths: Mapping[str, int] | None = None) -> dict[str, ModalityContract]:
    """The records of the built-in extractors (text encoder, speech SSL, FaceMesh with its geometry), the text and
    audio widths from ``widths`` (by modality; 1 when not given): what a stage built without a dataset reads."""
    widths = widths or {}
    dims = {"Dt": int(widths.get("text", 1)), "Da": int(widths.get("audio", 1))}
    return legacy_contracts({"feature_set": {"extractors": {"video": {"name": FACEMESH}}}, "dims": dims})


def member_table(contracts: Mapping[str, ModalityContract]) -> dict[str, MemberSpec]:
    """The members a sample of these shards may carry: each recorded modality's own (required as its extractor
    declares), and the schema's (:data:`MEMBERS`) for modalities without a record."""
    return declared_table({m: c.members for m, c in contracts.items()})


def declared_table(outputs: Mapping[str, Mapping[str, MemberSpec]]) -> dict[str, MemberSpec]:
    """:func:`member_table` from each modality's output spec (modality -> member -> spec), as extractors declare
    it (``Extractor.output_spec``)."""
    table = {n: s for n, s in MEMBERS.items() if s.modality not in outputs}
    for spec in outputs.values():
        table.update(spec)
    return table


def stats_members(contracts: Mapping[str, ModalityContract]) -> set[str]:
    """The members dataset.json records train statistics of: the built-in features (:data:`STATS_MEMBERS`) and
    each record's feature."""
    return {*STATS_MEMBERS, *(c.feature for c in contracts.values())}


def table_of(obj: Mapping[str, Any]) -> dict[str, MemberSpec]:
    """:func:`member_table` of a dataset.json object's records (``MEMBERS`` when they cannot be read: the reader of
    the directory refuses such a dataset.json itself, see ``shards.dataset.load_dataset_json``)."""
    return member_table(_readable(obj))


def _readable(obj: Mapping[str, Any]) -> dict[str, ModalityContract]:
    try:
        return read_contracts(obj)
    except (KeyError, TypeError, ValueError, AttributeError):
        return {}


def stats_members_of(obj: Mapping[str, Any]) -> set[str]:
    """:func:`stats_members` of a dataset.json object's records (the built-in ones when they cannot be read)."""
    return stats_members(_readable(obj))
