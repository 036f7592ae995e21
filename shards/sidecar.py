"""Sidecars as the record a shard is checked against: member digests, keys, split; dataset.json against them.

Each shard ``{split}-{NNNNNN}.tar`` has a sidecar ``{split}-{NNNNNN}.json`` written after it (the commit marker).
Besides the keys in tar order and the split, the sidecar records ``digests``: for every sample key, every member
it holds and the first 32 hex digits (128 bits) of the SHA-256 of that member's bytes. Readers check:

* ``mmfuse inspect --verify``: every member's digest, the member set of every sample, the key list, the sidecar's
  split against the shard's file name and every sample's meta.json split against it (:class:`ShardCheck` with
  ``digests="all"``);
* training: the key list, the member sets, the sidecar's split and ``meta.json``'s digest (labels live there),
  not the feature digests: hashing every feature byte would cost about half of decoding them;
* anything that loads dataset.json as a dataset (:func:`dataset_problems`): no shard listed twice, every listed
  shard present with its sidecar, the shard name its sidecar records equal to its file name, no sample key in two
  shards, each shard's sample count, the per-split counts and the total equal to what the sidecars list, and the
  train statistics equal to the train sidecars' merged (:mod:`shards.crosscheck`).

Sidecars written before digests were recorded have none: their members are not checked against digests (verify
says so in a warning); everything else still is. A sidecar without its shard's name is not checked against it.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mmfuse.settings import quoted
from shards.contract import stats_members_of
from shards.crosscheck import KeyOwners, SidecarStats
from shards.guard import load_json
from shards.schema import SCHEMA_VERSION, SchemaError

DIGEST_HEX = 32  # hex digits of SHA-256 kept per member (128 bits)
SIDECAR_MAX_BYTES = 64 << 20  # a sidecar of tens of thousands of clips stays far below this
SHARD_NAME = re.compile(r"^(?P<split>[a-z]+)-(?P<index>\d{6,})\.tar$")
NOT_SAMPLES = ("skipped",)  # clip statuses that have no sample in a shard


def member_digest(data: bytes) -> str:
    """The digest a sidecar records for a member's bytes: SHA-256, first :data:`DIGEST_HEX` hex digits."""
    return hashlib.sha256(data).hexdigest()[:DIGEST_HEX]


def read_json_file(path: Path, max_bytes: int) -> Any:
    """A JSON file of at most ``max_bytes`` nested at most :data:`shards.guard.JSON_MAX_DEPTH` deep; SchemaError
    naming the file when it is larger, deeper, not UTF-8 or not JSON (OSError when it cannot be read)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise SchemaError(f"{path}: {size} bytes, over the {max_bytes}-byte cap; refused unread")
        data = f.read(size + 1)  # no more than the file holds: a buffer of max_bytes would cost the memory
    try:
        return load_json(data, max_bytes=max_bytes)
    except SchemaError as exc:
        raise SchemaError(f"{path}: {exc}") from exc
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise SchemaError(f"{path} is not valid JSON ({exc})") from exc


def load_sidecar(path: Path) -> dict[str, Any]:
    """The sidecar at ``path``; SchemaError naming it when it is absent, unreadable, foreign or lacks its keys."""
    try:
        obj = read_json_file(path, SIDECAR_MAX_BYTES)
    except OSError as exc:
        raise SchemaError(f"sidecar {path.name} missing or unreadable ({exc.strerror or exc})") from exc
    if not isinstance(obj, dict) or obj.get("schema_version") != SCHEMA_VERSION:
        raise SchemaError(f"sidecar {path.name} is not a schema-version-{SCHEMA_VERSION} sidecar")
    keys = obj.get("keys")
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise SchemaError(f"sidecar {path.name} has no list of sample keys")
    digests = obj.get("digests")
    if digests is not None and not (isinstance(digests, dict) and all(isinstance(d, dict) for d in digests.values())):
        raise SchemaError(f"sidecar {path.name}: 'digests' is not a map of sample key to member digests")
    if not isinstance(obj.get("shard", ""), str):
        raise SchemaError(f"sidecar {path.name}: 'shard' is {quoted(obj['shard'])}, not its shard's file name")
    return obj


def read_sidecar(path: Path) -> dict[str, Any] | None:
    """The sidecar at ``path``, or ``None`` if it is absent or unreadable (the shard is then incomplete)."""
    try:
        return load_sidecar(path)
    except SchemaError:
        return None


def name_split(name: str) -> str | None:
    """The split a shard's file name says (``train`` of ``train-000000.tar``); None for a foreign name."""
    match = SHARD_NAME.match(name)
    return match["split"] if match else None


