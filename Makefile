# Quick start: `make demo` (set up, then run every method on the embedded default) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PETL := $(VENV)/bin/petlbench
STAMP := $(VENV)/.petlbench-installed

.PHONY: setup demo test test-fast bench lint clean

setup: $(STAMP)

# pip resolves torch and torchvision together from the registry (never pin the local CPU-only torch wheel:
# torchvision's registry wheels need the matching torch build).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev,ray]"
	touch $(STAMP)

demo: $(STAMP)
	$(PETL) run --methods all --res 512 --report

test: $(STAMP)
	$(PY) -m pytest -q tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

bench: $(STAMP)
	$(PETL) bench

lint: $(STAMP)
	$(VENV)/bin/ruff check petlbench methods datasets tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
