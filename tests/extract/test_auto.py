"""``--workers auto`` / ``--batch-size auto``: the choice per machine, the flags, the logged line, and features
that do not depend on either."""

from __future__ import annotations

import copy
import dataclasses
import logging

import numpy as np
import pytest
from conftest import MEDIA, bundled_rows, write_manifest

from extract.auto import choose, describe, encoder_threads, resolve_precision, usable_cores
from extract.config import ConfigError, make_config, resolved
from extract.pipeline import run_extract
from shards import iter_shard, load_dataset_json

ALL = ("text", "audio", "video")


@pytest.mark.parametrize(
    ("device", "cores", "modalities", "expected"),
    [
        ("cpu", 1, ALL, (0, 2, "1 CPU core, cpu")),
        ("cpu", 2, ALL, (1, 2, "2 CPU cores, cpu")),
        ("cpu", 2, ("text", "audio"), (1, 2, "2 CPU cores, cpu")),
        ("cpu", 16, ALL, (15, 2, "16 CPU cores, cpu")),
        ("cpu", 16, ("text", "audio"), (2, 2, "16 CPU cores, cpu")),
        ("cpu", 2, ("text",), (0, 16, "2 CPU cores, cpu, text only")),
        ("cpu", 16, ("text",), (0, 16, "16 CPU cores, cpu, text only")),
        ("cuda", 1, ALL, (1, 32, "1 CPU core, cuda")),
        ("cuda:1", 2, ALL, (1, 32, "2 CPU cores, cuda:1")),
        ("cuda", 16, ALL, (15, 32, "16 CPU cores, cuda")),
        ("cuda", 16, ("text",), (0, 32, "16 CPU cores, cuda, text only")),
    ],
)
def test_choice_per_machine(device, cores, modalities, expected):
    assert choose(device, cores, modalities) == expected


def test_usable_cores_follow_the_affinity_mask(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 5, 7})
    monkeypatch.setattr("os.cpu_count", lambda: 64)
    assert usable_cores() == 3


def test_settings_take_auto_and_integers_and_refuse_junk(monkeypatch, tmp_path):
    monkeypatch.setattr("extract.config.usable_cores", lambda: 4)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    given = make_config(None)
    assert (given.workers, given.batch_size, given.threads, given.precision, given.auto) == (None,) * 4 + ((),)
    cfg = resolved(given)
    assert (cfg.workers, cfg.batch_size, cfg.threads, cfg.precision) == (3, 2, 1, "fp32")
    assert cfg.auto == ("workers", "batch_size", "threads", "precision")
    assert cfg.auto_reason == "4 CPU cores, cpu"
    cfg = resolved(make_config(None, workers="auto", batch_size=5, modalities="text"))
    assert (cfg.workers, cfg.batch_size, cfg.threads, cfg.auto) == (0, 5, 4, ("workers", "threads", "precision"))
    (tmp_path / "c.yaml").write_text("workers: 1\nbatch_size: AUTO\nprecision: auto\nthreads: 2\n")
    cfg = resolved(make_config(tmp_path / "c.yaml"), precision="bf16")  # the Ray engine's, from a cluster GPU
    assert (cfg.workers, cfg.batch_size, cfg.threads, cfg.precision) == (1, 2, 2, "bf16")
    assert cfg.auto == ("batch_size", "precision")
    cfg = resolved(make_config(tmp_path / "c.yaml", workers="auto", precision="fp16"))  # the flag wins
    assert (cfg.workers, cfg.precision, cfg.auto) == (3, "fp16", ("workers", "batch_size"))
    assert resolved(make_config(None, workers=1)).threads == 3  # the cores the workers leave
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # torch follows it: not overridden
    cfg = resolved(make_config(None))
    assert cfg.threads is None and cfg.auto == ("workers", "batch_size", "precision")
    with pytest.raises(ConfigError, match="workers: 'many' is not a number"):
        make_config(None, workers="many")
    with pytest.raises(ConfigError) as err:
        make_config(None, workers=-1, batch_size=0, precision="fp8")
    assert "workers: must be >= 0 or auto, got -1" in str(err.value)
    assert "batch_size: must be >= 1, got 0" in str(err.value)
    assert "precision: 'fp8' must be one of fp32, bf16, fp16 or auto" in str(err.value)
    with pytest.raises(ConfigError, match="threads: must be >= 1, got 0"):
        make_config(None, threads=0)


