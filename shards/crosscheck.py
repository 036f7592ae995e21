"""Checks of dataset.json across all its shards' sidecars: every sample key in one shard only, and the train
statistics equal to what the train shards' sidecars record.

:func:`shards.sidecar.dataset_problems` feeds every listed shard's sidecar to a :class:`KeyOwners` and, for train
shards, a :class:`SidecarStats`, then lists their problems with its own. Without them a shard copied under another
name (and listed in dataset.json) has training read its samples twice, and statistics edited in dataset.json (a
mean shifted, a std shrunk) standardise every feature wrongly while every shard still verifies.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from shards.schema import MEMBERS, STATS_MEMBERS
from shards.stats import RunningStats

# dataset.json's statistics are the sidecars' merged (in the same order, by shards.dataset.build_dataset): they
# agree to the last bits. Differences beyond these were made by hand, or the statistics belong to other shards.
STATS_RTOL = 1e-6
STATS_ATOL = 1e-9


class KeyOwners:
    """Which shard holds each sample key, over every shard fed to :meth:`add`."""

    def __init__(self) -> None:
        self.owner: dict[str, str] = {}
        self.shared: dict[tuple[str, str], list[str]] = {}  # (first shard, later shard) -> the keys both hold

    def add(self, shard: str, keys: Iterable[str]) -> None:
        """Record that ``shard`` holds ``keys`` (a key listed twice by one shard counts as shared with itself)."""
        seen: set[str] = set()
        for key in keys:
            first = shard if key in seen else self.owner.setdefault(key, shard)
            if first != shard or key in seen:
                self.shared.setdefault((first, shard), []).append(key)
            seen.add(key)

    def problems(self, path: Path) -> list[str]:
        """One problem per pair of shards that share keys, naming both shards and one key."""
        found = []
        for (first, later), keys in self.shared.items():
            more = f" (and {len(keys) - 1} more they share)" if len(keys) > 1 else ""
            where = f"twice in {first}" if first == later else f"in both {first} and {later}"
            found.append(
                f"{path}: sample {keys[0]} is {where}{more}; sample keys must be unique across the directory "
                "(a shard copied or extracted twice would be read twice): remove the copy and its entry in dataset.json"
            )
        return found


class SidecarStats:
    """The train statistics dataset.json should record: the train sidecars' ``stats`` merged, as
    :func:`shards.dataset.build_dataset` merges them."""

    def __init__(self, members: Collection[str] = STATS_MEMBERS) -> None:
        self.members = members  # the members build_dataset records (shards.contract.stats_members)
        self.merged: dict[str, RunningStats] = {}
        self.unreadable: list[str] = []

    def add(self, sidecar: str, stats: Any) -> None:
        """Merge one train shard's sidecar ``stats`` (member -> count, mean, m2); a malformed one is a problem."""
        if not isinstance(stats, Mapping):
            self.unreadable.append(f"sidecar {sidecar}: 'stats' is not an object of statistics by member")
            return
        for member, obj in stats.items():
            if member not in self.members:
                continue  # build_dataset records only these
            try:
                part = _running_stats(obj)
                self.merged.setdefault(member, RunningStats()).merge(part)
            except (KeyError, TypeError, ValueError) as exc:
                self.unreadable.append(f"sidecar {sidecar}: the statistics of {member} cannot be used ({exc})")

    def problems(self, path: Path, recorded: Any) -> list[str]:
        """Where dataset.json's ``stats`` (``recorded``) differ from the merged sidecars', naming the member, its
        modality and the field (count, mean or std)."""
        if self.unreadable:
            return self.unreadable
        recorded = recorded if isinstance(recorded, Mapping) else {}
        problems = []
        for member in sorted(set(recorded) | set(self.merged)):
            where = f"{path}: stats.{member} ({MEMBERS[member].modality if member in MEMBERS else 'unknown'})"
            if member not in self.merged:
                problems.append(f"{where} is recorded, but no train shard's sidecar holds statistics of {member}")
            elif member not in recorded:
                problems.append(
                    f"{where} is missing, but the train shards' sidecars record {self.merged[member].count} rows of it"
                )
            else:
                problems += _member_problems(where, recorded[member], self.merged[member])
        return problems


def _running_stats(obj: Any) -> RunningStats:
    """A sidecar's statistics of one member, checked: a whole count >= 0, mean and m2 of one (D,) shape, finite."""
    count = obj.get("count") if isinstance(obj, Mapping) else None
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise ValueError("no whole, non-negative 'count'")
    part = RunningStats.from_json(dict(obj))
    if part.mean.ndim != 1 or part.mean.shape != part.m2.shape or not np.isfinite(part.mean).all():
        raise ValueError("'mean' and 'm2' are not two lists of finite numbers of one length")
    if not np.isfinite(part.m2).all() or (part.m2 < 0).any():
        raise ValueError("'m2' holds a negative or non-finite sum of squares")
    return part


def _member_problems(where: str, recorded: Any, merged: RunningStats) -> list[str]:
    """``recorded`` (dataset.json's count, mean and std of one member) against ``merged`` (the sidecars')."""
    if not isinstance(recorded, Mapping):
        return [f"{where} is not an object with count, mean and std"]
    problems = []
    if recorded.get("count") != merged.count:
        problems.append(
            f"{where.replace(' (', '.count (', 1)} is {recorded.get('count')!r}, but the train shards' sidecars "
            f"record {merged.count} rows"
        )
    for name, expected in (("mean", merged.mean), ("std", merged.std)):
        field = where.replace(" (", f".{name} (", 1)
        try:
            got = np.asarray(recorded.get(name), np.float64)
        except (TypeError, ValueError):
            problems.append(f"{field} is not a list of numbers")
            continue
        if got.shape != expected.shape:
            problems.append(f"{field} has shape {got.shape}, but the train shards' sidecars give {expected.shape}")
            continue
        off = ~np.isclose(got, expected, rtol=STATS_RTOL, atol=STATS_ATOL)
        if off.any():
            i = int(np.argmax(np.where(off, np.abs(got - expected), -1.0)))
            problems.append(
                f"{field} differs from what the train shards' sidecars record in {int(off.sum())} of {off.size} "
                f"dimensions (dimension {i}: {got[i]:.6g} in dataset.json, {expected[i]:.6g} from the sidecars)"
            )
    return problems
