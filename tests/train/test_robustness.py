"""train.robustness: Gaussian noise and time-step drop on one modality, seeding, the area under a curve."""

from __future__ import annotations

import math

import pytest
import torch

from train.config import TrainConfigError
from train.robustness import (
    SWEEP_LEVELS,
    Corruption,
    area_under_curve,
    batch_generator,
    corrupt,
    parse_noise,
    sweep_levels,
)

B, T, D = 96, 40, 7


def make_batch(min_len: int = 10, seed: int = 0) -> dict:
    """Text (B, T, D) with per-sample lengths in [min_len, T], audio (B, 9, 5), masks False on padding; padding
    holds a recognisable value so a change there shows."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None] < lengths[:, None]
    text = torch.where(mask[..., None], torch.randn(B, T, D, generator=g), torch.full((), 7.0))
    audio = torch.randn(B, 9, 5, generator=g)
    keys = [f"clip{i}" for i in range(B)]
    return {
        "text": text,
        "text_mask": mask,
        "audio": audio,
        "audio_mask": torch.ones(B, 9, dtype=torch.bool),
        "key": keys,
    }


STD = torch.tensor([0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5])


def test_gaussian_noise_has_level_times_train_std_on_valid_steps_and_touches_nothing_else() -> None:
    batch = make_batch()
    out = corrupt(batch, "text", "gaussian", 0.7, STD, torch.Generator().manual_seed(3))
    mask = batch["text_mask"]
    added = (out["text"] - batch["text"])[mask]  # (valid steps, D)
    assert len(added) > 2000
    # per-feature std of N valid draws has relative standard error 1/sqrt(2N) < 1.6 %: 6 % is over 3.5 of them
    assert torch.allclose(added.std(0), 0.7 * STD, rtol=0.06)
    assert added.mean(0).abs().max() < 0.1 * 3.5
    assert torch.equal(out["text"][~mask], batch["text"][~mask])  # padding bit-identical (the 7.0 fill)
    assert torch.equal(out["text_mask"], mask) and out["audio"] is batch["audio"] and out["key"] is batch["key"]
    assert out["text"].dtype == batch["text"].dtype and not torch.equal(out["text"], batch["text"])
    half = corrupt({**batch, "text": batch["text"].half()}, "text", "gaussian", 0.7, STD, torch.Generator())
    assert half["text"].dtype == torch.float16


def test_drop_removes_level_of_the_valid_steps_and_never_padding() -> None:
    batch = make_batch()
    mask = batch["text_mask"]
    out = corrupt(batch, "text", "drop", 0.3, None, torch.Generator().manual_seed(5))
    kept = out["text_mask"]
    # the exact count for this seed: the steps whose uniform draw is below the level (no sample of >= 10 steps
    # loses all of them here, so no step is given back)
    draw = torch.rand(mask.shape, generator=torch.Generator().manual_seed(5))
    expected = int((mask & (draw < 0.3)).sum())
    dropped = int(mask.sum() - kept.sum())
    assert dropped == expected and abs(dropped / int(mask.sum()) - 0.3) < 0.02
    assert not (kept & ~mask).any()  # padding stays padding
    assert torch.equal(out["text"][~mask], batch["text"][~mask])
    gone = mask & ~kept
    assert (out["text"][gone] == 0).all() and torch.equal(out["text"][kept], batch["text"][kept])
    assert out["audio"] is batch["audio"] and out["audio_mask"] is batch["audio_mask"]


def test_drop_keeps_one_step_per_sample_below_level_one() -> None:
    batch = make_batch(min_len=1)
    lengths = batch["text_mask"].sum(1)
    out = corrupt(batch, "text", "drop", 0.99, None, torch.Generator().manual_seed(1))
    assert (out["text_mask"].sum(1) >= 1).all()
    assert int((out["text_mask"].sum(1) > 1).sum()) < 0.5 * B  # nearly every sample is down to one step
    assert (lengths > 1).any()
    everything = corrupt(batch, "text", "drop", 1.0, None, torch.Generator().manual_seed(1))
    assert not everything["text_mask"].any() and (everything["text"][batch["text_mask"]] == 0).all()


def test_level_zero_is_the_identity_and_a_seed_fixes_the_draws() -> None:
    batch = make_batch()
    for kind in ("gaussian", "drop"):
        same = corrupt(batch, "text", kind, 0.0, STD, torch.Generator().manual_seed(0))
        assert all(same[k] is batch[k] for k in batch)
        a = corrupt(batch, "text", kind, 0.5, STD, torch.Generator().manual_seed(9))
        b = corrupt(batch, "text", kind, 0.5, STD, torch.Generator().manual_seed(9))
        c = corrupt(batch, "text", kind, 0.5, STD, torch.Generator().manual_seed(10))
        assert torch.equal(a["text"], b["text"]) and torch.equal(a["text_mask"], b["text_mask"])
        assert not torch.equal(a["text"], c["text"])
    missing = {k: v for k, v in batch.items() if not k.startswith("text")}
    assert corrupt(missing, "text", "drop", 0.5, None, torch.Generator()) == missing


def test_draws_follow_the_seed_and_the_samples_not_the_level() -> None:
    batch = make_batch()
    keys = batch["key"]
    assert torch.equal(torch.rand(3, generator=batch_generator(0, "text", "drop", keys)),
                       torch.rand(3, generator=batch_generator(0, "text", "drop", keys)))  # fmt: skip
    for other in (batch_generator(1, "text", "drop", keys), batch_generator(0, "text", "drop", keys[::-1])):
        assert not torch.equal(
            torch.rand(3, generator=other), torch.rand(3, generator=batch_generator(0, "text", "drop", keys))
        )
    low = Corruption({"text": 0.3}, "drop")(batch, keys)["text_mask"]
    high = Corruption({"text": 0.6}, "drop")(batch, keys)["text_mask"]
    assert (high <= low).all() and int(high.sum()) < int(low.sum())  # every step dropped at 0.3 is dropped at 0.6
    one = Corruption({"text": 1.0}, "gaussian", {"text": STD})(batch, keys)["text"] - batch["text"]
    two = Corruption({"text": 2.0}, "gaussian", {"text": STD})(batch, keys)["text"] - batch["text"]
    assert torch.allclose(two, 2 * one, atol=1e-5)  # the same noise, scaled


def test_area_under_curve_by_hand() -> None:
    # trapezoids 1 * (1 + 2) / 2 + 1 * (2 + 2) / 2 + 2 * (2 + 4) / 2 = 9.5 over a range of 4
    assert area_under_curve([0, 1, 2, 4], [1, 2, 2, 4]) == pytest.approx(2.375)
    assert area_under_curve([0, 0.5], [0.8, 0.6]) == pytest.approx(0.7)
    assert area_under_curve([0, 1, 3], [2, 2, 2]) == pytest.approx(2.0)  # a flat curve: its value
    assert area_under_curve([1.0], [0.25]) == 0.25
    assert math.isnan(area_under_curve([0, 1], [0.5, math.nan]))
    with pytest.raises(ValueError, match="levels must rise"):
        area_under_curve([0, 2, 1], [1, 1, 1])


def test_sweep_levels_and_noise_specs() -> None:
    assert sweep_levels("gaussian") == (0.0, 0.25, 0.5, 1.0, 2.0, 4.0) == SWEEP_LEVELS["gaussian"]
    assert sweep_levels("drop") == (0.0, 0.1, 0.3, 0.5, 0.7, 0.9)
    assert sweep_levels("gaussian", [2, 0.5]) == (0.0, 0.5, 2.0)
    with pytest.raises(TrainConfigError, match="drop levels are probabilities in \\[0, 1\\], got 1.5"):
        sweep_levels("drop", [1.5])
    modalities = ("text", "audio", "video")
    assert parse_noise("a=0.5", "gaussian", modalities) == {"audio": 0.5}
    assert parse_noise("t=0.2, video=1", "gaussian", modalities) == {"text": 0.2, "video": 1.0}
    assert parse_noise("v=1", "drop", modalities) == {"video": 1.0}
    cases = {
        "x=1": "unknown modality 'x'; use t, a, v (or text, audio, video)",
        "a=-1": "gaussian levels are finite numbers >= 0 (times the train std), got -1",
        "a": "give MOD=LEVEL pairs, comma-separated, e.g. a=0.5 or t=0.2,v=1",
        "a=x": "level 'x' of a is not a number",
        "a=1,a=2": "audio is given twice",
        "a=inf": "gaussian levels are finite numbers",
    }
    for spec, message in cases.items():
        with pytest.raises(TrainConfigError, match="--noise") as err:
            parse_noise(spec, "gaussian", modalities)
        assert message in str(err.value), spec
    with pytest.raises(TrainConfigError, match="drop levels are probabilities in \\[0, 1\\], got 2"):
        parse_noise("t=2", "drop", modalities)
    with pytest.raises(TrainConfigError, match="the model uses text, audio, not video"):
        parse_noise("v=1", "gaussian", ("text", "audio"))
    with pytest.raises(TrainConfigError, match="--noise-kind 'blur': use one of gaussian, drop"):
        parse_noise("a=1", "blur", modalities)
