"""``uses_every_parameter`` (fusion/base.py): a model that declares it lets DDP run without
``find_unused_parameters`` (train/run.py), so one backward of its training loss must reach every parameter that
requires a gradient (a zero gradient counts, None does not) whatever modalities the batch has: samples with
all-False masks, modalities absent from the batch dict, and in every configuration that changes which modules
run. A model that leaves a module out when a modality is missing must not declare it."""

from __future__ import annotations

import itertools

import pytest
import torch
from test_models import DIMS, NAMES, TASK_SETTINGS, make_batch, tiny
from torch import Tensor

from fusion import FusionModel

# settings that change which modules a model builds or runs (each also tried with its defaults)
VARIANTS: dict[str, list[dict[str, object]]] = {
    "bc_pmjrs": [{"fusion": "mean"}, {"faithful": True}, {"mi_min": False, "mi_max": False}],
    "ithp": [{"faithful": True}, {"bottleneck": False}, {"prime": "audio"}],
    "mim": [{"fusion": "add"}, {"faithful": True}],
    "mult": [{"memory_layers": 0}],
    "tcmax": [{"head": "share"}, {"head": "mlp"}, {"regression": "bins"}, {"regression": "continuous"}],
}


def batches(task: str) -> dict[str, dict[str, Tensor]]:
    """Samples missing modalities, modalities absent from the batch (one, two, all three)."""
    out = {}
    some = make_batch(task)
    some["text_mask"][0] = False
    some["audio_mask"][2] = False
    some["video_mask"][[2, 4]] = False  # sample 2 has text only
    out["some samples missing"] = some
    for r in (1, 2, 3):
        for gone in itertools.combinations(DIMS, r):
            batch = {k: v for k, v in make_batch(task).items() if k.split("_")[0] not in gone}
            out["absent " + "+".join(gone)] = batch
    return out


def unreached(model: FusionModel, batch: dict[str, Tensor]) -> list[str]:
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    out = model(batch)
    sum(out.losses.values()).backward()
    return [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]


def settings(name: str) -> list[tuple[str, dict[str, object]]]:
    return [(task, {}) for task in TASK_SETTINGS] + [("regression", extra) for extra in VARIANTS.get(name, [])]


@pytest.mark.parametrize("name", NAMES)
def test_declared_models_reach_every_parameter_whatever_is_missing(name: str) -> None:
    if not tiny(name).uses_every_parameter:
        pytest.skip(f"{name} does not declare uses_every_parameter")
    for task, extra in settings(name):
        model = tiny(name, task, **extra)
        assert model.uses_every_parameter, extra
        for what, batch in batches(task).items():
            missing = unreached(model, batch)
            assert not missing, f"{task} {extra}, {what}: no gradient reaches {missing}"


def test_mim_without_gates_does_not_declare_it() -> None:
    model = tiny("mim", gates=False)
    assert not model.uses_every_parameter
    assert any(n.startswith("upn.") for n in unreached(model, make_batch()))  # the mask learners never run


def test_every_registered_model_declares_it_at_its_defaults() -> None:
    declared = {name for name in NAMES if tiny(name).uses_every_parameter}
    assert declared == set(NAMES), f"undeclared: {set(NAMES) - declared}"
