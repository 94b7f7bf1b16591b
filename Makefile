# Quick start: `make demo` (the toy world end to end on CPU) and `make test` (test suite).
# Both create or reuse .venv and install idgen with the exact pins in constraints.txt first.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.idgen-installed
OFFLINE := HF_HUB_OFFLINE=1 WANDB_MODE=offline

.PHONY: install demo test lint format

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,sweeps]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(OFFLINE) $(PY) -m idgen.toyworld.job --out outputs/toyworld

test: $(STAMP)
	$(OFFLINE) $(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .
