"""The measured variants of ``mmfuse bench extract``, each run in a fresh interpreter.

``python -m bench.extract_variants SPEC.json`` runs the variant named in the spec and writes its measurements
to ``spec["result"]`` (JSON): model loading time (``load_s``, never counted as throughput), run time
(``run_s``), CPU-seconds (``getrusage``), and peak resident set sizes: ``rss_main_mib`` is this process's
own peak and ``rss_worker_mib`` the largest single worker's, both from ``VmHWM`` (``bench.memory``; the
``ru_maxrss`` of a process started by another one includes its starter's peak).

Variants: ``pipeline`` (``run_extract`` with K workers), ``ray`` (the same on Ray: K decoder actors and an
encoder actor), ``naive`` (one process, one clip at a time, batch
size 1: decode, FaceMesh, text, audio) and ``stages`` (each stage alone: decode only and decode + FaceMesh
through a K-worker pool, then the text and audio encoders batched over every clip).

Pool workers are spawned, and a spawned process re-imports the parent's ``__main__``: this module here, the
command-line dispatcher ``mmfuse.cli`` under the ``mmfuse`` command. Both import numpy but not torch; the
dispatcher's other imports add a few tenths of a second to each worker's start-up under ``mmfuse``.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from bench.memory import ChildPeaks, own_peak_mib
from extract.clip import decode_settings as extract_decode_settings
from extract.config import ExtractConfig, make_config
from extract.decode import DecodeError, clip_window, probe
from extract.manifest import Clip, load_manifest
from extract.video import VideoFrames
from extract.waveform import decode_audio
from extract.worker import DecodeSettings, decode_clip, init_worker
from shards.schema import SAMPLE_RATE


def config(spec: dict[str, Any], **overrides: Any) -> ExtractConfig:
    """The benchmark's extraction settings: every variant uses the same models, fps and batch size."""
    base = {
        "text_model": spec["text_model"],
        "audio_model": spec["audio_model"],
        "batch_size": spec["batch_size"],
        "shard_size": spec["shard_size"],
        "workers": spec["workers"],
        "threads": spec["threads"],
        "fps": spec["fps"],
        "device": spec["device"],
        "overwrite": True,
    }
    return make_config(None, **{**base, **overrides})


def decode_settings(cfg: ExtractConfig) -> DecodeSettings:
    return extract_decode_settings(cfg, ("audio", "video"))


