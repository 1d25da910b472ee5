# Two commands on a fresh machine: `make demo` and `make test`. Both create or reuse .venv and
# install only what changed (the stamp file tracks pyproject.toml).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.astrid-installed
DEMO_DIR ?= demo_out

.PHONY: setup demo test test-fast bench lint clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	@touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/astrid demo -o $(DEMO_DIR)

test: $(STAMP)
	bash scripts/test-services.sh
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(DEMO_DIR) .pytest_cache build
