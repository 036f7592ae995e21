"""torch.compile over every registered model: one graph, no recompiles for new batch or sequence sizes.

Dynamo's default (``dynamic=None``) is what a GPU user gets and what we test: the first call compiles for
its sizes, the first size change recompiles once with batch and time sizes symbolic, and no later size
recompiles. Host syncs in a forward (``.item()``, ``bool(tensor)``, boolean indexing) would split the graph
and show up here as extra frames. ``CompileCounter`` is the eager backend plus a count of compiled graphs.
"""

from __future__ import annotations

import pytest
import torch
from test_models import DIMS, NAMES, assert_outputs_equal, tiny
from torch._dynamo.testing import CompileCounter

SIZES = [(5, 7), (6, 9), (4, 5), (8, 12), (3, 6), (7, 8), (5, 10), (9, 4), (6, 11), (2, 7)]  # (B, T)


def varied_batch(b: int, t: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    batch = {}
    for i, m in enumerate(DIMS):
        steps = t + i  # unaligned streams
        batch[m] = torch.randn(b, steps, DIMS[m], generator=g)
        lengths = torch.randint(1, steps + 1, (b,), generator=g)
        batch[f"{m}_mask"] = torch.arange(steps)[None] < lengths[:, None]
    batch["audio_mask"][0] = False  # sample 0 has no audio
    batch["label"] = torch.rand(b, generator=g) * 6 - 3
    return batch


@pytest.mark.parametrize("name", NAMES)
def test_compiled_model_does_not_recompile_and_matches_eager(name: str) -> None:
    torch._dynamo.reset()
    model = tiny(name).eval()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    with torch.no_grad():
        for seed, (b, t) in enumerate(SIZES):
            batch = varied_batch(b, t, seed)
            torch.manual_seed(seed)
            expected = model(batch)
            torch.manual_seed(seed)
            assert_outputs_equal(compiled(batch), expected, atol=1e-5)
    assert counter.frame_count <= 3, f"{counter.frame_count} graphs: graph breaks or more than 2 recompiles"


def test_compiled_training_step_needs_one_graph() -> None:
    torch._dynamo.reset()
    model = tiny("bc_pmjrs").train()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    for seed, (b, t) in enumerate(SIZES[:4]):
        out = compiled(varied_batch(b, t, seed))
        sum(out.losses.values()).backward()
    assert counter.frame_count <= 3


def on(device: str, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["mult"])  # one model: inductor compiles take tens of seconds each
def test_inductor_on_cuda_recompiles_at_most_twice_and_matches_eager(name: str) -> None:
    """What a GPU user's ``compile=true`` gets: inductor on CUDA, recompiles logged (their reasons are printed
    when this fails), at most 2 over the 10 varied batches, outputs as eager's."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    torch._logging.set_logs(recompiles=True)
    try:
        model = tiny(name).eval().to("cuda")
        counter = CompileCounterWithBackend("inductor")
        compiled = torch.compile(model, backend=counter)
        with torch.no_grad():
            for seed, (b, t) in enumerate(SIZES):
                batch = on("cuda", varied_batch(b, t, seed))
                torch.manual_seed(seed)
                expected = model(batch)
                torch.manual_seed(seed)
                assert_outputs_equal(compiled(batch), expected, atol=1e-3)
    finally:
        torch._logging.set_logs()
    assert counter.frame_count <= 3, f"{counter.frame_count} graphs: graph breaks or more than 2 recompiles"
