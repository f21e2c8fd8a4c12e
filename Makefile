# moebook: `make run` (install, run every notebook, build the site) and `make test` (the whole suite).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
NBS := $(wildcard nbs/*.ipynb)

.PHONY: help install run test site lab export clean-nbs sync execute bench readme

help:
	@echo "make run      install, execute every notebook with papermill (small defaults), build the website"
	@echo "make test     install, run the whole test suite (nbdev_test + pytest); CI runs exactly this"
	@echo "make site     build _site/ from the notebooks in nbs/ (Quarto if installed, else the static preview)"
	@echo "make lab      open JupyterLab on nbs/ (jupytext pairs every .ipynb with a .py)"
	@echo "make sync     sync each .ipynb with its paired .py (jupytext), then export and clean"
	@echo "make execute  re-execute the notebooks in nbs/ in place, so the site shows fresh outputs"
	@echo "make bench    run the benchmarks in benchmarks/ (JSON results next to them)"

# torch is installed first and pinned, so pip takes the local CPU wheel instead of a CUDA build.
$(BIN)/.installed: pyproject.toml settings.ini
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

install: $(BIN)/.installed

run: install
	$(BIN)/moebook run $(NBS)
	$(BIN)/moebook site --from-runs runs
	@echo "Executed notebooks and metrics: runs/<notebook>/<run>/ (list them: $(BIN)/moebook runs)"
	@echo "Website: _site/index.html (serve it: $(BIN)/python -m http.server -d _site 8000)"

test: install
	MOEBOOK_QUIET=1 $(BIN)/nbdev_test --n_workers 2
	MOEBOOK_QUIET=1 $(BIN)/python -m pytest -q -rs tests

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
	for nb in $(NBS); do (cd nbs && MOEBOOK_QUIET=1 ../$(BIN)/jupyter nbconvert --to notebook --execute --inplace $$(basename $$nb)) || exit 1; done
	$(BIN)/nbdev_clean

bench: install
	$(BIN)/python benchmarks/moe_layer.py

readme: install
	$(BIN)/moebook readme