def rusage(workers: ChildPeaks) -> dict[str, float]:
    """Peak RSS of this process and of its largest worker (``VmHWM``, see bench.memory), and CPU-seconds of
    this process and of its terminated children (the pool's workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "rss_main_mib": own_peak_mib(),
        "rss_worker_mib": workers.largest_mib,
        "cpu_main_s": me.ru_utime + me.ru_stime,
        "cpu_workers_s": kids.ru_utime + kids.ru_stime,
    }


def run_pipeline(spec: dict[str, Any]) -> dict[str, Any]:
    """(a) The mmfuse pipeline into a fresh directory; setup (model loading, planning) reported apart."""
    import torch

    from extract.pipeline import run_extract

    torch.set_num_threads(spec["threads"])
    summary = run_extract(spec["manifest"], spec["media_root"], spec["out"], config(spec))
    return {
        "load_s": summary["setup_s"],
        "run_s": summary["wall_s"] - summary["setup_s"],
        "samples": summary["samples_written"],
        "first_clip_s": summary["first_clip_s"],  # the encoder process waiting for its first decoded clip
        "decode_wait_s": summary["decode_wait_s"],  # ... and for decoded clips in all
    }


def run_ray(spec: dict[str, Any]) -> dict[str, Any]:
    """(a) on Ray (``--engine ray``, a local Ray started here): setup (model loading, Ray's start) reported apart."""
    from extract.ray_engine import run_extract_ray

    summary = run_extract_ray(spec["manifest"], spec["media_root"], spec["out"], config(spec))
    return {
        "load_s": summary["setup_s"],
        "ray_start_s": summary["ray_start_s"],
        "run_s": summary["wall_s"] - summary["setup_s"],
        "samples": summary["samples_written"],
        "first_clip_s": summary["first_clip_s"],  # the first encoder waiting for its first clip (actor start-up)
        "decode_wait_s": summary["decode_wait_s"],
    }


def run_naive(spec: dict[str, Any]) -> dict[str, Any]:
    """(b) What MMSA-FET does: per clip, decode, FaceMesh, BERT and wav2vec 2.0 with batch size 1, in one process.

    Features are kept in memory (as MMSA-FET does before pickling them); nothing is written to disk.
    """
    import torch

    from extract.pipeline import build_extractors

    torch.set_num_threads(spec["threads"])
    tic = time.perf_counter()
    cfg = config(spec, batch_size=1, workers=0)
    settings = decode_settings(cfg)
    extractors = build_extractors(cfg)
    init_worker(settings)
    import av  # noqa: F401 - imported here so that loading is not counted as the first clip's time
    import mediapipe  # noqa: F401

    load_s = time.perf_counter() - tic
    clips = load_manifest(spec["manifest"], spec["media_root"])
    wall = {"decode_facemesh": 0.0, "text": 0.0, "audio": 0.0}
    cpu = dict.fromkeys(wall, 0.0)
    kept = []
    tic = time.perf_counter()
    for clip in clips:
        t, c = time.perf_counter(), time.process_time()
        decoded = decode_clip(clip, settings)
        wall["decode_facemesh"] += time.perf_counter() - t
        cpu["decode_facemesh"] += time.process_time() - c
        if "skipped" in decoded.info:
            continue
        features = {"video": decoded.features.get("video")}
        for name in ("text", "audio"):
            t, c = time.perf_counter(), time.process_time()
            features[name] = extractors[name]([decoded])[0]
            wall[name] += time.perf_counter() - t
            cpu[name] += time.process_time() - c
        kept.append(features)
    return {
        "load_s": load_s,
        "run_s": time.perf_counter() - tic,
        "samples": len(kept),
        "stage_wall_s": wall,
        "stage_cpu_s": cpu,
    }


def decode_only(clip: Clip, fps: float | None) -> dict[str, float]:
    """(c) Decode one clip's audio (16 kHz) and every frame the pipeline would use; return units and CPU-s."""
    cpu = time.process_time()
    audio_s, frames = 0.0, 0
    p = probe(clip.path)
    t0, t1 = clip_window(p, clip.start, clip.end)
    if p.has_audio:
        try:
            wave, _ = decode_audio(clip.path, p, t0, t1)
            audio_s = len(wave) / SAMPLE_RATE
        except DecodeError:
            pass
    if p.has_video:
        for batch, _ in VideoFrames(clip.path, p, t0, t1, fps).chunks():
            frames += len(batch)
    return {"audio_s": audio_s, "frames": frames, "cpu_s": time.process_time() - cpu}


def decode_facemesh(clip: Clip, settings: DecodeSettings) -> dict[str, float]:
    """(d) Exactly the pipeline worker's job (``decode_clip``: decode + FaceMesh); return its CPU-s."""
    cpu = time.process_time()
    decoded = decode_clip(clip, settings)
    return {"frames": decoded.info.get("video", {}).get("frames", 0), "cpu_s": time.process_time() - cpu}


def _pooled(fn: Any, clips: list[Clip], arg: Any, workers: int, settings: DecodeSettings) -> tuple[float, list]:
    """Wall time (worker start-up included, as in the pipeline) and per-clip results of ``fn`` over a pool."""
    tic = time.perf_counter()
    if workers == 0:  # in this process, as the pipeline decodes without workers
        init_worker(settings)
        results = [fn(c, arg) for c in clips]
        return time.perf_counter() - tic, results
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=init_worker, initargs=(settings, os.getpid())
    ) as pool:
        out = list(pool.map(fn, clips, [arg] * len(clips)))
    return time.perf_counter() - tic, out


def _ready(_: int) -> int:
    return os.getpid()


def stages_at_once(clips: list[Clip], settings: DecodeSettings, workers: int, encode_audio: Any) -> dict[str, float]:
    """(e) The pipeline's two sides at once, as it runs them: decode + FaceMesh in a pool of ``workers`` (started
    first, so both sides begin together) while this process runs ``encode_audio()`` over the same clips. Returns
    each side's CPU-seconds, to compare with their cost alone: contention for caches and memory bandwidth could
    raise them, and threads that wait by spinning burn less when the other core is busy. Whichever side
    finishes first leaves the other to run alone, so any difference is if anything understated. Without
    workers nothing runs at once: the costs alone stand."""
    if workers == 0:
        return {}
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=init_worker, initargs=(settings, os.getpid())
    ) as pool:
        list(pool.map(_ready, range(workers)))
        meshed = pool.map(decode_facemesh, clips, [settings] * len(clips))  # submitted at once
        cpu = time.process_time()
        encode_audio()
        audio_cpu = time.process_time() - cpu
        mesh_cpu = sum(d["cpu_s"] for d in meshed)
    return {"audio_cpu_at_once_s": audio_cpu, "decode_facemesh_cpu_at_once_s": mesh_cpu}


