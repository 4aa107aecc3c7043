"""Per-chunk kernels of the seed-compatible "mccaffrey" mode: numpy + numba, no dask, no I/O.

One source for both kinds of rows the mode takes; they differ only in how a value is read
(:func:`value`):

* uint8 pixels: a pixel is ``float32(byte / 255)`` widened to float64 (:data:`PIXEL`), the
  original's images bit for bit;
* float64 rows (e.g. the error-case vectors): used as they are.

Every decision the original makes is reproduced bit for bit:

* a distance is the original's: the sum of squared differences accumulated *in feature order*
  in float64, then ``sqrt``; a "squared distance" is that distance squared again;
* nearest centre = smallest such distance, ties to the lowest centre index.

For pixels the Lloyd pass screens with a float32 GEMM (``|x|^2 - 2 x.c + |c|^2``) and re-decides,
with the exact sequential distances, every row whose best and second-best GEMM distances are
closer than a rigorous bound on the GEMM's rounding error plus the sequential sum's; float rows
(short, of any sign) are decided with the exact distances throughout. Cluster sums of pixels are
exact in float64 (every pixel is a multiple of 2^-31 and a sum of < 2^22 of them fits in 53
bits), so they may be added in any order; sums of float rows are not, and are accumulated row by
row in row order (:func:`accumulate`, a carry handed from chunk to chunk), as the original does.

"Squared distance" as ``sqrt(s)**2`` (rather than ``s``) for D² and the WCSS follows the
original's wording "(Euclidean distance)²"; the published table is reproduced either way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit, types
from numba.extending import overload

from kmdask.errors import DataError

#: float32(b / 255) for every byte b, widened to float64 (division done in float32).
PIXEL = (np.arange(256, dtype=np.float32) / np.float32(255)).astype(np.float64)
PIXEL32 = PIXEL.astype(np.float32)  # the same values (exact): the GEMM screen runs in float32
NO_LUT = np.empty(0)  # float rows need no look-up table
BLOCK_ROWS = 1024  # rows per GEMM block: the block and its dot products stay cache-sized
_U = 2.0**-53  # unit roundoff of float64


def value(x, lut, i, f):  # pragma: no cover - replaced in compiled code by the overload below
    """The value of row ``i``, feature ``f``: ``lut[x[i, f]]`` for bytes, ``x[i, f]`` else."""
    return lut[x[i, f]] if x.dtype == np.uint8 else x[i, f]


@overload(value, inline="always")
def _value(x, lut, i, f):  # pragma: no cover - compiled
    if isinstance(x.dtype, types.Integer):
        return lambda x, lut, i, f: lut[x[i, f]]
    return lambda x, lut, i, f: x[i, f]


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
    """A chunk of rows as the mode keeps it: uint8 pixels (looked up in :data:`PIXEL`) or
    float64 values."""

    x: np.ndarray  # (n, d) uint8 or float64, C-contiguous
    offset: int  # global index of the chunk's first row
    index: int  # chunk number
    xnorm: np.ndarray | None  # (n,) float64 |x|^2 of the pixel values (GEMM screen only)
    byte_counts: np.ndarray | None  # (256,) int64: pixels of the chunk holding each byte value
    sq_sum: float  # sum of squares of float64 values (closed-form objective history only)

    @property
    def pixels(self) -> bool:
        return self.x.dtype == np.uint8

    @property
    def lut(self) -> np.ndarray:
        return PIXEL if self.pixels else NO_LUT


def prepare_chunk(x: np.ndarray, offset: int, index: int = 0) -> McChunk:
    """Wrap a chunk of rows: for pixels cache row norms and the byte histogram; float rows must
    be finite (a NaN names its row)."""
    if x.dtype == np.uint8:
        x = np.ascontiguousarray(x)
        xnorm = np.empty(x.shape[0], dtype=np.float64)
        for s in range(0, x.shape[0], BLOCK_ROWS):
            xb = PIXEL[x[s : s + BLOCK_ROWS]]
            xnorm[s : s + BLOCK_ROWS] = np.einsum("ij,ij->i", xb, xb)
        counts = np.bincount(x.ravel(), minlength=256).astype(np.int64)
        return McChunk(x, int(offset), int(index), xnorm, counts, 0.0)
    x = np.ascontiguousarray(x, dtype=np.float64)
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise DataError(f"mccaffrey mode: row {int(offset) + int(np.argmax(bad))} holds NaN or "
                        "infinity")
    return McChunk(x, int(offset), int(index), None, None, float(np.einsum("ij,ij->", x, x)))


def values(rows: np.ndarray) -> np.ndarray:
    """Raw rows as the float64 values the mode computes with (pixels looked up)."""
    return PIXEL[rows] if rows.dtype == np.uint8 else np.asarray(rows, dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# Initialisation (roulette-wheel k-means++), all trials at once


@njit(cache=True, nogil=True, error_model="numpy")
def _init_update(x, lut, ct, dmin, amin, j):  # pragma: no cover - compiled
    # ct is (d, T): centre j of every trial, so the innermost loop runs over trials and each
    # trial keeps its own accumulator (feature order is preserved per trial).
    n, d = x.shape
    t_count = ct.shape[1]
    acc = np.empty(t_count)
    for i in range(n):
        acc[:] = 0.0
        for f in range(d):
            xv = value(x, lut, i, f)
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
    t_count, n = centres.shape[0], chunk.x.shape[0]
    if state is None:
        dmin = np.full((t_count, n), np.inf)
        amin = np.zeros((t_count, n), dtype=np.int16)
    else:  # never mutate a task input: dask may share it
        dmin, amin = state[0].copy(), state[1].copy()
    ct = np.ascontiguousarray(np.asarray(centres, dtype=np.float64).T)
    _init_update(chunk.x, chunk.lut, ct, dmin, amin, j)
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
# Lloyd pass: nearest means, then per-cluster sums


@njit(cache=True, nogil=True, error_model="numpy")
def _exact_argmin(x, lut, i, centres, base, k_count, acc):  # pragma: no cover - compiled
    # Sequential (feature-order) squared differences against K centres; the k loop is innermost
    # so the K independent accumulators run in parallel.
    d = x.shape[1]
    acc[:k_count] = 0.0
    for f in range(d):
        xv = value(x, lut, i, f)
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
def _assign_block(x, lut, row0, xnorm, dots, cnorm, centres, k_count, tol, labels,
                  acc):  # pragma: no cover - compiled
    # The GEMM screen (pixels): accept the GEMM's argmin when every other centre is farther by
    # more than both rounding bounds; otherwise decide exactly.
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
                best = _exact_argmin(x, lut, i, centres, base, k_count, acc)
                rechecked += 1
            labels[a, i] = best
    return rechecked


@njit(cache=True, nogil=True, error_model="numpy")
def _assign_exact(x, lut, flat, k_count, labels, acc):  # pragma: no cover - compiled
    for i in range(x.shape[0]):
        for a in range(labels.shape[0]):
            labels[a, i] = _exact_argmin(x, lut, i, flat, a * k_count, k_count, acc)


@njit(cache=True, nogil=True)
def _accumulate(x, lut, labels, sums, counts):  # pragma: no cover - compiled
    n, d = x.shape
    row = np.empty(d)
    for i in range(n):
        for f in range(d):  # read the row once, not once per trial
            row[f] = value(x, lut, i, f)
        for a in range(labels.shape[0]):
            k = labels[a, i]
            counts[a, k] += 1
            for f in range(d):
                sums[a, k, f] += row[f]


@njit(cache=True, nogil=True)
def _move_rows(x, lut, old, new, sums, counts):  # pragma: no cover - compiled
    # Rows whose label changed leave their old cluster's sum for the new one's; the rest are
    # not touched (after the first passes, most of them).
    n, d = x.shape
    row = np.empty(d)
    for i in range(n):
        loaded = False
        for a in range(old.shape[0]):
            o = old[a, i]
            w = new[a, i]
            if o == w:
                continue
            if not loaded:
                for f in range(d):
                    row[f] = value(x, lut, i, f)
                loaded = True
            counts[a, o] -= 1
            counts[a, w] += 1
            for f in range(d):
                sums[a, o, f] -= row[f]
                sums[a, w, f] += row[f]


def move_rows(chunk: McChunk, old: np.ndarray, new: np.ndarray, sums: np.ndarray,
              counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster sums and counts for labels ``new (A, n)`` from those for ``old``: only the
    rows whose label changed move (new arrays; the inputs are not modified).

    Pixels only: their sums are exact in any order (see the module docstring), so moving rows
    gives the very sums a pass from scratch would.
    """
    if not chunk.pixels:
        raise TypeError("move_rows: float rows are summed in row order, not moved")
    sums, counts = sums.copy(), counts.copy()
    _move_rows(chunk.x, PIXEL, np.ascontiguousarray(old), np.ascontiguousarray(new), sums,
               counts)
    return sums, counts


