# capret — two commands: `make demo` and `make test`. Both create .venv when it is missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.capret-installed
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

# Runtime environment (see ../shared/docs/environment.md): no FiftyOne analytics, quiet MongoDB check,
# fast OpenBLAS kernels for faiss-cpu on AVX2 machines, a project-local FiftyOne database.
export FIFTYONE_DO_NOT_TRACK := true
export FIFTYONE_DATABASE_VALIDATION := false
export FIFTYONE_DATABASE_DIR ?= $(CURDIR)/.cache/fiftyone-db
export TOKENIZERS_PARALLELISM := false
export PYDEVD_DISABLE_FILE_VALIDATION := 1
# OpenMP threads sleep while waiting instead of spinning: spinning torch threads on a shared CPU were 4-20x slower
# (benchmarks/bench_threads.py).
export OMP_WAIT_POLICY ?= PASSIVE
ifneq ($(shell grep -m1 -o -w avx2 /proc/cpuinfo 2>/dev/null),)
export OPENBLAS_CORETYPE := Haswell
endif

.PHONY: venv demo demo-full test test-fast lab chromium clean-venv help

help:
	@echo "make demo   - set up .venv and run notebooks 01-04 on the synthetic benchmark into runs/demo-quick/ (~8 min on 2 cores; quick budget)"
	@echo "make demo-full - the same chain with the documented training budget into runs/demo/ (~20 min; the README's results)"
	@echo "make test   - set up .venv and run the test suite (unit + notebook smoke + FiftyOne + browser)"
	@echo "make lab    - JupyterLab on http://127.0.0.1:8888 with the project environment"

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip check
	touch $(STAMP)

chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { echo "installing Debian chromium for the FiftyOne App browser test"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	    echo "WARNING: could not install chromium; browser tests will be skipped"; }

test: venv chromium
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: venv
	$(BIN)/python -m pytest -m "not slow and not notebook and not fiftyone and not browser" $(PYTEST_ARGS)

# the newcomer's run: a third of the fine-tuning, a quarter of the answerer's steps (lower numbers, same conclusions)
demo: venv
	$(BIN)/python -m capret_utils.runs.demo --out runs/demo-quick --budget quick

# the documented configuration: reproduces the committed runs/demo/ and the README's results
demo-full: venv
	$(BIN)/python -m capret_utils.runs.demo --out runs/demo --budget full

lab: venv
	$(BIN)/jupyter-lab --no-browser --allow-root --port 8888 --IdentityProvider.token='' \
	  --ServerApp.ip=127.0.0.1 --ServerApp.root_dir=$(CURDIR)

clean-venv:
	rm -rf $(VENV)
