"""``mmfuse bench claims``: the tasks have the structure each claim needs, the statistics are exact, the probe
measures what it says, and a quick run reports every claim's effects with a verdict."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from bench.claim_stats import Effect, effect_values, holm, probe_r2, sign_flip_p, verdict
from bench.claim_tasks import TASKS, directions, make_data
from bench.claims import CLAIMS
from mmfuse.cli import main

SIZES = {"train": 600, "valid": 50, "test": 600}


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def test_nuisance_predicts_the_label_in_train_and_valid_only() -> None:
    data = make_data(TASKS["nuisance"], 0, SIZES)
    assert corr(data["train"]["nuisance"], data["train"]["label"]) > 0.85
    assert abs(corr(data["test"]["nuisance"], data["test"]["label"])) < 0.1
    assert set(TASKS["nuisance"].modalities) == {"text", "audio", "video"}


def test_purification_marks_half_the_video_steps_as_noise() -> None:
    data = make_data(TASKS["purification"], 1, SIZES)["train"]
    share = float(data["video_noisy"].sum() / data["video_mask"].sum())
    assert 0.45 < share < 0.55 and not (data["video_noisy"] & ~data["video_mask"]).any()
    assert corr(data["s2"], data["label"]) > 0.6  # the noisy modality carries half the label: it is necessary


def projection(data: dict, m: str, direction: torch.Tensor) -> torch.Tensor:
    """Each sample's time mean of modality m, on ``direction`` (scaled so a unit factor gives 1)."""
    mean = data[m].sum(1) / data[f"{m}_mask"].sum(1, keepdim=True)
    return mean @ direction / direction.dot(direction)


def test_redundancy_shares_one_component_and_competition_has_a_weak_modality() -> None:
    task = TASKS["redundancy"]
    red = make_data(task, 2, SIZES)["train"]
    d = directions(task.dims, 2, task.seed)
    assert torch.allclose(red["label"], (red["c"] + red["u1"] + red["u2"]).clamp(-3, 3))
    shared = corr(projection(red, "text", d["text"][0]), projection(red, "audio", d["audio"][0]))
    unique = corr(projection(red, "text", d["text"][1]), projection(red, "audio", d["audio"][1]))
    assert shared > 0.9 and abs(unique) < 0.1
    task = TASKS["competition"]
    comp = make_data(task, 3, SIZES)["train"]
    d = directions(task.dims, 1, task.seed)
    assert torch.allclose(comp["label"], (comp["s1"] + 0.5 * comp["s2"]).clamp(-3, 3))
    assert corr(projection(comp, "text", d["text"][0]), comp["s1"]) > 0.99  # fast, dominant
    assert corr(projection(comp, "audio", 0.5 * d["audio"][0]), comp["s2"]) < 0.8  # slow, weak, unique


