# The two commands of the README:  `make study`  and  `make test`.
# Each creates .venv (if needed) and installs what it needs into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU build for this environment; GPU users: see README ("GPU").
TORCH_SPEC ?= torch==2.13.0
CORES ?= all

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" -e ".[workflow,dev]"
	touch $@

venv: $(BIN)/.installed

study: venv
	$(BIN)/snakemake --cores $(CORES)
	$(BIN)/snakemake --report results/report.html

# extra pytest arguments, e.g. PYTEST_ARGS='-m "not slurm"'
PYTEST_ARGS ?=

test: venv
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)

.PHONY: venv study test
