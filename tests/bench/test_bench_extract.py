"""``mmfuse bench extract``: the quick run reports every figure, the tiled manifest, the BENCHMARKS.md section."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from ttyrun import NATIVE, run_mmfuse

from bench.extract import BEGIN, END, write_section
from bench.extract_runs import MEDIA, tile_manifest
from extract.manifest import load_manifest


def test_quick_run_reports_every_field_positive(tmp_path, tiny_text_model, tiny_audio_model) -> None:
    """Run with its output piped (as a script or CI would): no progress bar, one JSON report on stdout."""
    out = tmp_path / "BENCHMARKS.md"
    argv = ["bench", "extract", "--quick", "--repeat", "2", "--json", "--text-model", str(tiny_text_model)]
    argv += ["--audio-model", str(tiny_audio_model), "--out", str(out)]
    run = run_mmfuse(argv, "piped")
    assert run.returncode == 0, run.terminal[-3000:]
    assert "\r" not in run.terminal and "Traceback" not in run.terminal and NATIVE.search(run.terminal) is None
    report = json.loads(run.stdout)
    expected = {
        "clips", "clips_4n", "audio_total_s", "video_frames", "floor_s", "no_overlap_estimate_s", "model_load_s", "pipeline_setup_s",
        "speedup_vs_naive", "speedup_vs_naive_marginal", "pipeline_over_ceiling", "ceiling_over_pipeline",
        "pipeline_over_floor", "naive_over_floor", "pipeline_cpu_s", "naive_cpu_s", "naive_audio_cpu_s",
        "naive_text_cpu_s", "pipeline_4n_s", "pipeline_4n_clips_per_s", "pipeline_marginal_clips_per_s",
        "naive_rss_main_mib", "rss_main_4n_over_n", "rss_worker_4n_over_n", "floor_over_ceiling",
        "pipeline_first_clip_s", "pipeline_decode_wait_s", "pipeline_encoder_busy_share", "pipeline_whole_s",
        "naive_whole_s", "speedup_vs_naive_whole", "cpu_pipeline_over_naive", "audio_cpu_at_once_s",
        "decode_facemesh_cpu_at_once_s", "audio_at_once_over_alone", "decode_facemesh_at_once_over_alone",
        "floor_at_once_s", "pipeline_over_floor_at_once", "naive_every_core_cpu_s", "speedup_vs_naive_every_core",
        "cpu_pipeline_over_naive_every_core", "naive_every_core_over_floor",
    }  # fmt: skip
    for variant in ("pipeline", "naive", "naive_every_core", "decode", "ceiling"):
        expected |= {f"{variant}_{u}" for u in ("s", "clips_per_s", "audio_s_per_s", "frames_per_s")}
    for stage in ("decode", "facemesh", "text", "audio"):
        expected.add(f"{stage}_cpu_s")
    for stage in ("decode_facemesh", "text", "audio"):
        expected.add(f"naive_{stage}_share")
    for run in ("pipeline", "pipeline_4n"):
        expected |= {f"{run}_rss_main_mib", f"{run}_rss_worker_mib"}
    results = report["results"]
    assert expected <= set(results), sorted(expected - set(results))
    assert {k: v for k, v in results.items() if not v > 0} == {}
    assert results["clips"] == 2 and results["clips_4n"] == 8
    assert results["pipeline_first_clip_s"] <= results["pipeline_decode_wait_s"] < results["pipeline_s"]
    assert results["pipeline_encoder_busy_share"] < 1
    assert results["video_frames"] == 30  # two 3 s GRID clips at --fps 5 (quick)
    assert set(report["targets"]) == {
        "speedup_vs_naive_at_least_2x", "within_1.3x_of_ceiling", "rss_growth_n_to_4n_under_10pct",
        "spec_within_1.15x_of_floor", "cpu_seconds_at_most_naive", "speedup_vs_naive_at_least_1.4x",
        "speedup_vs_naive_every_core_at_least_1.4x",
    }  # fmt: skip
    best = {name: t["best_possible"] for name, t in report["targets"].items() if "best_possible" in t}
    assert {
        "speedup_vs_naive_at_least_1.4x": results["naive_over_floor"],
        "speedup_vs_naive_at_least_2x": results["naive_over_floor"],
        "speedup_vs_naive_every_core_at_least_1.4x": results["naive_every_core_over_floor"],
        "within_1.3x_of_ceiling": results["floor_over_ceiling"],
    } == pytest.approx(best, abs=1e-4)
    assert report["settings"]["repeat"] == 2 and len(report["rounds"]) == 2
    for key in ("pipeline_over_floor", "speedup_vs_naive", "cpu_pipeline_over_naive"):  # the median of two rounds
        assert results[key] == pytest.approx(sum(r[key] for r in report["rounds"]) / 2, abs=2e-4)
    assert "--repeat 2" in report["command"]
    assert report["settings"]["workers"] == 1 and "mmfuse bench extract --clips 2" in report["command"]
    text = out.read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1 and report["command"] in text
    assert "| target | value | met | best possible here (at the stage floor) |" in text
    assert "no schedule can be more than" in text


def test_tiled_manifest_has_distinct_keys_on_bundled_media(tmp_path) -> None:
    path = tile_manifest(tmp_path / "tiled.csv", 11)
    rows = list(csv.DictReader(path.read_text().splitlines()))
    assert len(rows) == 11 and all((MEDIA / r["path"]).is_file() for r in rows)
    clips = load_manifest(path, MEDIA)
    assert len({c.key for c in clips}) == 11
    assert [c.path.name for c in clips[:5]] == [
        "bbaf2n.mpg", "pwij3p.mpg", "id2_vcd_swwp2s.mpg", "face_noface.mov", "bbaf2n.mpg",
    ]  # fmt: skip


def test_section_written_twice_is_one_section_and_others_intact(tmp_path) -> None:
    out = tmp_path / "BENCHMARKS.md"
    other = "<!-- synthetic:begin -->\n## Synthetic\n\n| a | b |\n<!-- synthetic:end -->\n"
    train = "<!-- bench-train:begin -->\n## Training throughput\n<!-- bench-train:end -->\n"
    out.write_text(f"# Benchmarks\n\nFirst paragraph,\nstill first.\n\n## Notes\n\nText.\n\n{other}\n{train}")
    write_section(out, "first body")
    text = out.read_text()
    assert text.index("still first.") < text.index(BEGIN) < text.index("## Notes")
    write_section(out, "second body")
    text = out.read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1
    assert "second body" in text and "first body" not in text
    assert other in text and train in text and "## Notes\n\nText.\n" in text
    assert text.startswith("# Benchmarks\n\nFirst paragraph,\nstill first.\n\n" + BEGIN)


def test_section_created_in_a_new_file(tmp_path) -> None:
    out = tmp_path / "new.md"
    write_section(out, "body")
    assert out.read_text() == f"# Benchmarks\n\n{BEGIN}\nbody\n{END}\n"
    assert Path(out).read_text().count(BEGIN) == 1
