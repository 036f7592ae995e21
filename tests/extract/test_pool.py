"""Decode workers: started while the models load, capped to two malloc arenas, and the encoder process never
imports MediaPipe (the graph runs in the workers)."""

from __future__ import annotations

import ctypes
import json
import multiprocessing as mp
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
from conftest import MEDIA, ROOT, bundled_rows, write_manifest

import extract.pipeline as pipeline
from extract.clip import decode_settings
from extract.pool import DecodePool
from extract.worker import MALLOC_ARENAS

glibc = sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "malloc_info")


def heaps_after_threads(threads: int = 8) -> int:
    """Start ``threads`` threads that each allocate and free small blocks at the same time, then count this
    process's malloc arenas (the ``<heap>`` elements of glibc's ``malloc_info``)."""
    barrier = threading.Barrier(threads)

    def churn() -> None:
        barrier.wait()
        for _ in range(200):
            blocks = [bytearray(512) for _ in range(64)]
            del blocks

    running = [threading.Thread(target=churn) for _ in range(threads)]
    for t in running:
        t.start()
    for t in running:
        t.join()
    libc = ctypes.CDLL(None)
    libc.fopen.restype = ctypes.c_void_p
    with tempfile.NamedTemporaryFile(suffix=".xml") as f:
        fp = libc.fopen(f.name.encode(), b"w")
        libc.malloc_info(0, ctypes.c_void_p(fp))
        libc.fclose(ctypes.c_void_p(fp))
        return Path(f.name).read_text().count("<heap nr=")


@pytest.mark.skipif(not glibc, reason="malloc arenas are glibc's")
def test_decode_workers_keep_to_two_malloc_arenas(tiny_cfg):
    settings = decode_settings(tiny_cfg(modalities=("audio",)))
    with DecodePool(settings, 1) as pool:
        pool.start()
        in_worker = pool._submit(heaps_after_threads).result(timeout=120)
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as plain:  # the same threads in a process that did not cap them
        uncapped = plain.apply(heaps_after_threads)
    assert in_worker <= MALLOC_ARENAS < uncapped


def test_decode_workers_start_while_the_models_load(tmp_path, tiny_cfg, monkeypatch):
    seen: list[int] = []
    built = pipeline.build_extractors

    def loading(cfg):
        # Spawned workers are children of this process from their first moment (before their imports finish).
        seen.append(len(mp.active_children()))
        return built(cfg)

    monkeypatch.setattr(pipeline, "build_extractors", loading)
    rows = [r for r in bundled_rows() if r["video_id"] == "grid"][:2]
    manifest = write_manifest(tmp_path / "m.csv", rows)
    summary = pipeline.run_extract(manifest, MEDIA, tmp_path / "out", tiny_cfg(workers=2, shard_size=2))
    assert seen == [2]
    assert summary["samples_written"] == 2 and summary["complete"]
    assert mp.active_children() == []  # and stopped with the run


def test_no_workers_are_started_when_there_is_nothing_to_decode(tmp_path, tiny_cfg, monkeypatch):
    seen: list[int] = []
    built = pipeline.build_extractors
    monkeypatch.setattr(pipeline, "build_extractors", lambda cfg: seen.append(len(mp.active_children())) or built(cfg))
    manifest = write_manifest(tmp_path / "m.csv", bundled_rows()[:2])
    pipeline.run_extract(manifest, MEDIA, tmp_path / "out", tiny_cfg(workers=2, modalities=("text",)))
    assert seen == [0]


def test_the_encoder_process_never_imports_mediapipe(tmp_path, tiny_cfg):
    """MediaPipe's import costs 1.4 CPU-seconds and its memory; the encoder process only needs its version."""
    from importlib import metadata

    manifest = write_manifest(tmp_path / "m.csv", [r for r in bundled_rows() if r["video_id"] == "grid"][:1])
    cfg = tiny_cfg(workers=1)
    script = f"""
import json, sys
from extract.config import make_config
from extract.pipeline import run_extract
s = run_extract({str(manifest)!r}, {str(MEDIA)!r}, {str(tmp_path / "out")!r},
                make_config(None, text_model={cfg.text_model!r}, audio_model={cfg.audio_model!r}, workers=1))
print(json.dumps([s["samples_written"], "mediapipe" in sys.modules]))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [1, False]
    fs = json.loads((tmp_path / "out" / "dataset.json").read_text())["feature_set"]
    assert (
        fs["extractors"]["video"]["model"] == f"mediapipe=={metadata.version('mediapipe')} face_mesh refine_landmarks"
    )
