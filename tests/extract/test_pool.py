"""Decode workers: started while the models load, capped to two malloc arenas, and the encoder process never
imports MediaPipe (the graph runs in the workers)."""

from __future__ import annotations

import ctypes
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
from conftest import MEDIA, ROOT, bundled_rows, write_manifest

import extract.pipeline as pipeline
from extract.clip import decode_settings
from extract.manifest import load_manifest
from extract.pool import DecodePool
from extract.worker import MALLOC_ARENAS, WORKER_NICENESS

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


@pytest.mark.parametrize(("ready", "groups"), [(True, [3, 1]), (False, [1, 1, 1, 1])])
def test_the_encoders_take_what_is_decoded_rather_than_wait_for_a_full_group(
    tmp_path, tiny_cfg, monkeypatch, ready, groups
):
    """Batch 3 over a 4-clip shard: full groups while the next clip is always decoded already; one clip at a time
    while it never is (the encoders would otherwise wait for the group to fill)."""
    sizes: list[int] = []
    built = pipeline.build_extractors

    class Recording:  # the text extractor, noting each group's size
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def __call__(self, clips):
            sizes.append(len(clips))
            return self.inner(clips)

    def recording(cfg):
        found = built(cfg)
        return {**found, "text": Recording(found["text"])}

    monkeypatch.setattr(pipeline, "build_extractors", recording)
    monkeypatch.setattr(DecodePool, "next_ready", lambda self: ready)
    manifest = write_manifest(tmp_path / "m.csv", [{**r, "mode": "train"} for r in bundled_rows()])  # one shard
    summary = pipeline.run_extract(manifest, MEDIA, tmp_path / "out", tiny_cfg(workers=1, batch_size=3, shard_size=4))
    assert summary["samples_written"] == 4 and summary["complete"]
    assert sizes == groups


def test_next_ready_says_whether_the_next_clip_is_decoded(tmp_path, tiny_cfg):
    rows = [r for r in bundled_rows() if r["video_id"] == "grid"][:2]
    clips = load_manifest(write_manifest(tmp_path / "m.csv", rows), MEDIA, need_media=True, need_text=False)
    settings = decode_settings(tiny_cfg(modalities=("audio",)))
    with DecodePool(settings, 1) as pool:
        assert not pool.next_ready()  # nothing in flight
        clips_in = pool.decode([("plan", c) for c in clips], window=2)
        first = next(clips_in)
        assert first[1].clip.key == clips[0].key
        pool._pending[0][1].result(timeout=120)  # the second clip, decoded
        assert pool.next_ready()
        assert [d.clip.key for _, d in clips_in] == [clips[1].key]
        assert not pool.next_ready()  # all handed over


def _niceness_of_a_thread() -> tuple[int, int]:
    """(this worker's niceness, that of a thread it starts now)."""
    seen: list[int] = []
    thread = threading.Thread(target=lambda: seen.append(os.getpriority(os.PRIO_PROCESS, 0)))
    thread.start()
    thread.join()
    return os.getpriority(os.PRIO_PROCESS, 0), seen[0]


def test_decode_workers_run_below_the_encoder_process(tiny_cfg):
    """The workers' extra threads (decoder, MediaPipe graph) must not take the encoder process's core."""
    settings = decode_settings(tiny_cfg(modalities=("audio",)))
    with DecodePool(settings, 1) as pool:
        pool.start()
        assert pool._pool is not None
        worker, thread = pool._pool.submit(_niceness_of_a_thread).result(timeout=120)
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    assert worker == thread == min(19, mine + WORKER_NICENESS)
    assert os.getpriority(os.PRIO_PROCESS, 0) == mine  # the parent's own priority is untouched
