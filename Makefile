# Two commands set everything up on a fresh machine: `make quickstart` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv quickstart test test-fast bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip
	$(BIN)/pip install --quiet -e '.[dev]'
	# torchattacks pins requests~=2.25 and an old robustbench; its real needs (torch, numpy, scipy) are already here.
	$(BIN)/pip install --quiet --no-deps 'torchattacks==3.5.1'
	touch $(STAMP)

quickstart: $(STAMP)
	$(BIN)/study run --fresh search_spaces/quickstart.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

bench: $(STAMP)
	$(BIN)/python -m bench.run_all

clean:
	rm -rf $(VENV) runs
