"""scikit-learn style K-Means on dask arrays, and fused multi-K sweeps.

``KMeans(n_clusters=K, n_init=T)`` fits its T trials together (one pass over the data per
iteration for all of them); :func:`fit_sweep` does the same across several K. Trial ``t`` of any
K uses the seed derived from ``(random_state, t)``, so a sweep gives exactly the models that
fitting each K on its own gives.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from numbers import Integral
from typing import Protocol

import dask.array as da
import numpy as np

from kmdask.engine import kernels
from kmdask.engine.executor import ChunkedRows
from kmdask.engine.lloyd import ModelResult, ModelState, lloyd, pack_states, unpack_states
from kmdask.engine.seeding import kmeans_parallel, kmeans_plusplus
from kmdask.errors import ConfigError

_INITS = ("k-means||", "k-means++")
DEFAULT_CHUNK_ROWS = 10_000


def trial_seeds(random_state: int | None, n_init: int) -> list[int]:
    """The seed of each trial: derived from (random_state, trial), independent of K."""
    if random_state is None:
        random_state = int(np.random.SeedSequence().generate_state(1)[0])
    ss = np.random.SeedSequence(int(random_state) & (2**63 - 1))
    return [int(c.generate_state(1, dtype=np.uint64)[0] >> 1) for c in ss.spawn(n_init)]


def as_dask(X, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> da.Array:
    """Validate ``X`` as a 2-D array of rows and return it as a row-chunked dask array."""
    if not isinstance(X, da.Array):
        X = np.asarray(X)
        if X.ndim == 2:
            X = da.from_array(X, chunks=(min(chunk_rows, max(X.shape[0], 1)), X.shape[1]))
    if X.ndim != 2:
        raise ConfigError(f"X must be 2-D (rows x features), got ndim={X.ndim}")
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise ConfigError(f"X must have at least one row and one feature, got shape {X.shape}")
    if X.dtype not in (np.uint8, np.float32, np.float64):
        if X.dtype.kind not in "biuf":
            raise ConfigError(f"X must be numeric, got dtype {X.dtype}")
        X = X.astype(np.float64)
    return X


class Checkpoint(Protocol):
    """Where :func:`fit_models` keeps its model states between iterations: as named arrays and
    JSON-ready records (:func:`kmdask.engine.lloyd.pack_states`)."""

    def load(self) -> tuple[dict[str, np.ndarray], list[dict]] | None: ...

    def save(self, arrays: dict[str, np.ndarray], records: list[dict]) -> None: ...


@dataclass
class FitResult:
    """Everything a fit of one or more models produced (see :func:`fit_models`)."""

    models: list[tuple[int, int]]  # (k, trial) per model
    results: list[ModelResult]
    chunks: tuple[int, ...]
    n_passes: int
    timings: dict[str, float] = field(default_factory=dict)
    persisted: bool = False

    def best(self, k: int) -> tuple[int, ModelResult]:
        """(trial, result) of the lowest-inertia trial for ``k`` (earliest trial wins ties)."""
        cands = [(r.inertia, t, r) for (kk, t), r in zip(self.models, self.results, strict=True)
                 if kk == k]
        inertia, t, r = min(cands, key=lambda c: (c[0], c[1]))
        return t, r


def _progress_printer(verbose: int) -> Callable[[dict], None] | None:
    if not verbose:
        return None

    def show(p: dict) -> None:
        print(f"  iteration {p['iteration']:4d}: {p['models']:3d} model(s) running, "
              f"best inertia {p['inertia']:.6g}, max shift {p['shift']:.3g}, "
              f"{p['seconds'] * 1e3:.0f} ms", file=sys.stderr, flush=True)

    return show


def fit_models(X, ks: Sequence[int], *, n_init: int = 1, init="k-means||", max_iter: int = 300,
               tol: float = 1e-4, random_state: int | None = None,
               oversampling_factor: float = 2.0, init_rounds: int = 5,
               persist: bool | str = "auto", verbose: int = 0,
               progress: Callable[[dict], None] | None = None,
               checkpoint: Checkpoint | None = None) -> FitResult:
    """Fit every (k in ks) x (trial in n_init) model with shared passes over ``X``.

    With a ``checkpoint``, the seeded centres and every Lloyd iteration's model states are
    saved, and a fit that finds a saved state resumes from it (ending bit-identical).
    """
    X = as_dask(X)
    n, d = X.shape
    ks = [int(k) for k in ks]
    _check_params(ks, n, n_init, max_iter, tol, init, d, oversampling_factor, init_rounds)
    t0 = time.perf_counter()
    data = ChunkedRows(X, persist=persist)
    # One pass: feature variance (for tol, as scikit-learn) and a finiteness check.
    stats = data.map(kernels.chunk_stats)
    if not all(s[3] for s in stats):
        raise ConfigError("X contains NaN or infinity")
    s1 = np.sum([s[1] for s in stats], axis=0)
    s2 = np.sum([s[2] for s in stats], axis=0)
    var = np.maximum(s2 / n - (s1 / n) ** 2, 0.0)
    tol_abs = float(var.mean() * tol)
    t_stats = time.perf_counter()

    seeds = trial_seeds(random_state, n_init)
    models = [(k, t) for k in ks for t in range(n_init)]
    specs = [(k, seeds[t]) for k, t in models]
    saved = checkpoint.load() if checkpoint is not None else None
    save = None if checkpoint is None else (lambda st: checkpoint.save(*pack_states(st)))
    if saved is not None:
        states = unpack_states(*saved)
    else:
        if isinstance(init, str) and init == "k-means||":
            centres = kmeans_parallel(data, specs, oversampling_factor, init_rounds)
        elif isinstance(init, str) and init == "k-means++":
            centres = kmeans_plusplus(data, specs)
        else:
            centres = [np.asarray(init, dtype=np.float64)] * len(specs)
        states = [ModelState(centres=c.copy()) for c in centres]
        if save is not None:
            save(states)
    t_init = time.perf_counter()
    progress = progress or _progress_printer(verbose)
    results = lloyd(data, states, max_iter=max_iter, tol=tol_abs, progress=progress,
                    on_iteration=save)
    t_end = time.perf_counter()
    out = FitResult(
        models=models, results=results, chunks=X.chunks[0], n_passes=data.passes,
        persisted=data.persisted,
        timings={"prepare": t_stats - t0, "init": t_init - t_stats, "lloyd": t_end - t_init,
                 "total": t_end - t0},
    )
    data.release()
    return out


def _check_params(ks, n, n_init, max_iter, tol, init, d, oversampling, rounds) -> None:
    for k in ks:
        if k < 1:
            raise ConfigError(f"n_clusters must be >= 1, got {k}")
        if k > n:
            raise ConfigError(f"n_clusters={k} is larger than the number of rows ({n})")
    if not isinstance(n_init, Integral) or n_init < 1:
        raise ConfigError(f"n_init must be a positive integer, got {n_init!r}")
    if not isinstance(max_iter, Integral) or max_iter < 1:
        raise ConfigError(f"max_iter must be a positive integer, got {max_iter!r}")
    if not (tol >= 0):
        raise ConfigError(f"tol must be >= 0, got {tol!r}")
    if oversampling <= 0:
        raise ConfigError(f"oversampling_factor must be > 0, got {oversampling!r}")
    if not isinstance(rounds, Integral) or rounds < 1:
        raise ConfigError(f"init_rounds must be a positive integer, got {rounds!r}")
    if isinstance(init, str):
        if init not in _INITS:
            raise ConfigError(f"unknown init {init!r}; expected one of {', '.join(_INITS)} "
                              "or an array of centres")
    else:
        arr = np.asarray(init)
        if len(ks) != 1 or arr.shape != (ks[0], d):
            raise ConfigError(f"init centres must have shape ({ks[0]}, {d}), got {arr.shape}")
        if not np.isfinite(arr).all():
            raise ConfigError("init centres contain NaN or infinity")


def _labels_array(labels: list[np.ndarray], chunks: tuple[int, ...]) -> da.Array:
    return da.concatenate([da.from_array(lab, chunks=(c,)) for lab, c in
                           zip(labels, chunks, strict=True)])


def _predict_block(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    chunk = kernels.prepare_chunk(x, kernels.scale_for(x.dtype), 0, 0)
    starts, stops = kernels.stack_bounds([centres.shape[0]])
    c = centres.astype(kernels.compute_dtype(x.dtype))
    return kernels.assign(chunk, c, starts, stops, kernels.MODE_ASSIGN).labels[0]


def _transform_block(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    xs = kernels.to_compute(x, kernels.scale_for(x.dtype)).astype(np.float64)
    return np.sqrt(kernels.sq_dists(xs, centres))


class KMeans:
    """K-Means++ on dask arrays (scikit-learn API).

    Parameters
    ----------
    n_clusters : int
    init : "k-means||" (scalable, Bahmani et al.), "k-means++" (exact D² sampling, one pass
        per centre) or an array of shape (n_clusters, n_features).
    n_init : int — trials, fitted together; the lowest inertia is kept.
    max_iter, tol : as scikit-learn (tol is relative to the mean feature variance).
    random_state : int or None.
    oversampling_factor, init_rounds : k-means|| oversampling l = factor * K and rounds.
    persist : True, False or "auto" — hold the data in worker memory, or stream it from its
        source (e.g. zarr) every pass; "auto" persists when it fits half the workers' memory.
    verbose : print one line per Lloyd iteration to stderr.
    algorithm : "lloyd" (kmdask's engine, the default) or "mccaffrey" (the original demo's
        algorithm, bit for bit: .NET Random(random_state) shared by the trials, roulette-wheel
        k-means++, its Lloyd loop and stopping rules; needs uint8 pixel rows; ``init``, ``tol``
        and the k-means|| options do not apply).

    uint8 input is read as pixels / 255 (per block, never materialised as float);
    ``cluster_centers_`` are then in that [0, 1] scale.
    """

    def __init__(self, n_clusters: int = 8, *, init="k-means||", n_init: int = 1,
                 max_iter: int = 300, tol: float = 1e-4, random_state: int | None = None,
                 oversampling_factor: float = 2.0, init_rounds: int = 5,
                 persist: bool | str = "auto", verbose: int = 0, algorithm: str = "lloyd"):
        self.n_clusters = n_clusters
        self.algorithm = algorithm
        self.init = init
        self.n_init = n_init
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state
        self.oversampling_factor = oversampling_factor
        self.init_rounds = init_rounds
        self.persist = persist
        self.verbose = verbose

    def fit(self, X, y=None) -> KMeans:
        if not isinstance(self.n_clusters, Integral):
            raise ConfigError(f"n_clusters must be an integer, got {self.n_clusters!r}")
        Xd = as_dask(X)
        if self.algorithm == "mccaffrey":
            return self._fit_mccaffrey(Xd)
        if self.algorithm != "lloyd":
            raise ConfigError(f"unknown algorithm {self.algorithm!r}; expected 'lloyd' or "
                              "'mccaffrey'")
        n_init = self.n_init if isinstance(self.init, str) else 1
        res = fit_models(Xd, [self.n_clusters], n_init=n_init, init=self.init,
                         max_iter=self.max_iter, tol=self.tol, random_state=self.random_state,
                         oversampling_factor=self.oversampling_factor,
                         init_rounds=self.init_rounds, persist=self.persist,
                         verbose=self.verbose)
        self._set_fitted(res, self.n_clusters, Xd)
        return self

    def _fit_mccaffrey(self, X: da.Array) -> KMeans:
        from kmdask.engine.executor import _current_client
        from kmdask.mccaffrey.fit import fit_mccaffrey

        if X.dtype != np.uint8:
            raise ConfigError(f"algorithm='mccaffrey' needs uint8 pixel rows, got {X.dtype}")
        _check_params([self.n_clusters], X.shape[0], self.n_init, self.max_iter, 0.0,
                      "k-means++", X.shape[1], 1.0, 1)
        t0 = time.perf_counter()
        seed = 0 if self.random_state is None else int(self.random_state)
        r = fit_mccaffrey(X, self.n_clusters, self.max_iter, self.n_init, seed,
                          client=_current_client())
        self.cluster_centers_ = r.centers
        self.labels_ = da.from_array(np.asarray(r.labels, dtype=np.int32), chunks=X.chunks[0])
        self.inertia_ = r.wcss
        self.n_iter_ = int(r.trial_n_iter[r.best_trial])
        self.inertia_history_ = list(r.trial_history[r.best_trial])
        self.shift_history_ = []
        self.n_features_in_ = X.shape[1]
        self.best_trial_ = r.best_trial
        self.trial_inertia_ = list(r.trial_wcss)
        self.n_passes_ = None
        self.timings_ = {"total": time.perf_counter() - t0}
        self.persisted_ = None
        return self

    def _set_fitted(self, res: FitResult, k: int, X: da.Array) -> None:
        trial, best = res.best(k)
        out_dtype = np.float64 if X.dtype == np.uint8 else X.dtype
        self.cluster_centers_ = best.centres.astype(out_dtype)
        self.labels_ = _labels_array(best.labels, res.chunks)
        self.inertia_ = best.inertia
        self.n_iter_ = best.n_iter
        self.inertia_history_ = list(best.inertia_history)
        self.shift_history_ = list(best.shift_history)
        self.n_features_in_ = X.shape[1]
        self.best_trial_ = trial
        self.trial_inertia_ = [r.inertia for (kk, _), r in zip(res.models, res.results,
                                                                 strict=True) if kk == k]
        self.n_passes_ = res.n_passes
        self.timings_ = dict(res.timings)
        self.persisted_ = res.persisted

    def _check_fitted(self, X):
        if not hasattr(self, "cluster_centers_"):
            raise ConfigError("this KMeans is not fitted yet: call fit(X) first")
        Xd = as_dask(X)
        if Xd.shape[1] != self.n_features_in_:
            raise ConfigError(f"X has {Xd.shape[1]} features, the model was fitted with "
                              f"{self.n_features_in_}")
        return Xd.rechunk({1: -1})

    def predict(self, X):
        """Index of the nearest centre of each row (dask array; numpy for numpy input)."""
        Xd = self._check_fitted(X)
        out = Xd.map_blocks(_predict_block, self.cluster_centers_, dtype=np.int32, drop_axis=1)
        return out if isinstance(X, da.Array) else out.compute()

    def fit_predict(self, X, y=None):
        self.fit(X)
        return self.labels_ if isinstance(X, da.Array) else self.labels_.compute()

    def transform(self, X):
        """Euclidean distance of each row to each centre, shape (n, n_clusters)."""
        Xd = self._check_fitted(X)
        k = self.cluster_centers_.shape[0]
        out = Xd.map_blocks(_transform_block, self.cluster_centers_, dtype=np.float64,
                            chunks=(Xd.chunks[0], (k,)))
        return out if isinstance(X, da.Array) else out.compute()

    def score(self, X, y=None) -> float:
        """Opposite of the inertia of X for the fitted centres."""
        d = self.transform(X)
        d = d if isinstance(d, np.ndarray) else d
        return -float((d.min(axis=1) ** 2).sum().compute() if isinstance(d, da.Array)
                      else (d.min(axis=1) ** 2).sum())


@dataclass
class SweepResult:
    """Best model per K of a fused sweep (``models[k]`` is a fitted :class:`KMeans`)."""

    models: dict[int, KMeans]
    fit: FitResult


def fit_sweep(X, n_clusters: Sequence[int] = tuple(range(2, 11)), *, n_init: int = 1,
              init="k-means||", max_iter: int = 300, tol: float = 1e-4,
              random_state: int | None = None, oversampling_factor: float = 2.0,
              init_rounds: int = 5, persist: bool | str = "auto", verbose: int = 0,
              progress: Callable[[dict], None] | None = None) -> SweepResult:
    """Fit every K in ``n_clusters`` x ``n_init`` trials with one pass per iteration.

    Models drop out of the pass as they converge. Returns the best trial of each K as a
    fitted :class:`KMeans`, equal to ``KMeans(K, n_init=n_init, random_state=...)`` on its own.
    """
    if isinstance(init, np.ndarray):
        raise ConfigError("fit_sweep needs init='k-means||' or 'k-means++', not fixed centres")
    Xd = as_dask(X)
    ks = sorted({int(k) for k in n_clusters})
    res = fit_models(Xd, ks, n_init=n_init, init=init, max_iter=max_iter, tol=tol,
                     random_state=random_state, oversampling_factor=oversampling_factor,
                     init_rounds=init_rounds, persist=persist, verbose=verbose,
                     progress=progress)
    models = {}
    for k in ks:
        km = KMeans(k, init=init, n_init=n_init, max_iter=max_iter, tol=tol,
                    random_state=random_state, oversampling_factor=oversampling_factor,
                    init_rounds=init_rounds, persist=persist)
        km._set_fitted(res, k, Xd)
        models[k] = km
    return SweepResult(models=models, fit=res)
