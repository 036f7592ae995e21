"""Speech recognition for corpora without transcripts: a local Whisper checkpoint, decoded greedily.

:class:`WhisperTranscriber` turns a batch of decoded clips into one transcript per clip (or a
:class:`ModalityFailure` saying why not); the text extractor then encodes that transcript like a manifest one.
Only the real part of the audio (``audio_span``, not the silence padding of a late or early stream) is
transcribed. Whisper sees 30 s at a time, so longer audio is cut into consecutive 30 s windows whose texts are
joined with a space. Windows of all clips in a call are batched together; each window is padded to 30 s on its
own and decoded greedily (one beam, no sampling, no temperature fallback), so a clip's transcript does not
depend on its batch mates or the batch size.

The checkpoint is a directory saved with ``save_pretrained`` (model, generation config, tokenizer and feature
extractor); it is never downloaded.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from extract.extractors.base import DecodedClip, ExtractionError, ModalityFailure, ModelNotFoundError, shared
from extract.models import resolve_model, weights_hash
from shards.schema import SAMPLE_RATE

log = logging.getLogger(__name__)

WINDOW_S = 30.0  # Whisper's fixed input length
PROMPT_TOKENS = 4  # <|startoftranscript|> <|lang|> <|transcribe|> <|notimestamps|>
TASK = "transcribe"


def check_whisper_dir(path: Path) -> None:
    """Raise :class:`ModelNotFoundError` naming ``path`` and every missing part unless it is a saved Whisper."""
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"ASR model {path}: cannot read config.json ({exc})") from exc
    if model_type != "whisper":
        raise ModelNotFoundError(
            f"ASR model {path} is not a Whisper checkpoint (config.json has model_type {model_type!r}); --asr needs "
            "a Whisper model saved with save_pretrained, e.g. openai/whisper-small from the Hugging Face cache"
        )
    missing = []
    if not (path / "tokenizer.json").is_file() and not all((path / f).is_file() for f in ("vocab.json", "merges.txt")):
        missing.append("the tokenizer (tokenizer.json, or vocab.json + merges.txt)")
    if not (path / "preprocessor_config.json").is_file():
        missing.append("the feature extractor (preprocessor_config.json)")
    if not (path / "generation_config.json").is_file():
        missing.append("the generation settings (generation_config.json)")
    if missing:
        raise ModelNotFoundError(
            f"ASR model {path} lacks {'; '.join(missing)}. Save the whole checkpoint: "
            "WhisperForConditionalGeneration.save_pretrained(DIR) and WhisperProcessor.save_pretrained(DIR)"
        )


class _NaNScores(LogitsProcessor):
    """Logits processor that records which rows ever scored NaN or +inf (−inf is how tokens are suppressed)."""

    def __init__(self) -> None:
        self.bad: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        rows = (torch.isnan(scores) | torch.isposinf(scores)).any(dim=-1).cpu()
        self.bad = rows if self.bad is None else self.bad | rows
        return scores


class WhisperTranscriber:
    """Transcribe clips with a local Whisper checkpoint: ``setup(device)`` once, then call on batches of clips.

    ``batch_size`` counts 30 s windows per ``generate`` call; ``max_new_tokens`` bounds each window's text
    (lowered to what the model's ``max_target_positions`` allows); ``language`` is a Whisper language code or name
    (``"en"``, ``"german"``) for multilingual checkpoints, ``None`` to detect it per window.
    """

    name = "whisper-asr"
    version = "1"
    modality = "transcript"  # it fills no modality: it writes the transcripts the text extractor reads
    members: tuple[str, ...] = ()
    runs_in = "encoder"

    @dataclass(frozen=True)
    class Settings:
        """``asr: {model, language}``; no model: no speech recognition."""

        model: str | None = None  # local Whisper checkpoint: transcribe clips whose manifest text is empty
        language: str | None = None  # Whisper language code or name (None: detected per window)
        batch_size: int = shared(8)
        SETTING_ALIASES: ClassVar[dict[str, str]] = {"asr": "model", "asr_language": "language"}

        def problems(self, config: Any) -> list[str]:
            if self.model is None:
                return ["asr.language: set, but asr.model (the Whisper checkpoint) is not"] if self.language else []
            found, modalities = [], list(config.modalities)
            if not self.model.strip():
                found.append("asr.model: empty path; give the directory of a local Whisper checkpoint")
            if "text" not in modalities:
                found.append(f"asr.model: transcripts feed the text modality, which modalities {modalities} omit")
            if "audio" not in modalities:
                found.append(
                    f"asr.model: no audio to transcribe with modalities {modalities}; add audio "
                    "(e.g. --modalities text,audio or text,audio,video)"
                )
            return found

    @classmethod
    def from_settings(cls, settings: Settings) -> WhisperTranscriber:
        if settings.model is None:
            raise ExtractionError("no ASR model: set asr.model (--asr) to the directory of a local Whisper checkpoint")
        return cls(settings.model, batch_size=settings.batch_size, language=settings.language)

    def __init__(self, model: str, batch_size: int = 8, max_new_tokens: int = 128, language: str | None = None):
        if batch_size < 1 or max_new_tokens < 1:
            raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size} and {max_new_tokens}")
        self.model_id = model
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.language = language
        self.device = "cpu"
        self._model: Any = None
        self._features: Any = None
        self._tokenizer: Any = None
        self._generation: Any = None
        self._multilingual = False
        self._hash = ""

    def setup(self, device: str = "cpu") -> None:
        """Load the checkpoint from its directory (never from the network) onto ``device``, in eval mode."""
        from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperTokenizer

        path = resolve_model(self.model_id, "ASR")
        check_whisper_dir(path)
        try:
            model = WhisperForConditionalGeneration.from_pretrained(path, local_files_only=True)
            self._tokenizer = WhisperTokenizer.from_pretrained(path, local_files_only=True)
            self._features = WhisperFeatureExtractor.from_pretrained(path, local_files_only=True)
        except Exception as exc:  # corrupt files surface as many error types; say which checkpoint
            raise ExtractionError(f"ASR model {path} cannot be loaded: {type(exc).__name__}: {exc}") from exc
        self._features.dither = 0.0  # dithering adds random noise: transcripts must be reproducible
        self._model = model.eval().to(device)
        self.device = device
        self._generation = self._generation_config(path)
        self._hash = weights_hash(self._model, path)
        try:
            self._transcribe([np.zeros(SAMPLE_RATE // 10, dtype=np.float32)])
        except Exception as exc:  # a checkpoint that cannot decode would fail every clip: stop before any work
            raise ExtractionError(f"ASR model {path} cannot transcribe: {type(exc).__name__}: {exc}") from exc

    def _generation_config(self, path: Path) -> Any:
        gen = copy.deepcopy(self._model.generation_config)
        self._multilingual = bool(getattr(gen, "is_multilingual", hasattr(gen, "lang_to_id")))
        if self.language is not None:
            if not self._multilingual or not getattr(gen, "lang_to_id", None):
                raise ExtractionError(
                    f"ASR model {path} is English-only: it takes no language; drop asr_language / --asr-language"
                )
            self._check_language(gen.lang_to_id, path)
        limit = int(self._model.config.max_target_positions) - PROMPT_TOKENS
        if self.max_new_tokens > limit:
            log.info("ASR max_new_tokens lowered from %d to %d (the model's limit)", self.max_new_tokens, limit)
            self.max_new_tokens = limit
        # Whisper's generate reads max_length as new tokens after the prompt, like max_new_tokens; setting
        # max_new_tokens instead makes transformers warn on every call that both are set.
        gen.max_length, gen.max_new_tokens = self.max_new_tokens, None
        gen.num_beams, gen.do_sample, gen.num_return_sequences = 1, False, 1
        gen.return_timestamps = False
        # Thresholds would switch on temperature fallback or silence skipping; decoding stays plain greedy.
        gen.logprob_threshold = gen.compression_ratio_threshold = gen.no_speech_threshold = None
        return gen

    def _check_language(self, lang_to_id: dict[str, int], path: Path) -> None:
        from transformers.models.whisper.tokenization_whisper import TO_LANGUAGE_CODE

        lang = self.language.lower()  # type: ignore[union-attr]
        token = lang if lang in lang_to_id else f"<|{TO_LANGUAGE_CODE.get(lang, lang)}|>"
        if token not in lang_to_id:
            codes = sorted(k.strip("<|>") for k in lang_to_id)
            raise ExtractionError(
                f"ASR language {self.language!r} is not one of model {path}'s languages: {', '.join(codes)}"
            )

    def provenance(self) -> dict[str, Any]:
        """What determines the transcripts (and so the text features): model, weights and decoding settings."""
        return {
            "name": self.name,
            "version": self.version,
            "model": self.model_id,
            "weights_sha256": self._hash,
            "task": TASK,
            "language": self.language,
            "max_new_tokens": self.max_new_tokens,
            "decoding": "greedy",
            "window_s": WINDOW_S,
        }

    @torch.inference_mode()
    def __call__(self, clips: Sequence[DecodedClip]) -> list[str | ModalityFailure]:
        """One stripped transcript per clip (``""`` when nothing was recognised), or why there is none."""
        if self._model is None:
            raise ExtractionError("WhisperTranscriber.setup(device) must be called before transcribing")
        results: list[str | ModalityFailure | None] = [None] * len(clips)
        windows: list[tuple[int, np.ndarray]] = []  # (clip index, float waveform of at most 30 s)
        for i, c in enumerate(clips):
            pieces = self._windows(c)
            if isinstance(pieces, ModalityFailure):
                results[i] = pieces
            else:
                windows.extend((i, w) for w in pieces)
        texts: dict[int, list[str]] = {}
        for lo in range(0, len(windows), self.batch_size):
            batch = windows[lo : lo + self.batch_size]
            try:
                out: list[str] | ModalityFailure = self._transcribe([w for _, w in batch])
            except Exception as exc:  # one bad batch must not lose the others; its clips record why
                log.warning("ASR batch of %d windows failed: %s: %s", len(batch), type(exc).__name__, exc)
                out = ModalityFailure(f"transcription failed: {type(exc).__name__}: {exc}")
            for k, (i, _) in enumerate(batch):
                if isinstance(results[i], ModalityFailure):
                    continue
                if isinstance(out, ModalityFailure):
                    results[i] = out
                elif out[k] is None:
                    results[i] = ModalityFailure("transcription failed: the ASR model produced NaN/inf scores")
                else:
                    texts.setdefault(i, []).append(out[k])
        for i, parts in texts.items():
            if results[i] is None:
                results[i] = " ".join(p for p in parts if p)
        return results  # type: ignore[return-value]

    def _windows(self, c: DecodedClip) -> list[np.ndarray] | ModalityFailure:
        """The real part of a clip's audio as float waveforms of at most 30 s each."""
        if c.wave is None:
            error = c.status.get("audio", {}).get("error")
            return ModalityFailure("no audio to transcribe" + (f": {error}" if error else ""))
        lo, hi = c.audio_span if c.audio_span is not None else (0.0, len(c.wave) / SAMPLE_RATE)
        real = c.wave[max(0, round(lo * SAMPLE_RATE)) : round(hi * SAMPLE_RATE)]
        if not len(real):
            return ModalityFailure("no audio to transcribe: the audio span holds no samples")
        wave = real.astype(np.float32) / 32768.0
        step = int(WINDOW_S * SAMPLE_RATE)
        return [wave[s : s + step] for s in range(0, len(wave), step)]

    def _transcribe(self, waves: list[np.ndarray]) -> list[str | None]:
        """One ``generate`` call on up to 30 s waveforms; ``None`` for a window whose scores went NaN/inf."""
        inputs = self._features(
            waves, sampling_rate=SAMPLE_RATE, return_tensors="pt", return_attention_mask=True, device=self.device
        )
        check = _NaNScores()
        kwargs: dict[str, Any] = {"task": TASK, "language": self.language} if self._multilingual else {}
        sequences = self._model.generate(
            inputs.input_features.to(self.device, self._model.dtype),
            attention_mask=inputs.attention_mask.to(self.device),  # unused by Whisper; silences a batch warning
            generation_config=self._generation,
            logits_processor=LogitsProcessorList([check]),
            **kwargs,
        )
        texts = self._tokenizer.batch_decode(sequences.cpu(), skip_special_tokens=True)
        bad = check.bad.tolist() if check.bad is not None else [False] * len(waves)
        return [None if b else t.strip() for t, b in zip(texts, bad, strict=True)]
