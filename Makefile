# Two set-up commands: `make demo` and `make test`. Both create .venv if missing and install the pinned stack.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mmfuse-installed

.PHONY: install demo test test-fast gpu-check lint clean-demo

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

# On a GPU machine: every CUDA test (each model x bf16/fp16, fp16 resume, CUDA vs CPU, end-to-end AMP, GPU
# extraction, bench train on the device). Their CPU halves run in `make test`.
gpu-check: $(STAMP)
	timeout 480 $(PY) -m pytest -m gpu -q -rs tests

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean-demo:
	rm -rf demo-out
