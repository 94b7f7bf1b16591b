# Quick start: `make demo` (the toy world end to end on CPU) and `make test` (test suite).
# Both create or reuse .venv and install idgen with the exact pins in constraints.txt first.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.idgen-installed
OFFLINE := HF_HUB_OFFLINE=1 WANDB_MODE=offline

.PHONY: install demo table1-sdxl table1-sd3 test lint format device-wheels

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,sweeps]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(OFFLINE) $(PY) -m idgen.toyworld.job --out outputs/toyworld

# The toy Table 1's rows on the SDXL and SD3 toy bases (the demo's job, another family's base):
# outputs/toyworld_sdxl/, outputs/toyworld_sd3/ (results.md, comparison.png).
table1-sdxl: $(STAMP)
	$(OFFLINE) $(PY) -m idgen.toyworld.job --family sdxl --out outputs/toyworld_sdxl

table1-sd3: $(STAMP)
	$(OFFLINE) $(PY) -m idgen.toyworld.job --family sd3 --out outputs/toyworld_sd3

# One pytest worker per CPU this process may use (affinity and cgroup quota, as idgen-train
# decides its threads; TEST_JOBS=N overrides), one torch thread per worker (tests/conftest.py;
# OMP_NUM_THREADS=N overrides), a test file per worker (module fixtures run once); says how long
# the suite took.
test: $(STAMP)
	@jobs=$${TEST_JOBS:-$$($(PY) -c "from idgen.utils.threads import usable_cpus; print(usable_cpus())")}; \
	start=$$(date +%s); $(OFFLINE) $(PY) -m pytest -n $$jobs --dist loadfile $(PYTEST_ARGS); \
	status=$$?; echo "make test: $$(( $$(date +%s) - start )) s, $$jobs worker(s) on $$(nproc) CPU(s)"; \
	exit $$status

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .

# Wheels for the GPU machine, whose Python 3.12 has torch, lightning, transformers, peft,
# torchmetrics... but no diffusers, hydra-core or omegaconf, and no registry: carry
# benchmarks/wheels (git-ignored, about 7 MB) and benchmarks/device_check.py installs them there
# with `pip install --no-index --no-deps`. Versions come from constraints.txt.
DEVICE_WHEELS_DIR := benchmarks/wheels
DEVICE_WHEELS := diffusers hydra-core omegaconf

device-wheels: $(STAMP)
	rm -rf $(DEVICE_WHEELS_DIR) && mkdir -p $(DEVICE_WHEELS_DIR)
	$(PY) -m pip download -q --no-deps --only-binary=:all: -c constraints.txt \
		--python-version 3.12 --implementation cp --platform manylinux2014_x86_64 --platform any \
		-d $(DEVICE_WHEELS_DIR) $(DEVICE_WHEELS)
	# antlr4-python3-runtime 4.9.* (what hydra-core and omegaconf need) is published only as an
	# sdist: build its pure-Python wheel here.
	$(PY) -m pip wheel -q --no-deps -c constraints.txt -w $(DEVICE_WHEELS_DIR) antlr4-python3-runtime
	ls -l $(DEVICE_WHEELS_DIR)
