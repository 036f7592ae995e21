"""One parametrised suite for every registered fusion model, at tiny odd sizes.

Each test asserts a property every model promises (fusion/base.py): output shapes, padding invariance,
missing modalities, finite losses, gradients to every parameter, state-dict round trip, deterministic eval.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import Tensor

from fusion import MODELS, FusionConfigError, FusionModel, UnknownModelError, build_model
from fusion.base import modality_dropout

DIMS = {"text": 21, "audio": 27, "video": 11}
LENGTHS = {"text": [7, 5, 3, 7, 6], "audio": [13, 11, 8, 4, 13], "video": [9, 9, 2, 6, 5]}
B = 5
TASK_SETTINGS = {
    "regression": {"task": "regression"},
    "classification": {"task": "classification", "num_classes": 3},
    "multilabel": {"task": "multilabel", "num_classes": 4},
}


def tiny(name: str, task: str = "regression", dims: dict[str, int] | None = None, **extra: object) -> FusionModel:
    torch.manual_seed(0)
    settings = {"dims": dict(dims or DIMS), "hidden": 15, "num_heads": 3, "num_layers": 1, **TASK_SETTINGS[task]}
    return build_model(name, **settings, **extra)


def make_batch(task: str = "regression", seed: int = 1, modalities=tuple(DIMS)) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    batch: dict[str, Tensor] = {}
    for m in modalities:
        lengths = torch.tensor(LENGTHS[m])
        t = int(lengths.max())
        batch[m] = torch.randn(B, t, DIMS[m], generator=g)
        batch[f"{m}_mask"] = torch.arange(t)[None] < lengths[:, None]
    if "audio" in modalities:
        batch["audio_mask"][1, :3] = False  # a late-starting stream: invalid steps before valid ones
    if task == "regression":
        batch["label"] = torch.rand(B, generator=g) * 6 - 3
    elif task == "classification":
        batch["label"] = torch.tensor([0, 1, 2, 1, 0])
    else:
        batch["label"] = (torch.rand(B, 4, generator=g) > 0.5).float()
    return batch


def run_eval(model: FusionModel, batch: dict[str, Tensor]):
    model.eval()
    torch.manual_seed(123)  # estimators with sampled negatives draw the same ones for both calls
    with torch.no_grad():
        return model(batch)


def assert_outputs_equal(a, b, atol: float = 1e-5) -> None:
    torch.testing.assert_close(a.prediction, b.prediction, atol=atol, rtol=1e-5)
    assert a.losses.keys() == b.losses.keys()
    for key in a.losses:
        torch.testing.assert_close(a.losses[key], b.losses[key], atol=atol, rtol=1e-5, msg=key)


NAMES = sorted(MODELS)


def test_registry_lists_valid_names() -> None:
    assert {"late"} <= set(MODELS)
    with pytest.raises(UnknownModelError, match="valid models: " + ", ".join(NAMES)):
        build_model("mulT", dims=DIMS)


def test_config_problems_are_collected() -> None:
    with pytest.raises(FusionConfigError, match="unknown key 'hiden'.*valid keys for"):
        build_model("late", dims=DIMS, hiden=3)
    with pytest.raises(FusionConfigError) as info:
        build_model("late", dims={"txt": 3}, task="ranking", hidden=10, num_heads=3)
    message = str(info.value)
    assert "unknown modality 'txt'" in message
    assert "task: must be one of regression, classification, multilabel" in message
    assert "hidden (10) must be a positive multiple of num_heads (3)" in message


@pytest.mark.parametrize("task", list(TASK_SETTINGS))
@pytest.mark.parametrize("name", NAMES)
def test_output_shapes_and_finite_losses(name: str, task: str) -> None:
    model = tiny(name, task)
    model.train()
    out = model(make_batch(task))
    expected = {"regression": (B,), "classification": (B, 3), "multilabel": (B, 4)}[task]
    assert tuple(out.prediction.shape) == expected
    assert out.losses, "a model must return at least its task loss"
    for key, loss in out.losses.items():
        assert loss.dim() == 0 and torch.isfinite(loss), key
    for key, value in out.diagnostics.items():
        assert not value.requires_grad, key
        assert torch.isfinite(value).all(), key


@pytest.mark.parametrize("name", NAMES)
def test_padding_values_do_not_change_outputs(name: str) -> None:
    model = tiny(name)
    batch = make_batch()
    reference = run_eval(model, batch)
    garbage = dict(batch)
    for m in DIMS:
        noise = torch.randn_like(batch[m]) * 1e3
        garbage[m] = torch.where(batch[f"{m}_mask"][..., None], batch[m], noise)
    assert_outputs_equal(reference, run_eval(model, garbage))
    longer = dict(batch)  # more trailing padding must not matter either
    for m in DIMS:
        longer[m] = torch.cat([batch[m], torch.randn(B, 4, DIMS[m])], 1)
        longer[f"{m}_mask"] = torch.cat([batch[f"{m}_mask"], torch.zeros(B, 4, dtype=torch.bool)], 1)
    assert_outputs_equal(reference, run_eval(model, longer))


@pytest.mark.parametrize("name", NAMES)
def test_missing_modality_masks(name: str) -> None:
    model = tiny(name)
    batch = make_batch()
    batch["audio_mask"][2] = False  # sample 2 has no audio
    batch["video_mask"][4] = False  # sample 4 has no video
    reference = run_eval(model, batch)
    assert torch.isfinite(reference.prediction).all()
    changed = dict(batch)
    changed["audio"] = batch["audio"].clone()
    changed["audio"][2] = torch.randn_like(batch["audio"][2])
    changed["video"] = batch["video"].clone()
    changed["video"][4] = torch.randn_like(batch["video"][4])
    torch.testing.assert_close(run_eval(model, changed).prediction, reference.prediction)


@pytest.mark.parametrize("name", NAMES)
def test_no_mixing_across_the_batch(name: str) -> None:
    # A prediction must not depend on the other samples of its batch (the released BC-PMJRS attends across it).
    model = tiny(name)
    batch = make_batch()
    changed = dict(batch)
    for m in DIMS:
        changed[m] = batch[m].clone()
        changed[m][3] = torch.randn_like(batch[m][3]) * 5
    before, after = run_eval(model, batch).prediction, run_eval(model, changed).prediction
    keep = [0, 1, 2, 4]
    torch.testing.assert_close(after[keep], before[keep], atol=1e-6, rtol=1e-6)
    assert (after[3] - before[3]).abs().max() > 1e-5


@pytest.mark.parametrize("name", NAMES)
def test_every_subset_of_modalities(name: str) -> None:
    full = tiny(name)
    batch = make_batch()
    for r in (1, 2):
        for subset in itertools.combinations(DIMS, r):
            # a model built for the subset ...
            model = tiny(name, dims={m: DIMS[m] for m in subset})
            model.train()
            out = model(make_batch(modalities=subset))
            assert all(torch.isfinite(v) for v in out.losses.values()), subset
            # ... and the full model evaluated with the other modalities removed from the batch
            reduced = {k: v for k, v in batch.items() if k == "label" or k.split("_")[0] in subset}
            out = run_eval(full, reduced)
            assert tuple(out.prediction.shape) == (B,)
            assert torch.isfinite(out.prediction).all(), subset
            # removing a modality equals masking it out for every sample
            masked = dict(batch)
            for m in set(DIMS) - set(subset):
                masked[f"{m}_mask"] = torch.zeros_like(batch[f"{m}_mask"])
            torch.testing.assert_close(run_eval(full, masked).prediction, out.prediction)


@pytest.mark.parametrize("name", NAMES)
def test_backward_reaches_every_parameter(name: str) -> None:
    model = tiny(name)
    model.train()
    torch.manual_seed(5)
    out = model(make_batch())
    sum(out.losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing, f"no gradient reaches {missing}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_param_groups_cover_parameters_once(name: str) -> None:
    model = tiny(name)
    groups = model.param_groups(lr=1e-3)
    assert all({"name", "params", "lr"} <= set(g) for g in groups)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}
    torch.optim.AdamW(groups)  # the groups are valid optimiser input as they are


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_and_deterministic_eval(name: str) -> None:
    model = tiny(name)
    model.train()
    opt = torch.optim.Adam(model.param_groups(lr=1e-2))
    for _ in range(2):  # move away from the initialisation first
        out = model(make_batch(seed=7))
        opt.zero_grad()
        sum(out.losses.values()).backward()
        opt.step()
    batch = make_batch()
    model.eval()
    with torch.no_grad():
        first, second = model(batch), model(batch)
    torch.testing.assert_close(first.prediction, second.prediction, atol=0, rtol=0)
    clone = tiny(name)
    clone.load_state_dict(model.state_dict())
    assert_outputs_equal(run_eval(model, batch), run_eval(clone, batch), atol=0)


def test_modality_dropout_never_drops_everything() -> None:
    g = torch.Generator().manual_seed(0)
    present = {"text": torch.ones(1000, dtype=torch.bool), "audio": torch.ones(1000, dtype=torch.bool)}
    present["audio"][:10] = False
    kept = modality_dropout(present, 0.9, generator=g)
    alive = kept["text"] | kept["audio"]
    assert alive.all()
    assert not kept["audio"][:10].any()  # an absent modality is never brought back
    rate = 1 - kept["text"][10:].float().mean().item()
    assert 0.4 < rate < 0.95  # dropped often, but rescued whenever both would go


@pytest.mark.parametrize("name", NAMES)
def test_modality_dropout_in_training_only(name: str) -> None:
    model = tiny(name, modality_dropout=0.5)
    batch = make_batch()
    model.train()
    inputs = model.prepare(batch)
    alive = torch.stack(list(inputs.present.values()), 1).any(1)
    assert alive.all()
    model.eval()
    inputs = model.prepare(batch)
    assert all(inputs.present[m].all() for m in DIMS)
