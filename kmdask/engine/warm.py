"""Warming a process for kmdask's fits: import the engine and load every compiled kernel
once, so that the first fit on a fresh worker does not pay for it.

numba loads each kernel from its on-disk cache at first call, and the first load in a process
also initialises numba's compiler (~0.25 s); over the kernels a fit calls that is about a
second per worker process, before its first pass. :func:`warm` pays it ahead of time by running
tiny fits of each kind (uint8 pixels, float32 and float64 rows, the original's algorithm)
in-process, without a cluster. :mod:`kmdask.engine.preload` runs it when imported, which is how
LocalCluster's worker processes get it for free (see :mod:`kmdask.batch.cluster`).
"""

from __future__ import annotations

import numpy as np


def warm() -> None:
    """Run tiny fits of every data kind and algorithm in this process (about a second)."""
    from kmdask.engine.estimator import fit_models
    from kmdask.mccaffrey.fit import fit_mccaffrey

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(64, 16), dtype=np.uint8)
    for x in (pixels, pixels.astype(np.float32) / 255, pixels.astype(np.float64) / 255):
        # k-means|| seeding and pruned incremental passes, as a real fit runs them
        fit_models(x, [2, 3], n_init=2, max_iter=4, tol=0.0, random_state=0)
    for x in (pixels, pixels.astype(np.float64) / 255):
        fit_mccaffrey(x, 2, max_iter=3, n_init=2, seed=0)
