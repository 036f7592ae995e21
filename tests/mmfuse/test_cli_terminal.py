"""Every command the way a person runs it: in a terminal (progress bars drawn), with its output piped (no bar, no
carriage return) and with ``--no-progress``. Each run must exit 0 without a traceback, keep MediaPipe's and TF
Lite's native log lines off the screen, and end with its summary line. Ctrl-C in a terminal exits 130 with one
line, and the same command (``--resume`` for training) then finishes the work with every clip exactly once."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import BUNDLED, MEDIA, bundled_rows, write_manifest
from ttyrun import NATIVE, run_command, run_mmfuse

from shards.io import iter_shard
from tests.extract.test_import_mmsa import mmsa_split, write

pytestmark = pytest.mark.integration

MODES = ("terminal", "piped", "no-progress")
TRAIN = ["epochs=2", "batch_size=1", "num_workers=0", "model.hidden=12", "device=cpu"]
# command -> (bar name or None for a short command, summary line pattern)
EXPECTED = {
    "extract": ("extract", r"^wrote 4 samples in 3 shards \(0 already complete\) to .*; test: partial 1; train: ok 2"),
    "extract-text": ("extract", r"^wrote 5 samples in 2 shards \(0 already complete\) to .*; train: ok 3; valid: ok 2"),
    "inspect": ("verify", r"verify: 4 samples in 3 shards read back: OK"),
    "report": ("report", r"^report written to .*index\.html$"),
    "import-mmsa": ("import", r"^imported 9 samples \(test: 3, train: 4, valid: 2\) from "),
    "train": ("train", r"^selected step \d+ by valid mae; test: mae "),
    "eval": ("eval test", r"^test \(removed: none\): n=1 mae "),
    "predict": (None, r"bbaf2n\.mpg: score [+-]\d\.\d{4} \("),
    "bench-extract": ("bench extract", r"^\| target \| value \| met \|"),
    "bench-train": ("bench train", r"streaming ≥ 0\.9 × in-memory samples/s"),
}
SLOW = {"bench-extract", "bench-train"}  # run in the terminal only; tests/bench runs them piped / --no-progress


def commands(work: Path, text_model: Path, audio_model: Path) -> dict[str, list[str]]:
    """The arguments of each command, in the order they run (later ones read what earlier ones wrote)."""
    manifest = write_manifest(work / "label.csv", bundled_rows())
    rows = [{"video_id": "t", "clip_id": f"c{i}", "text": f"sentence number {i}", "label": i - 2.0,
             "split": "train" if i < 3 else "valid"} for i in range(5)]  # fmt: skip
    (work / "text.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rng = np.random.default_rng(0)
    pickle = write(work / "features.pkl", {s: mmsa_split(n, rng, False, 10 * k) for k, (s, n) in
                                           enumerate({"train": 4, "valid": 2, "test": 3}.items())})  # fmt: skip
    models = ["--text-model", str(text_model), "--audio-model", str(audio_model)]
    shards, run = work / "shards", work / "run"
    best = str(run / "checkpoints" / "best.pt")
    return {
        "extract": ["extract", str(manifest), "--media-root", str(MEDIA), "--out", str(shards), "--shard-size", "2",
                    "--fps", "5", *models],
        "extract-text": ["extract", str(work / "text.jsonl"), "--out", str(work / "text-shards"), "--shard-size", "3",
                         "--modalities", "text", "--text-model", str(text_model)],
        "inspect": ["inspect", str(shards), "--verify"],
        "report": ["report", str(shards), "--out", str(work / "report"), "--overlays", "1"],
        "import-mmsa": ["import-mmsa", str(pickle), "--out", str(work / "imported"), "--trust-pickle",
                        "--shard-size", "3"],
        "train": ["train", "--shards", str(shards), "--model", "late", "--run-dir", str(run), *TRAIN],
        "eval": ["eval", "--checkpoint", best, "--shards", str(shards), "--split", "test"],
        "predict": ["predict", "--checkpoint", best, str(MEDIA / "grid" / "bbaf2n.mpg"), "--text", BUNDLED[0][2]],
        "bench-extract": ["bench", "extract", "--quick", *models],
        "bench-train": ["bench", "train", "--quick"],
    }  # fmt: skip


CASES = [(mode, name) for mode in MODES for name in EXPECTED if mode == "terminal" or name not in SLOW]


@pytest.fixture(scope="module")
def sessions(tmp_path_factory, tiny_text_model, tiny_audio_model):
    """``sessions(mode)``: every command run once in ``mode``, in order (on first use); results by command."""
    done: dict[str, dict] = {}

    def session(mode: str) -> dict:
        if mode not in done:
            work = tmp_path_factory.mktemp(f"cli-{mode}")
            done[mode] = {
                name: run_mmfuse(args, mode)
                for name, args in commands(work, tiny_text_model, tiny_audio_model).items()
                if mode == "terminal" or name not in SLOW
            }
        return done[mode]

    return session


@pytest.mark.parametrize(("mode", "name"), CASES, ids=[f"{m}-{n}" for m, n in CASES])
def test_command_as_a_person_runs_it(sessions, mode: str, name: str) -> None:
    run = sessions(mode)[name]
    bar, summary = EXPECTED[name]
    assert run.returncode == 0, run.text[-3000:]
    assert "Traceback" not in run.text, run.text[-3000:]
    assert NATIVE.search(run.text) is None, NATIVE.search(run.text)
    assert any(re.search(summary, line) for line in run.lines()), run.text[-3000:]
    if mode == "terminal" and bar is not None:
        assert run.finished_bar(bar), run.terminal[-3000:]
    if mode != "terminal":
        assert "\r" not in run.text and not BAR_DRAWN.search(run.text), run.text[-3000:]


BAR_DRAWN = re.compile(r"\d+%\|")


def test_stdout_piped_keeps_the_bar_on_the_terminal_and_stdout_clean(tmp_path, tiny_text_model) -> None:
    """``mmfuse eval ... --json > out.json`` in a terminal: the bar on stderr, one JSON object on stdout."""
    shards, run = tmp_path / "shards", tmp_path / "run"
    rows = [{"video_id": "t", "clip_id": f"c{i}", "text": f"word {i}", "label": float(i % 3 - 1),
             "split": ("train", "valid", "test")[i % 3]} for i in range(9)]  # fmt: skip
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    extract = ["extract", str(tmp_path / "m.jsonl"), "--out", str(shards), "--modalities", "text"]
    assert run_mmfuse([*extract, "--text-model", str(tiny_text_model)], "piped").returncode == 0
    train = ["train", "--shards", str(shards), "--run-dir", str(run), "modalities=text", *TRAIN]
    assert run_mmfuse(train, "piped").returncode == 0
    best = str(run / "checkpoints" / "best.pt")
    result = run_mmfuse(["eval", "--checkpoint", best, "--shards", str(shards), "--json"], "stdout-piped")
    assert result.returncode == 0, result.text
    assert result.finished_bar("eval test"), result.terminal
    assert json.loads(result.stdout)["n"] == 3 and "\r" not in result.stdout


def test_native_logs_appear_with_debug_only(tmp_path, tiny_text_model, tiny_audio_model) -> None:
    """The default run keeps MediaPipe's absl lines and TF Lite's INFO line off the screen (test above); at
    --log-level DEBUG they are shown, from the main process and from the decode worker."""
    manifest = write_manifest(tmp_path / "one.csv", bundled_rows()[:1])
    args = ["extract", str(manifest), "--media-root", str(MEDIA), "--out", str(tmp_path / "out"), "--fps", "5",
            "--text-model", str(tiny_text_model), "--audio-model", str(tiny_audio_model), "--log-level", "DEBUG"]  # fmt: skip
    run = run_mmfuse(args)
    assert run.returncode == 0, run.text[-3000:]
    assert "Created TensorFlow Lite XNNPACK delegate" in run.text  # the FaceMesh graph of the main process
    assert re.search(r"^W\d{4} .*inference_feedback_manager", run.text, re.M)  # and of the worker's


def tiled_manifest(path: Path, n: int) -> Path:
    """``n`` clips cycling through the bundled GRID clips (distinct keys), every one in the train split."""
    grid = [r for r in bundled_rows() if r["video_id"] == "grid"]
    rows = [{**grid[i % len(grid)], "video_id": "tiled", "clip_id": f"c{i:02d}", "mode": "train",
             "path": f"grid/{grid[i % len(grid)]['clip_id']}.mpg"} for i in range(n)]  # fmt: skip
    return write_manifest(path, rows)


def test_ctrl_c_during_extraction_then_rerun_finishes_every_clip_once(tmp_path, tiny_text_model, tiny_audio_model):
    manifest = tiled_manifest(tmp_path / "tiled.csv", 8)
    args = ["extract", str(manifest), "--media-root", str(MEDIA), "--out", str(tmp_path / "out"), "--shard-size", "2",
            "--fps", "5", "--batch-size", "1", "--text-model", str(tiny_text_model), "--audio-model", str(tiny_audio_model)]  # fmt: skip
    stopped = run_mmfuse(args, interrupt_when=r"extract: +\d+%\|[^|]*\| *[2-6]/8")
    assert stopped.interrupted and stopped.returncode == 130, stopped.text[-3000:]
    assert "Traceback" not in stopped.text and "KeyboardInterrupt" not in stopped.text, stopped.text[-3000:]
    said = [line for line in stopped.lines() if "interrupted" in line]
    assert said == ["mmfuse extract: interrupted; complete shards are kept; rerun the same command to resume"]
    assert [line for line in stopped.lines() if line.strip()][-1] == said[0]
    again = run_mmfuse(args)
    assert again.returncode == 0, again.text[-3000:]
    done = re.search(r"wrote (\d) samples in (\d) shards \((\d) already complete\)", again.text)
    assert done and int(done[3]) >= 1 and int(done[1]) == 2 * int(done[2]), again.text[-2000:]
    keys = [s["__key__"] for tar in sorted((tmp_path / "out").glob("*.tar")) for s in iter_shard(tar)]
    assert sorted(keys) == [f"tiled__c{i:02d}" for i in range(8)]
    assert not list((tmp_path / "out").glob("*.tmp*")), "no temporary file is left behind"


def test_ctrl_c_during_training_then_resume_finishes(tmp_path, bundled_dataset) -> None:
    run_dir = tmp_path / "run"
    args = ["train", "--shards", str(bundled_dataset), "--model", "late", "--run-dir", str(run_dir),
            "epochs=50", "batch_size=1", "num_workers=0", "model.hidden=12", "device=cpu"]  # fmt: skip
    stopped = run_mmfuse(args, interrupt_when=r"train: +\d+%\|[^|]*\| *(?:[5-9]|[1-8]\d)/100")
    assert stopped.interrupted and stopped.returncode == 130, stopped.text[-3000:]
    assert "Traceback" not in stopped.text, stopped.text[-3000:]
    assert stopped.text.rstrip().endswith(
        "mmfuse train: interrupted; rerun the same command with --resume to continue from the last checkpoint"
    ), stopped.text[-1000:]
    resumed = run_mmfuse([*args, "--resume"])
    assert resumed.returncode == 0, resumed.text[-3000:]
    final = json.loads((run_dir / "final.json").read_text())
    assert final["test"]["n"] == 1
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 100  # 2 train clips, batch 1, 50 epochs: every step taken once the run resumed


@pytest.mark.slow
def test_demo_draws_its_bars_in_a_terminal(tmp_path) -> None:
    """``make demo``'s script, as the README's first command runs it in a terminal (bundled MiniLM, random-init
    wav2vec 2.0, FaceMesh, end-to-end training). Piped, the same commands draw no bar (the tests above)."""
    env = {"OUT": str(tmp_path / "demo"), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    run = run_command(["bash", "examples/demo.sh"], env=env, timeout=600)
    assert run.returncode == 0, run.text[-4000:]
    assert "Traceback" not in run.text and NATIVE.search(run.text) is None, run.text[-4000:]
    assert "  checkpoints:   " in run.text and (tmp_path / "demo" / "run" / "checkpoints" / "best.pt").is_file()
    for bar in ("extract", "verify", "report", "train", "eval test", "eval train -t"):
        assert run.finished_bar(bar), (bar, run.terminal[-4000:])
