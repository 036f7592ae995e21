"""Mergeable per-dimension mean/std (Chan et al. parallel variance), stored as JSON in sidecars and dataset.json."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class RunningStats:
    """Count, mean and sum of squared deviations per feature dimension, over valid rows only."""

    count: int = 0
    mean: np.ndarray = field(default_factory=lambda: np.zeros(0))
    m2: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def update(self, rows: np.ndarray) -> None:
        """Add rows ``(N, ...)``, each flattened to one vector (already restricted to valid frames)."""
        if len(rows) == 0:
            return
        rows = np.asarray(rows, dtype=np.float64).reshape(len(rows), -1)
        self.merge(RunningStats(len(rows), rows.mean(0), ((rows - rows.mean(0)) ** 2).sum(0)))

    def merge(self, other: RunningStats) -> None:
        if other.count == 0:
            return
        if self.count == 0:
            self.count, self.mean, self.m2 = other.count, other.mean.copy(), other.m2.copy()
            return
        if other.mean.shape != self.mean.shape:
            raise ValueError(f"cannot merge statistics of width {other.mean.shape} into {self.mean.shape}")
        n = self.count + other.count
        delta = other.mean - self.mean
        self.mean = self.mean + delta * (other.count / n)
        self.m2 = self.m2 + other.m2 + delta**2 * (self.count * other.count / n)
        self.count = n

    @property
    def std(self) -> np.ndarray:
        if self.count == 0:
            return self.mean
        return np.sqrt(self.m2 / self.count)

    def to_json(self) -> dict[str, Any]:
        return {"count": self.count, "mean": self.mean.tolist(), "m2": self.m2.tolist()}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> RunningStats:
        return cls(int(obj["count"]), np.asarray(obj["mean"], dtype=np.float64), np.asarray(obj["m2"], np.float64))
