# ConvergeDB developer commands. `make test` is the one CI runs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DOCS_STAMP := $(VENV)/.installed-docs
# the API reference: pdoc documents the package's public surface (what `convergedb` and
# `convergedb.client` list in __all__), from Google-style docstrings, with the template in
# docs/api-template; tests/test_api_docs.py builds it with these same settings
API_DIR := build/api
API_MODULES := convergedb convergedb.client
PDOC_FLAGS := --docformat google --template-directory docs/api-template

.PHONY: install test lint typecheck unit run bench docs clean torture

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

$(DOCS_STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[docs]'
	touch $(DOCS_STAMP)

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: install
	$(BIN)/mypy src

unit: install
	$(BIN)/pytest -q

test: lint typecheck unit

run: install
	$(BIN)/convergedb serve

bench: install
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	@for b in bench/[!_]*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

# -W error: a warning of pdoc (a module it cannot import, an annotation it cannot resolve) fails
docs: $(DOCS_STAMP)
	rm -rf $(API_DIR)
	$(BIN)/python -W error -m pdoc $(PDOC_FLAGS) --output-directory $(API_DIR) $(API_MODULES)
	@echo "API reference: open $(API_DIR)/index.html"

# the suites marked `torture` (crash torture, soak, ...) at their long sizes: 100+ SIGKILLs and
# a 10-minute soak (half an hour or more); `make test` runs them at their fast sizes
torture: install
	CONVERGEDB_TORTURE=long $(BIN)/pytest -q -s -m torture

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache .hypothesis $(API_DIR)
