# Quick start: `make demo` (set up, then run every method on the embedded default) and `make test`.
# Installs come from the hash-checked locks (requirements.lock: what `petlbench` needs; requirements-dev.lock: that
# plus the test, lint and Ray extras), then the project itself without dependency resolution. `make lock` regenerates
# both locks (see README, "Development").
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PETL := $(VENV)/bin/petlbench
PIP := $(PY) -m pip --disable-pip-version-check
RUN_STAMP := $(VENV)/.petlbench-run
DEV_STAMP := $(VENV)/.petlbench-dev
LOCK_VENV := .lock-venv
PIP_TOOLS := pip-tools==7.6.2
# The newest torch and torchvision that these machines carry on disk (pip caps them there); raise both together.
TORCH_PINS := --upgrade-package torch==2.14.1 --upgrade-package torchvision==0.29.1
COMPILE := $(LOCK_VENV)/bin/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras --no-emit-index-url \
	--no-emit-find-links $(TORCH_PINS)

.PHONY: setup setup-dev demo test test-fast check bench lock clean

setup: $(RUN_STAMP)
setup-dev: $(DEV_STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# Exactly the lock (no resolution), then petlbench itself with the locked setuptools (no build isolation). -qq: pip
# would otherwise list every package missing from this machine's extra file:// indexes, which says nothing about us.
$(RUN_STAMP): requirements.lock pyproject.toml | $(PY)
	$(PIP) install -qq --no-deps --require-hashes -r requirements.lock
	$(PIP) install --quiet --no-deps --no-build-isolation -e .
	touch $@

$(DEV_STAMP): requirements-dev.lock pyproject.toml | $(PY)
	$(PIP) install -qq --no-deps --require-hashes -r requirements-dev.lock
	$(PIP) install --quiet --no-deps --no-build-isolation -e .
	touch $@ $(RUN_STAMP)

demo: $(RUN_STAMP)
	$(PETL) run --methods all --res 512 --report

test: $(DEV_STAMP)
	$(PY) -m pytest -q tests

test-fast: $(DEV_STAMP)
	$(PY) -m pytest -q -m "not slow" tests

check: $(DEV_STAMP)
	$(VENV)/bin/ruff check petlbench methods tests
	$(VENV)/bin/ruff format --check petlbench methods tests
	$(VENV)/bin/mypy

bench: $(RUN_STAMP)
	$(PETL) bench

# Regenerate both locks for Linux x86_64 / CPython 3.11 from pyproject.toml's ranges; the runtime lock is
# constrained by the development lock, so both name the same versions.
lock:
	test -x $(LOCK_VENV)/bin/pip-compile || ($(PYTHON) -m venv $(LOCK_VENV) && \
		$(LOCK_VENV)/bin/pip install --quiet $(PIP_TOOLS))
	$(COMPILE) --extra dev --extra ray -o requirements-dev.lock pyproject.toml
	$(COMPILE) -c requirements-dev.lock -o requirements.lock pyproject.toml

clean:
	rm -rf $(VENV) $(LOCK_VENV) build *.egg-info .pytest_cache .mypy_cache
