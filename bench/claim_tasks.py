"""Synthetic tasks, one per seed method's claim, each built so that the claim *can* show (bench/claims.py).

Every task draws padded sequence batches like ``fusion.synthetic.SyntheticTask``: a modality's valid steps are
``factor * direction + sigma * noise`` with a per-sample length, masks True on valid steps. Latent factors are
N(0, 1) per sample. ``sample(n, generator, split)`` returns the modalities, their ``*_mask``, ``label`` (n,) and
the latents (``s1``, ``s2``, ...) a probe or a diagnostic needs; ``split`` lets a task shift a nuisance between
the splits it trains and selects on (train, valid) and the one it is tested on (test).

- ``competition`` (TCMax: modality competition). Text carries s1 with little noise (fast, dominant); audio
  carries s2 under heavy per-step noise (slow, weak) and nothing else does; y = s1 + s2 / 2. Under a joint
  loss the text branch fits first and the audio branch gets little gradient.
- ``competition_classes`` (TCMax as published: classification). The same two streams; the class is the quadrant
  of (s1, s2), y = 2 [s1 > 0] + [s2 > 0] (4 classes): text alone reaches at most 50 % accuracy, the second bit
  is in the weak audio stream only.
- ``purification`` (MIM). Text carries s1; video carries s2 on half of its steps, the other half is noise of
  scale 4 (``video_noisy`` marks them); y = s1 + s2, so the noisy modality is necessary.
- ``nuisance`` (ITHP: information bottleneck). The prime modality, text, carries the signal s along one
  direction and a nuisance n along another; in train and valid n = s + 0.5 e (it predicts the label almost as
  well as s), at test n is independent of s. Audio and video track s only (the detectors). y = s.
- ``redundancy`` (BC-PMJRS). Text carries c + u1, audio carries c + u2 (c shared; u1, u2 unique, along other
  directions), video is absent; y = c + u1 + u2.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

LENGTHS = {"text": (6, 12), "audio": (10, 20), "video": (8, 16)}
DIMS = {"text": 16, "audio": 12, "video": 10}


def directions(dims: dict[str, int], count: int, seed: int) -> dict[str, list[Tensor]]:
    """``count`` orthonormal directions (times 2) per modality, fixed by ``seed`` (the task's "world")."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m, d in dims.items():
        q, _ = torch.linalg.qr(torch.randn(d, count, generator=g))
        out[m] = [2.0 * q[:, k] for k in range(count)]
    return out


def _sequences(
    parts: list[tuple[Tensor, Tensor]], dim: int, lengths: tuple[int, int], sigma: float, g: torch.Generator
) -> tuple[Tensor, Tensor]:
    """(n, T, dim) steps = sum of factor (n,) x direction (dim,) + sigma * noise, and the (n, T) mask."""
    n = len(parts[0][0])
    lens = torch.randint(lengths[0], lengths[1] + 1, (n,), generator=g)
    t = int(lens.max())
    mask = torch.arange(t)[None] < lens[:, None]
    x = sigma * torch.randn(n, t, dim, generator=g)
    for factor, direction in parts:
        x = x + factor[:, None, None] * direction
    return x * mask[..., None], mask


@dataclass
class ClaimTask:
    """A task's settings; ``kind`` picks the generator (see the module docstring)."""

    kind: str
    modalities: tuple[str, ...]
    dims: dict[str, int] = field(default_factory=lambda: dict(DIMS))
    seed: int = 0  # fixes the directions
    num_classes: int = 0  # 0: a regression label; else class indices in [0, num_classes)

    @property
    def settings(self) -> dict[str, object]:
        """Model settings the task needs (the task kind and class count)."""
        return {"task": "classification", "num_classes": self.num_classes} if self.num_classes else {}

    def sample(self, n: int, g: torch.Generator, split: str = "train") -> dict[str, Tensor]:
        return getattr(self, f"_{self.kind}")(n, g, split)

    def _competition(self, n: int, g: torch.Generator, split: str) -> dict[str, Tensor]:
        s1, s2 = torch.randn(n, generator=g), torch.randn(n, generator=g)
        d = directions(self.dims, 1, self.seed)
        out = {"label": (s1 + 0.5 * s2).clamp(-3, 3), "s1": s1, "s2": s2}
        out["text"], out["text_mask"] = _sequences([(s1, d["text"][0])], self.dims["text"], LENGTHS["text"], 0.3, g)
        out["audio"], out["audio_mask"] = _sequences(
            [(s2, 0.5 * d["audio"][0])], self.dims["audio"], LENGTHS["audio"], 3.0, g
        )
        return out

    def _competition_classes(self, n: int, g: torch.Generator, split: str) -> dict[str, Tensor]:
        out = self._competition(n, g, split)
        out["label"] = 2 * (out["s1"] > 0).long() + (out["s2"] > 0).long()
        return out

    def _purification(self, n: int, g: torch.Generator, split: str) -> dict[str, Tensor]:
        s1, s2 = torch.randn(n, generator=g), torch.randn(n, generator=g)
        d = directions(self.dims, 1, self.seed)
        out = {"label": (s1 + s2).clamp(-3, 3), "s1": s1, "s2": s2}
        out["text"], out["text_mask"] = _sequences([(s1, d["text"][0])], self.dims["text"], LENGTHS["text"], 1.0, g)
        video, mask = _sequences([(s2, d["video"][0])], self.dims["video"], LENGTHS["video"], 1.0, g)
        noisy = (torch.rand(mask.shape, generator=g) < 0.5) & mask
        noise = 4.0 * torch.randn(video.shape, generator=g)
        out["video"], out["video_mask"], out["video_noisy"] = torch.where(noisy[..., None], noise, video), mask, noisy
        return out

    def _nuisance(self, n: int, g: torch.Generator, split: str) -> dict[str, Tensor]:
        s, e = torch.randn(n, generator=g), torch.randn(n, generator=g)
        nuisance = e if split == "test" else s + 0.5 * e
        d = directions(self.dims, 2, self.seed)
        out = {"label": s.clamp(-3, 3), "s1": s, "nuisance": nuisance}
        out["text"], out["text_mask"] = _sequences(
            [(s, d["text"][0]), (nuisance, d["text"][1])], self.dims["text"], LENGTHS["text"], 1.0, g
        )
        for m in ("audio", "video"):
            out[m], out[f"{m}_mask"] = _sequences([(s, d[m][0])], self.dims[m], LENGTHS[m], 1.0, g)
        return out

    def _redundancy(self, n: int, g: torch.Generator, split: str) -> dict[str, Tensor]:
        c, u1, u2 = (torch.randn(n, generator=g) for _ in range(3))
        d = directions(self.dims, 2, self.seed)
        out = {"label": (c + u1 + u2).clamp(-3, 3), "c": c, "u1": u1, "u2": u2}
        out["text"], out["text_mask"] = _sequences(
            [(c, d["text"][0]), (u1, d["text"][1])], self.dims["text"], LENGTHS["text"], 1.0, g
        )
        out["audio"], out["audio_mask"] = _sequences(
            [(c, d["audio"][0]), (u2, d["audio"][1])], self.dims["audio"], LENGTHS["audio"], 1.0, g
        )
        return out


TASKS = {
    "competition_classes": ClaimTask("competition_classes", ("text", "audio"), num_classes=4),
    "competition": ClaimTask("competition", ("text", "audio")),
    "purification": ClaimTask("purification", ("text", "video")),
    "nuisance": ClaimTask("nuisance", ("text", "audio", "video")),
    "redundancy": ClaimTask("redundancy", ("text", "audio")),
}


def make_data(task: ClaimTask, seed: int, sizes: dict[str, int]) -> dict[str, dict[str, Tensor]]:
    """train / valid / test sets of ``task`` drawn with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return {split: task.sample(n, g, split) for split, n in sizes.items()}
