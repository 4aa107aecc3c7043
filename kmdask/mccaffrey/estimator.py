"""The original demo's algorithm with the API of scikit-learn's ``KMeans``."""

from __future__ import annotations

import time
from numbers import Integral
from typing import Any

import dask.array as da
import numpy as np

from kmdask.engine.kernels import sq_dists
from kmdask.engine.params import ParamsMixin
from kmdask.errors import ConfigError, NotFittedError
from kmdask.mccaffrey.fit import fit_mccaffrey
from kmdask.mccaffrey.kernels import values


class McCaffreyKMeans(ParamsMixin):
    """The "McCaffrey K-Means++ visualized on MNIST" demo's clustering, bit for bit.

    One .NET ``System.Random(random_state)`` shared by all trials in turn, roulette-wheel
    k-means++ seeding, the demo's Lloyd loop and stopping rules (a trial stops when no label
    changes or a cluster would empty, or after ``max_iter`` accepted iterations, keeping the
    means of the labels before the last reassignment), and the trial of strictly lowest WCSS.
    Its trials share every pass over the data. Unlike :class:`kmdask.KMeans` it has no
    tolerance, no k-means|| and no other seeding: those would not be the demo's algorithm.

    Parameters
    ----------
    n_clusters : int, default 8
        K.
    max_iter : int, default 20
        The demo's ``maxIter``.
    n_init : int, default 20
        Trials (the demo's ``trials``).
    random_state : int, default 0
        Seed of the .NET generator; 0 is the demo's (published counts are for seed 0). Unlike
        scikit-learn, None means 0: the algorithm is defined by its one seeded generator.
    chunk_rows : int or None
        Rows per chunk for a numpy ``X`` (results do not depend on it).

    Attributes
    ----------
    cluster_centers_ : ndarray of shape (n_clusters, n_features)
        The best trial's kept means (pixel values b as float32(b / 255), or float rows as
        they are), in the order the centres were drawn.
    labels_ : dask array of shape (n_samples,)
        Its cluster of every row.
    inertia_ : float
        Its WCSS, summed in row order as the demo does.
    n_iter_ : int
        Its accepted Lloyd iterations.
    n_features_in_ : int
        Features seen by ``fit``.
    best_trial_ : int
        Index of the kept trial (the earliest on ties).
    trial_inertia_ : list of float
        WCSS of every trial.
    inertia_history_ : list of float
        The kept trial's objective after seeding and after each accepted iteration.
    timings_ : dict
        Seconds per phase (load, seeding, lloyd, wcss) and the Lloyd passes made.
    """

    def __init__(self, n_clusters: int = 8, *, max_iter: int = 20, n_init: int = 20,
                 random_state: int | None = 0, chunk_rows: int | None = None):
        self.n_clusters = n_clusters
        self.max_iter = max_iter
        self.n_init = n_init
        self.random_state = random_state
        self.chunk_rows = chunk_rows

    def fit(self, X: Any, y: Any = None) -> McCaffreyKMeans:
        """Fit to the rows of ``X``: uint8 pixels or float64 values (dask or numpy array)."""
        if not isinstance(self.n_clusters, Integral):
            raise ConfigError(f"n_clusters must be an integer, got {self.n_clusters!r}")
        t0 = time.perf_counter()
        seed = 0 if self.random_state is None else int(self.random_state)
        r = fit_mccaffrey(X, self.n_clusters, self.max_iter, self.n_init, seed,
                          chunk_rows=self.chunk_rows)
        chunks = X.chunks[0] if isinstance(X, da.Array) else (len(r.labels),)
        self.cluster_centers_ = r.centers
        self.labels_ = da.from_array(np.asarray(r.labels, dtype=np.int32), chunks=chunks)
        self.inertia_ = r.wcss
        self.n_iter_ = int(r.trial_n_iter[r.best_trial])
        self.n_features_in_ = int(X.shape[1])
        self.best_trial_ = r.best_trial
        self.trial_inertia_ = list(r.trial_wcss)
        self.inertia_history_ = list(r.trial_history[r.best_trial])
        self.timings_ = {**r.timings, "total": time.perf_counter() - t0}
        return self

    def predict(self, X: Any) -> np.ndarray:
        """Nearest kept mean of each row (Euclidean, ties to the lowest index)."""
        if not hasattr(self, "cluster_centers_"):
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet: call fit(X) "
                                 "first")
        x = np.asarray(X.compute() if isinstance(X, da.Array) else X)
        if x.ndim != 2 or x.shape[1] != self.n_features_in_:
            raise ConfigError(f"X must have {self.n_features_in_} features, got shape {x.shape}")
        return np.concatenate([np.argmin(sq_dists(values(x[s : s + 10_000]),
                                                  self.cluster_centers_), axis=1)
                               for s in range(0, x.shape[0], 10_000)])

    def fit_predict(self, X: Any, y: Any = None) -> np.ndarray:
        """``fit(X)``, then its labels as a numpy array."""
        return np.asarray(self.fit(X).labels_.compute())