def nearest(chunk: McChunk, means: np.ndarray) -> tuple[np.ndarray, int]:
    """Nearest mean of every row for every trial: ``(labels (A, n) int16, rechecked)``.

    ``means`` is ``(A, K, d)`` float64. Pixels: GEMM screen + exact recheck (``rechecked``
    counts the (row, trial) decisions redone); float rows: every decision exact.
    """
    a_count, k_count, d = means.shape
    flat = np.ascontiguousarray(means.reshape(a_count * k_count, d), dtype=np.float64)
    n = chunk.x.shape[0]
    labels = np.empty((a_count, n), dtype=np.int16)
    acc = np.empty(k_count)
    if not chunk.pixels:
        _assign_exact(chunk.x, NO_LUT, flat, k_count, labels, acc)
        return labels, 0
    flat_t = np.ascontiguousarray(flat.T, dtype=np.float32)  # screen only: half the GEMM cost
    cnorm = np.einsum("ij,ij->i", flat, flat)
    tol = gemm_tolerance(d, np.float32)
    rechecked = 0
    for s in range(0, n, BLOCK_ROWS):
        dots = PIXEL32[chunk.x[s : s + BLOCK_ROWS]] @ flat_t
        rechecked += _assign_block(chunk.x, PIXEL, s, chunk.xnorm, dots, cnorm, flat, k_count,
                                   tol, labels, acc)
    return labels, rechecked


