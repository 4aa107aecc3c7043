"""Benchmarks: ``python -m kmdask.bench`` (``make bench``) runs :mod:`kmdask.bench.peers`, kmdask
against scikit-learn, scikit-learn-intelex, faiss-cpu, dask-ml and Spark MLlib, each fit in its own
process; ``python -m kmdask.bench internal`` runs kmdask's own figures
(:mod:`kmdask.bench.internal`: per-iteration costs, streamed vs persisted, the fused sweep);
``python -m kmdask.bench mnist8m`` (``make bench-8m``) the streamed MNIST-8M fit against its
floor (:mod:`kmdask.bench.mnist8m`); ``python -m kmdask.bench scaling`` (``make bench-scaling``)
the 1.02M-row fit on 1, 2, 4, ... workers, with its parallel efficiency
(:mod:`kmdask.bench.scaling`)."""

from __future__ import annotations

import importlib
import statistics
import sys


def summary(values: list[float]) -> dict:
    """min, median, count and the values of repeated measurements (every bench table's cell)."""
    return {"min": min(values), "median": statistics.median(values), "n": len(values),
            "values": values}


#: ``python -m kmdask.bench NAME ...``: the module whose ``main`` runs NAME (else the peers)
SUBCOMMANDS = {"internal": "kmdask.bench.internal", "mnist8m": "kmdask.bench.mnist8m",
               "scaling": "kmdask.bench.scaling"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] and argv[0] in SUBCOMMANDS:
        return importlib.import_module(SUBCOMMANDS[argv[0]]).main(argv[1:])
    from kmdask.bench.peers import main as peers

    return peers(argv)
