# Two set-up commands: `make demo` and `make test`. Both create .venv if missing and install the pinned stack.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mmfuse-installed
HOST_PY := $(if $(wildcard $(PY)),$(PY),python3)

.PHONY: install demo test test-fast settings-doc gpu-check gpu-check-tests gpu-check-bench gpu-wheels gpu-rehearsal lint clean-demo

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" bash examples/demo.sh

test: $(STAMP)
	$(PY) -m pytest -m "not gpu"

test-fast: $(STAMP)
	$(PY) -m pytest -m "not gpu and not slow and not integration"

# docs/settings.md from the settings' dataclasses (a test fails while it is stale)
settings-doc: $(STAMP)
	$(PY) -m mmfuse.settings_doc docs/settings.md

# On a GPU machine, under 8 minutes: (1) every CUDA test (each model x bf16/fp16, fp16 resume, CUDA vs CPU,
# end-to-end AMP, two ranks under torchrun then a resume on one GPU, inductor recompiles, extraction on two ranks),
# each multi-process test under its own subprocess timeout; (2) the timed figures (50 steps at batch 32, extraction
# clips/s) with (1)'s outcomes into BENCHMARKS.md's GPU section. Fails when a test failed or a step hung.
# Their CPU halves run in `make test`. `gpu-check-tests` and `gpu-check-bench` are its two halves, one device call
# each (docs/gpu.md).
#
# The lent GPU machine's image has python3 with torch, transformers, numpy 2, PyYAML, tqdm, matplotlib, tensorboard
# and pytest, no network, and none of the wheels below. `make gpu-wheels` (here, where the registry is reachable)
# downloads them for the call to carry; GPU_IMAGE=1 (or detected: no $(VENV) and python3 imports torch) runs the
# check from the tree with python3, the wheels installed with pip --no-index --no-deps --target $(GPU_SITE).
# `make gpu-rehearsal` proves that path on the CPU, in a venv holding only the image's packages.
GPU_WHEELS := gpu-wheels
GPU_SITE := .gpu-site
GPU_WHEEL_PINS := av==18.1.0 webdataset==1.0.2 braceexpand==0.1.7
CARRY_LIMIT_MIB := 64
GPU_PYTEST ?= -m gpu tests
GPU_TESTS_TIMEOUT ?= 330
GPU_BENCH ?=
GPU_BENCH_TIMEOUT ?= 130
ifneq ($(filter gpu-check%,$(MAKECMDGOALS)),)
GPU_IMAGE ?= $(shell test ! -e $(PY) && python3 -c 'import torch' >/dev/null 2>&1 && echo 1)
endif
ifeq ($(GPU_IMAGE),1)
GPU_PY := python3
GPU_DEPS := $(GPU_SITE)/.installed
GPU_ENV := PYTHONPATH="$(CURDIR)/$(GPU_SITE):$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH}"
else
GPU_PY := $(PY)
GPU_DEPS := $(STAMP)
GPU_ENV :=
endif
GPU_TESTS_RUN = rm -f gpu-check.xml; $(GPU_ENV) timeout -k 10 $(GPU_TESTS_TIMEOUT) $(GPU_PY) -m pytest $(GPU_PYTEST) \
	-q -rs --junitxml=gpu-check.xml
GPU_BENCH_RUN = $(GPU_ENV) timeout -k 10 $(GPU_BENCH_TIMEOUT) $(GPU_PY) -m mmfuse bench gpu $(GPU_BENCH) \
	--junit gpu-check.xml --out BENCHMARKS.md

gpu-check: $(GPU_DEPS)
	@echo "gpu-check 1/2: pytest $(GPU_PYTEST) (at most $(GPU_TESTS_TIMEOUT) s; outcomes in gpu-check.xml)"
	@$(GPU_TESTS_RUN); tests=$$?; \
	echo "gpu-check 2/2: mmfuse bench gpu -> BENCHMARKS.md (at most $(GPU_BENCH_TIMEOUT) s)"; \
	$(GPU_BENCH_RUN); bench=$$?; \
	echo "gpu-check: pytest exit $$tests, bench exit $$bench (124: timed out)"; \
	test $$tests -eq 0 && test $$bench -eq 0

gpu-check-tests: $(GPU_DEPS)
	@echo "gpu-check 1/2: pytest $(GPU_PYTEST) (at most $(GPU_TESTS_TIMEOUT) s; outcomes in gpu-check.xml)"
	@$(GPU_TESTS_RUN); tests=$$?; echo "gpu-check-tests: pytest exit $$tests (124: timed out)"; exit $$tests

gpu-check-bench: $(GPU_DEPS)
	@echo "gpu-check 2/2: mmfuse bench gpu -> BENCHMARKS.md (at most $(GPU_BENCH_TIMEOUT) s)"
	@$(GPU_BENCH_RUN); bench=$$?; echo "gpu-check-bench: bench exit $$bench (124: timed out)"; exit $$bench

$(GPU_SITE)/.installed: $(wildcard $(GPU_WHEELS)/*.whl)
	@test -n "$(wildcard $(GPU_WHEELS)/*.whl)" || { echo "gpu-check: no wheels in $(GPU_WHEELS)/: run" \
		"\`make gpu-wheels\` where the package registry is reachable, and carry $(GPU_WHEELS)"; exit 1; }
	rm -rf $(GPU_SITE)
	python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $(GPU_SITE) $(GPU_WHEELS)/*.whl
	@touch $@

# The cp312 manylinux wheels of what the check imports that the image lacks (pins as in pyproject.toml), and a
# check that they and the working tree fit in what one device call carries.
gpu-wheels:
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)
	$(HOST_PY) -m pip download -q --no-deps --only-binary=:all: --implementation cp --python-version 3.12 \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d $(GPU_WHEELS) $(GPU_WHEEL_PINS)
	$(HOST_PY) .ci/gpu/carry_size.py --limit-mib $(CARRY_LIMIT_MIB) $(GPU_WHEELS)

# The check's CPU half on this machine, as the GPU machine runs it: see .ci/gpu/rehearsal.sh.
gpu-rehearsal:
	bash .ci/gpu/rehearsal.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean-demo:
	rm -rf demo-out