class ShardCheck:
    """One shard's samples checked against its sidecar, in tar order.

    ``digests``: ``"all"`` checks every member's digest, ``"meta"`` only ``meta.json``'s. Problems are strings
    naming the shard and sample (and member), so a caller can raise the first or list them all.
    """

    def __init__(self, side: Mapping[str, Any], shard: str, split: str, digests: str = "all") -> None:
        self.shard, self.split, self.mode = shard, split, digests
        self.side_name = Path(shard).with_suffix(".json").name
        self.keys: list[str] = list(side["keys"])
        self.where = {k: i for i, k in enumerate(self.keys)}
        self.digests: dict[str, dict[str, str]] | None = side.get("digests")
        self.side_split = side.get("split")
        self.side_shard: str | None = side.get("shard")  # absent in sidecars written before it was recorded
        self.stats = side.get("stats", {})

    @classmethod
    def load(cls, path: Path | str, split: str, digests: str = "all", label: str | None = None) -> ShardCheck:
        """The check for the shard at ``path`` read as part of ``split`` (SchemaError when its sidecar is unusable,
        records another split or another shard's name)."""
        path = Path(path)
        check = cls(load_sidecar(path.with_suffix(".json")), label or path.name, split, digests)
        problem = check.split_problem() or check.name_problem(path.name)
        if problem:
            raise SchemaError(problem)
        return check

    def split_problem(self) -> str | None:
        """Why the sidecar's split disagrees with the split being read, or None."""
        if self.side_split is not None and self.side_split != self.split:
            return (
                f"shard {self.shard}: its sidecar {self.side_name} records split {self.side_split!r}, but the shard "
                f"is read as split {self.split!r}; a shard of another split was put in its place"
            )
        return None

    def name_problem(self, file_name: str) -> str | None:
        """Why the shard name the sidecar records is not ``file_name`` (the tar's), or None."""
        if self.side_shard is not None and self.side_shard != file_name:
            return (
                f"shard {self.shard}: its sidecar {self.side_name} records shard {quoted(self.side_shard)}, but it "
                f"lies beside {file_name}; it is a copy of another shard (or of its sidecar): remove it"
            )
        return None

    def sample(self, position: int, raw: Mapping[str, Any]) -> list[str]:
        """Problems of the sample at ``position`` (``raw``: members as bytes, as ``iter_raw_samples`` yields)."""
        key = raw["__key__"]
        where = f"shard {self.shard}: sample {key}"
        if key not in self.where:
            return [f"{where} is not in its sidecar's key list ({self.side_name})"]
        if self.where[key] != position:
            return [f"{where} is sample {position} of the tar but sample {self.where[key]} in {self.side_name}"]
        if self.digests is None:
            return []
        recorded = self.digests.get(key, {})
        members = {name for name in raw if not name.startswith("__")}
        if members != set(recorded):
            extra, missing = sorted(members - set(recorded)), sorted(set(recorded) - members)
            return [f"{where}: members differ from {self.side_name} (extra {extra}, missing {missing})"]
        names = sorted(members) if self.mode == "all" else ["meta.json"]
        return [
            f"{where}: member {key}.{name} digest mismatch ({self.side_name} records {recorded[name]}, "
            f"the bytes hash to {member_digest(raw[name])})"
            for name in names
            if name in raw and member_digest(raw[name]) != recorded[name]
        ]

    def end(self, count: int) -> str | None:
        """Why ``count`` samples read from the whole tar disagree with the sidecar's key list, or None."""
        if count != len(self.keys):
            return f"shard {self.shard} holds {count} samples but its sidecar {self.side_name} lists {len(self.keys)}"
        return None


