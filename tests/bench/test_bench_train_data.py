"""``mmfuse bench train --data-only --quick``: the report's fields and the BENCHMARKS.md section."""

from __future__ import annotations

import json
from pathlib import Path

from bench.markdown import markers
from bench.train_data import MEMBERS, SECTION, plain_samples
from mmfuse.cli import main
from train.workers import POOLS

ONE_PROCESS = {
    "runs", "plain_ms_per_sample", "loader_ms_per_sample", "loader_over_plain", "plain_cpu_ms_per_sample",
    "loader_cpu_ms_per_sample", "loader_over_plain_cpu",
}  # fmt: skip
WORKERS = {
    "workers", "epochs", "plain_epochs", "same_worker_processes", "loader_samples_per_s_per_worker",
    "plain_samples_per_s_per_worker", "plain_over_loader_rate",
}  # fmt: skip
EPOCH = {"first_batch_s", "samples", "seconds", "samples_per_s"}


def test_data_only_report_has_every_field(tmp_path: Path, capsys) -> None:
    out = tmp_path / "BENCHMARKS.md"
    argv = ["bench", "train", "--data-only", "--quick", "--json", "--workdir", str(tmp_path / "work")]
    assert main([*argv, "--out", str(out), "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    one, many, setup = report["one_process"], report["workers"], report["setup"]
    assert set(one) == ONE_PROCESS and set(many) == WORKERS
    for name in ONE_PROCESS - {"runs"}:
        assert one[name] > 0, name
    assert [len(one["runs"][k]) for k in ("plain", "loader")] == [1, 1]  # --quick: one run each
    assert one["runs"]["plain"][0]["samples"] == setup["samples"] == 48  # every sample of the split
    assert one["loader_over_plain"] == one["loader_ms_per_sample"] / one["plain_ms_per_sample"]
    for epoch in (*many["epochs"], *many["plain_epochs"]):
        assert set(epoch) == EPOCH and epoch["samples"] == 48 and epoch["samples_per_s"] > 0
    assert many["same_worker_processes"] is True and POOLS == {}  # kept across epochs, shut down at the end
    assert many["loader_samples_per_s_per_worker"] == many["epochs"][1]["samples_per_s"] / many["workers"]
    assert setup["command"].startswith("mmfuse bench train --data-only --samples 48 --batch-size 4 --workers 1")
    assert setup["members"] == list(MEMBERS) and "audio_wave.npy" not in MEMBERS and "meta.json" in MEMBERS
    text = out.read_text()
    begin, end = markers(SECTION)
    assert text.count(begin) == 1 and text.count(end) == 1 and setup["command"] in text
    assert "| loader / plain |" in text and "samples/s per worker" in text and "Epoch 2 ran in epoch 1's" in text


def test_plain_loop_decodes_the_members_it_is_given(tmp_path: Path) -> None:
    from bench.train_steps import QUICK, make_feature_set, write_dataset

    write_dataset(tmp_path, 5, QUICK, make_feature_set("t", "a", QUICK), shard_size=2)
    samples = list(plain_samples(sorted(str(p) for p in tmp_path.glob("*.tar")), ("meta.json", "text_feat.npy")))
    assert [s["__key__"] for s in samples] == [f"bench__c{j:07d}" for j in range(5)]
    assert all(set(s) == {"__key__", "meta.json", "text_feat.npy"} for s in samples)
    assert samples[0]["text_feat.npy"].shape[1] == QUICK.dt and samples[0]["meta.json"]["split"] == "train"
