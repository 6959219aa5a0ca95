# Two commands on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MODEL ?= smollm2-135m-instruct

.PHONY: install dev serve test lint format bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch pinned explicitly: the CPU wheel of 2.13.0 is on local disk; an unpinned torch pulls a CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.dev: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed
dev: $(VENV)/.dev

serve: install
	$(VENV)/bin/lmforge pull $(MODEL)
	$(VENV)/bin/lmforge serve $(MODEL)

lint: dev
	$(VENV)/bin/ruff format --check lmforge tests bench examples
	$(VENV)/bin/ruff check lmforge tests bench examples

format: dev
	$(VENV)/bin/ruff format lmforge tests bench examples
	$(VENV)/bin/ruff check --fix lmforge tests bench examples

test: dev lint
	$(PY) -m pytest -q --durations=20 $(PYTEST_ARGS)  # the slowest tests in every CI log

bench: dev
	$(PY) bench/decode.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
