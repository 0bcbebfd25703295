# voxqueue developer tasks. Needs only python3 >= 3.11 (and make): everything else goes into .venv.
#
#   make demo        run the end-to-end demo (private redis-server + emulator + worker + producer)
#   make test        run the test suite          (make test PYTEST_ARGS='-k logs -x')
#   make test-fast   the suite without the chaos tests, in parallel (under a minute)
#   make lint        ruff check, ruff format --check, mypy
#   make lint-ops    hadolint (ops/Dockerfile), kubernetes-validate (ops/k8s), KEDA schema
#   make lock        regenerate ops/requirements/*.lock (the images' pinned dependencies; network)
#   make dashboard   regenerate ops/grafana/voxqueue.json; make dashboard-png records a run and plots it
#   make bench       python -m ops.bench
#   make mutate      mutation testing of the fenced code (make mutate MUTATE_ARGS='worker/x.py --max 20')
#   make install     create .venv and install the project (editable) with dev, speech, embedded extras
#   make clean       remove caches and build output; make distclean also removes .venv
#
# Use another interpreter with PYTHON=python3.12 (only used to create .venv).

PYTHON      ?= python3
VENV        ?= .venv
EXTRAS      ?= dev,speech,embedded
PYTEST_ARGS ?=
TEST_WORKERS ?= 6
BENCH_ARGS  ?=
MUTATE_ARGS ?=

VENV_PY := $(VENV)/bin/python
STAMP   := $(VENV)/.voxqueue-installed

# `$(X) $(PY_OK)` exits 0 when interpreter X is Python >= 3.11.
PY_OK = -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'

.DEFAULT_GOAL := help
.PHONY: help install demo test test-fast lint bench mutate clean distclean check-python lint-ops lock dashboard dashboard-png

help:
	@sed -n '1,15s/^# \{0,1\}//p' $(firstword $(MAKEFILE_LIST))

check-python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { \
	  echo "error: '$(PYTHON)' not found. Install Python >= 3.11 or run: make PYTHON=/path/to/python3.11 ..." >&2; \
	  exit 1; }
	@$(PYTHON) $(PY_OK) || { \
	  echo "error: voxqueue needs Python >= 3.11, but $(PYTHON) is $$($(PYTHON) -V 2>&1)." >&2; \
	  echo "       Install a newer Python and run: make PYTHON=python3.11 ..." >&2; \
	  exit 1; }

# The venv itself: created once. Order-only for the stamp, so an interpreter update does not reinstall.
$(VENV_PY):
	@$(MAKE) --no-print-directory check-python
	@echo "==> creating $(VENV) with $(PYTHON) ($$($(PYTHON) -V 2>&1))"
	@$(PYTHON) -m venv $(VENV) || { \
	  echo "error: '$(PYTHON) -m venv' failed. On Debian/Ubuntu: apt-get install python3-venv" >&2; \
	  rm -rf $(VENV); exit 1; }

# The install: redone only when pyproject.toml is newer than the stamp.
$(STAMP): pyproject.toml | $(VENV_PY)
	@$(VENV_PY) $(PY_OK) || { \
	  echo "error: $(VENV) uses $$($(VENV_PY) -V 2>&1); voxqueue needs >= 3.11. Run: make distclean" >&2; \
	  exit 1; }
	@echo "==> installing voxqueue into $(VENV): pip install -e '.[$(EXTRAS)]'"
	$(VENV_PY) -m pip install --disable-pip-version-check --progress-bar off -q -e '.[$(EXTRAS)]'
	@touch $@

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/voxqueue demo

# The fast tier (everything but the second tier) runs in parallel: its tests mostly wait on real
# processes. The second tier (marker `slow`: chaos tests, which measure timings under faults, and
# the CPU-heavy speech-engine and 10,000-session tests) runs alone.
# pytest exits 5 when an -m/-k selection leaves a tier empty: that is not a failure here.
test: $(STAMP)
	@$(VENV_PY) -m pytest -q -m "not slow" -n $(TEST_WORKERS) $(PYTEST_ARGS); rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ] || exit $$rc
	@$(VENV_PY) -m pytest -q -m slow $(PYTEST_ARGS); rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ] || exit $$rc

test-fast: $(STAMP)
	$(VENV_PY) -m pytest -q -m "not slow" -n $(TEST_WORKERS) $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# Deployment files, offline: no Docker engine, no cluster (docs/operations.md says what is not run).
lint-ops: $(STAMP)
	$(VENV)/bin/hadolint ops/Dockerfile
	$(VENV)/bin/kubernetes-validate --strict --quiet ops/k8s/redis.yaml ops/k8s/worker.yaml
	$(VENV_PY) -m pytest -q -p no:cacheprovider tests/test_ops_files.py

lock: $(STAMP)
	LOCK_COMPILER=$(VENV)/bin/pip-compile ops/lock.sh

dashboard: $(STAMP)
	$(VENV_PY) -m ops.grafana.dashboard

# Needs matplotlib (in the dev and bench extras).
dashboard-png: $(STAMP)
	mkdir -p build
	$(VENV_PY) -m ops.grafana.plot record build/dashboard-run.json
	$(VENV_PY) -m ops.grafana.plot plot build/dashboard-run.json docs/dashboard.png

bench: $(STAMP)
	$(VENV_PY) -m ops.bench $(BENCH_ARGS)

# One mutation at a time in a copy of the tree; lists the mutants no fast test notices.
mutate: $(STAMP)
	$(VENV_PY) -m ops.mutate $(MUTATE_ARGS)

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache .mypy_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
