"""Per-chunk kernels of the seed-compatible "mccaffrey" mode: numpy + numba, no dask, no I/O.

Every decision the original demo makes is reproduced bit for bit:

* a pixel is ``float32(byte / 255)`` widened to float64 (:data:`PIXEL`);
* a distance is the original's: the sum of squared differences accumulated *in feature order*
  in float64, then ``sqrt``; a "squared distance" is that distance squared again;
* nearest centre = smallest such distance, ties to the lowest centre index.

The Lloyd pass screens with a float32 GEMM (``|x|^2 - 2 x.c + |c|^2``) and re-decides, with
the exact sequential distances, every row whose best and second-best GEMM distances are closer
than a rigorous bound on the GEMM's rounding error plus the sequential sum's. Cluster sums are
exact in float64 (every pixel is a multiple of 2^-31 and a sum of < 2^22 of them fits in 53
bits), so means never depend on chunking or accumulation order (for clusters under 4.19M rows).

"Squared distance" as ``sqrt(s)**2`` (rather than ``s``) for D² and the WCSS follows the spec's
wording "(Euclidean distance)²"; the published table is reproduced either way (checked).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

#: float32(b / 255) for every byte b, widened to float64 (division done in float32).
PIXEL = (np.arange(256, dtype=np.float32) / np.float32(255)).astype(np.float64)
PIXEL32 = PIXEL.astype(np.float32)  # the same values (exact): the GEMM screen runs in float32
BLOCK_ROWS = 1024  # rows per GEMM block: the block and its dot products stay cache-sized
_U = 2.0**-53  # unit roundoff of float64


def gemm_tolerance(n_features: int, dot_dtype=np.float32) -> float:
    """Relative bound used to accept a GEMM argmin without an exact recheck.

    For non-negative data and centres, the GEMM form ``|x|^2 - 2 x.c + |c|^2`` of a squared
    distance is within ``(gamma_n' + u') * 2 x.c`` (dot products in ``dot_dtype``, unit
    roundoff ``u'``, centres rounded to it) plus ``gamma_n * (|x|^2 + |c|^2)`` and two
    roundings (norms and combination in float64) of the true value, and the original's
    sequential sum is within ``gamma_n * (|x|^2 + |c|^2)`` of it; ``gamma_n = n u/(1 - n u)``.
    Both fit in ``tol/2 * (|x|^2 + 2|x.c| + |c|^2)`` with the returned ``tol``, so a GEMM gap
    larger than the two candidates' bounds guarantees the exact comparison agrees.
    """
    n = n_features + 8
    u_dot = float(np.finfo(dot_dtype).eps) / 2.0
    gamma_dot = n * u_dot / (1.0 - n * u_dot)
    gamma = n * _U / (1.0 - n * _U)
    return 2.0 * (gamma_dot + u_dot + 2.0 * gamma + 4.0 * _U)


@dataclass(frozen=True)
class McChunk:
    """A chunk of uint8 rows, kept in memory as bytes (pixels are looked up in :data:`PIXEL`)."""

    u8: np.ndarray  # (n, d) uint8, C-contiguous
    xnorm: np.ndarray  # (n,) float64: |x|^2 of the float64 pixels (for the GEMM screen only)
    offset: int  # global index of the chunk's first row
    byte_counts: np.ndarray  # (256,) int64: how many pixels of the chunk hold each byte value


def prepare_chunk(u8: np.ndarray, offset: int) -> McChunk:
    """Wrap a chunk of uint8 rows; cache row norms and its byte histogram."""
    u8 = np.ascontiguousarray(u8, dtype=np.uint8)
    xnorm = np.empty(u8.shape[0], dtype=np.float64)
    for s in range(0, u8.shape[0], BLOCK_ROWS):
        xb = PIXEL[u8[s : s + BLOCK_ROWS]]
        xnorm[s : s + BLOCK_ROWS] = np.einsum("ij,ij->i", xb, xb)
    counts = np.bincount(u8.ravel(), minlength=256).astype(np.int64)
    return McChunk(u8=u8, xnorm=xnorm, offset=int(offset), byte_counts=counts)


def take_rows(chunk: McChunk, local_rows: np.ndarray) -> np.ndarray:
    """Rows of a chunk as float64 pixels (to become centres)."""
    return PIXEL[chunk.u8[np.asarray(local_rows, dtype=np.int64)]]


# ---------------------------------------------------------------------------------------------
# Initialisation (roulette-wheel k-means++), all trials at once


@njit(cache=True, nogil=True, error_model="numpy")
def _init_update(u8, pixel, ct, dmin, amin, j):  # pragma: no cover - compiled
    # ct is (d, T): centre j of every trial, so the innermost loop runs over trials and each
    # trial keeps its own accumulator (feature order is preserved per trial).
    n, d = u8.shape
    t_count = ct.shape[1]
    acc = np.empty(t_count)
    for i in range(n):
        acc[:] = 0.0
        for f in range(d):
            xv = pixel[u8[i, f]]
            for t in range(t_count):
                diff = xv - ct[f, t]
                acc[t] += diff * diff
        for t in range(t_count):
            dist = np.sqrt(acc[t])
            if dist < dmin[t, i]:  # strict: ties keep the lower centre index
                dmin[t, i] = dist
                amin[t, i] = j


def init_update(chunk: McChunk, centres: np.ndarray, state, j: int):
    """Fold centre ``j`` of every trial into the chunk's nearest-centre state.

    Parameters
    ----------
    chunk : McChunk
    centres : (T, d) float64 — centre ``j`` of each trial.
    state : tuple (dmin (T, n) float64, amin (T, n) int16) or None before the first centre.
    j : int — the centre index.

    Returns
    -------
    tuple
        New ``(dmin, amin)``: distance to and index of each row's nearest centre so far.
    """
    t_count, n = centres.shape[0], chunk.u8.shape[0]
    if state is None:
        dmin = np.full((t_count, n), np.inf)
        amin = np.zeros((t_count, n), dtype=np.int16)
    else:  # never mutate a task input: dask may share it
        dmin, amin = state[0].copy(), state[1].copy()
    ct = np.ascontiguousarray(np.asarray(centres, dtype=np.float64).T)
    _init_update(chunk.u8, PIXEL, ct, dmin, amin, j)
    return dmin, amin


@njit(cache=True, nogil=True, error_model="numpy")
def _d2_sum(dmin, carry):  # pragma: no cover - compiled
    out = carry.copy()
    for t in range(dmin.shape[0]):
        s = out[t]
        for i in range(dmin.shape[1]):
            d = dmin[t, i]
            s += d * d
        out[t] = s
    return out


def d2_sum(state, carry: np.ndarray) -> np.ndarray:
    """Continue the row-order float64 running sum of D² = dist² over this chunk, per trial."""
    return _d2_sum(state[0], carry)


@njit(cache=True, nogil=True, error_model="numpy")
def _roulette(dmin, total, p, cum, found, offset):  # pragma: no cover - compiled
    cum = cum.copy()
    found = found.copy()
    for t in range(dmin.shape[0]):
        if found[t] >= 0:
            continue
        c = cum[t]
        s = total[t]
        for i in range(dmin.shape[1]):
            d = dmin[t, i]
            c += (d * d) / s
            if c > p[t]:
                found[t] = offset + i
                break
        cum[t] = c
    return cum, found


def roulette_step(state, chunk_offset: int, total: np.ndarray, p: np.ndarray, carry):
    """Continue the roulette walk over this chunk, per trial.

    ``carry = (cum, found)``: the running total of D²(i)/ΣD² (row order, float64, exactly as
    the original accumulates it) and, per trial, the global row where it first exceeded ``p``
    (-1 while not yet crossed). Trials already decided skip the chunk.
    """
    return _roulette(state[0], total, p, carry[0], carry[1], chunk_offset)


# ---------------------------------------------------------------------------------------------
# Lloyd pass: GEMM screen + exact recheck, then exact per-cluster sums


@njit(cache=True, nogil=True, error_model="numpy")
def _exact_argmin(u8, pixel, i, centres, base, k_count, acc):  # pragma: no cover - compiled
    # Sequential (feature-order) squared differences against K centres; the k loop is innermost
    # so the K independent accumulators run in parallel.
    d = u8.shape[1]
    acc[:k_count] = 0.0
    for f in range(d):
        xv = pixel[u8[i, f]]
        for k in range(k_count):
            diff = xv - centres[base + k, f]
            acc[k] += diff * diff
    best = 0
    bd = np.sqrt(acc[0])
    for k in range(1, k_count):
        dk = np.sqrt(acc[k])
        if dk < bd:
            bd = dk
            best = k
    return best


@njit(cache=True, nogil=True, error_model="numpy")
def _assign_block(u8, pixel, row0, xnorm, dots, cnorm, centres, k_count, tol, labels,
                  acc):  # pragma: no cover - compiled
    nrow = dots.shape[0]
    n_trials = dots.shape[1] // k_count
    rechecked = 0
    for r in range(nrow):
        i = row0 + r
        xn = xnorm[i]
        for a in range(n_trials):
            base = a * k_count
            best = 0
            bd = xn - 2.0 * dots[r, base] + cnorm[base]
            for k in range(1, k_count):
                v = xn - 2.0 * dots[r, base + k] + cnorm[base + k]
                if v < bd:
                    bd = v
                    best = k
            eb = tol * (xn + 2.0 * abs(dots[r, base + best]) + cnorm[base + best])
            clear = True
            for k in range(k_count):
                if k != best:
                    v = xn - 2.0 * dots[r, base + k] + cnorm[base + k]
                    e = tol * (xn + 2.0 * abs(dots[r, base + k]) + cnorm[base + k])
                    if v - bd <= e + eb:
                        clear = False
                        break
            if not clear:
                best = _exact_argmin(u8, pixel, i, centres, base, k_count, acc)
                rechecked += 1
            labels[a, i] = best
    return rechecked


@njit(cache=True, nogil=True)
def _accumulate(u8, pixel, labels, sums, counts):  # pragma: no cover - compiled
    n, d = u8.shape
    row = np.empty(d)
    for i in range(n):
        for f in range(d):  # look the pixels up once per row, not once per trial
            row[f] = pixel[u8[i, f]]
        for a in range(labels.shape[0]):
            k = labels[a, i]
            counts[a, k] += 1
            for f in range(d):
                sums[a, k, f] += row[f]


def lloyd_pass(chunk: McChunk, means: np.ndarray):
    """Reassign the chunk's rows to the nearest mean of every trial, then sum the new clusters.

    Parameters
    ----------
    chunk : McChunk
    means : (A, K, d) float64 — the current means of the A trials still running.

    Returns
    -------
    labels : (A, n) int16 — nearest mean per trial (original's distances, ties to lowest).
    sums : (A, K, d) float64 — exact per-cluster pixel sums of the new labels.
    counts : (A, K) int64 — cluster sizes of the new labels.
    rechecked : int — (row, trial) decisions that needed the exact recheck.
    """
    a_count, k_count, d = means.shape
    flat = np.ascontiguousarray(means.reshape(a_count * k_count, d), dtype=np.float64)
    flat_t = np.ascontiguousarray(flat.T, dtype=np.float32)  # screen only: half the GEMM cost
    cnorm = np.einsum("ij,ij->i", flat, flat)
    n = chunk.u8.shape[0]
    labels = np.empty((a_count, n), dtype=np.int16)
    acc = np.empty(k_count)
    tol = gemm_tolerance(d, np.float32)
    rechecked = 0
    for s in range(0, n, BLOCK_ROWS):
        dots = PIXEL32[chunk.u8[s : s + BLOCK_ROWS]] @ flat_t
        rechecked += _assign_block(chunk.u8, PIXEL, s, chunk.xnorm, dots, cnorm, flat, k_count,
                                   tol, labels, acc)
    sums = np.zeros((a_count, k_count, d))
    counts = np.zeros((a_count, k_count), dtype=np.int64)
    _accumulate(chunk.u8, PIXEL, labels, sums, counts)
    return labels, sums, counts, rechecked


def init_finish(chunk: McChunk, state, n_clusters: int):
    """The initial labels (nearest drawn centre) with their exact sums and counts.

    Returns ``(labels (T, n) int16, sums (T, K, d), counts (T, K))``.
    """
    labels = state[1]
    sums = np.zeros((labels.shape[0], n_clusters, chunk.u8.shape[1]))
    counts = np.zeros((labels.shape[0], n_clusters), dtype=np.int64)
    _accumulate(chunk.u8, PIXEL, labels, sums, counts)
    return labels, sums, counts


# ---------------------------------------------------------------------------------------------
# Final WCSS: exact per-row squared distances, summed in row order by a chain of chunks


@njit(cache=True, nogil=True, error_model="numpy")
def _assigned_sq(u8, pixel, flat, k_count, labels, out):  # pragma: no cover - compiled
    n, d = u8.shape
    t_count = labels.shape[0]
    rows = np.empty(t_count, dtype=np.int64)
    acc = np.empty(t_count)
    for i in range(n):
        for t in range(t_count):
            rows[t] = t * k_count + labels[t, i]
        acc[:] = 0.0
        for f in range(d):
            xv = pixel[u8[i, f]]
            for t in range(t_count):
                diff = xv - flat[rows[t], f]
                acc[t] += diff * diff
        for t in range(t_count):
            dist = np.sqrt(acc[t])
            out[t, i] = dist * dist


def assigned_sq_dist(chunk: McChunk, means: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each row's squared distance (the original's ``dist * dist``) to its own cluster's mean.

    ``means`` is ``(T, K, d)``, ``labels`` ``(T, n)``; returns ``(T, n)`` float64.
    """
    t_count, k_count, d = means.shape
    flat = np.ascontiguousarray(means.reshape(t_count * k_count, d), dtype=np.float64)
    out = np.empty(labels.shape, dtype=np.float64)
    _assigned_sq(chunk.u8, PIXEL, flat, k_count, np.ascontiguousarray(labels), out)
    return out


@njit(cache=True, nogil=True)
def _row_sum(values, carry):  # pragma: no cover - compiled
    out = carry.copy()
    for t in range(values.shape[0]):
        s = out[t]
        for i in range(values.shape[1]):
            s += values[t, i]
        out[t] = s
    return out


def row_sum(values: np.ndarray, carry: np.ndarray) -> np.ndarray:
    """Continue a row-order float64 running sum over ``values (T, n)``, per trial."""
    return _row_sum(values, carry)
