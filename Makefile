# fv_accel developer targets. `make test` and `make demo` work on a fresh clone.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fv_accel_installed
export HF_HUB_OFFLINE ?= 1
export OMP_NUM_THREADS ?= 1

.PHONY: install demo test test-fast lint docs bench mutate

install: $(STAMP)

$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# CPU PyTorch first on machines without CUDA: an unpinned torch would pull a multi-GB CUDA build.
	if command -v nvidia-smi >/dev/null 2>&1; then \
		$(BIN)/python -m pip install --quiet -e '.[test]'; \
	else \
		$(BIN)/python -m pip install --quiet torch==2.13.0 && \
		$(BIN)/python -m pip install --quiet -c constraints-cpu.txt -e '.[test]'; \
	fi
	touch $(STAMP)

demo: install
	$(BIN)/accelerate launch --config_file accelerate_configs/cpu_fsdp2_2proc.yaml recipes/distill.py

test: install
	$(BIN)/python -m pytest -q tests

test-fast: install
	$(BIN)/python -m pytest -q tests -m "not slow and not distributed"

lint: install
	$(BIN)/ruff check fv_accel recipes tests benchmarks
	# Type check of fv_accel/ and recipes/ (settings: pyproject [tool.mypy]).
	$(BIN)/mypy

# Regenerate the key tables of docs/configuration.md from the schema's field docstrings (fv_accel/config.py);
# tests/test_config_doc.py fails when the committed doc is stale.
docs: install
	$(BIN)/python -m fv_accel.config_doc --write

# Mutation testing of the core modules against the fast tier (pyproject [tool.mutmut]); outside CI: tens of
# minutes on 2 cores. Results: `$(BIN)/mutmut results`, one mutant: `$(BIN)/mutmut show NAME`; docs/testing.md.
mutate: install
	$(BIN)/python -m pip install --quiet 'mutmut==3.8.1'
	rm -rf mutants
	# PYTHONPATH: tests that start a subprocess (a recipe run) import the mutated copy too, never the checkout
	PYTHONPATH=$(CURDIR)/mutants $(BIN)/mutmut run --max-children $(or $(MUTATE_JOBS),2)
	$(BIN)/mutmut export-cicd-stats
	$(BIN)/python -c "import json; s = json.load(open('mutants/mutmut-cicd-stats.json')); \
	t = s['total'] - s['skipped']; print('mutation score: %d killed (+%d timeouts) of %d tested = %.1f%%' \
	% (s['killed'], s['timeout'], t, 100 * (s['killed'] + s['timeout']) / max(t, 1)))"
