"""The seed-compatible "mccaffrey" mode: the original K-Means++ MNIST demo, bit for bit.

What it reproduces is described in ``docs/original-demo.md``: one .NET ``System.Random(seed)``
shared by all trials, roulette-wheel k-means++ seeding, the Lloyd loop with its stopping rules
(including the stale means kept when ``max_iter`` is reached), and the best trial by strictly
lower WCSS.

How it runs on dask without changing a single decision:

* Every trial consumes exactly K draws, so all draws are made up front and **all trials share
  every pass** over the data.
* The rows are chunks of the engine's executor (:class:`kmdask.engine.executor.ChunkedRows`),
  which also gives the mode the engine's fault tolerance. Each chunk's state (its rows'
  nearest centres while seeding; their labels during Lloyd) stays on the worker next to it
  (``keep``); a pass sends only means and gets back counts, sums and "did a label change".
* Every per-chunk result that decides something is exact (see :mod:`kmdask.mccaffrey.kernels`).
  Order-dependent float sums (ΣD², the roulette's running total, the WCSS, and the cluster sums
  of float rows) are accumulated as the original does, in row order, by the executor's ordered
  fold, so the result does not depend on chunking or on the number of workers.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from kmdask.engine.executor import DEFAULT_CHUNK_ROWS, ChunkedRows
from kmdask.engine.waits import current_client
from kmdask.errors import ConfigError, DataError, KmdaskError
from kmdask.mccaffrey import kernels
from kmdask.mccaffrey.dotnet_random import DotNetRandom

__all__ = ["McCaffreyResult", "fit_mccaffrey", "mccaffrey_draws"]


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


# ---------------------------------------------------------------------------------------------
# What runs next to each chunk: pure functions of the chunk and its previous state


@dataclass(frozen=True)
class _Labels:
    """A chunk's Lloyd state: every trial's accepted labels, the last pass's candidates, and
    for pixels the per-cluster sums and counts of both (exact, so later passes move only the
    rows whose label changed)."""

    labels: np.ndarray  # (T, n) int16
    cand: np.ndarray | None = None  # (A, n) int16: the last pass's labels of trials ``trials``
    trials: np.ndarray | None = None  # (A,) int64
    sums: np.ndarray | None = None  # (T, K, d) pixels: sums of the accepted labels
    counts: np.ndarray | None = None  # (T, K)
    cand_sums: np.ndarray | None = None  # (A, K, d) pixels: sums of the candidates
    cand_counts: np.ndarray | None = None  # (A, K)

    def commit(self, accept: np.ndarray) -> _Labels:
        """The state with the candidates of the trials in ``accept`` taken (new arrays)."""
        if not len(accept):
            return self
        labels = self.labels.copy()
        sums = None if self.sums is None else self.sums.copy()
        counts = None if self.counts is None else self.counts.copy()
        pos = {int(t): a for a, t in enumerate(self.trials)}
        for t in accept:
            labels[t] = self.cand[pos[int(t)]]
            if sums is not None:
                sums[t] = self.cand_sums[pos[int(t)]]
                counts[t] = self.cand_counts[pos[int(t)]]
        return _Labels(labels, sums=sums, counts=counts)


def _seed(chunk, centres, j, state):
    return None, kernels.init_update(chunk, centres, state, j)


def _d2(chunk, carry, state):
    return kernels.d2_sum(state, carry)


def _roulette(chunk, carry, total, p, state):
    return kernels.roulette_step(state, chunk.offset, total, p, carry)


def _start(chunk, k, state):
    """The initial labels (nearest drawn centre) with their counts, and sums for pixels."""
    labels = state[1]
    if chunk.pixels:
        sums, counts = kernels.cluster_sums(chunk, labels, k)
        return (sums, counts), _Labels(labels, sums=sums, counts=counts)
    return (None, kernels.label_counts(labels, k)), _Labels(labels)


def _lloyd(chunk, means, trials, accept, state):
    """Take the accepted candidates, then the nearest means of the running trials."""
    state = state.commit(accept)
    cand, rechecked = kernels.nearest(chunk, means)
    changed = (cand != state.labels[trials]).any(axis=1)
    if chunk.pixels:  # exact sums: move the rows that changed cluster
        sums, counts = kernels.move_rows(chunk, state.labels[trials], cand,
                                         state.sums[trials], state.counts[trials])
    else:  # sums follow in row order (_cand_sums)
        sums, counts = None, kernels.label_counts(cand, means.shape[1])
    return (changed, sums, counts, rechecked), _Labels(
        state.labels, cand, trials, state.sums, state.counts, sums, counts)


def _init_sums(chunk, carry, state):
    return kernels.accumulate(chunk, state.labels, carry)


def _cand_sums(chunk, carry, state):
    return kernels.accumulate(chunk, state.cand, carry)


def _finish(chunk, means, accept, state):
    """The final labels and every row's squared distance to its mean, per trial."""
    labels = state.commit(accept).labels
    return None, (labels, kernels.assigned_sq_dist(chunk, means, labels))


