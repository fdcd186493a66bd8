# Quick start: `make demo` (set up, then run every method on the embedded default) and `make test`.
# Installs come from the hash-checked locks (requirements.lock: what `petlbench` needs; requirements-dev.lock: that
# plus the test, lint, Ray and tracking extras), then the project itself without dependency resolution. `make lock`
# regenerates both locks (see README, "Development").
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
	$(PY) -m pytest -q -n 2 tests

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
	$(COMPILE) --extra dev --extra ray --extra tracking -o requirements-dev.lock pyproject.toml
	$(COMPILE) -c requirements-dev.lock -o requirements.lock pyproject.toml

# GPU reference checks (`petlbench validate`, see petlbench/profiling/validate.py). GPU machines lend a few minutes,
# have no package registry and carry torch, timm, peft, pandas, scikit-learn, matplotlib, typer, rich and
# nvidia-ml-py, but not fvcore and its small dependencies. `make gpu-wheels` (beforehand, with the registry) builds
# wheels of those from requirements.lock's hash-checked pins into $(GPU_WHEELS_DIR) (fvcore and iopath are sdists on
# PyPI: `pip wheel` builds them); setuptools is there for the editable install where the machine's is older than
# pyproject.toml's build requirement; PyYAML, a binary, is fetched for each of $(GPU_PY_VERSIONS). `make gpu-check`
# (on the GPU machine, system python) installs petlbench without dependency resolution, then the wheels it lacks
# (never upgrading what is installed), then runs every GPU check within VALIDATE_BUDGET seconds, writing
# $(VALIDATE_OUT)/<gpu-slug>.json and .md; its exit status is validate's (0 ok, 1 a check failed, 3 no CUDA,
# 4 budget ran out). A device copy of the tree skips git-ignored folders: carry $(GPU_WHEELS_DIR) along.
GPU_WHEELS_DIR ?= .gpu-wheels
GPU_WHEEL_PKGS ?= fvcore iopath yacs tabulate termcolor portalocker setuptools
GPU_BINARY_PKGS ?= pyyaml
GPU_PY_VERSIONS ?= 3.10 3.11 3.12 3.13
GPU_PLATFORM ?= manylinux2014_x86_64
GPU_PIP_FLAGS ?=
GPU_PIP := $(PYTHON) -m pip --disable-pip-version-check
VALIDATE_OUT ?= results/reference
VALIDATE_BUDGET ?= 480
VALIDATE_ARGS ?=
# The hash-pinned entries of requirements.lock for the packages named in $(1) (a requirements file on stdout).
lock_entries = awk -v pkgs="$(1)" 'BEGIN { n = split(tolower(pkgs), a, " "); for (i = 1; i <= n; i++) want[a[i]] = 1 } \
	/^[A-Za-z0-9]/ { split($$0, p, "=="); take = (tolower(p[1]) in want) } take && !/^[ \t]*\#/' requirements.lock

.PHONY: gpu-wheels gpu-check

gpu-wheels: requirements.lock
	mkdir -p $(GPU_WHEELS_DIR)
	$(call lock_entries,$(GPU_WHEEL_PKGS)) > $(GPU_WHEELS_DIR)/pure.lock
	$(call lock_entries,$(GPU_BINARY_PKGS)) > $(GPU_WHEELS_DIR)/binary.lock
	$(GPU_PIP) wheel --quiet --no-deps --require-hashes -w $(GPU_WHEELS_DIR) -r $(GPU_WHEELS_DIR)/pure.lock
	for version in $(GPU_PY_VERSIONS); do \
		$(GPU_PIP) download --quiet --no-deps --require-hashes --only-binary=:all: --platform $(GPU_PLATFORM) \
			--python-version $$version -d $(GPU_WHEELS_DIR) -r $(GPU_WHEELS_DIR)/binary.lock || exit 1; \
	done
	ls $(GPU_WHEELS_DIR)/*.whl

gpu-check:
	for name in $$(ls $(GPU_WHEELS_DIR)/*.whl 2>/dev/null | sed 's|.*/||; s|-.*||' | sort -u); do \
		$(GPU_PIP) install --quiet --no-deps --no-index --find-links $(GPU_WHEELS_DIR) $(GPU_PIP_FLAGS) $$name || \
			echo "gpu-check: $$name not installed (no wheel for this python in $(GPU_WHEELS_DIR))"; \
	done
	$(GPU_PIP) install --quiet --no-deps --no-build-isolation $(GPU_PIP_FLAGS) -e . >/dev/null 2>&1 || \
		(echo "gpu-check: this python's setuptools cannot build petlbench; using $(GPU_WHEELS_DIR)'s" && \
		$(GPU_PIP) install --quiet --no-deps --no-index --find-links $(GPU_WHEELS_DIR) $(GPU_PIP_FLAGS) -e .)
	$(PYTHON) -m petlbench validate --budget-s $(VALIDATE_BUDGET) --out $(VALIDATE_OUT) $(VALIDATE_ARGS)

clean:
	rm -rf $(VENV) $(LOCK_VENV) build *.egg-info .pytest_cache .mypy_cache
