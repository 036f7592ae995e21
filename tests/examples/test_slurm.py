"""The SLURM recipes in examples/slurm, run on this machine with a stand-in `srun` and `scontrol`.

The stand-ins do what SLURM does for these scripts: `srun` starts the command once per node with that node's
SLURM_NODEID / SLURM_PROCID, and `scontrol show hostnames` lists the job's nodes (all this host here). The job
array is run as SLURM runs it, one process per task with the array variables set.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MEDIA, ROOT, bundled_rows, write_manifest

from shards.dataset import read_sidecar

SLURM = ROOT / "examples" / "slurm"
BIN = Path(sys.executable).parent

FAKE_SRUN = """#!/usr/bin/env bash
# srun stand-in: the command once per node (--nodes=N, else the job's), in parallel; fails when any copy fails.
# One copy replaces this process, so the caller's pid is the command's.
count=${SLURM_NNODES:-1}
while [[ "${1:-}" == -* ]]; do
    case "$1" in
        --nodes=*) count=${1#--nodes=}; shift ;;
        -w) export FAKE_SRUN_HOST=$2; shift 2 ;;
        *) shift ;;
    esac
done
if [ "$count" = 1 ]; then SLURM_NODEID=0 SLURM_PROCID=0 SLURM_NTASKS=1 exec "$@"; fi
pids=()
for ((node = 0; node < count; node++)); do
    SLURM_NODEID=$node SLURM_PROCID=$node SLURM_NTASKS=$count "$@" &
    pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
