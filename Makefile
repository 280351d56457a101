# Every target sets up its own virtual environment (.venv) on first use; pip's cache makes re-creation fast.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST := $(BIN)/python -m pytest

.PHONY: setup demo test test-fast fuzz clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

## Serve the embedded tiny checkpoint with plain `sglang serve` and stream one chat request.
demo: setup
	$(BIN)/step35 demo

## The whole CI suite (unit, kernels under TRITON_INTERPRET, servers on CPU).
test: setup
	$(PYTEST) -q -ra --durations=15 tests

## Unit tests only (no `sglang serve` processes).
test-fast: setup
	$(PYTEST) -q -ra -m "not server" tests

## Long parser fuzzing run (>= 10,000 cases); not part of `make test`.
fuzz: setup
	$(BIN)/python tests/fuzz_parsers.py --cases 10000

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