def cluster_sums(chunk: McChunk, labels: np.ndarray, n_clusters: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster sums and counts of the chunk's rows under ``labels (A, n)``:
    ``(sums (A, K, d) float64, counts (A, K) int64)`` (exact for pixels)."""
    sums = np.zeros((labels.shape[0], n_clusters, chunk.x.shape[1]))
    counts = np.zeros((labels.shape[0], n_clusters), dtype=np.int64)
    _accumulate(chunk.x, chunk.lut, np.ascontiguousarray(labels), sums, counts)
    return sums, counts


def label_counts(labels: np.ndarray, n_clusters: int) -> np.ndarray:
    """Cluster sizes per trial under ``labels (A, n)``: ``(A, K)`` int64."""
    return np.stack([np.bincount(lab, minlength=n_clusters) for lab in labels]).astype(np.int64)


def lloyd_pass(chunk: McChunk, means: np.ndarray):
    """Reassign a chunk of pixels to the nearest mean of every trial, then sum the clusters.

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
    labels, rechecked = nearest(chunk, means)
    sums, counts = cluster_sums(chunk, labels, means.shape[1])
    return labels, sums, counts, rechecked


def accumulate(chunk: McChunk, labels: np.ndarray, carry: np.ndarray) -> np.ndarray:
    """Continue the row-order per-cluster sums ``carry (A, K, d)`` over this chunk's rows."""
    sums = carry.copy()  # never mutate a task input
    _accumulate(chunk.x, chunk.lut, np.ascontiguousarray(labels), sums,
                np.zeros(sums.shape[:2], dtype=np.int64))
    return sums


# ---------------------------------------------------------------------------------------------
# Final WCSS: exact per-row squared distances, summed in row order by a chain of chunks


@njit(cache=True, nogil=True, error_model="numpy")
def _assigned_sq(x, lut, flat, k_count, labels, out):  # pragma: no cover - compiled
    n, d = x.shape
    t_count = labels.shape[0]
    rows = np.empty(t_count, dtype=np.int64)
    acc = np.empty(t_count)
    for i in range(n):
        for t in range(t_count):
            rows[t] = t * k_count + labels[t, i]
        acc[:] = 0.0
        for f in range(d):
            xv = value(x, lut, i, f)
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
    _assigned_sq(chunk.x, chunk.lut, flat, k_count, np.ascontiguousarray(labels), out)
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
