# Two commands set everything up on a fresh machine: `make quickstart` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# pip constraints: the versions CI passed with (empty = the newest the ranges in pyproject.toml allow)
CONSTRAINTS ?= constraints.txt

.PHONY: venv quickstart test test-fast soak bench clean wheel fashion-data browser experiment-methods experiment-search \
        experiment-methods-quick experiment-search-quick

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip
	$(BIN)/pip install --quiet $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e '.[dev]'
	# torchattacks pins requests~=2.25 and an old robustbench; its real needs (torch, numpy, scipy) are already here.
	$(BIN)/pip install --quiet --no-deps 'torchattacks==3.5.1'
	touch $(STAMP)

quickstart: $(STAMP)
	$(BIN)/study run --fresh search_spaces/quickstart.yaml

test: $(STAMP) fashion-data browser
	$(BIN)/python -m pytest -q -m "not soak" tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not soak" tests

# The race tests repeated long enough to catch a rare interleaving (e.g. 1,000 races for the study lock).
soak: $(STAMP)
	$(BIN)/python -m pytest -q -m soak tests

# What a cluster's nodes install (cluster.yaml copies dist/ to every node): the project's wheel and the
# constraints it is installed with.
wheel: $(STAMP)
	rm -rf dist && mkdir -p dist
	$(BIN)/pip wheel --quiet --no-deps --wheel-dir dist .
	cp constraints.txt dist/

bench: $(STAMP)
	$(BIN)/python -m bench.run_all

# The experiments of docs/results.md (each writes its section, CSVs and plots); QUICK=1 = the smoke run.
experiment-methods: $(STAMP) fashion-data
	$(BIN)/python -m analysis.experiments.fashion_methods $(if $(QUICK),--quick)

experiment-search: $(STAMP)
	$(BIN)/python -m analysis.experiments.search_efficiency $(if $(QUICK),--quick)

experiment-methods-quick:
	$(MAKE) experiment-methods QUICK=1

experiment-search-quick:
	$(MAKE) experiment-search QUICK=1

# Debian's Fashion-MNIST (a 31 MB package) for experiment-methods and its test; where apt cannot install it
# (no root, not Debian) a warning, and that test is skipped with the install command as its reason.
FASHION_DIR := /usr/share/datasets/fashion-mnist
fashion-data:
	@test -d $(FASHION_DIR) || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) \
	  || echo "warning: could not install dataset-fashion-mnist (sudo apt-get install dataset-fashion-mnist)"

# Debian's Chromium, for the test that renders the study report headless (every image loaded); where apt
# cannot install it, a warning, and that test is skipped with the install command as its reason.
browser:
	@command -v chromium >/dev/null || (apt-get install -y -qq chromium || (apt-get update -qq && apt-get install -y -qq chromium)) \
	  || echo "warning: could not install chromium (sudo apt-get install chromium)"

clean:
	rm -rf $(VENV) runs