def test_auto_settings_are_chosen_once_into_a_new_config(monkeypatch, tmp_path):
    """The validated config is never changed: resolved() returns a copy holding extract.auto's choices, and a
    run leaves the caller's config as it was."""
    monkeypatch.setattr("extract.config.usable_cores", lambda: 3)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    given = make_config(None, ["modalities=text,audio", "asr.model=~/w"])
    before = copy.deepcopy(given)
    cfg = resolved(given)
    assert given == before and cfg is not given and resolved(cfg) is cfg  # resolving twice changes nothing
    workers, batch_size, reason = choose("cpu", 3, ("text", "audio"))
    assert (cfg.workers, cfg.batch_size, cfg.auto_reason) == (workers, batch_size, reason) == (2, 2, "3 CPU cores, cpu")
    assert (cfg.threads, cfg.precision) == (encoder_threads(3, workers), resolve_precision(None, "cpu")) == (1, "fp32")
    assert dataclasses.replace(cfg, workers=None, batch_size=None, threads=None, precision=None, auto=(),
                               auto_reason="", resolved=False) == given  # nothing else differs  # fmt: skip


def test_a_run_leaves_the_callers_settings_unchanged(tmp_path, tiny_text_model, monkeypatch):
    monkeypatch.setattr("extract.config.usable_cores", lambda: 2)
    manifest = write_manifest(tmp_path / "m.csv", bundled_rows()[:2])
    cfg = make_config(None, text_model=str(tiny_text_model), modalities="text")
    before = copy.deepcopy(cfg)
    run_extract(manifest, None, tmp_path / "out", cfg)
    assert cfg == before and cfg.workers is None and cfg.precision is None


def test_extract_flags_take_auto_and_integers_and_refuse_junk(capsys):
    from mmfuse.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["extract", "m.csv", "--out", "o"])
    assert (args.workers, args.batch_size, args.precision) == (None, None, None)
    args = parser.parse_args(["extract", "m.csv", "--out", "o", "--workers", "auto", "--batch-size", "4"])
    assert (args.workers, args.batch_size) == ("auto", 4)
    args = parser.parse_args(["extract", "m.csv", "--out", "o", "--workers", "0", "--precision", "bf16"])
    assert (args.workers, args.precision) == (0, "bf16")
    for flag, value, said in [
        ("--workers", "lots", "argument --workers: 'lots' is neither a whole number nor auto"),
        ("--batch-size", "-2", "argument --batch-size: '-2' is negative; give a whole number >= 0 or auto"),
        ("--precision", "fp8", "argument --precision: invalid choice: 'fp8'"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args(["extract", "m.csv", "--out", "o", flag, value])
        assert exit_.value.code == 2
        assert said in capsys.readouterr().err


def test_the_choice_is_logged_once(tmp_path, tiny_text_model, monkeypatch, caplog):
    monkeypatch.setattr("extract.config.usable_cores", lambda: 2)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    manifest = write_manifest(tmp_path / "m.csv", bundled_rows()[:3])
    cfg = make_config(None, text_model=str(tiny_text_model), modalities="text")
    with caplog.at_level(logging.INFO, logger="extract.pipeline"):
        run_extract(manifest, None, tmp_path / "out", cfg)
    lines = [r.getMessage() for r in caplog.records if "batch_size=" in r.getMessage()]
    assert lines == ["workers=0 batch_size=16 threads=2 precision=fp32 (auto: 2 CPU cores, cpu, text only)"]
    assert describe(2, 8, "fp32", (), "x") == "workers=2 batch_size=8 precision=fp32 (as given)"
    assert describe(1, 2, "bf16", ("batch_size",), "2 CPU cores, cpu") == (
        "workers=1 batch_size=2 precision=bf16 (batch_size auto: 2 CPU cores, cpu)"
    )
    assert describe(1, 2, "fp32", ("workers", "batch_size", "threads", "precision"), "2 CPU cores, cpu", 1) == (
        "workers=1 batch_size=2 threads=1 precision=fp32 (auto: 2 CPU cores, cpu)"
    )


def test_workers_and_batch_size_change_no_feature(tmp_path, tiny_cfg):
    """The feature set (and its hash) and every member are the same whatever the workers and the batch."""
    manifest = write_manifest(tmp_path / "m.csv", bundled_rows()[:3])
    outs = []
    for k, (workers, batch) in enumerate([(0, 1), (1, 3)]):
        out = tmp_path / f"out{k}"
        # Threads pinned: auto would give each worker count its own, and torch's sums then round differently.
        run_extract(manifest, MEDIA, out, tiny_cfg(workers=workers, batch_size=batch, shard_size=4, threads=1))
        outs.append(out)
    a, b = (load_dataset_json(o) for o in outs)
    assert a["feature_set_hash"] == b["feature_set_hash"] and a["feature_set"] == b["feature_set"]
    for tar in sorted(outs[0].glob("*.tar")):
        for s, t in zip(iter_shard(tar), iter_shard(outs[1] / tar.name), strict=True):
            assert s["__key__"] == t["__key__"]
            for name, value in s.items():
                if name.endswith(".npy"):
                    np.testing.assert_array_equal(value, t[name], err_msg=f"{s['__key__']} {name}")
