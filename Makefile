# kmdask — every target is a thin wrapper over the `kmdask` CLI, run from a local virtualenv.
# `make sweep`, `make test` and `make bench` bootstrap .venv from nothing (python3 >= 3.11 and
# pip needed), each installing only what it needs: the runtime, + the test tools, + the peers.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
KMDASK := $(VENV)/bin/kmdask
PIP    := $(PY) -m pip install --quiet --disable-pip-version-check
PROFILE ?= local
PYTEST_ARGS ?=
# Test processes (pytest-xdist), a file each at a time, since a file's tests share fixtures and
# clusters: 2 took 333 s against 580 s for one (before its clusters were forked warm) on a
# 2-core machine; 3 were slower than 2 there. PYTEST_JOBS=0 runs one. Files go out in the
# order tests/conftest.py sets (heaviest first, so the run ends on small ones), not in
# xdist's default order (most tests first).
PYTEST_JOBS ?= 2

.PHONY: help venv stage sweep test lint bench bench-8m bench-scaling bench-storage clean

help:
	@echo "make sweep   bootstrap .venv (runtime only), stage MNIST, run the sweep on a LocalCluster, write the report"
	@echo "make test    bootstrap .venv with the test tools and run the test suite (pytest)"
	@echo "make stage   stage MNIST into data/mnist.zarr"
	@echo "make lint    ruff"
	@echo "make bench   benchmarks against the peers (bench/results.json, bench/results.md)"
	@echo "make bench-8m   MNIST-8M (stage --augment 134, 2.5 GB): streamed K=10 fit vs its floor"
	@echo "make bench-scaling   the 1.02M-row fit on WORKERS=\"1 2 4 8 16\" workers: parallel efficiency"
	@echo "make bench-storage   local store vs an S3 store on loopback (moto), store layers"
	@echo "make clean   remove .venv, data/, runs/, report/ and caches"

# One stamp per set of extras; each reinstalls when pyproject.toml changes.
# Installing also compiles the engine's numba kernels into their on-disk cache (~15 s, once
# per checkout), as a build step would, so that a first fit does not compile them.
$(VENV)/.stamp-runtime: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -e .
	$(PY) -c "from kmdask.batch.fitkinds import warm; warm()"
	@touch $@

$(VENV)/.stamp-test: $(VENV)/.stamp-runtime
	$(PIP) -e '.[test,hpc,dev]'
	@touch $@

$(VENV)/.stamp-bench: $(VENV)/.stamp-runtime
	$(PIP) -e '.[bench]'
	@touch $@

venv: $(VENV)/.stamp-runtime

stage: $(VENV)/.stamp-runtime
	$(KMDASK) stage --dataset mnist

sweep: $(VENV)/.stamp-runtime
	$(KMDASK) stage --dataset mnist
	$(KMDASK) sweep --profile $(PROFILE)

# The kernels are compiled into numba's on-disk cache first, once (about 23 s on a fresh
# clone, 2 s after): otherwise every test process and worker started meanwhile compiles them.
test: $(VENV)/.stamp-test
	$(PY) -c "from kmdask.batch.fitkinds import warm; warm()"
	$(PY) -m pytest -n $(PYTEST_JOBS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

lint: $(VENV)/.stamp-test
	$(VENV)/bin/ruff check .

# Spark MLlib needs a Java 17 runtime: installed from the system packages where `java` is missing
# (as .ci/run installs its apt packages); if that fails the bench says so and leaves Spark out.
bench: $(VENV)/.stamp-bench
	@command -v java >/dev/null || { apt-get update -qq && \
		apt-get install -y -qq openjdk-17-jre-headless >/dev/null; } || \
		echo "make bench: could not install openjdk-17-jre-headless; Spark MLlib will be left out"
	$(KMDASK) stage --dataset mnist -q
	$(KMDASK) stage --dataset mnist --augment 16 -q
	$(PY) -m kmdask.bench --store data/mnist.zarr --big-store data/mnist-aug16.zarr

# stages data/mnist-aug134.zarr (8.1M rows) when missing, timing it
bench-8m: $(VENV)/.stamp-bench
	$(PY) -m kmdask.bench mnist8m --store data/mnist-aug134.zarr

# a machine with as many cores as the largest worker count (the runs above it are marked
# oversubscribed); stages data/mnist-aug16.zarr when missing
WORKERS ?= 1 2 4 8 16
bench-scaling: $(VENV)/.stamp-runtime
	$(KMDASK) stage --dataset mnist --augment 16 -q
	$(PY) -m kmdask.bench scaling --store data/mnist-aug16.zarr --workers $(WORKERS)

bench-storage: $(VENV)/.stamp-bench
	$(PY) -m kmdask.bench_storage

clean:
	rm -rf $(VENV) data runs report bench/results.json bench/results.md bench/storage.json bench/storage.md bench/scaling.json bench/scaling.md .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
