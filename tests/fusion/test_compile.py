"""torch.compile over every registered model: one graph, no recompiles for new batch or sequence sizes.

Dynamo's default (``dynamic=None``) is what a GPU user gets and what we test: the first call compiles for
its sizes, the first size change recompiles once with batch and time sizes symbolic, and no later size
recompiles. Host syncs in a forward (``.item()``, ``bool(tensor)``, boolean indexing) would split the graph
and show up here as extra frames. ``CompileCounter`` is the eager backend plus a count of compiled graphs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

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


def inductor_missing(device: str) -> str | None:
    """What inductor on ``device`` needs from the machine and this one lacks, as a skip reason; None when nothing.
    Triton compiles its kernel launcher with ``$CC``, else gcc, else clang, against Python.h from sysconfig's
    include directory, and on CUDA loads libcuda.so.1 from ``$TRITON_LIBCUDA_PATH``, else where ``/sbin/ldconfig
    -p`` lists it, else from ``$LD_LIBRARY_PATH`` (a bare image has a driver but may have none of these)."""
    missing = []
    cc = os.environ.get("CC")
    if not (shutil.which(cc) if cc else shutil.which("gcc") or shutil.which("clang")):
        missing.append(f"a C compiler (CC={cc})" if cc else "a C compiler (gcc or clang on PATH, or CC)")
    scheme = sysconfig.get_default_scheme()
    include = Path(sysconfig.get_paths(scheme="posix_prefix" if scheme == "posix_local" else scheme)["include"])
    if not (include / "Python.h").is_file():
        missing.append(f"Python's headers ({include / 'Python.h'} not found)")
    if device == "cuda" and not libcuda_found():
        missing.append("libcuda.so.1 where Triton looks (ldconfig -p, TRITON_LIBCUDA_PATH or LD_LIBRARY_PATH)")
    return f"inductor on {device} needs {', '.join(missing)}" if missing else None


def libcuda_found() -> bool:
    if os.environ.get("TRITON_LIBCUDA_PATH"):
        return True
    try:
        listed = subprocess.run(["/sbin/ldconfig", "-p"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        listed = ""
    if any("libcuda.so.1" in line for line in listed.splitlines()):
        return True
    paths = os.environ.get("LD_LIBRARY_PATH", "").split(":")
    return any(p and (Path(p) / "libcuda.so.1").exists() for p in paths)


def test_inductor_skip_names_what_the_machine_lacks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("TRITON_LIBCUDA_PATH", raising=False)
    monkeypatch.delenv("LD_LIBRARY_PATH", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(sysconfig, "get_paths", lambda scheme=None: {"include": str(tmp_path)})
    ldconfig = subprocess.CompletedProcess([], 0, stdout="\tlibc.so.6 (libc6,x86-64) => /lib/libc.so.6\n")
    monkeypatch.setattr(subprocess, "run", lambda *args, **kwargs: ldconfig)
    assert inductor_missing("cuda") == (
        "inductor on cuda needs a C compiler (gcc or clang on PATH, or CC), "
        f"Python's headers ({tmp_path / 'Python.h'} not found), "
        "libcuda.so.1 where Triton looks (ldconfig -p, TRITON_LIBCUDA_PATH or LD_LIBRARY_PATH)"
    )
    assert inductor_missing("cpu") == (
        f"inductor on cpu needs a C compiler (gcc or clang on PATH, or CC), Python's headers ({tmp_path / 'Python.h'} "
        "not found)"
    )
    (tmp_path / "Python.h").touch()
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}" if name == "clang" else None)
    ldconfig.stdout += "\tlibcuda.so.1 (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libcuda.so.1\n"
    assert inductor_missing("cuda") is None
    monkeypatch.setenv("CC", "/opt/none/cc")  # Triton takes CC as it is: gcc on PATH does not help
    assert inductor_missing("cuda") == "inductor on cuda needs a C compiler (CC=/opt/none/cc)"


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["mult"])  # one model: inductor compiles take tens of seconds each
def test_inductor_on_cuda_recompiles_at_most_twice_and_matches_eager(name: str) -> None:
    """What a GPU user's ``compile=true`` gets: inductor on CUDA, recompiles logged (their reasons are printed
    when this fails), at most 2 over the 10 varied batches, outputs as eager's."""
    from torch._dynamo.testing import CompileCounterWithBackend

    if reason := inductor_missing("cuda"):
        pytest.skip(reason)
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