exit $rc
"""

FAKE_SCONTROL = """#!/usr/bin/env bash
# scontrol stand-in: `show hostnames` lists the job's nodes: FAKE_HOSTS when set, else this host once per node.
if [ -n "${FAKE_HOSTS:-}" ]; then exec tr ' ' '\\n' <<< "$FAKE_HOSTS"; fi
for ((node = 0; node < ${SLURM_NNODES:-1}; node++)); do echo 127.0.0.1; done
"""


def sbatch_lines(script: Path) -> tuple[list[str], list[str]]:
    """(#SBATCH lines, the commands) of ``script``; SLURM reads #SBATCH only before the first command."""
    lines = script.read_text().splitlines()
    first_command = next(i for i, s in enumerate(lines) if s.strip() and not s.startswith("#"))
    header = [s for s in lines[:first_command] if s.startswith("#SBATCH")]
    return header, [s for s in lines[first_command:] if s.startswith("#SBATCH")]


@pytest.mark.parametrize("name", ["extract-array.sbatch", "extract-ray.sbatch", "train-multinode.sbatch"])
def test_recipes_parse_and_put_every_directive_in_the_header(name: str) -> None:
    script = SLURM / name
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    header, late = sbatch_lines(script)
    assert late == []  # a directive after the first command would be ignored by sbatch
    assert any(s.startswith("#SBATCH --job-name=mmfuse-") for s in header)
    assert os.access(script, os.X_OK)


def environment(tmp_path: Path, **extra: str) -> dict[str, str]:
    fake = tmp_path / "fake-slurm"
    fake.mkdir(exist_ok=True)
    for name, body in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (fake / name).write_text(body)
        (fake / name).chmod(0o755)
    path = f"{fake}:{BIN}:{os.environ['PATH']}"
    return {**os.environ, "PATH": path, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}


@pytest.mark.integration
def test_extraction_array_splits_the_plan_and_a_partial_rerun_finishes(
    tmp_path: Path, tiny_text_model: Path, tiny_audio_model: Path
) -> None:
    manifest = write_manifest(tmp_path / "label.csv", bundled_rows())
    out = tmp_path / "shards"
    env = environment(
        tmp_path,
        MANIFEST=str(manifest), MEDIA_ROOT=str(MEDIA), OUT=str(out), DEVICE="cpu",
        TEXT_MODEL=str(tiny_text_model), AUDIO_MODEL=str(tiny_audio_model),
        EXTRA_ARGS="--workers 0 --shard-size 1", SLURM_ARRAY_JOB_ID="77",
    )  # fmt: skip
    script = str(SLURM / "extract-array.sbatch")
    # --array=1-3:2 (tasks 1 and 3): ranks 0 and 1 of 2; task 3 runs alone first, task 1 is "lost".
    array = {"SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_STEP": "2"}
    done = subprocess.run(["bash", script], env={**env, **array, "SLURM_ARRAY_TASK_ID": "3"}, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    written = sorted(p.name for p in out.glob("*.json") if p.name != "dataset.json")
    assert {read_sidecar(out / n)["rank"] for n in written} == {1}
    assert json.loads((out / "dataset.json").read_text())["complete"] is False  # rank 0's shards are missing
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}

    # The rerun of the lost task alone (sbatch --array=1: one task, world size 1) finishes what is missing.
    rerun = {"SLURM_ARRAY_TASK_COUNT": "1", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_ID": "1"}
    done = subprocess.run(["bash", script], env={**env, **rerun}, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["complete"] is True and dataset["samples"] == 4
    keys = [k for p in out.glob("*.json") if p.name != "dataset.json" for k in read_sidecar(p)["keys"]]
    assert sorted(keys) == sorted(f"{r['video_id']}__{r['clip_id']}" for r in bundled_rows())  # each clip once
    assert all(out.joinpath(n).stat().st_mtime_ns == t for n, t in before.items())  # complete shards kept


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.integration
def test_multinode_training_recipe_runs_two_nodes_and_resumes_on_one(bundled_dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    settings = "batch_size=1 num_workers=0 log_every=1 device=cpu model.hidden=12 model.num_heads=3"
    env = environment(
        tmp_path,
        SHARDS=str(bundled_dataset), MODEL="late", RUN_DIR=str(run), GPUS_PER_NODE="1",
        SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node[01-02]", MMFUSE=str(BIN / "mmfuse"),
    )  # fmt: skip
    script = str(SLURM / "train-multinode.sbatch")
    two = {"SLURM_NNODES": "2", "PORT": str(free_port()), "TRAIN_ARGS": f"{settings} epochs=1"}
    done = subprocess.run(["bash", script], env={**env, **two}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "2 nodes x 1 processes, rendezvous at 127.0.0.1:" in done.stdout
    assert json.loads((run / "config.json").read_text())["world_size"] == 2
    final = json.loads((run / "final.json").read_text())
    assert final["test"]["n"] == 1 and final["valid"]["n"] == 1  # every sample scored once across the nodes

    # Resubmitted on one node with RESUME=1 and one more epoch: continues from the last checkpoint.
    one = {"SLURM_NNODES": "1", "PORT": str(free_port()), "RESUME": "1", "TRAIN_ARGS": f"{settings} epochs=2"}
    done = subprocess.run(["bash", script], env={**env, **one}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines() if "step" in line]
    assert max(steps) == 3  # epoch 1: one batch per rank on 2 ranks (step 1); epoch 2 on 1 rank: 2 batches


def test_multinode_recipe_takes_the_first_host_of_a_long_node_list(tmp_path: Path) -> None:
    # 10,000 hosts (100 kB) are more than a pipe holds: a reader that stops at the first line would leave scontrol
    # writing into a closed pipe (SIGPIPE, exit 141 under pipefail).
    fake = tmp_path / "stand-ins"
    fake.mkdir()
    (fake / "srun").write_text('#!/usr/bin/env bash\necho "srun $*"\n')
    (fake / "srun").chmod(0o755)
    hosts = " ".join(f"node{i:05d}" for i in range(10_000))
    env = environment(
        tmp_path, SLURM_JOB_ID="7", SLURM_NNODES="10000", SLURM_JOB_NODELIST="node[00000-09999]",
        FAKE_HOSTS=hosts, GPUS_PER_NODE="4", PORT="29511", MMFUSE="mmfuse",
    )  # fmt: skip
    env["PATH"] = f"{fake}:{env['PATH']}"
    done = subprocess.run(
        ["bash", str(SLURM / "train-multinode.sbatch")], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "job 7: 10000 nodes x 4 processes, rendezvous at node00000:29511" in done.stdout
    assert "--rdzv-endpoint node00000:29511" in done.stdout


FAKE_RAY = """#!/usr/bin/env bash
# ray stand-in: records each call; `ray start ... --block` joins the "cluster" and stays until it is killed.
echo "ray $* on=${FAKE_SRUN_HOST:-} pid=$$" >> "$FAKE_LOG"
if [[ " $* " == *" --block "* ]]; then echo "$$" >> "$FAKE_NODES"; exec sleep 300; fi
"""
FAKE_PYTHON = """#!/usr/bin/env bash
# the node count the recipe waits for: the stand-in nodes started so far
if [ -f "$FAKE_NODES" ]; then wc -l < "$FAKE_NODES"; else echo 0; fi
"""
FAKE_MMFUSE = """#!/usr/bin/env bash
echo "mmfuse $*" >> "$FAKE_LOG"
"""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def test_ray_recipe_starts_a_head_and_a_worker_per_node_then_one_driver_and_stops_them(tmp_path: Path) -> None:
    fake = tmp_path / "stand-ins"
    fake.mkdir()
    for name, body in (("ray", FAKE_RAY), ("python", FAKE_PYTHON), ("mmfuse", FAKE_MMFUSE)):
        (fake / name).write_text(body)
        (fake / name).chmod(0o755)
    log, nodes = tmp_path / "calls.log", tmp_path / "nodes"
    env = environment(
        tmp_path,
        SLURM_JOB_ID="99", SLURM_NNODES="3", SLURM_JOB_NODELIST="gpu[01-03]", FAKE_HOSTS="gpu01 gpu02 gpu03",
        SLURM_CPUS_PER_TASK="8", GPUS_PER_NODE="2", PORT="6390", WAIT_S="20", FAKE_LOG=str(log),
        FAKE_NODES=str(nodes), RAY=str(fake / "ray"), PYTHON=str(fake / "python"), MMFUSE=str(fake / "mmfuse"),
        MANIFEST="m.csv", MEDIA_ROOT="/shared/media", OUT="/shared/out",
    )  # fmt: skip
    done = subprocess.run(
        ["bash", str(SLURM / "extract-ray.sbatch")], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Ray cluster up: 3 nodes" in done.stdout
    calls = log.read_text().splitlines()
    head_ip = subprocess.run(["hostname", "--ip-address"], capture_output=True, text=True).stdout.split()[0]
    starts = [c for c in calls if c.startswith("ray start")]
    assert len(starts) == 3
    assert starts[0].startswith(
        f"ray start --head --node-ip-address={head_ip} --port=6390 --num-cpus=8 --num-gpus=2 "
        "--include-dashboard=false --block on=gpu01"
    )
    workers = sorted(c.split(" on=")[1].split()[0] for c in starts[1:])
    assert workers == ["gpu02", "gpu03"]
    assert all(f"--address={head_ip}:6390 --num-cpus=8 --num-gpus=2 --block" in c for c in starts[1:])
    assert calls[-1] == (
        f"mmfuse extract m.csv --media-root /shared/media --out /shared/out --engine ray --ray-address {head_ip}:6390 "
        "--text-model bert-base-uncased --audio-model facebook/wav2vec2-base --device cuda --no-progress"
    )
    started = [int(c.rsplit("pid=", 1)[1]) for c in starts]
    assert not any(alive(pid) for pid in started)  # the Ray steps are stopped when the extraction ends


def test_ray_recipe_gives_up_when_nodes_do_not_join(tmp_path: Path) -> None:
    fake = tmp_path / "stand-ins"
    fake.mkdir()
    (fake / "ray").write_text("#!/usr/bin/env bash\nexec sleep 300\n")  # never joins
    (fake / "python").write_text("#!/usr/bin/env bash\necho 1\n")
    for name in ("ray", "python"):
        (fake / name).chmod(0o755)
    env = environment(
        tmp_path, SLURM_JOB_ID="98", SLURM_NNODES="2", FAKE_HOSTS="gpu01 gpu02", SLURM_JOB_NODELIST="gpu[01-02]",
        WAIT_S="2", RAY=str(fake / "ray"), PYTHON=str(fake / "python"), MMFUSE="/bin/false",
    )  # fmt: skip
    done = subprocess.run(
        ["bash", str(SLURM / "extract-ray.sbatch")], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    assert "only 1 of 2 Ray nodes joined within 2 s" in done.stderr