def test_sign_flip_p_values_by_hand() -> None:
    assert sign_flip_p([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx(1 / 32)  # only all-positive is as large
    assert sign_flip_p([1.0, -1.0]) == pytest.approx(3 / 4)  # means 0, 1, -1, 0 against the observed 0
    assert sign_flip_p([2.0, 1.0, -0.5]) == pytest.approx(2 / 8)  # means >= 2.5/3: (+,+,+) and (+,+,-)


def test_effects_are_signed_as_claimed_and_judged() -> None:
    runs = [{"m": {"mae": 0.2}, "base": {"mae": 0.3}}, {"m": {"mae": 0.25}, "base": {"mae": 0.3}}]
    lower = Effect("mae", "mae", "m", "base", lower_is_better=True)
    assert effect_values(lower, runs) == pytest.approx([0.1, 0.05])
    assert effect_values(Effect("x", "mae", "m"), runs) == pytest.approx([0.2, 0.25])
    assert effect_values(Effect("x", "corr", "m", "base"), runs) is None
    five = verdict([0.1, 0.2, 0.15, 0.12, 0.3])
    assert five["verdict"] == "reproduced" and five["p"] == pytest.approx(1 / 32)
    assert five["d"] == pytest.approx(five["mean"] / five["std"])
    assert verdict([0.1, -0.2, 0.15, 0.12, 0.3])["verdict"] == "inconclusive"  # right direction, p = 5/32
    assert verdict([-0.1, -0.2, 0.15, 0.12, -0.3])["verdict"] == "not reproduced"  # mean < 0
    assert verdict([0.1, 0.2, 0.15, 0.12, 0.3], p=0.06)["verdict"] == "inconclusive"  # judged on the adjusted p
    assert verdict(None) == {"verdict": "not measured"}


def test_holm_adjustment_by_hand() -> None:
    # sorted 0.01, 0.02, 0.04, 0.3 times 4, 3, 2, 1 -> 0.04, 0.06, 0.08, 0.3, then non-decreasing, in input order
    assert holm([0.04, 0.01, 0.3, 0.02]) == pytest.approx([0.08, 0.04, 0.3, 0.06])
    assert holm([0.5, 0.4]) == pytest.approx([0.8, 0.8])  # 0.4 * 2 = 0.8, then max(0.8, 0.5 * 1)
    assert holm([0.9, 0.9, 0.9]) == pytest.approx([1.0, 1.0, 1.0])  # capped at 1


def test_competition_classes_needs_the_weak_modality_for_its_second_bit() -> None:
    task = TASKS["competition_classes"]
    data = make_data(task, 4, SIZES)["train"]
    assert task.settings == {"task": "classification", "num_classes": 4} and data["label"].dtype == torch.long
    assert torch.equal(data["label"], 2 * (data["s1"] > 0).long() + (data["s2"] > 0).long())
    assert set(data["label"].tolist()) == {0, 1, 2, 3}
    # the best text-only rule (the sign of s1, known exactly) gets the high bit: half the classes at most
    text_only = 2 * (data["s1"] > 0).long() + 1
    assert 0.4 < float((text_only == data["label"]).float().mean()) < 0.6


class MeanEncoder(nn.Module):
    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return x


def test_probe_r2_is_one_for_a_linear_latent_and_near_zero_for_an_independent_one() -> None:
    model = nn.Module()
    model.encoders = nn.ModuleDict({"text": MeanEncoder()})
    g = torch.Generator().manual_seed(0)
    data = {}
    for split in ("train", "test"):
        x = torch.randn(400, 5, 4, generator=g)
        mask = torch.ones(400, 5, dtype=torch.bool)
        mean = x.mean(1)
        data[split] = {"text": x, "text_mask": mask, "linear": mean @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 1.0,
                       "independent": torch.randn(400, generator=g)}  # fmt: skip
    assert probe_r2(model, "text", "linear", data) == pytest.approx(1.0, abs=1e-6)
    assert probe_r2(model, "text", "independent", data) < 0.05


@pytest.mark.integration
def test_quick_run_reports_every_effect(tmp_path, capsys) -> None:
    out, report_path = tmp_path / "BENCHMARKS.md", tmp_path / "claims.json"
    argv = ["bench", "claims", "--quick", "--claims", "mim,ithp", "--jobs", "2", "--steps", "12", "--eval-every", "6"]
    assert main([*argv, "--json", str(report_path), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    report = json.loads(report_path.read_text())
    assert [c["key"] for c in report["claims"]] == ["mim", "ithp"] and report["seeds"] == [0, 1]
    wanted = {c.key: c for c in CLAIMS}
    for claim in report["claims"]:
        assert set(claim["arms"]) == {a.label for a in wanted[claim["key"]].arms}
        assert [e["text"] for e in claim["effects"]] == [e.text for e in wanted[claim["key"]].effects]
        for e in claim["effects"]:
            assert e["verdict"] in ("reproduced", "inconclusive", "not reproduced") and len(e["values"]) == 2
            assert e["mean"] == pytest.approx(sum(e["values"]) / 2) and 0 < e["p"] <= e["p_holm"] <= 1
            assert f"{e['mean']:+.3f} ± {e['std']:.3f}" in text
    mim = report["claims"][0]
    gaps = [report["runs"]["mim"][s]["mim"]["gate_gap"] for s in ("0", "1")]
    assert mim["effects"][0]["values"] == pytest.approx(gaps)
    maes = {arm: [report["runs"]["ithp"][s][arm]["mae"] for s in ("0", "1")] for arm in ("ithp", "ithp[no bottleneck]")}
    expected = [b - a for a, b in zip(maes["ithp"], maes["ithp[no bottleneck]"], strict=True)]
    assert report["claims"][1]["effects"][0]["values"] == pytest.approx(expected)
    assert all(math.isfinite(report["runs"]["ithp"]["0"][arm]["mae"]) for arm in ("late", "early", "mult"))
    assert "<!-- claims:begin -->" in out.read_text() and "| claim | effect (positive = as claimed) |" in text


@pytest.mark.integration
def test_quick_tcmax_claims_run_classification_and_regression_with_the_mechanism(tmp_path, capsys) -> None:
    report_path = tmp_path / "claims.json"
    argv = ["bench", "claims", "--quick", "--claims", "tcmax,tcmax_regression", "--jobs", "1", "--steps", "6"]
    assert main([*argv, "--eval-every", "3", "--seeds", "0", "--json", str(report_path)]) == 0
    text = capsys.readouterr().out
    report = json.loads(report_path.read_text())
    runs = report["runs"]["tcmax"]["0"]
    assert 0 <= runs["tcmax"]["accuracy"] <= 1 and "mae" not in runs["tcmax"]  # classification metrics
    assert (
        runs["tcmax"]["grad_share/product_negative"] > 0 and runs["tcmax[TC off]"]["grad_share/product_negative"] == 0
    )
    regression = report["runs"]["tcmax_regression"]["0"]
    assert regression["tcmax"]["grad_share/task"] > 0 and "mae" in regression["tcmax[constant_normaliser]"]
    assert "| arm | valid error ↓ | test accuracy ↑ | test macro F1 ↑ | best step (of 6) |" in text
    best = runs["tcmax"]["best_step"]
    valid = f"| tcmax | {report['claims'][0]['arms']['tcmax']['valid_error']['mean']:.3f} ± "
    row = next(line for line in text.splitlines() if line.startswith(valid))  # the arm table's row
    assert best in (3.0, 6.0) and row.split(" | ")[4] == f"{best:.0f} ± 0"  # one seed: std 0
    assert "grad_share/product_negative" in report["claims"][0]["columns"]
    assert "Chosen after a result of this benchmark was seen:" in text
