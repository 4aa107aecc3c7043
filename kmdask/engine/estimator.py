"""scikit-learn style K-Means on dask arrays, and fused multi-K sweeps.

``KMeans(n_clusters=K, n_init=T)`` fits its T trials together (one pass over the data per
iteration for all of them); :func:`fit_sweep` does the same across several K. Trial ``t`` of any
K uses the seed derived from ``(random_state, t)``, so a sweep gives exactly the models that
fitting each K on its own gives. :func:`fit_models` is the common core.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from numbers import Integral
from typing import Any, Protocol

import dask.array as da
import numpy as np

from kmdask.engine import kernels
from kmdask.engine.executor import DEFAULT_CHUNK_ROWS, ChunkedRows
from kmdask.engine.lloyd import (
    Groups,
    ModelResult,
    ModelState,
    group_units,
    lloyd,
    pack_states,
    unpack_states,
)
from kmdask.engine.params import ParamsMixin
from kmdask.engine.seeding import kmeans_parallel, kmeans_plusplus
from kmdask.errors import ConfigError, NotFittedError

log = logging.getLogger(__name__)

_INITS = ("k-means||", "k-means++")


def trial_seeds(random_state: int | None, n_init: int) -> list[int]:
    """The seed of each trial: derived from (random_state, trial), independent of K."""
    if random_state is None:
        random_state = int(np.random.SeedSequence().generate_state(1)[0])
    ss = np.random.SeedSequence(int(random_state) & (2**63 - 1))
    return [int(c.generate_state(1, dtype=np.uint64)[0] >> 1) for c in ss.spawn(n_init)]


def check_rows(X: Any) -> Any:
    """``X`` checked as a 2-D array of numeric rows: a dask array, or a numpy array (lists
    and the like become one). uint8, float32 and float64 are kept; other numbers become
    float64."""
    if not isinstance(X, da.Array):
        X = np.asarray(X)
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
    also: list[list[ModelResult]] = field(default_factory=list)  # per extra row set

    def best(self, k: int) -> tuple[int, ModelResult]:
        """(trial, result) of the lowest-inertia trial for ``k`` (earliest trial wins ties)."""
        cands = [(r.inertia, t, r) for (kk, t), r in zip(self.models, self.results, strict=True)
                 if kk == k]
        inertia, t, r = min(cands, key=lambda c: (c[0], c[1]))
        return t, r


def _progress_logger(verbose: int) -> Callable[[dict], None] | None:
    """``verbose``: one log line per Lloyd iteration, shown on stderr even where the program
    set no logging up (asking for it is asking to see it)."""
    if not verbose:
        return None
    if not logging.getLogger("kmdask").handlers and not logging.getLogger().handlers:
        from kmdask import log as kmlog

        kmlog.setup(0)

    def show(p: dict) -> None:
        log.info("  iteration %4d: %3d model(s) running, best inertia %.6g, max shift %.3g, "
                 "%.0f ms", p["iteration"], p["models"], p["inertia"], p["shift"],
                 p["seconds"] * 1e3)

    return show


def _tolerances(stats: list, groups: list[list[int]], tol: float) -> list[float]:
    """``tol`` times the mean feature variance (scikit-learn's rule), per group of chunks."""
    out = []
    for chunks in groups:
        n = sum(stats[i][0] for i in chunks)
        s1 = np.sum([stats[i][1] for i in chunks], axis=0)
        s2 = np.sum([stats[i][2] for i in chunks], axis=0)
        var = np.maximum(s2 / n - (s1 / n) ** 2, 0.0)
        out.append(float(var.mean() * tol))
    return out


def fit_models(X, ks: Sequence[int], *, n_init: int = 1, init="k-means||", max_iter: int = 300,
               tol: float = 1e-4, random_state: int | None = None,
               oversampling_factor: float = 2.0, init_rounds: int = 5,
               persist: bool | str = "auto", verbose: int = 0,
               progress: Callable[[dict], None] | None = None,
               checkpoint: Checkpoint | None = None, divisor: float | None = None,
               also: Sequence[tuple[np.ndarray, Sequence[np.ndarray]]] = ()) -> FitResult:
    """Fit every (k in ks) x (trial in n_init) model with shared passes over ``X``.

    Parameters are those of :class:`KMeans` (``ks`` a list of ``n_clusters``); ``progress``
    receives a dict per Lloyd iteration; uint8 rows are divided by ``divisor`` (default 255).
    With a ``checkpoint``, the seeded centres and every Lloyd iteration's model states are saved,
    and a fit that finds a saved state resumes from it (ending bit-identical).
    ``also``: more row sets, each ``(rows, initial centres of its models)`` (rows of ``X``'s
    width and dtype, in memory), whose models are fitted to those rows alone in the same passes
    as ``X``'s (e.g. the gap statistic's reference sets); their results are ``FitResult.also``.

    Returns
    -------
    FitResult
    """
    X = check_rows(X)
    n, d = X.shape
    ks = [int(k) for k in ks]
    _check_params(ks, n, n_init, max_iter, tol, init, d, oversampling_factor, init_rounds)
    t0 = time.perf_counter()
    data = ChunkedRows(X, persist=persist, divisor=divisor, also=[a for a, _ in also])
    n_x = data.n_chunks - len(also)
    # One pass: feature variance (for tol, as scikit-learn) and a finiteness check.
    stats = data.map(kernels.chunk_stats)
    if not all(s[3] for s in stats):
        raise ConfigError("X contains NaN or infinity")
    big = kernels.float32_overflow(X.dtype, stats)
    if big is not None:  # float32 distances would be infinite: labels wrong, silently
        raise ConfigError(f"X is float32 with squared row norms up to {big:.3g}, beyond what "
                          f"float32 distances hold ({kernels.F32_MAX_SQ_NORM:.3g}): pass it "
                          "as float64")
    tols = _tolerances(stats, [list(range(n_x))] + [[n_x + j] for j in range(len(also))], tol)
    t_stats = time.perf_counter()

    seeds = trial_seeds(random_state, n_init)
    models = [(k, t) for k in ks for t in range(n_init)]
    specs = [(k, seeds[t]) for k, t in models]
    extra = [np.asarray(c, dtype=np.float64) for _, inits in also for c in inits]
    groups = Groups(tuple([0] * n_x + list(range(1, len(also) + 1))),
                    tuple([0] * len(models) + [j + 1 for j, (_, inits) in enumerate(also)
                                               for _ in inits]))
    saved = checkpoint.load() if checkpoint is not None else None
    if saved is not None and len(saved[1]) != len(groups.model):
        log.warning("checkpoint: %d saved model state(s) for %d models: starting afresh",
                    len(saved[1]), len(groups.model))
        saved = None
    save = None if checkpoint is None else (lambda st: checkpoint.save(*pack_states(st)))
    if saved is not None:
        states = unpack_states(*saved)
    else:
        x_only = data.head(n_x)  # X's models are seeded from X's rows alone
        if isinstance(init, str) and init == "k-means||":
            centres = kmeans_parallel(x_only, specs, oversampling_factor, init_rounds)
        elif isinstance(init, str) and init == "k-means++":
            centres = kmeans_plusplus(x_only, specs)
        else:
            centres = [np.asarray(init, dtype=np.float64)] * len(specs)
        data.passes += x_only.passes  # the seeding's passes count as the fit's
        states = [ModelState(centres=c.copy()) for c in [*centres, *extra]]
        if save is not None:
            save(states)
    t_init = time.perf_counter()
    progress = progress or _progress_logger(verbose)
    results = lloyd(data, states, max_iter=max_iter,
                    tol=[tols[g] for g in groups.model], progress=progress,
                    on_iteration=save, groups=groups, fixed=group_units(data, groups, stats))
    t_end = time.perf_counter()
    out = FitResult(
        models=models, results=results[: len(models)], chunks=tuple(data.row_chunks[:n_x]),
        n_passes=data.passes, persisted=data.persisted,
        timings={"prepare": t_stats - t0, "init": t_init - t_stats, "lloyd": t_end - t_init,
                 "total": t_end - t0},
    )
    out.also = _split(results[len(models):], [len(inits) for _, inits in also])
    data.release()
    return out


def _split(results: list, sizes: list[int]) -> list[list]:
    """``results`` cut into consecutive runs of the given sizes (one per row set)."""
    out, at = [], 0
    for n in sizes:
        out.append(results[at : at + n])
        at += n
    return out


def fit_sets(sets: Sequence[np.ndarray], inits: Sequence[Sequence[np.ndarray]], *,
             max_iter: int = 300, tol: float = 1e-4, divisor: float | None = None
             ) -> list[list[ModelResult]]:
    """Fit models to several row sets of one shape in the same passes: set ``b``'s models start
    from the centres ``inits[b]`` and are fitted to ``sets[b]`` alone, each as
    :func:`fit_models` would fit it from those centres (``tol`` relative to the set's own
    feature variance). Returns each set's results, in the order of its ``inits``."""
    shapes = {(s.shape, s.dtype) for s in sets}
    if len(shapes) != 1:
        raise ConfigError(f"fit_sets needs row sets of one shape and dtype, got {shapes}")
    data = ChunkedRows(np.concatenate(sets), chunk_rows=sets[0].shape[0], divisor=divisor)
    stats = data.map(kernels.chunk_stats)
    tols = _tolerances(stats, [[b] for b in range(len(sets))], tol)
    states = [ModelState(centres=np.asarray(c, dtype=np.float64).copy())
              for cs in inits for c in cs]
    groups = Groups(tuple(range(len(sets))), tuple(b for b, cs in enumerate(inits) for _ in cs))
    results = lloyd(data, states, max_iter=max_iter, tol=[tols[g] for g in groups.model],
                    groups=groups, fixed=group_units(data, groups, stats))
    data.release()
    return _split(results, [len(cs) for cs in inits])


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


def _blockwise(fn: Callable, X: Any, centres: np.ndarray, width: int | None) -> Any:
    """``fn`` over row blocks of ``X``: lazily for a dask array, at once for numpy."""
    if isinstance(X, da.Array):
        X = X.rechunk({1: -1})
        if width is None:
            return X.map_blocks(fn, centres, dtype=np.int32, drop_axis=1)
        return X.map_blocks(fn, centres, dtype=np.float64, chunks=(X.chunks[0], (width,)))
    return np.concatenate([fn(X[s : s + DEFAULT_CHUNK_ROWS], centres)
                           for s in range(0, X.shape[0], DEFAULT_CHUNK_ROWS)])


class KMeans(ParamsMixin):
    """K-Means++ on dask arrays, with the API of scikit-learn's ``KMeans``.

    The ``n_init`` trials are fitted together: every Lloyd pass over the data serves all of
    them. A fit is a pure function of (data, chunking, parameters, ``random_state``):
    bit-identical whatever the number of workers or threads. It runs on the distributed client
    in use (``distributed.Client``), else on dask's local scheduler.

    Parameters
    ----------
    n_clusters : int, default 8
        K.
    init : {"k-means||", "k-means++"} or array of shape (n_clusters, n_features)
        "k-means||": scalable k-means++ (Bahmani et al. 2012), ``init_rounds`` passes;
        "k-means++": exact D² sampling, one pass per centre; an array: these centres (then
        ``n_init`` is 1, with a warning if it was set higher).
    n_init : int, default 1
        Trials; the one of lowest inertia is kept.
    max_iter : int, default 300
        Lloyd iterations at most.
    tol : float, default 1e-4
        A trial stops when its squared centre shift is at most ``tol`` times the mean feature
        variance (scikit-learn's rule).
    random_state : int or None
        Seed of every random draw (None: fresh entropy).
    oversampling_factor : float, default 2.0
        k-means|| samples about ``oversampling_factor * n_clusters`` rows per round.
    init_rounds : int, default 5
        k-means|| rounds.
    persist : {True, False, "auto"}, default "auto"
        Hold the data in worker memory, or stream it from its source (e.g. zarr) every pass;
        "auto" persists when it fits half the workers' memory.
    verbose : int, default 0
        Log one line per Lloyd iteration.
    algorithm : {"lloyd"}, default "lloyd"
        Accepted for scikit-learn compatibility; passes use Elkan's bounds by themselves when
        they pay. The original demo's algorithm is :class:`kmdask.McCaffreyKMeans`.

    Attributes
    ----------
    cluster_centers_ : ndarray of shape (n_clusters, n_features)
        Centres, in the scaled units (uint8 pixels / 255; float rows as they are).
    labels_ : dask array of shape (n_samples,)
        Cluster of every row, for the final centres.
    inertia_ : float
        Sum of squared distances of the rows to their centres.
    n_iter_ : int
        Lloyd iterations the kept trial ran.
    n_features_in_ : int
        Features seen by ``fit``.
    inertia_history_ : list of float
        The kept trial's inertia at its initial centres, after each iteration, and at the end
        (``n_iter_ + 1`` values).
    shift_history_ : list of float
        Its squared centre shift per iteration.
    best_trial_ : int
        Index of the kept trial.
    trial_inertia_ : list of float
        Final inertia of every trial.
    n_passes_ : int
        Passes over the data the fit made.
    timings_ : dict
        Seconds spent preparing the data, seeding, in Lloyd, and in all.
    persisted_ : bool
        Whether the data was held in worker memory.

    Notes
    -----
    uint8 input is read as pixels / 255 (per block, never materialised as float).
    """

    def __init__(self, n_clusters: int = 8, *, init: Any = "k-means||", n_init: int = 1,
                 max_iter: int = 300, tol: float = 1e-4, random_state: int | None = None,
                 oversampling_factor: float = 2.0, init_rounds: int = 5,
                 persist: bool | str = "auto", verbose: int = 0, algorithm: str = "lloyd"):
        self.n_clusters = n_clusters
        self.init = init
        self.n_init = n_init
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state
        self.oversampling_factor = oversampling_factor
        self.init_rounds = init_rounds
        self.persist = persist
        self.verbose = verbose
        self.algorithm = algorithm

    def fit(self, X: Any, y: Any = None) -> KMeans:
        """Fit the model to the rows of ``X`` (dask or numpy array); ``y`` is ignored."""
        if not isinstance(self.n_clusters, Integral):
            raise ConfigError(f"n_clusters must be an integer, got {self.n_clusters!r}")
        if self.algorithm != "lloyd":
            raise ConfigError(f"unknown algorithm {self.algorithm!r}; expected 'lloyd' (the "
                              "original demo's algorithm is kmdask.McCaffreyKMeans)")
        X = check_rows(X)
        n_init = self.n_init
        if not isinstance(self.init, str) and n_init != 1:
            warnings.warn(f"explicit initial centres given: fitting one trial, not "
                          f"n_init={n_init}", RuntimeWarning, stacklevel=2)
            n_init = 1
        res = fit_models(X, [self.n_clusters], n_init=n_init, init=self.init,
                         max_iter=self.max_iter, tol=self.tol, random_state=self.random_state,
                         oversampling_factor=self.oversampling_factor,
                         init_rounds=self.init_rounds, persist=self.persist,
                         verbose=self.verbose)
        self._set_fitted(res, self.n_clusters, X)
        return self

    def _set_fitted(self, res: FitResult, k: int, X: Any) -> None:
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

    def _checked(self, X: Any) -> Any:
        if not hasattr(self, "cluster_centers_"):
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet: call fit(X) "
                                 "first")
        X = check_rows(X)
        if X.shape[1] != self.n_features_in_:
            raise ConfigError(f"X has {X.shape[1]} features, the model was fitted with "
                              f"{self.n_features_in_}")
        return X

    def predict(self, X: Any) -> Any:
        """Index of the nearest centre of each row (a dask array for dask input, else numpy)."""
        return _blockwise(_predict_block, self._checked(X), self.cluster_centers_, None)

    def fit_predict(self, X: Any, y: Any = None) -> Any:
        """``fit(X)``, then its ``labels_`` (computed for numpy input)."""
        self.fit(X)
        return self.labels_ if isinstance(X, da.Array) else self.labels_.compute()

    def transform(self, X: Any) -> Any:
        """Euclidean distance of each row to each centre, shape (n, n_clusters)."""
        return _blockwise(_transform_block, self._checked(X), self.cluster_centers_,
                          self.cluster_centers_.shape[0])

    def score(self, X: Any, y: Any = None) -> float:
        """Opposite of the inertia of ``X`` for the fitted centres (higher is better)."""
        d2 = self.transform(X).min(axis=1) ** 2
        return -float(d2.sum().compute() if isinstance(d2, da.Array) else d2.sum())


