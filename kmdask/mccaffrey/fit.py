"""The seed-compatible "mccaffrey" mode: the original K-Means++ MNIST demo, bit for bit.

What it reproduces is described in ``docs/original-demo.md``: one .NET ``System.Random(seed)``
shared by all trials, roulette-wheel k-means++ seeding, the Lloyd loop with its stopping rules
(including the stale means kept when ``max_iter`` is reached), and the best trial by strictly
lower WCSS.

How it runs on dask without changing a single decision:

* Every trial consumes exactly K draws, so all draws are made up front and **all trials share
  every pass** over the data (one GEMM against every trial's means per row block).
* Chunks of rows live on the workers; every per-chunk result that decides something is exact
  (see :mod:`kmdask.mccaffrey.kernels`): argmins use the original's sequential distances where
  the GEMM screen is not conclusive, and cluster sums are exact in float64.
* Order-dependent float sums (ΣD², the roulette's running total, the WCSS) are computed as the
  original does, in row order: a chain of small tasks hands a per-trial carry from chunk to
  chunk, so the values never leave the workers and the result does not depend on chunking or
  on the number of workers.
"""

from __future__ import annotations

import math
import operator
import time
from dataclasses import dataclass

import numpy as np

from kmdask.errors import ConfigError, DataError, KmdaskError
from kmdask.mccaffrey import kernels as mk
from kmdask.mccaffrey import kernels_float as mf
from kmdask.mccaffrey.dotnet_random import DotNetRandom

__all__ = ["McCaffreyResult", "fit_mccaffrey", "mccaffrey_draws"]

DEFAULT_CHUNK_ROWS = 10_000


@dataclass(frozen=True, eq=False)
class McCaffreyResult:
    """Outcome of :func:`fit_mccaffrey` (the best trial, plus a summary of every trial).

    Attributes
    ----------
    centers : (K, d) float64 — the best trial's kept means (stale when it hit ``max_iter``).
    labels : (N,) int64 — its cluster of every row; cluster order = order the centres were drawn.
    wcss : float — its WCSS against ``centers``, summed in row order as the original does.
    best_trial : int — index of the best trial (strictly lowest WCSS, earliest on ties).
    trial_wcss : per-trial WCSS.
    trial_n_iter : per-trial number of accepted Lloyd iterations.
    trial_history : per-trial objective after initialisation and after each accepted iteration,
        each labelling against its own means (closed form; for curves, not bit-exact).
    init_rows : (T, K) int64 — the data rows drawn as initial centres.
    n_rechecked : int — (row, trial) argmin decisions re-done with exact distances.
    timings : wall seconds of the phases ``load``, ``seeding``, ``lloyd``, ``wcss``, and
        ``lloyd_passes`` (the number of passes over the data the Lloyd phase made).
    """

    centers: np.ndarray
    labels: np.ndarray
    wcss: float
    best_trial: int
    trial_wcss: tuple[float, ...]
    trial_n_iter: tuple[int, ...]
    trial_history: tuple[tuple[float, ...], ...]
    init_rows: np.ndarray
    n_rechecked: int
    timings: dict[str, float]

    @property
    def counts(self) -> np.ndarray:
        """Cluster sizes in cluster order (the numbers the original prints)."""
        return np.bincount(self.labels, minlength=self.centers.shape[0])


def mccaffrey_draws(seed: int, n_rows: int, n_clusters: int, n_init: int):
    """Every draw of a run, in the original's order: per trial ``Next(0, N)`` then K-1 doubles.

    Returns
    -------
    first : (T,) int64 — the row of each trial's centre 0.
    p : (T, K-1) float64 — the roulette thresholds of centres 1..K-1.
    """
    rnd = DotNetRandom(seed)
    first = np.empty(n_init, dtype=np.int64)
    p = np.empty((n_init, n_clusters - 1))
    for t in range(n_init):
        first[t] = rnd.next(0, n_rows)
        for j in range(n_clusters - 1):
            p[t, j] = rnd.next_double()
    return first, p


