"""Per-chunk kernels of the mccaffrey mode for float64 rows (e.g. the error-case vectors).

Same contract as :mod:`kmdask.mccaffrey.kernels` (whose uint8 path is untouched), with the
original's arithmetic on arbitrary float64 values:

* a distance is the sum of squared differences accumulated in feature order, then ``sqrt``;
  nearest centre = smallest distance, ties to the lowest index; every decision is made with
  these exact distances (rows are short, so no GEMM screen is needed);
* cluster sums are not exact for arbitrary floats, so they are accumulated as the original
  does, row by row in row order: a carry is handed from chunk to chunk
  (:func:`accumulate`), which makes the means independent of chunking and worker count.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from kmdask.errors import DataError


@dataclass(frozen=True)
class McFloatChunk:
    """A chunk of float64 rows."""

    x: np.ndarray  # (n, d) float64, C-contiguous
    offset: int  # global index of the chunk's first row
    sq_sum: float  # sum of squares of its values (closed-form objective history only)


def prepare_chunk(x: np.ndarray, offset: int) -> McFloatChunk:
    x = np.ascontiguousarray(x, dtype=np.float64)
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise DataError(f"mccaffrey mode: row {int(offset) + int(np.argmax(bad))} holds NaN or "
                        "infinity")
    return McFloatChunk(x=x, offset=int(offset), sq_sum=float(np.einsum("ij,ij->", x, x)))


def take_rows(chunk: McFloatChunk, local_rows: np.ndarray) -> np.ndarray:
    return chunk.x[np.asarray(local_rows, dtype=np.int64)].copy()


@njit(cache=True, nogil=True, error_model="numpy")
def _init_update(x, ct, dmin, amin, j):  # pragma: no cover - compiled
    n, d = x.shape
    t_count = ct.shape[1]
    acc = np.empty(t_count)
    for i in range(n):
        acc[:] = 0.0
        for f in range(d):
            xv = x[i, f]
            for t in range(t_count):
                diff = xv - ct[f, t]
                acc[t] += diff * diff
        for t in range(t_count):
            dist = np.sqrt(acc[t])
            if dist < dmin[t, i]:  # strict: ties keep the lower centre index
                dmin[t, i] = dist
                amin[t, i] = j


def init_update(chunk: McFloatChunk, centres: np.ndarray, state, j: int):
    """As :func:`kmdask.mccaffrey.kernels.init_update`, for float64 rows."""
    t_count, n = centres.shape[0], chunk.x.shape[0]
    if state is None:
        dmin = np.full((t_count, n), np.inf)
        amin = np.zeros((t_count, n), dtype=np.int16)
    else:
        dmin, amin = state[0].copy(), state[1].copy()
    ct = np.ascontiguousarray(np.asarray(centres, dtype=np.float64).T)
    _init_update(chunk.x, ct, dmin, amin, j)
    return dmin, amin


@njit(cache=True, nogil=True, error_model="numpy")
def _assign(x, flat, k_count, labels, counts):  # pragma: no cover - compiled
    n, d = x.shape
    n_trials = labels.shape[0]
    acc = np.empty(k_count)
    for i in range(n):
        for a in range(n_trials):
            base = a * k_count
            acc[:] = 0.0
            for f in range(d):
                xv = x[i, f]
                for k in range(k_count):
                    diff = xv - flat[base + k, f]
                    acc[k] += diff * diff
            best = 0
            bd = np.sqrt(acc[0])
            for k in range(1, k_count):
                dk = np.sqrt(acc[k])
                if dk < bd:
                    bd = dk
                    best = k
            labels[a, i] = best
            counts[a, best] += 1


def lloyd_pass(chunk: McFloatChunk, means: np.ndarray):
    """Nearest mean of every running trial: ``(labels (A, n) int16, counts (A, K))``.

    The sums follow in :func:`accumulate`, chained over the chunks in row order."""
    a_count, k_count, d = means.shape
    flat = np.ascontiguousarray(means.reshape(a_count * k_count, d), dtype=np.float64)
    labels = np.empty((a_count, chunk.x.shape[0]), dtype=np.int16)
    counts = np.zeros((a_count, k_count), dtype=np.int64)
    _assign(chunk.x, flat, k_count, labels, counts)
    return labels, counts


@njit(cache=True, nogil=True)
def _accumulate(x, labels, sums):  # pragma: no cover - compiled
    n, d = x.shape
    for i in range(n):
        for a in range(labels.shape[0]):
            k = labels[a, i]
            for f in range(d):
                sums[a, k, f] += x[i, f]


def accumulate(chunk: McFloatChunk, labels: np.ndarray, carry: np.ndarray) -> np.ndarray:
    """Continue the row-order per-cluster sums ``carry (A, K, d)`` over this chunk's rows."""
    sums = carry.copy()  # never mutate a task input
    _accumulate(chunk.x, np.ascontiguousarray(labels), sums)
    return sums


def accumulate_pass(chunk: McFloatChunk, result, carry: np.ndarray) -> np.ndarray:
    """:func:`accumulate` with the labels of a :func:`lloyd_pass` result."""
    return accumulate(chunk, result[0], carry)


@njit(cache=True, nogil=True, error_model="numpy")
def _assigned_sq(x, flat, k_count, labels, out):  # pragma: no cover - compiled
    n, d = x.shape
    for t in range(labels.shape[0]):
        for i in range(n):
            r = t * k_count + labels[t, i]
            acc = 0.0
            for f in range(d):
                diff = x[i, f] - flat[r, f]
                acc += diff * diff
            dist = np.sqrt(acc)
            out[t, i] = dist * dist


def assigned_sq_dist(chunk: McFloatChunk, means: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each row's squared distance (``dist * dist``) to its own cluster's mean, per trial."""
    t_count, k_count, d = means.shape
    flat = np.ascontiguousarray(means.reshape(t_count * k_count, d), dtype=np.float64)
    out = np.empty(labels.shape, dtype=np.float64)
    _assigned_sq(chunk.x, flat, k_count, np.ascontiguousarray(labels), out)
    return out
