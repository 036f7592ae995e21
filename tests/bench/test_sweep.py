"""``mmfuse bench extract|train --sweep``: the points measured, the JSON report, the PNG, the BENCHMARKS.md section."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from bench import extract_sweep, train_sweep
from bench.markdown import replace_section
from bench.sweep import batch_sizes, image_link, measure_points, plot_path, plot_sweep, shared_note, worker_counts
from mmfuse.cli import main

PNG_SHAPE = (300, 800, 4)  # 8 x 3 inches at 100 dpi, RGBA
BLUE, ORANGE = np.array([0x1F, 0x77, 0xB4]) / 255, np.array([0xFF, 0x7F, 0x0E]) / 255  # matplotlib's C0, C1


def read_png(path: Path) -> np.ndarray:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape == PNG_SHAPE
    return image


def has_colour(image: np.ndarray, colour: np.ndarray) -> bool:
    return bool((np.abs(image[..., :3] - colour).max(axis=-1) < 0.02).any())


def settings_of(report: dict) -> list[tuple[str, int, int]]:
    return [(p["sweep"], p["workers"], p["batch_size"]) for p in report["points"]]


def table_rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(("| workers |", "| batch size |"))]


def section_of(text: str, begin: str, end: str) -> str:
    assert text.count(begin) == 1 and text.count(end) == 1
    return text.split(begin, 1)[1].split(end, 1)[0]


@pytest.mark.integration
def test_extract_sweep_quick(tmp_path: Path, capsys) -> None:
    out = tmp_path / "B.md"
    assert main(["bench", "extract", "--quick", "--sweep", "--json", "--out", str(out), "-q"]) == 0
    report = json.loads(capsys.readouterr().out)
    # workers 0,1 at --batch-size (8, capped at the 2 clips), batch sizes 1,2 at --workers (1 under --quick)
    assert settings_of(report) == [("workers", 0, 2), ("workers", 1, 2), ("batch_size", 1, 1), ("batch_size", 1, 2)]
    assert report["settings"]["clips"] == 2
    assert report["settings"]["audio_total_s"] == pytest.approx(2 * 2.98)  # two GRID clips, 2.98 s windows
    for p in report["points"]:
        assert p["clips_per_s"] > 0 and p["audio_s_per_s"] > 0 and p["load_s"] > 0 and p["rss_main_mib"] > 0
        assert p["clips_per_s"] == pytest.approx(2 / p["run_s"], rel=1e-3)
        assert p["audio_s_per_s"] == pytest.approx(5.96 / p["run_s"], rel=1e-3)
        assert p["rss_worker_mib"] > 100 or p["workers"] == 0  # a spawned worker imports MediaPipe and torch
    assert report["points"][1] == {**report["points"][3], "sweep": "workers"}  # the shared setting ran once
    assert "--sweep --sweep-workers 0,1 --sweep-batch-sizes 1,2" in report["command"]
    png = tmp_path / "docs" / "bench" / "extract-sweep.png"
    assert report["plot"] == str(png)
    read_png(png)
    body = section_of(out.read_text(), extract_sweep.BEGIN, extract_sweep.END)
    assert f"Command: `{report['command']}`" in body
    assert len(table_rows(body)) == 4 and "| workers | 0 | 2 |" in body and "| batch size | 1 | 1 |" in body
    assert "](docs/bench/extract-sweep.png)" in body and body.count("![") == 1

    # Again, one setting, the plot elsewhere: the section is replaced, not added.
    other = tmp_path / "plots" / "x.png"
    argv = ["bench", "extract", "--quick", "--sweep", "--workers", "0", "--sweep-workers", "0"]
    assert main([*argv, "--sweep-batch-sizes", "2", "--out", str(out), "--plot", str(other), "-q"]) == 0
    assert "| workers | 0 | 2 |" in capsys.readouterr().out  # the table, without --json
    body = section_of(out.read_text(), extract_sweep.BEGIN, extract_sweep.END)
    rows = table_rows(body)
    assert len(rows) == 2 and all(row.startswith(("| workers | 0 | 2 |", "| batch size | 0 | 2 |")) for row in rows)
    assert "](plots/x.png)" in body and "docs/bench" not in body and "--plot" in body
    read_png(other)


@pytest.mark.integration
def test_train_sweep_quick(tmp_path: Path, capsys) -> None:
    out = tmp_path / "B.md"
    assert main(["bench", "train", "--quick", "--sweep", "--json", "--out", str(out), "-q"]) == 0
    report = json.loads(capsys.readouterr().out)
    # workers 0,1 at batch 4, batch sizes 2,4 at 1 worker (the --quick settings)
    assert settings_of(report) == [("workers", 0, 4), ("workers", 1, 4), ("batch_size", 1, 2), ("batch_size", 1, 4)]
    for p in report["points"]:
        assert p["samples_per_s"] > 0 and p["memory_samples_per_s"] > 0 and p["rss_main_mib"] > 0
        assert p["stream_over_memory"] == pytest.approx(p["samples_per_s"] / p["memory_samples_per_s"], rel=1e-3)
        assert p["epochs"] == pytest.approx((1 + 3) * p["batch_size"] / 48, abs=1e-4)
        assert p["rss_worker_mib"] > 50 or p["workers"] == 0  # a DataLoader worker holds a copy of the interpreter
    by_batch = {}
    for p in report["points"]:  # one in-memory run per batch size, whatever the worker count
        assert by_batch.setdefault(p["batch_size"], p["memory_samples_per_s"]) == p["memory_samples_per_s"]
    assert report["points"][1] == {**report["points"][3], "sweep": "workers"}
    command = report["setup"]["command"]
    assert command.startswith("mmfuse bench train") and "--quick --sweep --sweep-workers 0,1" in command
    png = tmp_path / "docs" / "bench" / "train-sweep.png"
    image = read_png(png)
    assert has_colour(image[:, : PNG_SHAPE[1] // 2], ORANGE) and has_colour(image[:, PNG_SHAPE[1] // 2 :], ORANGE)
    body = section_of(out.read_text(), train_sweep.BEGIN, train_sweep.END)
    assert f"Command: `{command}`" in body and len(table_rows(body)) == 4
    assert "| batch size | 1 | 2 |" in body and "](docs/bench/train-sweep.png)" in body

    argv = ["bench", "train", "--quick", "--sweep", "--sweep-workers", "1", "--sweep-batch-sizes", "4"]
    assert main([*argv, "--out", str(out), "-q"]) == 0  # again, one setting: the section is replaced
    body = section_of(out.read_text(), train_sweep.BEGIN, train_sweep.END)
    assert len(table_rows(body)) == 2 and "| batch size | 1 | 2 |" not in body and body.count("![") == 1


def hand_made(reference: bool) -> dict:
    points = [{"sweep": "workers", "workers": w, "batch_size": 8, "rate": 10.0 + w} for w in (0, 1, 2, 3)]
    points += [{"sweep": "batch_size", "workers": 2, "batch_size": b, "rate": 4.0 * b**0.5} for b in (1, 4, 16)]
    for p in points:
        p["ref"] = 2 * p["rate"]
    report = {"title": "a hand-made sweep\nsecond line", "metric": "rate", "unit": "things/s", "points": points}
    return report | ({"reference": {"metric": "ref", "label": "ideal"}, "label": "measured"} if reference else {})


def test_plot_sweep_draws_both_panels_and_the_reference(tmp_path: Path) -> None:
    path = plot_sweep(hand_made(reference=True), tmp_path / "a" / "b" / "sweep.png")
    assert path == tmp_path / "a" / "b" / "sweep.png"
    image = read_png(path)
    half = PNG_SHAPE[1] // 2
    for panel in (image[:, :half], image[:, half:]):
        assert has_colour(panel, BLUE) and has_colour(panel, ORANGE)
    plain = read_png(plot_sweep(hand_made(reference=False), tmp_path / "plain.png"))
    assert has_colour(plain, BLUE) and not has_colour(plain, ORANGE)


def test_points_measure_each_setting_once_in_order() -> None:
    calls = []

    def run(workers: int, batch_size: int) -> dict:
        calls.append((workers, batch_size))
        return {"rate": 10 * workers + batch_size}

    points = measure_points((0, 1, 2), (4, 8), 2, 8, run)
    assert calls == [(0, 8), (1, 8), (2, 8), (2, 4)]
    assert [(p["sweep"], p["workers"], p["batch_size"], p["rate"]) for p in points] == [
        ("workers", 0, 8, 8), ("workers", 1, 8, 18), ("workers", 2, 8, 28),
        ("batch_size", 2, 4, 24), ("batch_size", 2, 8, 28),
    ]  # fmt: skip
    assert shared_note(points) == "Workers 2 with batch 8 is one run, shown in both sweeps."
    assert shared_note(points[:3]) == ""


def test_counts_paths_and_links(tmp_path: Path, capsys) -> None:
    assert worker_counts("0,1,3") == (0, 1, 3) and batch_sizes("16,1") == (16, 1)
    for bad, parse in (("0", batch_sizes), ("-1", worker_counts), ("1,1", worker_counts), ("1,,2", batch_sizes)):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(bad)
    with pytest.raises(SystemExit):
        main(["bench", "train", "--sweep", "--sweep-batch-sizes", "0,4"])
    for kind in ("extract", "train"):  # sweep flags without --sweep are refused before anything runs
        assert main(["bench", kind, "--quick", "--sweep-workers", "0", "--plot", str(tmp_path / "p.png")]) == 1
        assert "--sweep-workers, --plot only apply with --sweep" in capsys.readouterr().err
    assert plot_path(tmp_path / "B.md", None, "x.png") == tmp_path / "docs" / "bench" / "x.png"
    assert plot_path(None, tmp_path / "p.png", "x.png") == tmp_path / "p.png" and plot_path(None, None, "x.png") is None
    assert image_link(tmp_path / "B.md", tmp_path / "docs" / "p.png", "alt") == "![alt](docs/p.png)"
    assert image_link(tmp_path / "d" / "B.md", tmp_path / "p.png", "alt") == "![alt](../p.png)"


def test_new_sections_in_a_new_file_stay_apart(tmp_path: Path) -> None:
    out = tmp_path / "B.md"
    replace_section(out, "## One\n\nfirst", "one")
    replace_section(out, "## Two\n\nsecond", "two")
    replace_section(out, "## One\n\nagain", "one")
    text = out.read_text()
    two = "<!-- two:begin -->\n## Two\n\nsecond\n<!-- two:end -->\n"
    one = "<!-- one:begin -->\n## One\n\nagain\n<!-- one:end -->\n"
    assert text == f"# Benchmarks\n\n{two}\n{one}"
