"""``mmfuse bench gpu``: one line and exit 1 without CUDA; on the CPU with ``--quick``, the BENCHMARKS.md section
with its figures and the GPU tests of a pytest junit file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmfuse.cli import main

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="3">
<testcase classname="tests.train.test_gpu" name="test_end_to_end_amp_training_on_cuda[bf16]" time="3.1" />
<testcase classname="tests.train.test_ddp" name="test_ranks_keep_lockstep[cuda]" time="9.0">
<failure message="AssertionError: 2 rank(s) did not finish within 240 s: hung&#10;second line">trace</failure>
</testcase>
<testcase classname="tests.fusion.test_compile" name="test_inductor[late]" time="0">
<skipped type="pytest.skip" message="needs CUDA">skip</skipped></testcase>
</testsuite></testsuites>
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="asserts the refusal without CUDA")
def test_without_cuda_it_refuses_in_one_line(tmp_path: Path, capsys) -> None:
    out = tmp_path / "BENCHMARKS.md"
    assert main(["bench", "gpu", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "mmfuse bench: error: --device cuda was asked for but CUDA is not available; use --device cpu or auto"
    ]
    assert main(["bench", "gpu", "--device", "cpu"]) == 1
    assert "--device cpu only with --quick" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.integration
def test_quick_cpu_run_writes_the_section_with_figures_and_tests(tmp_path: Path, capsys) -> None:
    out, junit = tmp_path / "BENCHMARKS.md", tmp_path / "gpu-check.xml"
    out.write_text("# Benchmarks\n\nIntro.\n\n<!-- bench-train:begin -->\nkept\n<!-- bench-train:end -->\n")
    junit.write_text(JUNIT)
    argv = ["bench", "gpu", "--device", "cpu", "--quick", "--junit", str(junit), "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    text = out.read_text()
    assert "<!-- bench-train:begin -->\nkept\n<!-- bench-train:end -->" in text
    section = text.split("<!-- gpu-check:begin -->\n", 1)[1].split("\n<!-- gpu-check:end -->", 1)[0]
    lines = section.splitlines()
    assert lines[0] == "## GPU check (`make gpu-check`)"
    assert lines[2] == (
        "Command: `mmfuse bench gpu --device cpu --steps 3 --warmup 1 --batch-size 4 --samples 16 --workers 0 "
        "--clips 2 --quick --junit gpu-check.xml --out BENCHMARKS.md`"
    )
    assert lines[4].startswith(f"Device: CPU (cpu; 0 GPU(s) visible), torch {torch.__version__}, CUDA none, measured ")
    rows = {ln.split(" | ")[0].lstrip("| "): ln.rsplit(" | ", 1)[1].rstrip(" |") for ln in lines if ln.startswith("| ")}
    assert float(rows["training, model `late` frozen, batch 4: s/step (3 timed steps)"]) > 0
    assert float(rows["training: samples/s"]) > 0
    wait = rows["training: data wait / step time (target < 50%)"]
    assert wait.endswith(("(**met**)", "(**missed**)")) and 0 <= float(wait.split("%")[0]) <= 100
    assert float(rows["extraction: clips/s (2 clips, model loading excluded)"]) > 0
    assert "GPU tests (`pytest -m gpu`): 1 passed, 1 failed, 0 error, 1 skipped." in lines
    assert rows["`tests/train/test_gpu.py::test_end_to_end_amp_training_on_cuda[bf16]`"] == "passed"
    failed = "failed: AssertionError: 2 rank(s) did not finish within 240 s: hung"
    assert rows["`tests/train/test_ddp.py::test_ranks_keep_lockstep[cuda]`"] == failed
    assert rows["`tests/fusion/test_compile.py::test_inductor[late]`"] == "skipped: needs CUDA"
    assert section in capsys.readouterr().out  # printed as written


def test_missing_junit_file_is_said_in_the_section() -> None:
    from bench.gpu import format_section

    setup = {
        "command": "c",
        "device_name": "H200",
        "device": "cuda",
        "gpus": 1,
        "torch": "t",
        "cuda": "12",
        "date": "d",
    }
    training = {"batch_size": 32, "steps": 50, "s_per_step": 0.01, "samples_per_s": 3200.0, "data_wait_s_per_step": 0.006,
                "wait_fraction": 0.6, "wait_ok": False}  # fmt: skip
    extraction = {"clips": 32, "clips_per_s": 4.0, "text_model": "a", "audio_model": "b"}
    report = {
        "setup": setup,
        "training": training,
        "extraction": extraction,
        "tests": None,
        "junit_missing": "x/gpu.xml",
    }
    lines = format_section(report).splitlines()
    assert "| training: data wait / step time (target < 50%) | 60.0% (**missed**) |" in lines
    assert lines[-1].startswith("GPU tests: no outcomes: `gpu.xml` was not written (pytest did not finish")
