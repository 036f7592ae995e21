"""A training step reads nothing from the device on the host between logged steps: the finite check is folded in on
the device and read only before a log line, a checkpoint or an evaluation; the GradScaler's scale is read once
per step under fp16 and never otherwise; the DDP label flags are host values. On the CPU the Python-level reads
(``bool``, ``int``, ``float``, ``.item()``, ``.tolist()``) are counted inside the device part of a step (forward,
backward, optimiser step); on CUDA, torch's sync debug mode counts every synchronisation, implicit ones too."""

from __future__ import annotations

import math
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from test_fp16_steps import cuda_amp_on_cpu

import fusion
import train.step
from train.config import make_train_config
from train.finite import FiniteWatch, NonFiniteLoss
from train.run import build_run, train_loader
from train.runtime import Dist
from train.step import train_step

READS = ("__bool__", "__int__", "__float__", "__index__", "item", "tolist")
FAST = ["batch_size=1", "num_workers=0", "model.hidden=12", "model.num_heads=3", "epochs=3"]


@contextmanager
def counted_reads(calls: list[str]) -> Iterator[None]:
    """Every host read of a tensor's value made inside, appended to ``calls`` by name."""
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def counting(name):
        def read(self, *args, **kwargs):
            if "torch/optim/" not in traceback.extract_stack(limit=2)[0].filename:
                calls.append(name)
            return originals[name](self, *args, **kwargs)

        return read

    for name in READS:
        setattr(torch.Tensor, name, counting(name))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def test_the_finite_watch_reads_nothing_until_it_is_checked() -> None:
    watch, calls = FiniteWatch(torch.device("cpu")), []
    with counted_reads(calls):
        watch.add(1, 0, torch.tensor(0.5), torch.tensor(2.0))
        watch.add(2, 0, torch.tensor(float("nan")), None)  # a step the scaler skipped: no gradient norm
        watch.add(3, 1, torch.tensor(float("inf")), torch.tensor(1.0))  # later: the first bad step is kept
    assert calls == []
    with pytest.raises(NonFiniteLoss) as stopped:
        watch.check(Dist(), step=3, run_dir=Path("run"), kept=[Path("checkpoints/last.pt")])
    assert str(stopped.value).startswith("training stopped at step 3: step 2 (epoch 0) had a loss of nan, not finite.")
    assert "Kept from before it: checkpoints/last.pt in run." in str(stopped.value)

    finite = FiniteWatch(torch.device("cpu"))
    finite.add(1, 0, torch.tensor(0.5), torch.tensor(2.0))
    finite.check(Dist(), step=1, run_dir=None, kept=[])  # nothing to say
    finite.add(2, 0, torch.tensor(0.5), torch.tensor(math.inf))
    with pytest.raises(NonFiniteLoss, match=r"step 2 \(epoch 0\) had a loss of 0.5, gradient norm inf, not finite"):
        finite.check(Dist(), step=2, run_dir=None, kept=[])


def device_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The host reads inside ``forward_backward`` and ``optimizer_step`` (the part of a step that runs on the
    device; the batch's own checks before it moves are host work), less AdamW's reads of its step counters, which
    torch keeps on the host."""
    calls: list[str] = []
    for name in ("forward_backward", "optimizer_step"):
        original = getattr(train.step, name)

        def counted(*args, _original=original, **kwargs):
            with counted_reads(calls):
                return _original(*args, **kwargs)

        monkeypatch.setattr(train.step, name, counted)
    return calls


MODES = [*((m, "frozen") for m in sorted(fusion.MODELS)), ("mult", "end_to_end")]


@pytest.mark.parametrize("amp", ["off", "fp16"])
@pytest.mark.parametrize(("model", "mode"), MODES)
def test_a_training_step_reads_no_device_value_on_the_host(
    bundled_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model: str, mode: str, amp: str
) -> None:
    """End to end the text encoder is fed a prepared attention mask: given the 2-D one, transformers tests it for
    padding on the host every step."""
    if amp == "fp16":
        cuda_amp_on_cpu(monkeypatch)
    config = make_train_config(model, overrides=[*FAST, "device=cpu", f"amp={amp}", f"mode={mode}"])
    run = build_run(config, bundled_dataset, tmp_path / "run", Dist())
    calls = device_reads(monkeypatch)
    batches = list(train_loader(run)) * 2  # the train split holds a few clips: each twice
    steps = [train_step(run, [batch]) for batch in batches]
    assert all(s.stepped for s in steps) and run.step == len(batches) >= 2
    # under fp16, per optimiser step: torch's read of the inf check in GradScaler.step (which waits for the step's
    # kernels), then ours of the scale after update (which waits for update's one kernel only)
    assert calls == (["item", "item"] * len(batches) if amp == "fp16" else []), calls


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["frozen", "end_to_end"])
def test_cuda_training_steps_synchronise_only_where_torch_must(
    bundled_dataset: Path, tmp_path: Path, mode: str
) -> None:
    """bf16 on CUDA: no synchronisation in any step after the first (which builds the optimiser's state and the
    allocator's pools)."""
    config = make_train_config("mult", overrides=[*FAST, "device=cuda", "amp=bf16", f"mode={mode}"])
    run = build_run(config, bundled_dataset, tmp_path / "run", Dist(device=torch.device("cuda")))
    batches = list(train_loader(run)) * 2  # the train split holds a few clips: each twice
    train_step(run, [batches[0]])
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for batch in batches[1:]:
                train_step(run, [batch])
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert syncs == [], syncs[:3]
