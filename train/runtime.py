"""Process-level helpers for training: devices, distributed set-up, seeding, RNG state, run directories.

Rank-0 helpers are here so the training loop itself stays readable (train/trainer.py).
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from extract.devices import resolve_device
from mmfuse.errors import MmfuseError
from shards.io import atomic_write_json
from train.jsonout import dumps, strict_json

log = logging.getLogger(__name__)


class RunDirError(MmfuseError, RuntimeError):
    """The run directory cannot be used as asked (exists and not resuming, or nothing to resume)."""


@dataclass
class Dist:
    """This process's place in the job: rank, world size, device; ``enabled`` when torch.distributed is up."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    enabled: bool = False
    # a gloo group over the same ranks when the default group is NCCL: host values (counts, flags) are reduced
    # through host memory without waiting for the GPU's queue; None: the default group is gloo already
    cpu_group: Any = None

    @property
    def main(self) -> bool:
        return self.rank == 0


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """The ``device`` setting as this rank's device (:func:`extract.devices.resolve_device`): ``cuda`` and ``auto``
    take GPU ``local_rank % device_count``, the rank's own when the node's GPUs are all visible to every rank, GPU 0
    when each rank sees only its own (a per-rank ``CUDA_VISIBLE_DEVICES``, as SLURM sets it). A device this machine
    lacks is a :class:`DeviceError` before anything is created."""
    return torch.device(resolve_device(name, local_rank, option="device"))


def setup_distributed(device: str) -> Dist:
    """Join the torchrun job when WORLD_SIZE > 1 (backend: ``pick_backend``); otherwise a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local)
    if world <= 1:
        return Dist(0, 1, 0, dev, False)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        gpus = torch.cuda.device_count() if dev.type == "cuda" else 0
        backend = pick_backend(dev, local_world, gpus)
        if dev.type == "cuda" and backend == "gloo" and local == 0:
            log.warning("%d ranks on this node share %d GPU(s): gloo instead of NCCL (slower)", local_world, gpus)
        dist.init_process_group(backend)
    else:
        backend = dist.get_backend()
    cpu_group = dist.new_group(backend="gloo") if backend == "nccl" else None
    return Dist(rank, world, local, dev, True, cpu_group)


def pick_backend(device: torch.device, local_world: int, gpus: int) -> str:
    """NCCL when every rank on the node has a GPU of its own, gloo otherwise: on the CPU, and when torchrun starts
    more ranks on a node than it has visible GPUs (``local_world`` > ``gpus``: ranks share a GPU by
    ``LOCAL_RANK % device_count``), which NCCL refuses ("duplicate GPU") and gloo does through host memory.
    Ranks started without torchrun (``LOCAL_WORLD_SIZE`` unset, one each) keep NCCL: each may see a different GPU
    as its device 0 (a per-rank ``CUDA_VISIBLE_DEVICES``)."""
    if device.type != "cuda":
        return "gloo"
    return "nccl" if local_world <= gpus else "gloo"


def teardown_distributed(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """Every RNG this process uses, in types ``torch.load(weights_only=True)`` accepts. On CUDA: the generator
    of ``device`` (this rank's GPU) only, so a resume that sees fewer GPUs still restores it."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2])},
        "torch": torch.get_rng_state(),
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore ``rng_state``'s streams; the CUDA one onto ``device``. A checkpoint written before one rank's
    CUDA state was saved holds every visible GPU's (a list): this rank's GPU's entry is restored when present."""
    random.setstate(_tuples(state["python"]))
    key = state["numpy"]["key"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", key, state["numpy"]["pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    cuda = cuda_rng_state(state.get("cuda"), device)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def cuda_rng_state(saved: Any, device: torch.device | None) -> torch.Tensor | None:
    """The saved CUDA generator state for ``device`` (None when there is nothing to restore): one state, or
    from an older checkpoint's list of every GPU's, the entry of ``device``'s index when the list has one."""
    if saved is None or device is None or device.type != "cuda":
        return None
    if isinstance(saved, torch.Tensor):
        return saved
    index = device.index or 0
    if index < len(saved):
        return saved[index]
    log.warning("the checkpoint has no CUDA RNG state for %s (%d saved); its stream starts afresh", device, len(saved))
    return None


def _tuples(x: Any) -> Any:
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def git_revision() -> str:
    """The source tree's git revision (with ``-dirty`` when modified), or ``unknown`` outside a checkout."""
    root = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        if rev.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=5)
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


RUN_FILES = ("metrics.jsonl", "curves.png", "final.json")  # what a run appends to or rewrites


def prepare_run_dir(run_dir: Path, resume: bool) -> None:
    """Create the run directory; refuse an existing run unless resuming, and a resume with nothing to resume.

    A run stopped before its first checkpoint (config.json written, no checkpoints/last.pt) resumes by starting
    again from step 0 in the same directory: nothing was saved that could be continued or lost."""
    last = run_dir / "checkpoints" / "last.pt"
    if resume:
        if last.is_file():
            return
        if not (run_dir / "config.json").is_file():
            raise RunDirError(f"--resume: {last} not found; start a new run without --resume")
        log.warning("--resume: %s stopped before its first checkpoint; starting it again from step 0", run_dir)
        for name in RUN_FILES:
            (run_dir / name).unlink(missing_ok=True)
        shutil.rmtree(run_dir / "events", ignore_errors=True)
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        return
    if run_dir.exists() and any(run_dir.iterdir()):
        raise RunDirError(
            f"run directory {run_dir} already exists and is not empty; pass --resume to continue it, "
            "or choose another --run-dir"
        )
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)


def write_json(path: Path, obj: Any) -> None:
    """Standard JSON (NaN -> null), written atomically (temporary name, fsync, rename)."""
    atomic_write_json(path, strict_json(obj))


def append_jsonl(path: Path, obj: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(dumps(obj, sort_keys=True) + "\n")


def amp_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``amp`` on ``device`` (None = full precision). AMP is a CUDA feature here."""
    if device.type != "cuda" or setting == "off":
        return None
    if setting == "fp16":
        return torch.float16
    # emulated bf16 (V100, T4) is slower than fp16 with a scaler: auto counts native support only
    if setting == "bf16" or torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.bfloat16
    return torch.float16