def run_stages(spec: dict[str, Any]) -> dict[str, Any]:
    """(c), (d) and each encoder alone: wall time and CPU-seconds per stage (the machine's floor); then (e),
    decode + FaceMesh and the audio encoder at once (:func:`stages_at_once`)."""
    import torch

    from extract.pipeline import build_extractors

    torch.set_num_threads(spec["threads"])
    cfg = config(spec)
    settings = decode_settings(cfg)
    clips = load_manifest(spec["manifest"], spec["media_root"])
    bare = DecodeSettings(settings.modalities, cfg.fps, cfg.max_duration_s)  # (c): its workers set up no FaceMesh
    decode_wall, decoded = _pooled(decode_only, clips, cfg.fps, cfg.workers, bare)
    mesh_wall, meshed = _pooled(decode_facemesh, clips, settings, cfg.workers, settings)
    tic = time.perf_counter()
    extractors = build_extractors(config(spec, modalities=("text", "audio")))
    load_s = time.perf_counter() - tic
    audio_only = DecodeSettings(("audio",), cfg.fps, cfg.max_duration_s)
    live = [d for d in (decode_clip(c, audio_only) for c in clips) if "skipped" not in d.info]
    mesh_cpu = sum(d["cpu_s"] for d in meshed)
    encoders = {}
    for name in ("text", "audio"):
        t, c = time.perf_counter(), time.process_time()
        extractors[name](live)  # batched over every clip, as one shard of the pipeline does
        encoders[name] = {"wall_s": time.perf_counter() - t, "cpu_s": time.process_time() - c}
    alone = {"audio_cpu_at_once_s": encoders["audio"]["cpu_s"], "decode_facemesh_cpu_at_once_s": mesh_cpu}
    at_once = alone | stages_at_once(clips, settings, cfg.workers, lambda: extractors["audio"](live))
    return at_once | {
        "load_s": load_s,
        "clips": len(clips),
        "audio_s": sum(d["audio_s"] for d in decoded),
        "frames": sum(d["frames"] for d in decoded),
        "decode_wall_s": decode_wall,
        "decode_cpu_s": sum(d["cpu_s"] for d in decoded),
        "decode_facemesh_wall_s": mesh_wall,
        "decode_facemesh_cpu_s": mesh_cpu,
        "text_wall_s": encoders["text"]["wall_s"],
        "text_cpu_s": encoders["text"]["cpu_s"],
        "audio_wall_s": encoders["audio"]["wall_s"],
        "audio_cpu_s": encoders["audio"]["cpu_s"],
    }


def build_tiny_models(root: Path) -> tuple[Path, Path]:
    """A 1-layer BERT (width 21, the bundled MiniLM tokenizer) and a 2-layer wav2vec 2.0 (width 27), saved."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel, Wav2Vec2Config, Wav2Vec2Model

    from extract.models import bundled_models

    text, audio = root / "tiny-bert", root / "tiny-w2v"
    tok = AutoTokenizer.from_pretrained(bundled_models()["all-MiniLM-L6-v2"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        BertModel(
            BertConfig(
                vocab_size=tok.vocab_size,
                hidden_size=21,
                num_hidden_layers=1,
                num_attention_heads=3,
                intermediate_size=37,
                max_position_embeddings=64,
            )  # fmt: skip
        ).save_pretrained(text)
        tok.save_pretrained(text)
        Wav2Vec2Model(
            Wav2Vec2Config(
                hidden_size=27,
                num_hidden_layers=2,
                num_attention_heads=3,
                intermediate_size=33,
                conv_dim=(13,) * 7,
                feat_extract_norm="group",
                do_stable_layer_norm=False,
                num_conv_pos_embeddings=16,
                num_conv_pos_embedding_groups=3,
            )  # fmt: skip
        ).save_pretrained(audio)
    return text, audio


VARIANTS = {"pipeline": run_pipeline, "ray": run_ray, "naive": run_naive, "stages": run_stages}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(argv[0]).read_text())
    os.environ.setdefault("GLOG_minloglevel", "2")
    with ChildPeaks() as workers:
        result = VARIANTS[spec["variant"]](spec)
    result.update(rusage(workers))
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