def _wcss(chunk, carry, state):
    return kernels.row_sum(state[1], carry)


def _trial_labels(chunk, t, state):
    return state[0][t]


def _sq_stats(chunk):
    return chunk.byte_counts if chunk.pixels else chunk.sq_sum


# ---------------------------------------------------------------------------------------------
# The fit


def _load(X: Any, chunk_rows: int | None) -> ChunkedRows:
    """Validate the rows and place them, as prepared chunks, where the kernels run."""
    import dask.array as da

    is_dask = isinstance(X, da.Array)
    if not is_dask:
        X = np.asarray(X)
    if X.ndim != 2 or X.shape[0] < 1 or X.shape[1] < 1:
        raise DataError(f"mccaffrey mode needs a 2-D (rows, pixels) array, got shape {X.shape}")
    if X.dtype not in (np.uint8, np.float64):
        raise DataError(f"mccaffrey mode needs uint8 pixel rows or float64 rows, got dtype "
                        f"{X.dtype}")
    if is_dask:
        if any(math.isnan(c) for c in X.chunks[0]):
            X = X.compute_chunk_sizes()
    else:
        if chunk_rows is None:  # on a cluster, at least two chunks per worker
            client = current_client()
            n_workers = 1 if client is None else len(client.scheduler_info()["workers"])
            chunk_rows = min(DEFAULT_CHUNK_ROWS, -(-X.shape[0] // (2 * max(n_workers, 1))))
        if chunk_rows < 1:
            raise ConfigError(f"chunk_rows must be >= 1, got {chunk_rows}")
    return ChunkedRows(X, persist=True, prepare=kernels.prepare_chunk,
                       chunk_rows=chunk_rows or DEFAULT_CHUNK_ROWS)


def _objective(sums: np.ndarray, counts: np.ndarray, q_total: float) -> float:
    """Σ_i |x_i - mean(L_i)|² = Σ|x|² - Σ_k |S_k|²/n_k for a labelling against its own means."""
    return float(q_total - np.sum(np.einsum("kd,kd->k", sums, sums) / counts))


def _check(n_clusters: int, max_iter: int, n_init: int, seed: int) -> None:
    for name, v, lo in (("n_clusters", n_clusters, 1), ("max_iter", max_iter, 1),
                        ("n_init", n_init, 1)):
        if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < lo:
            raise ConfigError(f"mccaffrey mode: {name} must be an integer >= {lo}, got {v!r}")
    if not -(2**31) <= int(seed) < 2**31:
        raise ConfigError(f"mccaffrey mode: seed must be a 32-bit signed int, got {seed!r}")


def fit_mccaffrey(X: Any, n_clusters: int, max_iter: int, n_init: int, seed: int = 0, *,
                  client: Any = None, chunk_rows: int | None = None,
                  progress: Callable[[dict], None] | None = None) -> McCaffreyResult:
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
        Run on this cluster; by default on the current client, or in this process without one.
        The result is bit-identical either way and for any chunking.
    chunk_rows : int, optional
        Rows per chunk when ``X`` is a numpy array; by default 10,000, or fewer on a cluster
        so that every worker gets at least two chunks. Results do not depend on it.
    progress : callable, optional
        Called after every Lloyd pass with a dict: ``iteration`` (the pass), ``models`` (trials
        that ran in it), ``inertia`` (the lowest objective of a trial so far), ``seconds``.

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
    _check(n_clusters, max_iter, n_init, seed)
    with contextlib.nullcontext() if client is None else client.as_current():
        return _fit(X, int(n_clusters), int(max_iter), int(n_init), int(seed), chunk_rows,
                    progress)


def _fit(X: Any, K: int, max_iter: int, T: int, seed: int, chunk_rows: int | None,
         progress: Callable[[dict], None] | None) -> McCaffreyResult:
    clock = [time.perf_counter()]
    data = _load(X, chunk_rows)
    N, d = data.shape
    if K > N:
        raise ConfigError(f"mccaffrey mode: n_clusters={K} exceeds the {N} rows")
    clock.append(time.perf_counter())
    init_rows, labels, sums, counts = _seed_all(data, K, T, seed)
    q_stats = data.map(_sq_stats)
    if data.dtype == np.uint8:  # exact: the byte histogram
        q_total = math.fsum(float(c) * v * v
                            for c, v in zip(sum(q_stats), kernels.PIXEL, strict=True))
    else:
        q_total = math.fsum(q_stats)
    for t in range(T):
        empty = np.flatnonzero(counts[t] == 0)
        if empty.size:
            raise KmdaskError(f"mccaffrey trial {t}: cluster {int(empty[0])} is empty after "
                              f"initialisation (initial rows {init_rows[t].tolist()})")
    clock.append(time.perf_counter())
    means, labels, accept, history, n_iter, rechecked, passes = _lloyd_all(
        data, labels, sums, counts, q_total, max_iter, progress)
    clock.append(time.perf_counter())
    _, final = data.map(_finish, means, accept, per_chunk=[(h,) for h in labels], keep=True)
    wcss = data.fold(_wcss, np.zeros(T), per_chunk=[(h,) for h in final])
    best = 0
    for t in range(1, T):
        if wcss[t] < wcss[best]:  # strictly lower: the earliest trial wins ties
            best = t
    best_labels = data.map(_trial_labels, best, per_chunk=[(h,) for h in final])
    clock.append(time.perf_counter())
    data.release()
    return McCaffreyResult(
        centers=means[best].copy(),
        labels=np.concatenate(best_labels).astype(np.int64),
        wcss=float(wcss[best]),
        best_trial=best,
        trial_wcss=tuple(float(w) for w in wcss),
        trial_n_iter=tuple(int(i) for i in n_iter),
        trial_history=tuple(tuple(h) for h in history),
        init_rows=init_rows,
        n_rechecked=rechecked,
        timings={**{k: round(b - a, 4) for k, a, b in zip(
            ("load", "seeding", "lloyd", "wcss"), clock[:-1], clock[1:], strict=True)},
            "lloyd_passes": passes},
    )


def _seed_all(data: ChunkedRows, K: int, T: int, seed: int):
    """Roulette-wheel k-means++ for every trial, one pass per centre; then the initial labels.

    Returns (initial rows (T, K), per-chunk label states, sums (T, K, d), counts (T, K))."""
    N, d = data.shape
    first, p = mccaffrey_draws(seed, N, K, T)
    init_rows = np.empty((T, K), dtype=np.int64)
    init_rows[:, 0] = first
    centres = kernels.values(data.rows(first))
    states: list = [None] * data.n_chunks
    for j in range(1, K):
        _, states = data.map(_seed, centres, j - 1, per_chunk=[(s,) for s in states], keep=True)
        per = [(s,) for s in states]
        total = data.fold(_d2, np.zeros(T), per_chunk=per)  # ΣD² in row order
        carry = data.fold(_roulette, (np.zeros(T), np.full(T, -1, dtype=np.int64)), total,
                          p[:, j - 1].copy(), per_chunk=per)
        found = np.asarray(carry[1]).copy()
        found[found < 0] = N - 1  # the running total never exceeded p: the last row
        init_rows[:, j] = found
        centres = kernels.values(data.rows(found))
    _, states = data.map(_seed, centres, K - 1, per_chunk=[(s,) for s in states], keep=True)
    got, labels = data.map(_start, K, per_chunk=[(s,) for s in states], keep=True)
    counts = sum(g[1] for g in got)
    if data.dtype == np.uint8:
        sums = sum(g[0] for g in got)
    else:
        sums = data.fold(_init_sums, np.zeros((T, K, d)), per_chunk=[(h,) for h in labels])
    return init_rows, labels, sums, counts


def _lloyd_all(data: ChunkedRows, labels: list, sums: np.ndarray, counts: np.ndarray,
               q_total: float, max_iter: int, progress: Callable[[dict], None] | None):
    """The Lloyd loop, every running trial in one pass per iteration.

    Returns (means, label states, trials accepted by the last pass, histories, accepted
    iterations per trial, decisions rechecked, passes)."""
    T, K, d = sums.shape
    means = sums / counts[:, :, None]
    history = [[_objective(sums[t], counts[t], q_total)] for t in range(T)]
    n_iter = np.zeros(T, dtype=np.int64)
    active = list(range(T))
    accept = np.zeros(0, dtype=np.int64)
    rechecked = passes = 0
    while active:
        t0 = time.perf_counter()
        trials = np.asarray(active, dtype=np.int64)
        got, labels = data.map(_lloyd, np.ascontiguousarray(means[active]), trials, accept,
                               per_chunk=[(h,) for h in labels], keep=True)
        changed = np.logical_or.reduce([g[0] for g in got])
        new_counts = sum(g[2] for g in got)
        rechecked += sum(int(g[3]) for g in got)
        if data.dtype == np.uint8:
            new_sums = sum(g[1] for g in got)
        else:  # labels in parallel, then the row-order sums folded over the chunks
            new_sums = data.fold(_cand_sums, np.zeros((len(active), K, d)),
                                 per_chunk=[(h,) for h in labels])
        passes += 1
        still, taken = [], []
        for a, t in enumerate(active):
            if not changed[a] or np.any(new_counts[a] == 0):
                continue  # stop; keep the old labels and the means computed from them
            taken.append(t)
            n_iter[t] += 1
            history[t].append(_objective(new_sums[a], new_counts[a], q_total))
            if n_iter[t] >= max_iter:
                continue  # the original's quirk: the kept means are those of the old labels
            means[t] = new_sums[a] / new_counts[a][:, None]
            still.append(t)
        if progress is not None:
            progress({"iteration": passes, "models": len(active),
                      "inertia": min(h[-1] for h in history),
                      "seconds": time.perf_counter() - t0})
        accept = np.asarray(taken, dtype=np.int64)
        active = still
    return means, labels, accept, history, n_iter, rechecked, passes
