"""Corrupted modalities for robustness curves (MultiBench's protocol, Liang et al. 2021): pure functions.

A corruption acts on the fusion model's inputs, a batch dict of modality features ``m`` (B, T, D) float and masks
``m_mask`` (B, T) bool (True = valid step), so it is the same for every model. Two kinds:

- ``gaussian``: ``x + level * std * N(0, 1)`` on the valid steps of one modality, ``std`` (D,) that modality's
  per-feature standard deviation on the train split (in the units of the batch: after the train-split
  standardisation, 1 for every feature the network standardises; see ``train.noise_sweep.input_std``);
- ``drop``: every valid step is dropped (mask set False, its features zeroed like padding) with probability
  ``level``, independently. Below level 1 a sample keeps at least one step: when every valid step of a sample
  would be dropped, the one with the largest uniform draw is kept. At level 1 every step goes and the sample
  has lost the modality (as ``mmfuse eval --missing`` removes it from every sample).

Padding and the other modalities are left bit-identical; level 0 is the identity. Random draws come from the
``torch.Generator`` passed in; :func:`batch_generator` seeds one from (seed, modality, kind, sample keys), so a
batch gets the same draws however often it is scored, and the draws do not depend on the level: a level's noise
is the same noise scaled (gaussian), a level's dropped steps include every lower level's (drop).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from train.config import TrainConfigError

KINDS = ("gaussian", "drop")
# The sweep's levels per kind (MultiBench sweeps a handful of rising levels from 0): gaussian in units of the
# train-split std, drop as the probability of dropping each valid step.
SWEEP_LEVELS = {"gaussian": (0.0, 0.25, 0.5, 1.0, 2.0, 4.0), "drop": (0.0, 0.1, 0.3, 0.5, 0.7, 0.9)}
# The metric a curve follows, per task: lower is better for MAE, higher for the accuracies.
MAIN_METRIC = {"regression": "mae", "classification": "accuracy", "multilabel": "acc_mean"}
SHORT = {"t": "text", "a": "audio", "v": "video"}


def corrupt(
    batch: Mapping[str, Any], modality: str, kind: str, level: float, std: Tensor | None, generator: torch.Generator
) -> dict[str, Any]:
    """``batch`` with ``modality`` corrupted by ``kind`` at ``level`` (a new dict; the input is not changed).

    ``std``: (D,) train-split std of the modality's features (gaussian only; ignored by drop). A batch without
    the modality, or level 0, comes back unchanged. Draws are made on ``generator``'s device, then moved to the
    batch's device, so a CPU generator gives the same corruption on any device.
    """
    if kind not in KINDS:
        raise TrainConfigError(f"noise kind {kind!r}: use one of {', '.join(KINDS)}")
    out = dict(batch)
    if level == 0 or modality not in batch:
        return out
    x, mask = batch[modality], batch[f"{modality}_mask"]
    if kind == "gaussian":
        if std is None:
            raise TrainConfigError(f"gaussian noise on {modality} needs its train-split std")
        out[modality] = _gaussian(x, mask, level, std, generator)
    else:
        out[modality], out[f"{modality}_mask"] = _drop(x, mask, level, generator)
    return out


def _gaussian(x: Tensor, mask: Tensor, level: float, std: Tensor, generator: torch.Generator) -> Tensor:
    noise = torch.randn(x.shape, generator=generator, device=generator.device).to(x.device)
    scale = level * std.to(device=x.device, dtype=torch.float32)
    valid = mask.reshape(*mask.shape, *[1] * (x.dim() - mask.dim()))
    return torch.where(valid, x.float() + noise * scale, x.float()).to(x.dtype)


def _drop(x: Tensor, mask: Tensor, level: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    draw = torch.rand(mask.shape, generator=generator, device=generator.device).to(mask.device)
    keep = mask & (draw >= level)
    if level < 1:  # a sample that would lose every valid step keeps the one with the largest draw
        lost = mask.any(1) & ~keep.any(1)
        best = torch.where(mask, draw, torch.full_like(draw, -1.0)).argmax(1)
        keep = keep | (lost[:, None] & (torch.arange(mask.shape[1], device=mask.device)[None] == best[:, None]))
    dropped = (mask & ~keep).reshape(*mask.shape, *[1] * (x.dim() - mask.dim()))
    return torch.where(dropped, torch.zeros((), dtype=x.dtype, device=x.device), x), keep


def batch_generator(seed: int, modality: str, kind: str, keys: Sequence[str] | None) -> torch.Generator:
    """A CPU generator seeded from ``seed``, the corruption and the batch's sample keys (none: the same draws for
    every batch of one shape)."""
    text = "\n".join([str(seed), modality, kind, *(keys or ())])
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def area_under_curve(levels: Sequence[float], values: Sequence[float]) -> float:
    """Trapezoid area under ``values`` over ``levels`` (rising), divided by the level range: the curve's mean
    value over the levels swept, in the metric's own units. One level: its value. NaN if any value is NaN."""
    if len(levels) != len(values) or not levels:
        raise ValueError(f"{len(levels)} levels for {len(values)} values")
    if any(b <= a for a, b in zip(levels, levels[1:], strict=False)):
        raise ValueError(f"levels must rise, got {list(levels)}")
    if len(levels) == 1:
        return float(values[0])
    area = sum((b - a) * (u + v) / 2 for a, b, u, v in zip(levels, levels[1:], values, values[1:], strict=False))
    return float(area / (levels[-1] - levels[0]))