def dataset_problems(root: Path | str, ds: Mapping[str, Any]) -> list[str]:
    """Where dataset.json (``ds``, read from ``root``) disagrees with the shards and sidecars beside it.

    Each problem names dataset.json, the field and both values: a shard listed twice, a listed shard whose tar or
    sidecar is missing, a name whose split is not the entry's or the sidecar's, a sidecar that records another
    shard's name, a sample key held by two shards, an entry's ``samples``, a split's ``counts`` (its statuses other
    than ``skipped``) or the total ``samples`` differing from the sidecars' keys, and train statistics (count, mean,
    std of a member) differing from the train sidecars' merged.
    """
    root = Path(root)
    path = root / "dataset.json"
    problems: list[str] = []
    listed = Counter(entry["name"] for entry in ds["shards"])
    problems += [f"{path}: shards lists {name} {n} times" for name, n in sorted(listed.items()) if n > 1]
    per_split: Counter = Counter()
    owners, train_stats = KeyOwners(), SidecarStats(stats_members_of(ds))
    seen: set[str] = set()
    for i, entry in enumerate(ds["shards"]):
        if entry["name"] in seen:
            continue
        seen.add(entry["name"])
        check = _entry_check(root, i, entry, problems)
        if check is None:
            continue
        per_split[entry["split"]] += len(check.keys)
        owners.add(entry["name"], check.keys)
        if entry["split"] == "train":
            train_stats.add(check.side_name, check.stats)
    problems += _count_problems(path, ds, per_split)
    return problems + owners.problems(path) + train_stats.problems(path, ds.get("stats", {}))


def _entry_check(root: Path, i: int, entry: Mapping[str, Any], problems: list[str]) -> ShardCheck | None:
    """The check of dataset.json's ``shards[i]`` (``entry``), its problems appended to ``problems``; None when
    the shard or its sidecar cannot be read."""
    name, split = entry["name"], entry["split"]
    where = f"{root / 'dataset.json'}: shards[{i}] ({name})"
    if name_split(name) != split:
        problems.append(f"{where} has split {split!r} but its file name says {name_split(name)!r}")
    if not (root / name).is_file():
        problems.append(f"{where} is not in {root}")
        return None
    try:
        check = ShardCheck(load_sidecar((root / name).with_suffix(".json")), name, split)
    except SchemaError as exc:
        problems.append(f"{where}: {exc}")
        return None
    problems += [f"{where}: {p}" for p in (check.split_problem(), check.name_problem(name)) if p]
    if entry["samples"] != len(check.keys):
        problems.append(
            f"{where} 'samples' is {entry['samples']} but its sidecar {check.side_name} lists {len(check.keys)} samples"
        )
    return check


def _count_problems(path: Path, ds: Mapping[str, Any], per_split: Counter) -> list[str]:
    """dataset.json's ``counts`` per split and total ``samples`` against the sidecars' (``per_split``)."""
    problems = []
    counts = ds["counts"]
    for split in sorted(set(counts) | set(per_split)):
        statuses = counts.get(split, {})
        listed_n = sum(int(n) for status, n in statuses.items() if status not in NOT_SAMPLES)
        if listed_n != per_split[split]:
            problems.append(
                f"{path}: counts.{split} lists {listed_n} samples (statuses other than skipped) but the sidecars "
                f"of its {split} shards list {per_split[split]}"
            )
    total = ds.get("samples")
    if total is not None and total != sum(per_split.values()):
        problems.append(f"{path}: 'samples' is {total} but the sidecars list {sum(per_split.values())}")
    return problems
