"""``mmfuse extract --engine ray``: the same output as the local engine, actors killed mid-run, a killed driver.

One local Ray (3 logical CPUs: 2 decoders and a CPU encoder) serves the whole module; the tests that need it
skip, saying why, only when Ray is not installed (``pip install 'mmfuse[ray]'``; ``make test`` installs it).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import MEDIA, ROOT, bundled_rows, write_manifest

from extract.devices import DeviceError
from extract.extractors.base import ExtractionError
from extract.outdir import owner_gone
from extract.ray_engine import actor_counts, cluster_precision, import_ray, run_extract_ray
from shards import iter_shard

KEYS = ["grid__bbaf2n", "grid__pwij3p", "grid__id2_vcd_swwp2s", "faces__face_noface"]
TIMED = {"updated"}  # dataset.json fields that differ between any two runs


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'mmfuse[ray]' (make test installs it)")
    import logging

    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    yield ray
    ray.shutdown()


def keys_in(out) -> Counter:
    return Counter(s["__key__"] for tar in sorted(out.glob("*.tar")) for s in iter_shard(tar))


def assert_same_output(local, remote) -> None:
    """Same files, keys, members, shapes, dtypes, metadata and masks; features equal up to float16 rounding;
    status.jsonl identical and dataset.json equal apart from its time stamp."""
    assert sorted(p.name for p in local.iterdir()) == sorted(p.name for p in remote.iterdir())
    assert (local / "status.jsonl").read_text() == (remote / "status.jsonl").read_text()
    a, b = (json.loads((d / "dataset.json").read_text()) for d in (local, remote))
    stats_a, stats_b = a.pop("stats"), b.pop("stats")
    assert {k: v for k, v in a.items() if k not in TIMED} == {k: v for k, v in b.items() if k not in TIMED}
    for member in stats_a:
        for field in ("mean", "std"):
            np.testing.assert_allclose(stats_a[member][field], stats_b[member][field], rtol=2e-3, atol=2e-3)
    for tar in sorted(local.glob("*.tar")):
        for x, y in zip(iter_shard(tar), iter_shard(remote / tar.name), strict=True):
            assert x.keys() == y.keys() and x["__key__"] == y["__key__"]
            assert x["meta.json"] == y["meta.json"]
            for name, value in x.items():
                if isinstance(value, np.ndarray):
                    assert value.shape == y[name].shape and value.dtype == y[name].dtype, name
                    if value.dtype == np.float16:
                        np.testing.assert_allclose(value, y[name], rtol=2e-3, atol=2e-3, err_msg=name)
                    else:
                        np.testing.assert_array_equal(value, y[name], err_msg=name)


def test_ray_engine_writes_what_the_local_engine_writes(ray_cluster, bundled_dataset, tiny_cfg, tmp_path):
    manifest = bundled_dataset.parent / "label.csv"  # the local run's (dataset.json records it)
    seen = []
    summary = run_extract_ray(
        manifest, MEDIA, tmp_path / "out", tiny_cfg(shard_size=2, workers=2), progress=lambda d, t: seen.append((d, t))
    )
    assert (summary["engine"], summary["decoders"], summary["encoders"]) == ("ray", 2, 1)
    assert summary["shards_written"] == 3 and summary["samples_written"] == 4 and summary["complete"]
    local = json.loads((bundled_dataset / "dataset.json").read_text())
    assert summary["feature_set_hash"] == local["feature_set_hash"]
    assert seen[0] == (0, 4) and seen[-1] == (4, 4)  # the plan, then each committed shard's clips
    assert_same_output(bundled_dataset, tmp_path / "out")
    again = run_extract_ray(manifest, MEDIA, tmp_path / "out", tiny_cfg(shard_size=2, workers=2))
    assert again["shards_written"] == 0 and again["samples_written"] == 0 and again["complete"]


@pytest.mark.integration
def test_a_killed_decoder_and_a_killed_encoder_lose_no_clip(
    ray_cluster, bundled_dataset, tiny_cfg, tmp_path, monkeypatch
):
    markers = tmp_path / "decoder-killed", tmp_path / "encoder-killed"
    # the second train clip's decoder dies (with the clips queued on it), then the valid shard's encoder
    monkeypatch.setenv("MMFUSE_RAY_FAULT", f"kill:{KEYS[1]}:{markers[0]},kill:valid-000000:{markers[1]}")
    manifest = bundled_dataset.parent / "label.csv"
    summary = run_extract_ray(manifest, MEDIA, tmp_path / "out", tiny_cfg(shard_size=2, workers=2))
    assert all(m.exists() for m in markers), "both faults should have happened"
    assert summary["complete"] and summary["samples_written"] == 4
    assert keys_in(tmp_path / "out") == Counter(KEYS)  # every clip exactly once
    assert not list((tmp_path / "out").glob("*.tmp-*"))
    assert_same_output(bundled_dataset, tmp_path / "out")


@pytest.mark.integration
def test_killed_driver_then_rerun_redoes_only_the_incomplete_shards(ray_cluster, tiny_cfg, tmp_path):
    manifest = write_manifest(tmp_path / "label.csv", bundled_rows())
    out = tmp_path / "out"
    cfg = tiny_cfg(shard_size=1, workers=2)
    args = [
        sys.executable, "-m", "mmfuse", "extract", str(manifest), "--media-root", str(MEDIA), "--out", str(out),
        "--shard-size", "1", "--workers", "2", "--text-model", cfg.text_model, "--audio-model", cfg.audio_model,
        "--engine", "ray", "--ray-address", ray_cluster.get_runtime_context().gcs_address, "-q",
    ]  # fmt: skip
    env = {**os.environ, "MMFUSE_RAY_FAULT": f"stall:{KEYS[3]}"}  # the last shard never finishes
    driver = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not list(out.glob("*-*.json")) and driver.poll() is None:
        time.sleep(0.05)
    driver.send_signal(signal.SIGKILL)
    _, err = driver.communicate()
    complete = {p.stem for p in out.glob("*-*.json")}
    assert 1 <= len(complete) <= 3 and "test-000000" not in complete, err
    mtimes = {name: (out / f"{name}.tar").stat().st_mtime_ns for name in complete}
    while time.time() < deadline and not all(owner_gone(p) for p in out.glob("*.tmp-*")):
        time.sleep(0.1)  # the dead driver's actors are gone (their temporary files are then removed as stale)
    summary = run_extract_ray(manifest, MEDIA, out, cfg)
    assert summary["shards_written"] == 4 - len(complete) and summary["complete"]
    for name in complete:  # complete shards were skipped, not rewritten
        assert (out / f"{name}.tar").stat().st_mtime_ns == mtimes[name]
    assert keys_in(out) == Counter(KEYS)
    assert not list(out.glob("*.tmp-*")) and not list(out.glob("*.lock"))


def test_engine_ray_without_ray_installed_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(ExtractionError, match=r"^--engine ray needs Ray: pip install 'mmfuse\[ray\]'$"):
        import_ray()


def test_cuda_on_a_ray_cluster_without_gpus_is_refused_and_actors_fit_the_cpus(tiny_cfg):
    def cluster(**resources):
        return SimpleNamespace(cluster_resources=lambda: resources)

    with pytest.raises(DeviceError, match="--device cuda was asked for but the Ray cluster has no GPU"):
        actor_counts(cluster(CPU=8.0), SimpleNamespace(device="cuda", workers=2, auto=()), media=True)
    assert actor_counts(cluster(CPU=16.0, GPU=2.0), SimpleNamespace(device="cuda", workers=12, auto=()), True) == (
        12,
        2,
        1,
    )
    assert actor_counts(cluster(CPU=4.0), SimpleNamespace(device="cpu", workers=8, auto=()), True) == (3, 1, 0)
    assert actor_counts(cluster(CPU=4.0), SimpleNamespace(device="cpu", workers=0, auto=()), True) == (1, 1, 0)
    assert actor_counts(cluster(CPU=4.0), SimpleNamespace(device="cpu", workers=8, auto=()), False) == (0, 1, 0)
    # --workers auto (the default) sizes the decoders to the cluster, not to the driver's machine
    auto = SimpleNamespace(device="cuda", workers=0, auto=("workers", "batch_size"))
    assert actor_counts(cluster(CPU=16.0, GPU=2.0), auto, True) == (14, 2, 1)


def test_the_automatic_precision_is_the_clusters_gpus_not_the_drivers(monkeypatch):
    import torch

    asked = []

    class FakeRay:
        def __init__(self, **resources):
            self.resources = resources

        def cluster_resources(self):
            return self.resources

        def remote(self, **options):
            asked.append(options)
            return lambda fn: SimpleNamespace(remote=lambda *a: fn(*a))

        def get(self, value):
            return value

    # The task runs where Ray puts it, on a GPU node: there the GPU computes bf16 natively.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert cluster_precision(FakeRay(CPU=8.0, GPU=1.0), "cuda") == "bf16"
    assert asked == [{"num_gpus": 1, "num_cpus": 0, "max_retries": 2}]
    assert cluster_precision(FakeRay(CPU=8.0), "cpu") == "fp32"
    with pytest.raises(DeviceError, match="--device cuda was asked for but the Ray cluster has no GPU"):
        cluster_precision(FakeRay(CPU=8.0), "cuda")


def test_ray_address_without_engine_ray_is_refused(tmp_path, capsys):
    from mmfuse.cli import main

    manifest = write_manifest(tmp_path / "label.csv", bundled_rows())
    code = main(["extract", str(manifest), "--out", str(tmp_path / "out"), "--ray-address", "head:6379"])
    assert code == 1
    assert "--ray-address is for --engine ray: add --engine ray" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_encoder_with_another_feature_set_than_the_drivers_refuses_to_write(tiny_cfg, tmp_path):
    from extract.ray_actors import Encoder

    encoder = Encoder(tiny_cfg(modalities=("text",)), "0123456789abcdef", str(tmp_path))
    assert encoder.problem().startswith(f"the encoder on {os.uname().nodename} has feature set ")
    assert encoder.problem().endswith(
        ", the driver 0123456789abcdef: install the same mmfuse, packages and model files on every node of the Ray cluster"
    )
    with pytest.raises(ExtractionError, match="has feature set"):
        encoder.write(None, [])
    assert list(tmp_path.iterdir()) == []


def test_a_decoder_returns_the_compact_arrays_never_frames(tiny_cfg):
    from extract.clip import decode_settings
    from extract.manifest import load_manifest
    from extract.ray_actors import Decoder

    clip = load_manifest(MEDIA / "manifest.csv", MEDIA)[0]
    decoded = Decoder(decode_settings(tiny_cfg(fps=5.0))).decode(clip)
    assert decoded.frames is None  # frames never cross processes
    assert decoded.wave.dtype == np.int16 and decoded.wave.ndim == 1
    assert decoded.features["video"]["video_lmk.npy"].shape[1:] == (478, 3)
    assert decoded.status["video"]["status"] == "ok" and decoded.status["audio"]["status"] == "ok"


@pytest.mark.integration
def test_ctrl_c_under_ray_ends_with_our_one_line(ray_cluster, tiny_cfg, tmp_path):
    """Ctrl-C while the actors have tasks in flight: Ray's driver printed a coloured "(raylet) Task ... failed,
    retries remaining" line per killed task; now the command's last line is its own, and it exits 130."""
    from ttyrun import run_mmfuse

    grid = [r for r in bundled_rows() if r["video_id"] == "grid"]
    rows = [{**grid[i % 3], "video_id": "tiled", "clip_id": f"c{i:02d}", "mode": "train",
             "path": f"grid/{grid[i % 3]['clip_id']}.mpg"} for i in range(8)]  # fmt: skip
    manifest = write_manifest(tmp_path / "tiled.csv", rows)
    cfg = tiny_cfg()
    args = ["extract", str(manifest), "--media-root", str(MEDIA), "--out", str(tmp_path / "out"), "--shard-size", "2",
            "--fps", "5", "--batch-size", "1", "--workers", "1", "--text-model", cfg.text_model,
            "--audio-model", cfg.audio_model, "--engine", "ray",
            "--ray-address", ray_cluster.get_runtime_context().gcs_address]  # fmt: skip
    stopped = run_mmfuse(args, interrupt_when=r"extract: +\d+%\|[^|]*\| *[1-6]/8", timeout=240)
    assert stopped.interrupted and stopped.returncode == 130, stopped.text[-3000:]
    assert "(raylet)" not in stopped.text and "Traceback" not in stopped.text, stopped.text[-3000:]
    shown = [line.strip() for line in stopped.lines() if line.replace("\x1b[0m", "").strip()]
    assert shown[-1] == "mmfuse extract: interrupted; complete shards are kept; rerun the same command to resume"