@dataclass
class SweepResult:
    """Best model per K of a fused sweep (``models[k]`` is a fitted :class:`KMeans`)."""

    models: dict[int, KMeans]
    fit: FitResult


def fit_sweep(X: Any, n_clusters: Sequence[int] = tuple(range(2, 11)), *, n_init: int = 1,
              init: str = "k-means||", max_iter: int = 300, tol: float = 1e-4,
              random_state: int | None = None, oversampling_factor: float = 2.0,
              init_rounds: int = 5, persist: bool | str = "auto", verbose: int = 0,
              progress: Callable[[dict], None] | None = None) -> SweepResult:
    """Fit every K in ``n_clusters`` x ``n_init`` trials with one pass per iteration.

    Models drop out of the pass as they converge. Returns the best trial of each K as a
    fitted :class:`KMeans`, equal to ``KMeans(K, n_init=n_init, random_state=...)`` on its own.
    Parameters are those of :class:`KMeans`.
    """
    if not isinstance(init, str):
        raise ConfigError("fit_sweep needs init='k-means||' or 'k-means++', not fixed centres")
    X = check_rows(X)
    ks = sorted({int(k) for k in n_clusters})
    res = fit_models(X, ks, n_init=n_init, init=init, max_iter=max_iter, tol=tol,
                     random_state=random_state, oversampling_factor=oversampling_factor,
                     init_rounds=init_rounds, persist=persist, verbose=verbose,
                     progress=progress)
    models = {}
    for k in ks:
        km = KMeans(k, init=init, n_init=n_init, max_iter=max_iter, tol=tol,
                    random_state=random_state, oversampling_factor=oversampling_factor,
                    init_rounds=init_rounds, persist=persist)
        km._set_fitted(res, k, X)
        models[k] = km
    return SweepResult(models=models, fit=res)
