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

# On a GPU machine, under 8 minutes: (1) every CUDA test (each model x bf16/fp16, fp16 resume, CUDA vs CPU,
# end-to-end AMP, two ranks under torchrun then a resume on one GPU, inductor recompiles, extraction on two ranks),
# each multi-process test under its own subprocess timeout; (2) the timed figures (50 steps at batch 32, extraction
# clips/s) with (1)'s outcomes into BENCHMARKS.md's GPU section. Fails when a test failed or a step hung.
# Their CPU halves run in `make test`.
gpu-check: $(STAMP)
	@echo "gpu-check 1/2: pytest -m gpu (at most 330 s; outcomes in gpu-check.xml)"
	@rm -f gpu-check.xml; timeout -k 10 330 $(PY) -m pytest -m gpu -q -rs --junitxml=gpu-check.xml tests; tests=$$?; \
	echo "gpu-check 2/2: mmfuse bench gpu -> BENCHMARKS.md (at most 130 s)"; \
	timeout -k 10 130 $(PY) -m mmfuse bench gpu --junit gpu-check.xml --out BENCHMARKS.md; bench=$$?; \
	echo "gpu-check: pytest exit $$tests, bench exit $$bench (124: timed out)"; \
	test $$tests -eq 0 && test $$bench -eq 0

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean-demo:
	rm -rf demo-out
