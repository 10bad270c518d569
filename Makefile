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

# the write path's modules, compiled with mypyc in place (see src/convergedb/server/native.py);
# rebuilt whenever one of them changes. Python prefers the compiled module, so the package
# checks the recorded digest at import and runs plain Python if the build is stale.
NATIVE_SOURCES := src/convergedb/server/engine.py src/convergedb/server/connection.py \
	src/convergedb/schema/rowcheck.py
NATIVE_DIGEST := src/convergedb/server/compiled.sha256

.PHONY: install compile test lint typecheck unit run bench docs clean torture

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

$(NATIVE_DIGEST): $(STAMP) $(NATIVE_SOURCES) tools/build_native.py
	$(BIN)/python tools/build_native.py

compile: $(NATIVE_DIGEST)

$(DOCS_STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[docs]'
	touch $(DOCS_STAMP)

lint: install
	$(BIN)/ruff check src tests bench tools
	$(BIN)/ruff format --check src tests bench tools

typecheck: install
	$(BIN)/mypy src

# CONVERGEDB_NATIVE=required: tests/test_native.py checks that the compiled write path runs
unit: compile
	CONVERGEDB_NATIVE=required $(BIN)/pytest -q

test: lint typecheck unit

run: compile
	$(BIN)/convergedb serve

bench: compile
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	@for b in bench/[!_]*.py; do echo "== $$b"; case $$b in bench/compare_redis.py) a="--window-ms 20,2 --redis-appendfsync everysec,always";; *) a="";; esac; $(BIN)/python $$b $$a || exit 1; done

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
	rm -f $(NATIVE_DIGEST) src/convergedb/schema/compiled.sha256 src/*__mypyc*.so \
		src/convergedb/server/*.so src/convergedb/schema/*.so
