"""``mmfuse bench models``: every model on the shards, validation-selected test metrics, mean ± std over seeds."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from mmfuse.cli import main

SETTINGS = ["epochs=1", "batch_size=1", "num_workers=0", "model.hidden=12", "model.num_heads=3", "device=cpu"]


def test_models_table_and_json_agree_with_the_runs(bundled_dataset: Path, tmp_path: Path, capsys) -> None:
    runs, report_path, md = tmp_path / "runs", tmp_path / "models.json", tmp_path / "BENCHMARKS.md"
    argv = ["bench", "models", "--shards", str(bundled_dataset), "--models", "late,early", "--seeds", "1,2",
            "--runs", str(runs), "--json", str(report_path), "--out", str(md), *SETTINGS]  # fmt: skip
    assert main(argv) == 0
    table = capsys.readouterr().out
    report = json.loads(report_path.read_text())
    assert set(report["summary"]) == {"late", "early"} and report["seeds"] == [1, 2]
    assert report["selected_by"] == "valid mae"
    for model in ("late", "early"):
        finals = [json.loads((runs / model / f"seed-{s}" / "final.json").read_text()) for s in (1, 2)]
        maes = [f["test"]["mae"] for f in finals]
        assert report["summary"][model]["mae"]["mean"] == pytest.approx(statistics.fmean(maes))
        assert report["summary"][model]["mae"]["std"] == pytest.approx(statistics.stdev(maes))
        row = next(line for line in table.splitlines() if line.startswith(f"| {model} |"))
        assert f"{statistics.fmean(maes):.4f} ± {statistics.stdev(maes):.4f}" in row
    # one test sample: its correlation is undefined (NaN in every run), so that column is left out
    assert (
        table.splitlines()[6]
        == "| model | MAE × late | mae | acc2_has0 | f1_has0 | acc2_non0 | f1_non0 | acc5 | acc7 |"
    )
    best = min(report["summary"].values(), key=lambda s: s["mae"]["mean"])["mae"]
    assert f"**{best['mean']:.4f} ± {best['std']:.4f}**" in table
    assert "<!-- bench-models:begin -->" in md.read_text() and report["command"] in md.read_text()
    # robustness: each run's area under the Gaussian-noise curve of every modality, mean ± std over seeds
    noise = report["noise"]
    assert noise["levels"] == [0, 0.5, 1, 2] and noise["metric"] == "mae" and noise["kind"] == "gaussian"
    assert "Robustness: area under each modality's Gaussian-noise curve on the test split" in table
    assert "| model | text | audio | video |" in table
    for model in ("late", "early"):
        sweeps = [json.loads((runs / model / f"seed-{s}" / "noise-test.json").read_text()) for s in (1, 2)]
        for m in ("text", "audio", "video"):
            curves = [sweep["curves"]["gaussian"][m] for sweep in sweeps]
            assert all(c["levels"] == [0, 0.5, 1, 2] and len(c["metrics"]) == 4 for c in curves)
            aucs = [c["auc"] for c in curves]
            assert noise["auc"][model][m]["mean"] == pytest.approx(statistics.fmean(aucs))
        finals = [json.loads((runs / model / f"seed-{s}" / "final.json").read_text()) for s in (1, 2)]
        assert [c["metrics"][0]["mae"] for c in (sw["curves"]["gaussian"]["audio"] for sw in sweeps)] == pytest.approx(
            [f["test"]["mae"] for f in finals]
        )  # level 0: the selected checkpoint's clean test metrics
        row = [line for line in table.splitlines() if line.startswith(f"| {model} |")][1]
        assert f"{noise['auc'][model]['audio']['mean']:.4f} ± {noise['auc'][model]['audio']['std']:.4f}" in row

    stamps = [(runs / "late" / "seed-1" / name).stat().st_mtime_ns for name in ("final.json", "noise-test.json")]
    assert main(argv) == 0  # finished runs with the same settings are read back, not trained again
    assert capsys.readouterr().out == table
    assert [
        (runs / "late" / "seed-1" / name).stat().st_mtime_ns for name in ("final.json", "noise-test.json")
    ] == stamps


def test_models_refuses_unknown_names_and_bad_seeds(bundled_dataset: Path, capsys) -> None:
    base = ["bench", "models", "--shards", str(bundled_dataset)]
    assert main([*base, "--models", "late,lte"]) == 1
    err = capsys.readouterr().err
    assert "--models: unknown lte; valid: " in err and "tcmax" in err
    assert main([*base, "--seeds", "1,x"]) == 1
    assert "--seeds '1,x': give comma-separated integers" in capsys.readouterr().err
    assert main([*base, "--models", "early,tcmax", "--reference", "mult"]) == 1
    assert "--reference mult: not among the models compared (early, tcmax)" in capsys.readouterr().err


def test_models_ratio_to_late_and_each_methods_mechanism(bundled_dataset: Path, tmp_path: Path, capsys) -> None:
    runs, report_path = tmp_path / "runs", tmp_path / "models.json"
    argv = ["bench", "models", "--shards", str(bundled_dataset), "--models", "late,tcmax,ithp", "--seeds", "1,2",
            "--runs", str(runs), "--json", str(report_path), *SETTINGS]  # fmt: skip
    assert main(argv) == 0
    table = capsys.readouterr().out
    report = json.loads(report_path.read_text())
    finals = {m: [json.loads((runs / m / f"seed-{s}" / "final.json").read_text())["test"] for s in (1, 2)]
              for m in ("late", "tcmax", "ithp")}  # fmt: skip
    assert report["reference"] == "late" and report["headline"] == "MAE"
    assert "| model | MAE × late | mae |" in table
    for model in ("tcmax", "ithp"):
        ratios = [run["mae"] / late["mae"] for run, late in zip(finals[model], finals["late"], strict=True)]
        assert report["ratio"][model]["mean"] == pytest.approx(statistics.fmean(ratios))  # paired by seed
        row = next(line for line in table.splitlines() if line.startswith(f"| {model} |"))
        assert row.startswith(f"| {model} | {statistics.fmean(ratios):.2f} ± {statistics.stdev(ratios):.2f} |")
    assert report["ratio"]["late"] == {"mean": 1.0, "std": 0.0, "n": 2}
    # each method's own mechanism, read from the same test metrics; late fusion has none
    assert report["mechanism"]["late"] == {}
    assert set(report["mechanism"]["tcmax"]) == {"grad_share/product_negative", "diag/tc", "diag/dv_joint"}
    assert set(report["mechanism"]["ithp"]) == {"grad_share/kl0", "grad_share/kl1", "diag/kl0", "diag/kl1"}
    share = [run["grad_share/product_negative"] for run in finals["tcmax"]]
    assert 0 < statistics.fmean(share) < 1
    assert (
        f"| tcmax | grad_share/product_negative | {statistics.fmean(share):.4f} ± {statistics.stdev(share):.4f} |"
        in table
    )
    assert not any(line.startswith("| late | grad_share") for line in table.splitlines())


def test_models_without_the_reference_have_no_ratio_column(bundled_dataset: Path, tmp_path: Path, capsys) -> None:
    argv = ["bench", "models", "--shards", str(bundled_dataset), "--models", "early", "--seeds", "1",
            "--runs", str(tmp_path / "runs"), *SETTINGS]  # fmt: skip
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "| model | mae |" in table and "× late" not in table
    assert "Mechanisms: none of these models has a mechanism of its own (baselines only)." in table