class _Exec:
    """Runs kernels in-process (``client is None``) or as dask tasks; same calls either way."""

    def __init__(self, client) -> None:
        self.client = client

    def submit(self, fn, *args):
        if self.client is None:
            return fn(*args)
        return self.client.submit(fn, *args, pure=False)

    def share(self, value):
        """A read-only argument used by many tasks: sent to the cluster once."""
        if self.client is None:
            return value
        return self.client.scatter(value, hash=False)

    def gather(self, items):
        return items if self.client is None else self.client.gather(items)

    def wait(self, items) -> None:
        if self.client is not None:
            from distributed import wait

            wait(items)


def _load(X, ex: _Exec, chunk_rows: int | None):
    """Validate the rows and place them, as prepared chunks, where the kernels run."""
    try:
        import dask.array as da
    except ImportError:  # pragma: no cover - dask is a dependency
        da = None
    is_dask = da is not None and isinstance(X, da.Array)
    if not is_dask:
        X = np.asarray(X)
    if X.ndim != 2 or X.shape[0] < 1 or X.shape[1] < 1:
        raise DataError(f"mccaffrey mode needs a 2-D (rows, pixels) array, got shape {X.shape}")
    if X.dtype not in (np.uint8, np.float64):
        raise DataError(f"mccaffrey mode needs uint8 pixel rows or float64 rows, got dtype "
                        f"{X.dtype}")
    kern = mk if X.dtype == np.uint8 else mf
    if is_dask:
        if any(math.isnan(c) for c in X.chunks[0]):
            X = X.compute_chunk_sizes()
        X = X.rechunk({1: -1})  # whole rows per chunk
        sizes = [int(c) for c in X.chunks[0]]
        blocks = list(X.to_delayed()[:, 0])
        if ex.client is None:
            import dask

            raw = list(dask.compute(*blocks))
        else:
            raw = ex.client.compute(blocks)
    else:
        if chunk_rows is None:  # on a cluster, at least two chunks per worker
            n_workers = 1 if ex.client is None else len(ex.client.scheduler_info()["workers"])
            chunk_rows = min(DEFAULT_CHUNK_ROWS, -(-X.shape[0] // (2 * max(n_workers, 1))))
        if chunk_rows < 1:
            raise ConfigError(f"chunk_rows must be >= 1, got {chunk_rows}")
        sizes = [min(chunk_rows, X.shape[0] - s) for s in range(0, X.shape[0], chunk_rows)]
        raw = [X[s : s + chunk_rows] for s in range(0, X.shape[0], chunk_rows)]
        if ex.client is not None:
            raw = ex.client.scatter(raw, hash=False)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    parts = [ex.submit(kern.prepare_chunk, r, int(o))
             for r, o in zip(raw, offsets, strict=True)]
    return (kern, parts, offsets, np.asarray(sizes, dtype=np.int64), int(X.shape[0]),
            int(X.shape[1]))


def _rows(ex: _Exec, kern, parts, offsets, rows: np.ndarray, d: int) -> np.ndarray:
    """Fetch global rows (float64 pixels) from the chunks that hold them."""
    owner = np.searchsorted(offsets, rows, side="right") - 1
    out = np.empty((rows.shape[0], d))
    futs = {c: ex.submit(kern.take_rows, parts[c], rows[owner == c] - offsets[c])
            for c in np.unique(owner).tolist()}
    got = dict(zip(futs, ex.gather(list(futs.values())), strict=True))
    for c, vals in got.items():
        out[owner == c] = vals
    return out


def _objective(sums: np.ndarray, counts: np.ndarray, q_total: float) -> float:
    """Σ_i |x_i - mean(L_i)|² = Σ|x|² - Σ_k |S_k|²/n_k for a labelling against its own means."""
    return float(q_total - np.sum(np.einsum("kd,kd->k", sums, sums) / counts))


def _row_order_sums(ex: _Exec, parts, labels, shape: tuple[int, ...]) -> np.ndarray:
    """float64 rows: per-cluster sums accumulated row by row, a carry chained over chunks."""
    carry = np.zeros(shape)
    for pt, lab in zip(parts, labels, strict=True):
        carry = ex.submit(mf.accumulate, pt, lab, carry)
    return np.asarray(ex.gather(carry))


def fit_mccaffrey(X, n_clusters: int, max_iter: int, n_init: int, seed: int = 0, *,
                  client=None, chunk_rows: int | None = None) -> McCaffreyResult:
    """Cluster rows exactly as the original McCaffrey K-Means++ demo does.

    Parameters
    ----------
    X : (N, d) uint8 or float64 numpy array, or dask array of such rows (chunked by rows)
        uint8 pixel ``b`` is used as ``float32(b / 255)`` widened to float64 (the original's
        images, bit for bit); float64 values (e.g. error-case vectors) are used as they are,
        with the original's arithmetic: feature-order distances, row-order cluster sums.
    n_clusters : int
        K.
    max_iter : int
        The original's ``maxIter`` (>= 1).
    n_init : int
        Number of trials T; they share one generator, in order.
    seed : int
        Seed of the .NET ``System.Random`` (the original uses 0).
    client : distributed.Client, optional
        Run the per-chunk kernels on this cluster; in-process when None. The result is
        bit-identical either way and for any chunking.
    chunk_rows : int, optional
        Rows per chunk when ``X`` is a numpy array; by default 10,000, or fewer on a cluster
        so that every worker gets at least two chunks. Results do not depend on it.

    Returns
    -------
    McCaffreyResult

    Raises
    ------
    ConfigError
        Bad K, iterations, trials or seed.
    DataError
        ``X`` is not a 2-D uint8 or float64 array, or holds NaN/infinity.
    KmdaskError
        A trial's initial assignment leaves a cluster empty (an error in the original too).
    """
    for name, v, lo in (("n_clusters", n_clusters, 1), ("max_iter", max_iter, 1),
                        ("n_init", n_init, 1)):
        if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < lo:
            raise ConfigError(f"mccaffrey mode: {name} must be an integer >= {lo}, got {v!r}")
    if not -(2**31) <= int(seed) < 2**31:
        raise ConfigError(f"mccaffrey mode: seed must be a 32-bit signed int, got {seed!r}")
    K, T = int(n_clusters), int(n_init)
    ex = _Exec(client)
    clock = [time.perf_counter()]
    kern, parts, offsets, sizes, N, d = _load(X, ex, chunk_rows)
    exact_sums = kern is mk  # uint8 pixels: sums exact in any order, so chunks sum in parallel
    if K > N:
        raise ConfigError(f"mccaffrey mode: n_clusters={K} exceeds the {N} rows")
    first, p = mccaffrey_draws(int(seed), N, K, T)

    # --- seeding: one pass per centre, every trial at once -----------------------------------
    ex.wait(parts)  # so that "load" times the data placement
    clock.append(time.perf_counter())
    init_rows = np.empty((T, K), dtype=np.int64)
    init_rows[:, 0] = first
    centres = _rows(ex, kern, parts, offsets, first, d)
    states = [None] * len(parts)
    for j in range(1, K):
        c_f = ex.share(centres)
        states = [ex.submit(kern.init_update, pt, c_f, st, j - 1)
                  for pt, st in zip(parts, states, strict=True)]
        total = np.zeros(T)
        for st in states:  # ΣD² in row order: a carry handed from chunk to chunk
            total = ex.submit(mk.d2_sum, st, total)
        carry = (np.zeros(T), np.full(T, -1, dtype=np.int64))
        for st, off in zip(states, offsets, strict=True):
            carry = ex.submit(mk.roulette_step, st, int(off), total, p[:, j - 1].copy(), carry)
        found = np.asarray(ex.gather(carry)[1]).copy()
        found[found < 0] = N - 1  # the running total never exceeded p: the last row
        init_rows[:, j] = found
        centres = _rows(ex, kern, parts, offsets, found, d)
    c_f = ex.share(centres)
    states = [ex.submit(kern.init_update, pt, c_f, st, K - 1)
              for pt, st in zip(parts, states, strict=True)]
    if exact_sums:
        got = ex.gather([ex.submit(mk.init_finish, pt, st, K)
                         for pt, st in zip(parts, states, strict=True)])
        labels = [g[0].copy() for g in got]  # per chunk, (T, n_c)
        sums = sum(g[1] for g in got)
        counts = sum(g[2] for g in got)
        get_counts = operator.attrgetter("byte_counts")
        byte_counts = sum(ex.gather([ex.submit(get_counts, pt) for pt in parts]))
        q_total = math.fsum(float(c) * v * v
                            for c, v in zip(byte_counts, mk.PIXEL, strict=True))
    else:
        labels = [np.asarray(a).copy() for a in
                  ex.gather([ex.submit(operator.itemgetter(1), st) for st in states])]
        counts = np.stack([np.bincount(np.concatenate([lab[t] for lab in labels]),
                                       minlength=K) for t in range(T)])
        sums = _row_order_sums(ex, parts, labels, (T, K, d))
        q_total = math.fsum(ex.gather([ex.submit(operator.attrgetter("sq_sum"), pt)
                                       for pt in parts]))
    for t in range(T):
        empty = np.flatnonzero(counts[t] == 0)
        if empty.size:
            raise KmdaskError(f"mccaffrey trial {t}: cluster {int(empty[0])} is empty after "
                              f"initialisation (initial rows {init_rows[t].tolist()})")

    # --- Lloyd: all running trials in one pass per iteration ---------------------------------
    clock.append(time.perf_counter())
    n_passes = 0
    means = sums / counts[:, :, None]
    history = [[_objective(sums[t], counts[t], q_total)] for t in range(T)]
    n_iter = np.zeros(T, dtype=np.int64)
    active = list(range(T))
    n_rechecked = 0
    while active:
        m_f = ex.share(np.ascontiguousarray(means[active]))
        if exact_sums:
            res = ex.gather([ex.submit(mk.lloyd_pass, pt, m_f) for pt in parts])
            new_sums = sum(r[1] for r in res)
            new_counts = sum(r[2] for r in res)
            n_rechecked += sum(int(r[3]) for r in res)
        else:  # labels in parallel, then the row-order sums chained over the chunks
            futs = [ex.submit(mf.lloyd_pass, pt, m_f) for pt in parts]
            carry = np.zeros((len(active), K, d))
            for pt, fu in zip(parts, futs, strict=True):
                carry = ex.submit(mf.accumulate_pass, pt, fu, carry)
            res = ex.gather(futs)
            new_sums = np.asarray(ex.gather(carry))
            new_counts = sum(r[1] for r in res)
        n_passes += 1
        still = []
        for a, t in enumerate(active):
            changed = any(np.any(r[0][a] != lab[t]) for r, lab in zip(res, labels, strict=True))
            if not changed or np.any(new_counts[a] == 0):
                continue  # stop; keep the old labels and the means computed from them
            for r, lab in zip(res, labels, strict=True):
                lab[t] = r[0][a]
            n_iter[t] += 1
            history[t].append(_objective(new_sums[a], new_counts[a], q_total))
            if n_iter[t] >= max_iter:
                continue  # the original's quirk: the kept means are those of the old labels
            means[t] = new_sums[a] / new_counts[a][:, None]
            still.append(t)
        active = still

    # --- WCSS against the kept means, in row order; best trial -------------------------------
    clock.append(time.perf_counter())
    m_f = ex.share(means)
    vals = [ex.submit(kern.assigned_sq_dist, pt, m_f, lab)
            for pt, lab in zip(parts, labels, strict=True)]
    total = np.zeros(T)
    for v in vals:
        total = ex.submit(mk.row_sum, v, total)
    wcss = np.asarray(ex.gather(total))
    clock.append(time.perf_counter())
    best = 0
    for t in range(1, T):
        if wcss[t] < wcss[best]:  # strictly lower: the earliest trial wins ties
            best = t
    return McCaffreyResult(
        centers=means[best].copy(),
        labels=np.concatenate([lab[best] for lab in labels]).astype(np.int64),
        wcss=float(wcss[best]),
        best_trial=best,
        trial_wcss=tuple(float(w) for w in wcss),
        trial_n_iter=tuple(int(i) for i in n_iter),
        trial_history=tuple(tuple(h) for h in history),
        init_rows=init_rows,
        n_rechecked=n_rechecked,
        timings={**{k: round(b - a, 4) for k, a, b in zip(
            ("load", "seeding", "lloyd", "wcss"), clock[:-1], clock[1:], strict=True)},
            "lloyd_passes": n_passes},
    )
