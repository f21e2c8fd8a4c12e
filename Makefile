# moebook: `make run` (install, run every notebook, build the site) and `make test` (the whole suite).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
NBS := $(wildcard nbs/*.ipynb)
# the CPU wheel of torch (an unpinned torch pulls a multi-GB CUDA build)
TORCH := torch==2.13.0
# the tests of `make test-fast`: no notebook, no process started
FAST := not notebook and not slow and not distributed
PYTEST = MOEBOOK_QUIET=1 $(1)/python -m pytest -q -rs
MINVENV ?= /tmp/moebook-minvenv
# `make test` runs the tests in this many processes (pytest-xdist, `--dist loadgroup`): tests/conftest.py keeps the
# tests of a file that share fixtures together and spreads the notebook smoke runs and `moebook run` tests over
# both processes, the long ones first (kernel start-ups and process launches leave cores idle otherwise)
TEST_WORKERS ?= 2

.PHONY: help install run test test-fast test-retrain test-min lock site lab export clean-nbs sync execute bench readme

help:
	@echo "make run      install, execute every notebook with papermill (small defaults), build the website"
	@echo "make test     install, run the whole test suite (every notebook once, smallest parameters); CI runs exactly this"
	@echo "make test-fast  the tests that run no notebook and start no process (a few minutes)"
	@echo "make test-retrain  retrain the committed checkpoints and sealed runs and check they reproduce (about an hour on 2 cores)"
	@echo "make test-min   install the lowest supported versions (pyproject.toml floors) in $(MINVENV), run test-fast there"
	@echo "make lock     re-resolve constraints.txt (the versions make install uses) from pyproject.toml"
	@echo "make site     build _site/ from the notebooks in nbs/ (Quarto if installed, else the static preview)"
	@echo "make lab      open JupyterLab on nbs/ (jupytext pairs every .ipynb with a .py)"
	@echo "make sync     sync each .ipynb with its paired .py (jupytext), then export and clean"
	@echo "make execute  re-execute the notebooks in nbs/ in place, so the site shows fresh outputs"
	@echo "make bench    run the benchmarks in benchmarks/ (JSON results next to them)"

# Exactly the versions in constraints.txt (the lock; torch is its CPU wheel), so every CI run tests the same set.
$(BIN)/.installed: pyproject.toml settings.ini constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $@

# The lock: resolve pyproject.toml from scratch (nothing installed is reused, nothing is installed) and pin the result.
define LOCK_PY
import json, sys
report = json.load(open(sys.argv[1]))
print("# The versions `make install` installs (pip constraints). Regenerate with `make lock`; do not edit by hand.")
for name, version in sorted((i["metadata"]["name"].lower().replace("_", "-"), i["metadata"]["version"]) for i in report["install"]):
    if name != "moebook": print(f"{name}=={version}")
endef
export LOCK_PY
lock:
	$(PYTHON) -m pip install -q --dry-run --ignore-installed --report .lock-report.json $(TORCH) -e ".[dev]"
	$(PYTHON) -c "$$LOCK_PY" .lock-report.json > constraints.txt
	rm .lock-report.json

# The floors: every `>=X` (or `==X`) of pyproject.toml becomes `==X`; all of them together must install and pass.
define FLOORS_PY
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
for req in project["dependencies"] + project["optional-dependencies"]["dev"]:
    name, spec = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*(.*)", req).groups()
    low = re.search(r"(?:>=|==)\s*([^,\s]+)", spec)
    if low is None: raise SystemExit(f"pyproject.toml: {req!r} has no floor (>= or ==)")
    print(f"{name}=={low.group(1)}")
endef
export FLOORS_PY
test-min:
	rm -rf $(MINVENV)
	$(PYTHON) -m venv $(MINVENV)
	$(PYTHON) -c "$$FLOORS_PY" > $(MINVENV)/floors.txt
	$(MINVENV)/bin/python -m pip install -q -c $(MINVENV)/floors.txt -e ".[dev]"
	MOEBOOK_NO_SPAWN=1 $(call PYTEST,$(MINVENV)/bin) -m "$(FAST)" tests

install: $(BIN)/.installed

run: install
	$(BIN)/moebook run $(NBS)
	$(BIN)/moebook site --from-runs runs
	@echo "Executed notebooks and metrics: runs/<notebook>/<run>/ (list them: $(BIN)/moebook runs)"
	@echo "Website: _site/index.html (serve it: $(BIN)/python -m http.server -d _site 8000)"

# Each notebook runs once, as a papermill smoke run with its smallest parameters (tests/test_notebooks.py):
# that executes every cell, unit tests included, so nbdev_test would only run them a second time.
test: install
	$(call PYTEST,$(BIN)) -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder -m "not retrain" tests

test-retrain: install
	$(call PYTEST,$(BIN)) -m retrain tests

test-fast: install
	MOEBOOK_NO_SPAWN=1 $(call PYTEST,$(BIN)) -m "$(FAST)" tests

site: install
	$(BIN)/moebook site

lab: install
	$(BIN)/jupyter lab nbs

export: install
	$(BIN)/nbdev_export

clean-nbs: install
	$(BIN)/nbdev_clean

sync: install
	$(BIN)/jupytext --sync $(NBS)
	$(BIN)/nbdev_export
	$(BIN)/nbdev_clean
	$(BIN)/moebook readme

execute: install
	# the inline backend: an MPLBACKEND=Agg from the shell would silently drop every figure
	for nb in $(NBS); do (cd nbs && MOEBOOK_QUIET=1 MPLBACKEND=module://matplotlib_inline.backend_inline ../$(BIN)/jupyter nbconvert --to notebook --execute --inplace $$(basename $$nb)) || exit 1; done
	$(BIN)/nbdev_clean

bench: install
	$(BIN)/python benchmarks/moe_layer.py

readme: install
	$(BIN)/moebook readme
