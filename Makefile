# The two commands of the README: `make report` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PRESET ?= digits
STORE  ?= runs
BIN     = $(VENV)/bin
# torch/torchvision versions that pip here takes from local disk; any release in pyproject's range works
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: report test install venv clean

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
	$(BIN)/datadiet-nb sweep --preset $(PRESET) --store $(STORE)
	$(BIN)/jupyter-book build . --quiet
	@echo "report: $(CURDIR)/_build/html/index.html"

test: install
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) _build book/runs .pytest_cache
