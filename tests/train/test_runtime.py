"""Process-level choices made without a GPU: the rank's CUDA device, the auto AMP dtype, CUDA RNG state."""

from __future__ import annotations

import pytest
import torch

from train import runtime
from train.runtime import amp_dtype, cuda_rng_state, pick_device, rng_state


def test_each_rank_seeing_one_gpu_uses_gpu_0(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # per-rank CUDA_VISIBLE_DEVICES
    assert [pick_device("cuda", r) for r in range(3)] == [torch.device("cuda:0")] * 3
    assert pick_device("cuda", 3) == torch.device("cuda:0") and pick_device("auto", 2) == torch.device("cuda:0")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)  # every GPU of the node visible to every rank
    assert pick_device("cuda", 3) == torch.device("cuda:3") and pick_device("auto", 5) == torch.device("cuda:1")


def test_auto_amp_counts_native_bf16_only(monkeypatch) -> None:
    seen = []

    def supported(including_emulation: bool = True) -> bool:
        seen.append(including_emulation)
        return including_emulation  # a V100 / T4: bf16 only emulated

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    cuda = torch.device("cuda:0")
    assert amp_dtype("auto", cuda) == torch.float16 and seen == [False]
    assert amp_dtype("bf16", cuda) == torch.bfloat16 and amp_dtype("off", cuda) is None
    assert amp_dtype("auto", torch.device("cpu")) is None


def test_cuda_rng_state_is_this_rank_device_only(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: calls.append(device) or torch.tensor([7]))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("every GPU's state saved"))
    state = rng_state(torch.device("cuda:1"))
    assert torch.equal(state["cuda"], torch.tensor([7])) and calls == [torch.device("cuda:1")]
    assert "cuda" not in rng_state(torch.device("cpu"))


def test_old_checkpoints_with_every_gpu_state_still_restore(monkeypatch, caplog) -> None:
    one, every = torch.tensor([1]), [torch.tensor([0]), torch.tensor([1])]  # an old checkpoint: a list
    assert torch.equal(cuda_rng_state(one, torch.device("cuda:0")), one)
    assert torch.equal(cuda_rng_state(every, torch.device("cuda:1")), every[1])
    assert cuda_rng_state(every, torch.device("cuda:2")) is None  # fewer GPUs saved than this index: no IndexError
    assert cuda_rng_state(every, torch.device("cpu")) is None and cuda_rng_state(None, torch.device("cuda:0")) is None
    restored = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: restored.append((s, device)))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda s: pytest.fail("every GPU's state restored"))
    state = {**rng_state(), "cuda": every}
    runtime.set_rng_state(state, torch.device("cuda:1"))
    assert restored == [(every[1], torch.device("cuda:1"))]


@pytest.mark.gpu
def test_cuda_rng_state_round_trips_on_the_rank_device() -> None:
    device = torch.device(f"cuda:{torch.cuda.device_count() - 1}")
    state = rng_state(device)
    first = torch.rand(3, device=device)
    runtime.set_rng_state(state, device)
    assert torch.equal(torch.rand(3, device=device), first)
    runtime.set_rng_state({**state, "cuda": [state["cuda"]] * 9}, torch.device("cuda:0"))  # old list format


def test_ranks_sharing_a_gpu_use_gloo(monkeypatch) -> None:
    """NCCL refuses two ranks on one GPU: torchrun with more local ranks than GPUs joins with gloo."""
    from train.runtime import pick_backend, setup_distributed

    cuda = torch.device("cuda:0")
    assert pick_backend(cuda, local_world=2, gpus=2) == "nccl"
    assert pick_backend(cuda, local_world=2, gpus=1) == "gloo"  # both ranks on cuda:0
    assert pick_backend(cuda, local_world=1, gpus=1) == "nccl"  # one rank per node, or LOCAL_WORLD_SIZE unset
    assert pick_backend(torch.device("cpu"), local_world=2, gpus=0) == "gloo"
    joined = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: joined.append(device))
    monkeypatch.setattr(runtime.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(runtime.dist, "init_process_group", lambda backend: joined.append(backend))
    monkeypatch.setattr(runtime.dist, "new_group", lambda backend: joined.append(f"{backend} group") or backend)
    env = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    d = setup_distributed("cuda")
    assert (d.rank, d.world_size, d.device, d.enabled) == (1, 2, cuda, True)
    assert joined == [cuda, "gloo"] and d.cpu_group is None  # host values go through the default group
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    joined.clear()
    d = setup_distributed("cuda")
    assert d.device == torch.device("cuda:1") and joined == [torch.device("cuda:1"), "nccl", "gloo group"]
    assert d.cpu_group == "gloo"  # NCCL's default group: host values through a gloo group over the same ranks
