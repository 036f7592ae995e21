"""From decoded clips to samples: the configured extractors run on them and the sample dict is built
(``meta.json`` with per-modality statuses, plus the members of every ok modality).

The shard writer builds each group's samples with these functions; :func:`extract_clip` does the same for one
clip, from decoding on, without writing a shard (``mmfuse predict``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

from extract.config import ExtractConfig
from extract.extractors.base import DecodedClip, ExtractionError, ExtractorResult, ModalityFailure
from extract.manifest import Clip
from extract.registry import EXTRACTORS
from extract.worker import MEDIA, DecodeSettings, decode_clip, init_worker
from shards.schema import MODALITIES, SAMPLE_RATE, SCHEMA_VERSION

ASR = "asr"  # the registry name of the speech recogniser, and its key among the built extractors


def transcribes(cfg: ExtractConfig) -> bool:
    """Whether ``cfg`` recognises speech for clips whose manifest text is empty (``asr.model``, ``--asr``)."""
    return "text" in cfg.modalities and cfg.section(ASR).model is not None


def decode_settings(cfg: ExtractConfig, modalities: Sequence[str] | None = None) -> DecodeSettings:
    """What the decode workers need for ``modalities`` (default: ``cfg.modalities``): the streams to decode, the
    frame rate and limits, and each configured ``"worker"`` extractor's registry entry with its settings."""
    wanted = [m for m in MODALITIES if m in (cfg.modalities if modalities is None else modalities)]
    keys = [cfg.chosen(m) for m in wanted]
    in_worker = tuple((EXTRACTORS[k], cfg.section(k)) for k in keys if EXTRACTORS[k].runs_in == "worker")
    return DecodeSettings(tuple(m for m in MEDIA if m in wanted), cfg.fps, cfg.max_duration_s, in_worker)


def run_extractors(
    live: list[DecodedClip], extractors: dict[str, Any], timings: dict[str, float] | None = None
) -> dict[str, list[ExtractorResult]]:
    """Per modality, one result per clip of ``live``: the speech recogniser (``"asr"``) first fills empty
    transcripts, every ``"encoder"`` extractor runs on the whole group, and the ``"worker"`` extractors' results
    come from the decode workers. Seconds spent are added to ``timings[f"{name}_s"]``."""
    timings = {} if timings is None else timings
    results: dict[str, list[ExtractorResult]] = {}
    if ASR in extractors:
        t = time.perf_counter()
        fill_transcripts(live, extractors[ASR])
        timings["asr_s"] = timings.get("asr_s", 0.0) + time.perf_counter() - t
    for modality in MODALITIES:
        extractor = extractors.get(modality)
        if extractor is None:
            continue
        if extractor.runs_in == "worker":
            results[modality] = [_from_worker(d, modality) for d in live]
            continue
        t = time.perf_counter()
        results[modality] = extractor(live) if live else []
        timings[f"{modality}_s"] = timings.get(f"{modality}_s", 0.0) + time.perf_counter() - t
    return results


def _from_worker(d: DecodedClip, modality: str) -> ExtractorResult:
    if modality in d.features:
        return d.features[modality]
    return ModalityFailure(d.status[modality]["error"])


def make_sample(
    d: DecodedClip, results: dict[str, ExtractorResult], requested: Sequence[str], fs_hash: str, cfg: ExtractConfig
) -> dict[str, Any]:
    """The sample of one decoded clip: ``meta.json`` (``modalities`` holds each modality's status: ok, failed,
    or absent when not in ``requested``) and the members of every ok modality."""
    mods = {m: modality_status(d, m, requested, results.get(m)) for m in MODALITIES}
    sample: dict[str, Any] = {"__key__": d.clip.key, "meta.json": sample_meta(d, mods, fs_hash, cfg)}
    for m in MODALITIES:
        if mods[m]["status"] == "ok":
            sample.update(results[m])
    return sample


def modality_status(d: DecodedClip, modality: str, requested: Sequence[str], result: Any) -> dict[str, Any]:
    if modality not in requested:
        return {"status": "absent", "error": None}
    if isinstance(result, ModalityFailure):
        return {**d.status.get(modality, {}), "status": "failed", "error": result.error}
    return {**d.status.get(modality, {}), "status": "ok", "error": None}


