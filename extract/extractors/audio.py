"""Audio: a wav2vec 2.0-family encoder (wav2vec2, HuBERT, WavLM) at about 50 frames/s.

Batching is exact (``extract.extractors.wav2vec2``): the convolutional feature encoder runs on the padded
batch with wav2vec2-base's group norm computed over each clip's valid frames only, then the transformer runs
once with an attention mask. A clip's features are therefore the same whatever it is batched with; the tests
check this against unbatched calls and against torchaudio's implementation.

Long clips are cut into ``chunk_s`` windows (default 30 s) so attention memory stays bounded. Batches are
planned per device (``batch_plan``): on CPU by count with little length slack, on CUDA by a budget of padded
samples.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from extract.auto import resolve_precision
from extract.extractors.base import (
    DecodedClip,
    Extractor,
    ExtractorResult,
    ModalityFailure,
    check_finite,
    precision_context,
    precision_provenance,
    range_problem,
    shared,
    to_device,
)
from extract.extractors.wav2vec2 import encode_pieces, receptive_field
from extract.models import (
    DEFAULT_AUDIO_MODEL,
    RANDOM_AUDIO_CONFIGS,
    RANDOM_PREFIX,
    RANDOM_SEED,
    resolve_model,
    weights_hash,
)
from shards.schema import SAMPLE_RATE

MAX_AUDIO_CHUNK_S = 600.0  # an encoder window of 10 minutes: attention over 30,000 wav2vec 2.0 frames at most


def build_random_wav2vec2(name: str) -> Any:
    """A wav2vec 2.0 of a named shape with seeded random weights (architecture only, not pretrained)."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    if name not in RANDOM_AUDIO_CONFIGS:
        raise ValueError(f"unknown random audio model {name!r}; valid: {sorted(RANDOM_AUDIO_CONFIGS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        return Wav2Vec2Model(Wav2Vec2Config(**RANDOM_AUDIO_CONFIGS[name]))


class AudioExtractor(Extractor):
    name = "speech-ssl"
    version = "1"
    modality = "audio"
    members = ("audio_feat.npy", "audio_mask.npy", "audio_time.npy", "audio_wave.npy")
    runs_in = "encoder"

    @dataclass(frozen=True)
    class Settings:
        """``audio: {model, layer, chunk_s}``."""

        model: str = DEFAULT_AUDIO_MODEL  # wav2vec2/HuBERT/WavLM id or path; random:NAME = seeded random init
        layer: int = -1  # hidden-state layer (-1: last)
        chunk_s: float = 30.0  # long audio is encoded in windows of this length, in [1, MAX_AUDIO_CHUNK_S]
        batch_size: int = shared(8)
        raw: bool = shared(True)  # keep the waveform (audio_wave.npy)
        precision: str | None = shared(None)  # None: resolved for the device (extract.auto.resolve_precision)
        SETTING_ALIASES: ClassVar[dict[str, str]] = {
            "audio_model": "model", "audio_layer": "layer", "audio_chunk_s": "chunk_s"
        }  # fmt: skip

        def problems(self, config: Any) -> list[str]:
            return [p for p in [range_problem("audio.chunk_s", self.chunk_s, 1.0, MAX_AUDIO_CHUNK_S)] if p]

    @classmethod
    def from_settings(cls, settings: Settings) -> AudioExtractor:
        s = settings
        return cls(
            model=s.model, layer=s.layer, batch_size=s.batch_size, chunk_s=s.chunk_s, keep_wave=s.raw,
            precision=s.precision,
        )  # fmt: skip

    def __init__(
        self,
        model: str = DEFAULT_AUDIO_MODEL,
        layer: int = -1,
        batch_size: int = 8,
        chunk_s: float = 30.0,
        keep_wave: bool = True,
        precision: str | None = None,
    ):
        self.model_id = model
        self.precision = precision
        self.layer = layer
        self.batch_size = batch_size
        self.keep_wave = keep_wave
        self.device = "cpu"
        self.do_normalize = True
        self._model: Any = None
        self._chunk_s = chunk_s

    def setup(self, device: str = "cpu") -> None:
        if self.model_id.startswith(RANDOM_PREFIX):
            model = build_random_wav2vec2(self.model_id[len(RANDOM_PREFIX) :])
            self.pretrained, source = False, self.model_id
        else:
            from transformers import AutoModel

            path = source = resolve_model(self.model_id, "audio")
            model = AutoModel.from_pretrained(path, local_files_only=True)
            pre = path / "preprocessor_config.json"
            if pre.is_file():
                self.do_normalize = bool(json.loads(pre.read_text()).get("do_normalize", True))
            self.pretrained = True
        for part in ("feature_extractor", "feature_projection", "encoder"):
            if not hasattr(model, part):
                raise ValueError(f"{self.model_id}: {type(model).__name__} is not a wav2vec 2.0-family model")
        self._model = model.eval().to(device)
        self.device = device
        self.precision = resolve_precision(self.precision, device)
        cfg = model.config
        self.stride = int(np.prod(cfg.conv_stride))
        self.receptive = receptive_field(cfg.conv_kernel, cfg.conv_stride)
        self.chunk = max(self.receptive, int(self._chunk_s * SAMPLE_RATE) // self.stride * self.stride)
        self._hash = weights_hash(self._model, source)

    @property
    def dim(self) -> int:
        return int(self._model.config.hidden_size)

    def provenance(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "model": self.model_id,
            "pretrained": self.pretrained,
            "architecture": type(self._model).__name__,
            "weights_sha256": self._hash,
            "layer": self.layer,
            "do_normalize": self.do_normalize,
            "chunk_samples": self.chunk,
            "frame_stride_samples": self.stride,
            "sample_rate": SAMPLE_RATE,
            "dims": {"Da": self.dim},
            **precision_provenance(self.precision),
        }

    def n_frames(self, n_samples: int) -> int:
        n = n_samples
        for k, s in zip(self._model.config.conv_kernel, self._model.config.conv_stride, strict=True):
            n = (n - k) // s + 1
        return max(n, 0)

    @torch.inference_mode()
    def __call__(self, clips: Sequence[DecodedClip]) -> list[ExtractorResult]:
        results: list[ExtractorResult | None] = [None] * len(clips)
        pieces: list[tuple[int, int, torch.Tensor]] = []  # (clip index, chunk start sample, prepared wave)
        for i, c in enumerate(clips):
            if c.wave is None:
                results[i] = ModalityFailure(c.status.get("audio", {}).get("error") or "no audio decoded")
                continue
            wave = to_device(torch.from_numpy(c.wave.astype(np.float32) / 32768.0), self.device)
            pieces += [(i, lo, piece) for lo, piece in wave_pieces(wave, self.receptive, self.chunk, self.do_normalize)]
        feats: dict[tuple[int, int], np.ndarray] = {}
        order = sorted(range(len(pieces)), key=lambda j: pieces[j][2].numel())
        for group in batch_plan([pieces[j][2].numel() for j in order], self.batch_size, self.device):
            batch = [pieces[order[k]] for k in group]
            for (i, lo, _), f in zip(batch, self._encode([p for _, _, p in batch]), strict=True):
                feats[(i, lo)] = f
        for i, c in enumerate(clips):
            if results[i] is not None:
                continue
            starts = sorted(lo for (j, lo) in feats if j == i)
            feat = np.concatenate([feats[(i, lo)] for lo in starts])
            frame_start = np.concatenate([lo + np.arange(len(feats[(i, lo)])) * self.stride for lo in starts]).astype(
                np.float64
            )
            centre = (frame_start + self.receptive / 2) / SAMPLE_RATE
            a, b = c.audio_span or (0.0, 0.0)
            out = {
                "audio_feat.npy": feat.astype(np.float16),
                "audio_mask.npy": (centre >= a) & (centre < b),
                "audio_time.npy": centre.astype(np.float32),
            }
            if self.keep_wave:
                out["audio_wave.npy"] = c.wave.astype(np.int16)
            results[i] = check_finite(out)
        return results  # type: ignore[return-value]

    def _encode(self, pieces: list[torch.Tensor]) -> list[np.ndarray]:
        with precision_context(self.device, self.precision):
            states, lengths = encode_pieces(self._model, pieces, self.layer)
        states = states.float().cpu().numpy()
        return [states[k, :n] for k, n in enumerate(lengths.tolist())]


def wave_pieces(wave: torch.Tensor, receptive: int, chunk: int, normalise: bool) -> list[tuple[int, torch.Tensor]]:
    """One clip's waveform (N,) float in [-1, 1] → the pieces the encoder sees, each with its start sample.

    Shared by extraction and end-to-end training, so both feed the model the same values: a clip shorter than
    one frame is zero-padded to ``receptive`` samples (the audio mask says what is real); with ``normalise``
    (the checkpoint's ``do_normalize``) the whole clip gets zero mean and unit variance; then it is cut into
    ``chunk``-sample windows, dropping a tail window too short for one frame. Differentiable.
    """
    wave = wave.float()
    if wave.numel() < receptive:
        wave = torch.nn.functional.pad(wave, (0, receptive - wave.numel()))
    if normalise:
        wave = (wave - wave.mean()) / torch.sqrt(wave.var(unbiased=False) + 1e-7)
    return [
        (lo, wave[lo : lo + chunk]) for lo in range(0, wave.numel(), chunk) if lo == 0 or wave.numel() - lo >= receptive
    ]


def length_buckets(lengths: Sequence[int], batch_size: int, slack: float = 1.1) -> list[list[int]]:
    """Batches of positions into ``lengths`` (sorted ascending): at most ``batch_size`` each, and a new batch
    whenever a length exceeds the batch's shortest by more than ``slack``. On CPU, padding a 3 s clip to 6 s
    costs more transformer time than batching saves (BENCHMARKS.md, extraction section)."""
    groups: list[list[int]] = []
    for k, n in enumerate(lengths):
        if groups and len(groups[-1]) < batch_size and n <= slack * lengths[groups[-1][0]]:
            groups[-1].append(k)
        else:
            groups.append([k])
    return groups


TYPICAL_CLIP_SAMPLES = 8 * SAMPLE_RATE  # CUDA budget per ``batch_size`` unit: an 8 s utterance (MOSI/MOSEI-like)


def batch_plan(lengths: Sequence[int], batch_size: int, device: str) -> list[list[int]]:
    """How pieces of ``lengths`` (sorted ascending) are batched on ``device``. CPU: ``length_buckets``, at most
    ``batch_size`` pieces within a 1.1 length slack. CUDA: ``sample_budget_batches`` with a budget of
    ``batch_size * TYPICAL_CLIP_SAMPLES`` padded samples, so a GPU batch carries about as much audio as
    ``batch_size`` typical clips however their lengths spread (count-with-slack gave batches of 1-2 clips)."""
    if str(device).startswith("cuda"):
        return sample_budget_batches(lengths, batch_size * TYPICAL_CLIP_SAMPLES)
    return length_buckets(lengths, batch_size)


def sample_budget_batches(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Batches of positions into ``lengths`` (sorted ascending) whose padded size (pieces x longest) stays
    within ``budget`` samples; a piece longer than the budget is batched alone."""
    groups: list[list[int]] = []
    for k, n in enumerate(lengths):
        if groups and (len(groups[-1]) + 1) * n <= budget:
            groups[-1].append(k)
        else:
            groups.append([k])
    return groups
