"""Training processes under torchrun: two CPU ranks (gloo) through the command line; and the lockstep check on
the CPU and on CUDA (NCCL with a GPU per rank; gloo when one GPU is all there is), then a resume on one rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rank_probe import torchrun

from train.checkpoint import load_checkpoint


@pytest.mark.integration
def test_two_process_gloo_run(bundled_dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "mmfuse", "train", "--shards", str(bundled_dataset), "--model", "late", "--run-dir", str(run),
        "batch_size=1", "num_workers=0", "epochs=2", "log_every=1", "device=cpu", "model.hidden=12", "model.num_heads=3",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        cmd, cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((run / "config.json").read_text())
    assert record["world_size"] == 2
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert 2 in steps  # 2 train clips over 2 ranks: one batch per rank per epoch, 2 epochs
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt["state"]["step"] == 2
    assert len(ckpt["rng"]) == 2  # each rank's RNG state, for resume
    final = json.loads((run / "final.json").read_text())
    assert final["test"]["n"] == 1 and final["valid"]["n"] == 1  # evaluation gathers every sample once


def cuda_plan() -> tuple[str, str, str]:
    """(the two ranks' CUDA_VISIBLE_DEVICES, the backend they must join with, the resume's single GPU)."""
    gpus = torch.cuda.device_count()
    if gpus >= 2:
        return "0,1", "nccl", "1"  # a GPU per rank; the resume sees only the second
    return "0", "gloo", "0"  # one GPU: both ranks on cuda:0, which NCCL refuses


def cuda_id() -> str:
    gpus = torch.cuda.device_count()
    return "cuda-nccl-2gpus" if gpus >= 2 else "cuda-gloo-ranks-share-1gpu" if gpus == 1 else "cuda-none"


@pytest.fixture(scope="module")
def half_labelled_shards(tmp_path_factory) -> Path:
    """8 synthetic train samples with tiny encoders in 4 shards of 2; shard 1 (samples 2, 3) has no labels."""
    from bench.train_steps import QUICK, make_feature_set, save_tiny_encoders, write_dataset

    work = tmp_path_factory.mktemp("half-labelled")
    fset = make_feature_set(*save_tiny_encoders(work), QUICK)
    write_dataset(work / "shards", 8, QUICK, fset, shard_size=2, unlabelled={2, 3})
    return work / "shards"


# batch = shard (shuffle buffer 1): whichever rank reads shard 1 gets an all-unlabelled micro-batch each epoch
LOCKSTEP = [
    "batch_size=2", "num_workers=0", "shuffle_buffer=1", "grad_accum=2", "mode=end_to_end", "unfreeze_after=1",
    "encoder_lr=0.01", "log_every=1", "selection=last", "model.hidden=12", "model.num_heads=3",
]  # fmt: skip


@pytest.mark.integration
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu, id=cuda_id())])
def test_ranks_keep_lockstep_end_to_end_then_resume_on_one(half_labelled_shards: Path, tmp_path: Path, device: str):
    """Two ranks, ``grad_accum=2``, the encoders unfrozen after step 1, one rank given an all-unlabelled micro-batch
    each epoch: both finish in time with equal parameters; then the run resumes on one rank (one GPU) and goes on
    to the planned step."""
    visible, backend, resume_gpu = cuda_plan() if device == "cuda" else ("", "gloo", "")
    gpu_env = {"CUDA_VISIBLE_DEVICES": visible} if device == "cuda" else {}
    run = tmp_path / "run"
    args = ["train", "--shards", str(half_labelled_shards), "--model", "late", "--run-dir", str(run)]
    ranks = torchrun(2, tmp_path / "two", [*args, *LOCKSTEP, "epochs=2", f"device={device}"], gpu_env, timeout=240)
    assert [r["step"] for r in ranks] == [2, 2]  # one step per epoch: each rank reads 2 shards = 2 micro-batches
    assert ranks[0]["checksum"] == ranks[1]["checksum"] and ranks[0]["abs_sum"] == ranks[1]["abs_sum"]
    assert sum(r["zero_weight_batches"] for r in ranks) == 2  # one rank's unlabelled micro-batch, each epoch
    if device == "cuda":
        assert {r["device"] for r in ranks} == ({"cuda:0", "cuda:1"} if backend == "nccl" else {"cuda:0"})
    record = json.loads((run / "config.json").read_text())
    assert (record["world_size"], record["backend"]) == (2, backend)
    assert len(load_checkpoint(run / "checkpoints" / "last.pt")["rng"]) == 2

    resume_env = {"CUDA_VISIBLE_DEVICES": resume_gpu} if device == "cuda" else {}
    more = [*args, "--resume", *LOCKSTEP, "epochs=10", "max_steps=4", f"device={device}"]
    (one,) = torchrun(1, tmp_path / "one", more, resume_env, timeout=240)
    assert one["step"] == 4 and one["device"] == ("cuda:0" if device == "cuda" else "cpu")
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt["state"]["step"] == 4 and len(ckpt["rng"]) == 1
    steps = [
        r["step"]
        for line in (run / "metrics.jsonl").read_text().splitlines()
        if (r := json.loads(line))["kind"] == "train"
    ]
    assert steps == [1, 2, 3, 4]
    assert [r["step"] for r in json.loads((run / "config.json").read_text())["resumed"]] == [2]
