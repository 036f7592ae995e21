"""A synthetic three-modality sequence task where fusion is necessary and one modality is partly noise.

Two independent latent factors s1, s2 ~ N(0, 1) per sample; the regression label is y = clip(s1 + s2, -3, 3),
so no single factor explains more than half of its variance.

- text  (B, T_t, D_t): every valid step is s1 * u + sigma * noise (u a fixed random direction);
- audio (B, T_a, D_a): every valid step is s2 * w + sigma * noise;
- video (B, T_v, D_v): *clean* steps are s1 * v + sigma * noise (redundant with text); *noisy* steps (a
  ``noisy_fraction`` of them, marked in ``video_noisy``) are pure noise of scale ``noise_scale``.

So the label needs two modalities (text or video for s1, and audio for s2); the best single modality can
reach a correlation of about 0.7 with y, a model that fuses text and audio close to 1; and a model that
can gate out the noisy video steps (MIM) gains from doing so. Sequence lengths vary per sample and are
padded, with masks as in shards/schema.py (True = valid). Everything is drawn from one ``torch.Generator``,
so a seed fixes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

DEFAULT_DIMS = {"text": 16, "audio": 12, "video": 10}
DEFAULT_LENGTHS = {"text": (6, 12), "audio": (10, 20), "video": (8, 16)}


@dataclass
class SyntheticTask:
    """Settings of the generator; ``sample(n, generator)`` draws a dataset."""

    dims: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_DIMS))
    lengths: dict[str, tuple[int, int]] = field(default_factory=lambda: dict(DEFAULT_LENGTHS))
    sigma: float = 1.0  # per-step noise on informative steps
    noisy_fraction: float = 0.5  # share of video steps that carry no signal
    noise_scale: float = 4.0  # scale of those noise steps
    seed: int = 0  # fixes the directions u, w, v (the "world"); samples use their own generator

    def directions(self) -> dict[str, Tensor]:
        g = torch.Generator().manual_seed(self.seed)
        return {
            m: torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0) * 2.0 for m, d in self.dims.items()
        }

    def sample(self, n: int, generator: torch.Generator) -> dict[str, Tensor]:
        """A padded batch of n samples: ``text``/``audio``/``video`` (n, T_max, D), their ``*_mask`` (n, T_max),
        ``label`` (n,), the latents ``s1``, ``s2`` (n,) and ``video_noisy`` (n, T_video) True on noise-only steps."""
        s1 = torch.randn(n, generator=generator)
        s2 = torch.randn(n, generator=generator)
        directions = self.directions()
        factor = {"text": s1, "audio": s2, "video": s1}
        out: dict[str, Tensor] = {"label": (s1 + s2).clamp(-3.0, 3.0), "s1": s1, "s2": s2}
        for m, dim in self.dims.items():
            low, high = self.lengths[m]
            lengths = torch.randint(low, high + 1, (n,), generator=generator)
            t = int(lengths.max())
            mask = torch.arange(t)[None] < lengths[:, None]
            x = factor[m][:, None, None] * directions[m] + self.sigma * torch.randn(n, t, dim, generator=generator)
            if m == "video":
                noisy = (torch.rand(n, t, generator=generator) < self.noisy_fraction) & mask
                x = torch.where(noisy[..., None], self.noise_scale * torch.randn(n, t, dim, generator=generator), x)
                out["video_noisy"] = noisy
            out[m] = x * mask[..., None]
            out[f"{m}_mask"] = mask
        return out


def take(data: dict[str, Tensor], index: Tensor) -> dict[str, Tensor]:
    """Rows ``index`` of every tensor in a dataset dict (a mini-batch)."""
    return {k: v[index] for k, v in data.items()}