def fill_transcripts(decoded: list[DecodedClip], transcriber: Any) -> None:
    """Give clips whose manifest text is empty the transcript of ``transcriber`` (``--asr``).

    The clip's text is replaced (``meta.json`` then holds the transcript) and ``info["text_source"]`` says
    where the text came from: ``manifest`` or ``asr``; a failed transcription leaves the text empty and its
    reason in ``info["asr_error"]``, which the text status repeats.
    """
    need = []
    for d in decoded:
        if d.clip.text.strip():
            d.info["text_source"] = "manifest"
        else:
            need.append(d)
    if not need:
        return
    for d, result in zip(need, transcriber(need), strict=True):
        if isinstance(result, ModalityFailure):
            d.info["asr_error"] = result.error
        else:
            d.clip = dataclasses.replace(d.clip, text=result)
            d.info["text_source"] = "asr"


def sample_meta(d: DecodedClip, mods: dict[str, Any], fs_hash: str, cfg: ExtractConfig) -> dict[str, Any]:
    c = d.clip
    return {
        "schema_version": SCHEMA_VERSION,
        "key": c.key,
        "video_id": c.video_id,
        "clip_id": c.clip_id,
        "split": c.split,
        "row": c.row,
        "text": c.text,
        "labels": c.labels,
        "words": c.words,
        "media": c.media,
        "start": c.start,
        "end": c.end,
        "duration": round(d.duration, 6),
        "sample_rate": SAMPLE_RATE,
        "fps": d.info.get("fps"),
        "modalities": mods,
        "feature_set_hash": fs_hash,
        "text_truncated_from": d.info.get("text_truncated_from"),
        "text_source": d.info.get("text_source", "manifest" if c.text.strip() else None),
        "asr_model": cfg.section(ASR).model if d.info.get("text_source") == "asr" or "asr_error" in d.info else None,
        "asr_error": d.info.get("asr_error"),
    }


def extract_clip(
    clip: Clip, cfg: ExtractConfig, extractors: dict[str, Any], fs_hash: str, modalities: Sequence[str] | None = None
) -> dict[str, Any]:
    """One clip decoded and encoded as ``run_extract`` does, returned as the sample dict it would write; nothing
    is written.

    ``extractors`` are :func:`extract.pipeline.build_extractors`'s for ``cfg`` and ``fs_hash`` the hash of their
    feature set. Of ``cfg.modalities``, those in ``modalities`` (default: all) are extracted and the others
    recorded absent. Members: ``meta.json`` and, per ok modality, e.g. ``text_feat.npy`` (Tt, Dt) float16,
    ``audio_feat.npy`` (Ta, Da) float16, ``video_lmk.npy`` (Tv, 478, 3) float16 with their masks. Raises
    :class:`ExtractionError` if the clip cannot be decoded (extraction records such a clip as skipped).
    """
    requested = [m for m in MODALITIES if m in cfg.modalities and (modalities is None or m in modalities)]
    settings = decode_settings(cfg, requested)
    if settings.modalities:
        with quiet_native_logs(2):
            init_worker(settings)  # the worker extractors with this config's settings, as the extraction workers
            decoded = decode_clip(clip, settings)
    else:
        decoded = DecodedClip(clip)
    if "skipped" in decoded.info:
        raise ExtractionError(f"cannot decode {clip.media or clip.path}: {decoded.info['skipped']}")
    used = {k: e for k, e in extractors.items() if k in requested or (k == ASR and "text" in requested)}
    results = {m: found[0] for m, found in run_extractors([decoded], used).items()}
    return make_sample(decoded, results, requested, fs_hash, cfg)


@contextlib.contextmanager
def quiet_native_logs(*fds: int) -> Iterator[None]:
    """File descriptors ``fds`` (1: stdout, 2: stderr) sent to /dev/null for the block, for native code that writes
    to them directly: MediaPipe's C++ logging while decoding (decode errors become statuses, so nothing of ours is
    lost), Ray's driver printing task-failure notices from threads of its own."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = [os.dup(fd) for fd in fds]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in fds:
            os.dup2(devnull, fd)
        yield
    finally:
        for fd, copy in zip(fds, saved, strict=True):
            os.dup2(copy, fd)
            os.close(copy)
        os.close(devnull)
