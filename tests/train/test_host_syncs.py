"""A training step reads nothing from the device on the host between logged steps: the finite check is folded in on
the device and read only before a log line, a checkpoint or an evaluation; the GradScaler's scale is read once
per step under fp16 and never otherwise; the DDP label flags are host values. On the CPU the Python-level reads
(``bool``, ``int``, ``float``, ``.item()``, ``.tolist()``) are counted inside the device part of a step (forward,
backward, optimiser step); on CUDA, torch's sync debug mode counts every synchronisation, implicit ones too."""

from __future__ import annotations

import contextlib
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
import train.trainer
from shards.dataset import ShardDataset
from train.checkpoint import load_checkpoint
from train.config import make_train_config
from train.finite import FiniteWatch, NonFiniteLoss
from train.inputs import feature_dims
from train.run import build, train_loader
from train.runtime import Dist
from train.trainer import fit

READS = ("__bool__", "__int__", "__float__", "__index__", "item", "tolist")
FAST = ["batch_size=1", "num_workers=0", "model.hidden=12", "model.num_heads=3", "epochs=1", "max_steps=4"]
FAST += ["log_every=1000", "selection=last"]


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


class StepWindow:
    """Marks the device part of ``fit``'s steps: open from the end of step 1 (logged, so read on the host) until
    the epoch's last step is done, closed while a step's batches are prepared on the host (``prepare_group``: the
    batch's own checks before it moves) and while ``after_step`` logs or saves. ``on_open`` / ``on_close`` are
    called as it opens and closes."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, on_open, on_close) -> None:
        self.on_open, self.on_close, self.is_open = on_open, on_close, False
        for name, then in (("prepare_group", None), ("after_step", True), ("check_labelled", False)):
            monkeypatch.setattr(train.trainer, name, self.closed_in(getattr(train.trainer, name), then))

    def set(self, state: bool) -> None:
        if state != self.is_open:
            self.is_open = state
            (self.on_open if state else self.on_close)()

    def closed_in(self, function, then: bool | None):
        """``function`` with the window closed, then open (True), closed (False) or as it was (None)."""

        def closed(*args, **kwargs):
            was = self.is_open
            self.set(False)
            result = function(*args, **kwargs)
            self.set(was if then is None else then)
            return result

        return closed


def device_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The host reads inside the device part of ``fit``'s steps after the first (``StepWindow``), less AdamW's
    reads of its step counters, which torch keeps on the host."""
    calls: list[str] = []
    counting: list[contextlib.ExitStack] = []

    def start() -> None:
        stack = contextlib.ExitStack()
        stack.enter_context(counted_reads(calls))
        counting.append(stack)

    StepWindow(monkeypatch, start, lambda: counting.pop().close())
    return calls


MODES = [*((m, "frozen") for m in sorted(fusion.MODELS)), ("mult", "end_to_end")]


def clips(config, shards: Path) -> list[dict]:
    """The train split's clips in the loader's format, each twice (the split holds a few)."""
    dataset = ShardDataset.load(shards)
    job, _, _ = build(config, shards, Dist(), dataset, feature_dims(dataset, config.data.modalities))
    return list(train_loader(job, 0, 0)) * 2


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
    batches = clips(config, bundled_dataset)
    calls = device_reads(monkeypatch)
    fit(config, bundled_dataset, tmp_path / "run", source=lambda job, epoch, skip: list(batches))
    saved = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert saved["state"]["step"] == len(batches) == 4
    # under fp16, per optimiser step: torch's read of the inf check in GradScaler.step (which waits for the step's
    # kernels), then ours of the scale after update (which waits for update's one kernel only)
    assert calls == (["item", "item"] * (len(batches) - 1) if amp == "fp16" else []), calls


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["frozen", "end_to_end"])
def test_cuda_training_steps_synchronise_only_where_torch_must(
    bundled_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """bf16 on CUDA: no synchronisation in any step after the first (which builds the optimiser's state and the
    allocator's pools)."""
    config = make_train_config("mult", overrides=[*FAST, "device=cuda", "amp=bf16", f"mode={mode}"])
    batches = clips(config, bundled_dataset)
    caught: list[list[warnings.WarningMessage]] = []
    recording: list[warnings.catch_warnings] = []  # one per opening of the window (none can be entered twice)

    def start() -> None:
        torch.cuda.synchronize()
        recording.append(warnings.catch_warnings(record=True))
        caught.append(recording[-1].__enter__())
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")

    def stop() -> None:
        torch.cuda.set_sync_debug_mode("default")
        recording.pop().__exit__(None, None, None)

    StepWindow(monkeypatch, start, stop)
    fit(config, bundled_dataset, tmp_path / "run", source=lambda job, epoch, skip: list(batches))
    syncs = [str(w.message) for got in caught for w in got if "synchroniz" in str(w.message)]
    assert caught and syncs == [], syncs[:3]
