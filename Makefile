# kmdask — every target is a thin wrapper over the `kmdask` CLI, run from a local virtualenv.
# `make sweep` and `make test` bootstrap .venv from nothing (python3 >= 3.11 and pip needed).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
KMDASK := $(VENV)/bin/kmdask
STAMP  := $(VENV)/.kmdask-installed
PROFILE ?= local
PYTEST_ARGS ?=

.PHONY: help venv stage sweep test lint bench clean

help:
	@echo "make sweep   bootstrap .venv, stage MNIST, run the sweep on a LocalCluster, write the report"
	@echo "make test    bootstrap .venv and run the test suite (pytest)"
	@echo "make stage   stage MNIST into data/mnist.zarr"
	@echo "make lint    ruff"
	@echo "make bench   benchmarks vs scikit-learn and dask-ml (bench/results.json, bench/results.md)"
	@echo "make clean   remove .venv, data/, runs/, report/ and caches"

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,bench,hpc,dev]'
	@touch $@

stage: $(STAMP)
	$(KMDASK) stage --dataset mnist

sweep: $(STAMP)
	$(KMDASK) stage --dataset mnist
	$(KMDASK) sweep --profile $(PROFILE)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(KMDASK) stage --dataset mnist -q
	$(KMDASK) stage --dataset mnist --augment 16 -q
	$(PY) -m kmdask.bench --store data/mnist.zarr --big-store data/mnist-aug16.zarr

clean:
	rm -rf $(VENV) data runs report bench/results.json bench/results.md .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
