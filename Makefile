# The two commands of the README: `make report` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PRESET ?= digits
# every pruning rule side by side, for the bias chapter
BIAS_PRESET ?= digits-bias
# keep-hard vs keep-easy vs random by training-set size, for the regime chapter
REGIME_PRESET ?= digits-regime
STORE  ?= runs
# jobs at once (notebook kernels, inline worker processes), each with a share of the cores
WORKERS ?= $(shell getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)
BIN     = $(VENV)/bin
# torch/torchvision versions that pip here takes from local disk; any release in pyproject's range works
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: report test mutation install venv clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet $(TORCH_PINS) || $(BIN)/pip install --quiet torch torchvision
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

install: $(VENV)/.installed

report: install
	$(BIN)/datadiet-nb sweep --preset $(PRESET) --store $(STORE) --workers $(WORKERS)
	$(BIN)/datadiet-nb sweep --preset $(REGIME_PRESET) --store $(STORE) --executor inline --workers $(WORKERS) \
		--chapters regime
	$(BIN)/datadiet-nb sweep --preset $(BIAS_PRESET) --store $(STORE) --executor inline --workers $(WORKERS) \
		--chapters bias,reproducibility,findings
	$(BIN)/jupyter-book build . --quiet
	@echo "report: $(CURDIR)/_build/html/index.html"

test: install
	$(BIN)/python -m pytest

# Mutation testing of prune, metrics, results, scores and stats (config: [tool.mutmut] in pyproject.toml); not in
# CI: about half an hour on 2 cores. Resumes where it stopped; prints the score per module (benchmarks/mutation.py).
# One torch thread per worker: two workers of two threads each on two cores made mutants time out, not fail.
mutation: install
	$(BIN)/pip install --quiet 'mutmut>=3.8,<4'
	OMP_NUM_THREADS=1 $(BIN)/mutmut run --max-children 2 >/dev/null || true
	$(BIN)/python benchmarks/mutation.py

clean:
	rm -rf $(VENV) _build book/runs .pytest_cache mutants
