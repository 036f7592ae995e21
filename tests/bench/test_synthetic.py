"""The synthetic task: its construction, and fusion beating every single modality on it."""

from __future__ import annotations

import torch

from bench.synthetic import BEGIN, END, train_one, write_section
from fusion.synthetic import SyntheticTask


def small_data(task: SyntheticTask) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return {"train": task.sample(600, g), "valid": task.sample(200, g), "test": task.sample(300, g)}


def test_generator_shapes_masks_and_noise() -> None:
    task = SyntheticTask()
    data = task.sample(50, torch.Generator().manual_seed(1))
    assert data["text"].shape[2] == 16 and data["audio"].shape[2] == 12 and data["video"].shape[2] == 10
    lengths = data["video_mask"].sum(1)
    assert lengths.min() >= 8 and lengths.max() <= 16
    assert not data["video"][~data["video_mask"]].any()  # padding is zero
    assert not (data["video_noisy"] & ~data["video_mask"]).any()  # noise only on valid steps
    rate = data["video_noisy"].sum() / data["video_mask"].sum()
    assert 0.35 < rate < 0.65
    torch.testing.assert_close(data["label"], (data["s1"] + data["s2"]).clamp(-3, 3))
    again = task.sample(50, torch.Generator().manual_seed(1))
    torch.testing.assert_close(again["audio"], data["audio"])


def test_single_modality_carries_half_the_signal() -> None:
    task = SyntheticTask()
    data = task.sample(4000, torch.Generator().manual_seed(2))
    text_mean = data["text"].sum(1) / data["text_mask"].sum(1, keepdim=True)
    projection = text_mean @ task.directions()["text"] / 4.0  # |u|^2 = 4, so this estimates s1
    corr = torch.corrcoef(torch.stack([projection, data["label"]]))[0, 1]
    assert 0.6 < corr < 0.75  # about 1/sqrt(2): text alone cannot explain the label


def test_fusion_beats_every_single_modality() -> None:
    task = SyntheticTask()
    data = small_data(task)
    kwargs = dict(steps=150, batch_size=64, eval_every=50, hidden=16)
    fused = train_one("late", ("text", "audio", "video"), data, task, seed=0, **kwargs)
    singles = {m: train_one("late", (m,), data, task, seed=0, **kwargs) for m in ("text", "audio", "video")}
    best_single = min(r.metrics["mae"] for r in singles.values())
    assert fused.metrics["mae"] < 0.7 * best_single, (fused.metrics, {m: r.metrics for m, r in singles.items()})
    assert fused.metrics["corr"] > max(r.metrics["corr"] for r in singles.values()) + 0.1


def test_write_section_replaces_only_its_markers(tmp_path) -> None:
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\n## Extraction\nkeep me\n")
    write_section(path, "first")
    write_section(path, "second")
    text = path.read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1
    assert "keep me" in text and "second" in text and "first" not in text


def test_bc_pmjrs_redundancy_is_reported_as_mutual_information() -> None:
    """The table's redundancy for BC-PMJRS is the validated MI measure (linear-Gaussian and held-out InfoNCE, per
    pair), not a CLUB reading; on this task only text and video share a factor (s1)."""
    task = SyntheticTask()
    data = small_data(task)
    run = train_one("bc_pmjrs", ("text", "audio", "video"), data, task, seed=0, steps=60, eval_every=30, hidden=16)
    pairs = ("text-audio", "text-video", "audio-video")
    assert {f"{kind}/{p}" for kind in ("mi_linear", "mi_infonce") for p in pairs} <= set(run.diagnostics)
    assert not any(k.startswith(("mi_refit", "mi_running")) for k in run.diagnostics)
    shared, independent = run.diagnostics["mi_linear/text-video"], run.diagnostics["mi_linear/text-audio"]
    assert shared > independent + 0.2, run.diagnostics