def sweep_levels(kind: str, levels: Sequence[float] | None = None) -> tuple[float, ...]:
    """The levels swept for ``kind``: ``levels`` (0 added when absent, sorted) or the defaults."""
    if kind not in KINDS:
        raise TrainConfigError(f"noise kind {kind!r}: use one of {', '.join(KINDS)}")
    chosen = SWEEP_LEVELS[kind] if levels is None else tuple(sorted({0.0, *map(float, levels)}))
    for level in chosen:
        problem = level_problem(kind, level)
        if problem:
            raise TrainConfigError(f"sweep level: {problem}")
    return chosen


def level_problem(kind: str, level: float) -> str | None:
    """What is wrong with ``level`` for ``kind`` (None when it is valid)."""
    if kind == "drop" and not 0 <= level <= 1:
        return f"drop levels are probabilities in [0, 1], got {level:g}"
    if not 0 <= level < float("inf"):
        return f"gaussian levels are finite numbers >= 0 (times the train std), got {level:g}"
    return None


def parse_noise(spec: str, kind: str, modalities: Sequence[str]) -> dict[str, float]:
    """``--noise a=0.5,t=0.2`` -> {audio: 0.5, text: 0.2}; modalities as t, a, v or their names; a clear error
    for anything else, or for a modality the model does not use."""
    if kind not in KINDS:
        raise TrainConfigError(f"--noise-kind {kind!r}: use one of {', '.join(KINDS)}")
    names = {**SHORT, **{m: m for m in SHORT.values()}}
    out: dict[str, float] = {}
    for part in spec.split(","):
        key, sep, value = (s.strip() for s in part.partition("="))
        if not sep:
            raise TrainConfigError(
                f"--noise {spec!r}: give MOD=LEVEL pairs, comma-separated, e.g. a=0.5 or t=0.2,v=1 "
                "(MOD: t, a, v or text, audio, video)"
            )
        if key not in names:
            raise TrainConfigError(f"--noise {spec!r}: unknown modality {key!r}; use t, a, v (or text, audio, video)")
        try:
            level = float(value)
        except ValueError:
            raise TrainConfigError(f"--noise {spec!r}: level {value!r} of {key} is not a number") from None
        modality = names[key]
        problem = level_problem(kind, level)
        if problem or modality in out:
            raise TrainConfigError(f"--noise {spec!r}: {problem or f'{modality} is given twice'}")
        if modality not in modalities:
            raise TrainConfigError(f"--noise {spec!r}: the model uses {', '.join(modalities)}, not {modality}")
        out[modality] = level
    return out


@dataclass(frozen=True)
class Corruption:
    """Every modality of ``levels`` corrupted by ``kind`` at its level; ``std`` (D,) per modality (gaussian)."""

    levels: dict[str, float]
    kind: str = "gaussian"
    std: dict[str, Tensor] = field(default_factory=dict)
    seed: int = 0

    def __call__(self, batch: Mapping[str, Any], keys: Sequence[str] | None = None) -> dict[str, Any]:
        out = dict(batch)
        for m, level in self.levels.items():
            generator = batch_generator(self.seed, m, self.kind, keys)
            out = corrupt(out, m, self.kind, level, self.std.get(m), generator)
        return out


@contextmanager
def corrupting(net: nn.Module, corruption: Corruption) -> Iterator[nn.Module]:
    """``net`` (a ``FusionPipeline``) with ``corruption`` applied to its fusion model's inputs while the context
    is open: after the train-split standardisation and, end to end, after the encoders. The sample keys of the
    batch ``net`` is called with seed the draws (:func:`batch_generator`)."""
    keys: list[Sequence[str] | None] = [None]

    def remember_keys(module: nn.Module, args: tuple[Any, ...]) -> None:
        keys[0] = args[0].get("key") if args and isinstance(args[0], Mapping) else None

    def corrupt_inputs(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (corruption(args[0], keys[0]), *args[1:])

    handles = [net.register_forward_pre_hook(remember_keys), net.fusion.register_forward_pre_hook(corrupt_inputs)]
    try:
        yield net
    finally:
        for handle in handles:
            handle.remove()
