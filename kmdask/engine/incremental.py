"""Lloyd passes that reuse what the previous pass left next to the chunk.

Two things are kept per chunk between passes (see :func:`lloyd_pass`):

- every row's label per model, with the per-cluster integer sums: a pass then moves only the
  rows whose label changed between the sums, instead of adding every row again (which cost
  about half as much as the distance GEMM of a 27-model sweep);
- once labels settle, Elkan's (2003) bounds: ``upper`` >= the distance to the row's own
  centre and, per centre, ``lower`` <= the distance to that centre. When the centres move, each
  bound is loosened by how far its centre moved (triangle inequality); a row whose lower bounds
  all still exceed its upper bound keeps its label without any distance computation, and
  otherwise only the distances that a bound cannot rule out are computed.

Results are identical to a pass from scratch, not merely close:

- labels are *canonical* (see :mod:`kmdask.engine.kernels`): a row is decided by the GEMM only when
  the gap exceeds a proven rounding bound, and exactly otherwise; the bounds are built from the
  GEMM distances widened by that same error bound, so a skip is taken only when the exact
  decision could not differ;
- per-cluster sums, counts and squared norms are exact integers (uint8 pixels as they are,
  float rows in the fixed point of :class:`kmdask.engine.kernels.Fixed`), so updating them by
  the rows that changed label equals summing from scratch.

Float rows are four (float32) or eight (float64) times the bytes of pixels, and a pass reads
nearly every row (a bounded pass for its own-centre distance), so it is bound by memory traffic.
They therefore also keep a compact copy (:class:`RowCode`: each row as 8-bit steps over its own
range, with a proven bound on its residual), built by the first pass while each block is in
cache. Bounded passes decide from the code first (its own-centre distance, then the
distances the bounds cannot rule out), every distance bound widened by the residual: that the
label stands, or which centre the row moves to (it is then read for the sums alone), and read
the float row's distances only where the code cannot decide. It costs a byte per
value, kept with the bounds; results are unchanged, since the code only ever yields valid
bounds. With few float32 centres (:data:`kmdask.engine.kernels.FEW_CENTRES`), the GEMM passes
between the first one and the bounded ones read the code too (:func:`_code_full`): the code's
dot products are taken as pixels' are, a row whose nearest centre they prove keeps or takes
that label, and only rows that move or that the code cannot decide are read (one thread, 30k
float32 MNIST rows, K=10: 20-21 and 18 ms against 23-24 and 22-23 for passes 2 and 3). With
more centres a GEMM of the codes was slower (copying them to floats for BLAS and reading the
rows of every label change cost more than the bytes saved), so those passes read the rows.

The state (:class:`Bounds`) is kept by the caller next to the chunk and passed back; without it
(streamed data, a recomputed chunk, a resumed fit) the pass simply computes every row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from kmdask.engine import kernels

# Set bounds up once a pass changes at most this share of the labels. 0.3 since 2026-12-07
# (0.15 before): K=10 from shared centres, the bounded passes then start one GEMM pass earlier.
# At 60k rows, one thread, 20 passes: 379 against 399 ms (uint8), 411 against 452 ms
# (float32). At 1.02M rows on 2 workers one A/B gave 358-372 against 402-410 ms a pass, a
# later interleaved one came out even; the 27-model sweep and n_init=10 came out even too.
# Results are the same either way.
_BOUNDS_FROM = 0.3
_ELKAN_MAX = 0.25  # drop them after a bounded pass that computed more than this share
_CODE = True  # keep float rows' RowCode (tests turn it off to compare)
# When float rows' code pays: with few centres (a pass is then bound by reading the rows, not by
# arithmetic; with many, a row is rarely settled for every model at once), and while it
# settles most of what it tries (noisy rows have residuals wider than their distance gaps).
# Measured on MNIST as float32, 60k rows, 2 workers: 20 passes of K=10 0.31-0.33 s with it,
# 0.38-0.40 s without; a 27-model sweep (162 centres) took 5-15% longer with it.
_CODE_MAX_CENTRES = 32
_CODE_MIN_SETTLED = 0.5  # a bounded pass drops the code when it settled less of what it tried
_CODE_ROWS = 256  # rows per block of a GEMM pass of the code (their codes stay in L2)


@dataclass(frozen=True)
class RowCode:
    """Float rows as 8-bit codes: ``xhat = lo + step * q`` per row, ``||x - xhat|| <= eps``.

    For a centre c, ``||xhat - c|| -+ eps`` bound ``||x - c||`` from both sides (triangle
    inequality), and ``||xhat - c||^2`` takes a byte per value to compute. The code is only a
    screen: any rounding of it is allowed, since ``eps`` is measured from what it stores.
    """

    q: np.ndarray  # (n, d) uint8
    lo: np.ndarray  # (n,) float64 row minimum
    step: np.ndarray  # (n,) float64 (max - min) / 255
    eps: np.ndarray  # (n,) float64 bound on ||x - xhat||
    x2: np.ndarray  # (n,) float64 ||xhat||^2
    qn: np.ndarray  # (n,) float64 ||q||, for the GEMM-style error bound of q . c


@njit(cache=True, nogil=True, inline="always")
def _row_range(xi, r, mask, shift, bits):  # pragma: no cover - compiled
    # Row r's min and max, read as integers (xi: the rows' bits) into bits[0] and bits[1].
    # Flipping the low bits of negatives orders the bits as the floats (finite ones); integer
    # min/max vectorise, float ones compile to a scalar chain (NaN rules) about 5x slower.
    # Every value is cast back to the bits' type: numba widens int32 arithmetic to int64,
    # which halves the vector width (float32: 6.1 against 4.5 ms per 30 blocks of 1,024 rows).
    t = xi.dtype.type
    mn = t(xi[r, 0] ^ t(t(xi[r, 0] >> shift) & mask))
    mx = mn
    for p in range(xi.shape[1]):
        k = t(xi[r, p] ^ t(t(xi[r, p] >> shift) & mask))
        mn = min(mn, k)
        mx = max(mx, k)
    bits[0] = mn ^ ((mn >> shift) & mask)
    bits[1] = mx ^ ((mx >> shift) & mask)


@njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _row_code(x, xi, mask, shift, bits, mnmx, q, lov, step, eps, x2, qn,
              u):  # pragma: no cover - compiled
    # Per row, its range (_row_range) and then its code, while the row is in L1: one read of
    # the block instead of two (float32 MNIST, 60k rows: 38-43 against 45-50 ms). mnmx is
    # bits viewed as the rows' dtype. The code: one pass in the rows' own dtype (vector
    # width), with a proven residual bound.
    # With D = x - lo and t = D / h the exact step count, the code stores k = round(t_fl) for
    # t_fl = fl(fl(D) * fl(1/h)) = t (1 + theta), |theta| <= 3.001 u and |t| <= 255.001, so
    # |t_fl - t| <= 766 u per value. ||x - xhat|| = h ||t - k|| <= h (||t_fl - k|| + 766 u
    # sqrt(d)); ||t_fl - k|| is summed in the same pass, its rounding covered by the factor
    # 1 + 2 (d + 1) u (fastmath: any summation order). The sums of k and k^2 are exact
    # (int32: the caller keeps d * 255**2 below 2**31), so ||xhat||^2 = d lo^2 + 2 lo h sum k
    # + h^2 sum k^2 errs by a few float64 ulps of its terms: their square root joins eps.
    d = x.shape[1]
    big = np.finfo(x.dtype).max
    for r in range(x.shape[0]):
        _row_range(xi, r, mask, shift, bits)
        lo_t = mnmx[0]
        lo = np.float64(lo_t)
        h = (np.float64(mnmx[1]) - lo) / 255.0
        inv = 1.0 / h if h > 0.0 else 0.0
        s2 = x.dtype.type(0.0)
        k1 = np.int32(0)
        k2 = np.int32(0)
        if inv < big:
            inv_t = x.dtype.type(inv)
            for p in range(d):
                t = (x[r, p] - lo_t) * inv_t
                # t >= 0 (x >= lo): truncation rounds t + 0.5 down. The integer sums stay
                # int32 (cast back: numba widens them to int64, which stops the loop
                # vectorising; one loop is 30% faster than a second one over q)
                k = min(np.int32(t + x.dtype.type(0.5)), np.int32(255))
                e = t - x.dtype.type(k)
                s2 += e * e
                q[r, p] = np.uint8(k)
                k1 = np.int32(k1 + k)
                k2 = np.int32(k2 + k * k)
            rn = np.sqrt(np.float64(s2) * (1.0 + 2.0 * (d + 1) * u)) / (1.0 - u)
            res = h * (rn + 766.0 * u * np.sqrt(np.float64(d))) * (1.0 + 1e-12)
        else:  # a range too narrow for 1/h in this dtype: xhat = lo, residual measured
            e2 = 0.0
            for p in range(d):
                q[r, p] = 0
                e2 += (np.float64(x[r, p]) - lo) ** 2
            h = 0.0
            res = np.sqrt(e2 * (1.0 + 4.0 * (d + 1) * 2.0**-53)) * (1.0 + 1e-12)
        terms = d * lo * lo + 2.0 * abs(lo) * h * k1 + h * h * k2
        lov[r] = lo
        step[r] = h
        x2[r] = d * lo * lo + 2.0 * lo * h * k1 + h * h * k2
        qn[r] = np.sqrt(np.float64(k2))
        eps[r] = res + np.sqrt(8.0 * 2.0**-53 * terms) + 1e-300


CODE_MAX_D = (2**31 - 1) // 255**2  # the code's integer sums per row stay in int32


def empty_code(n: int, d: int) -> RowCode:
    """A :class:`RowCode` for ``n`` rows of ``d`` values, to be filled by :func:`code_rows`."""
    return RowCode(q=np.empty((n, d), dtype=np.uint8), lo=np.empty(n), step=np.empty(n),
                   eps=np.empty(n), x2=np.empty(n), qn=np.empty(n))


def code_rows(x: np.ndarray, code: RowCode, start: int = 0) -> RowCode:
    """Fill rows ``start:start + len(x)`` of ``code`` with the code of finite float rows ``x``
    (used as they are: divisor 1; at most :data:`CODE_MAX_D` values a row). A pass calls it
    per row block, while the block is in cache."""
    n, d = x.shape
    if n and d:
        x = np.ascontiguousarray(x)
        it = np.dtype(f"int{8 * x.dtype.itemsize}")
        bits = np.empty(2, dtype=it)
        rows = slice(start, start + n)
        _row_code(x, x.view(it), it.type(np.iinfo(it).max), it.type(8 * it.itemsize - 1), bits,
                  bits.view(x.dtype), code.q[rows], code.lo[rows], code.step[rows],
                  code.eps[rows], code.x2[rows], code.qn[rows],
                  2.0**-53 if x.dtype == np.float64 else 2.0**-24)
    return code


def row_code(x: np.ndarray) -> RowCode:
    """The :class:`RowCode` of finite float rows ``x`` (n, d), used as they are (divisor 1)."""
    return code_rows(x, empty_code(*x.shape))


_NO_CODE = RowCode(q=np.zeros((1, 1), dtype=np.uint8), lo=np.zeros(1), step=np.zeros(1),
                   eps=np.zeros(1), x2=np.zeros(1), qn=np.zeros(1))  # same types: one kernel


@dataclass
class Bounds:
    """The state of one chunk after a pass: labels, per-cluster sums and distance bounds.

    Everything refers to ``centres``; reusing it next pass gives the same results as a pass
    from scratch (tested). Model ``m`` (id ``ids[m]``) owns ``centres[starts[m]:stops[m]]``.
    Bounds are stored relative to ``drift``, each centre's accumulated movement since they were
    set: the lower bound to centre j is ``lower[r, j] - drift[j]`` and the upper bound is
    ``upper[r, m] + drift[own]``, so moving centres costs no write per row.
    """

    ids: tuple  # model ids, in stacking order
    centres: np.ndarray  # (M, d) compute dtype: the centres the labels and bounds refer to
    starts: np.ndarray  # (n_models,) int64
    stops: np.ndarray  # (n_models,) int64
    labels: np.ndarray  # (n, n_models) int32 canonical labels (local to the model)
    sums: np.ndarray  # (M, d) int32 or int64: integer sums per label (raw pixels, or Fixed)
    counts: np.ndarray  # (M,) int64
    sq: np.ndarray  # (M,) int64: integer squared row norms summed per label
    upper: np.ndarray | None  # (n, n_models) float32
    lower: np.ndarray | None  # (n, M) float32
    drift: np.ndarray | None  # (M,) float64
    bounded: bool  # the pass that made this state used the bounds
    computed: float  # share of the distances that pass computed
    changed: float  # share of the (row, model) labels that pass changed
    fixed: kernels.Fixed | None = None  # the units of float rows' sums
    code: RowCode | None = None  # float rows' compact copy (see RowCode)


@dataclass
class PassResult:
    """A chunk's contribution to one Lloyd pass, in integer units (raw pixels, or the Fixed
    units of float rows: see :func:`kmdask.engine.kernels.sum_divisors`)."""

    sums: np.ndarray  # (M, d) int64
    counts: np.ndarray  # (M,) int64
    sq: np.ndarray  # (M,) int64
    computed: int  # distances computed (row x centre)
    possible: int  # rows x centres
    changed: int  # (row, model) labels that changed (all of them on a first pass)
    read: int  # rows whose values the pass read (the rest were settled by bounds or code)


@njit(cache=True, nogil=True, inline="always")
def _f32_up(v):  # pragma: no cover - compiled
    # float32 >= v: float32 rounding moves a value by at most 2**-24 of it (plus 2**-150
    # for subnormals), so step out by more first
    return np.float32(v + abs(v) * 2.0**-22 + 1e-30)


@njit(cache=True, nogil=True, inline="always")
def _f32_down(v):  # pragma: no cover - compiled
    return np.float32(v - abs(v) * 2.0**-22 - 1e-30)


@njit(cache=True, nogil=True, inline="always")
def _add_units(xr, to, s):  # pragma: no cover - compiled
    # to += xr in the sums' units: s the fixed-point scale (float rows), 0 for pixels
    if s > 0:
        for f in range(xr.shape[0]):
            to[f] += np.int64(np.rint(xr[f] * s))
    else:
        for f in range(xr.shape[0]):
            to[f] += xr[f]


@njit(cache=True, nogil=True, inline="always")
def _shift_units(xr, fr, to, s):  # pragma: no cover - compiled
    # fr -= xr and to += xr in the sums' units (see _add_units): a float row's values
    # converted once for both; pixels take a loop per sum (one loop for both: 1.9 against
    # 1.5 ms for 9,000 moves)
    if s > 0:
        for f in range(xr.shape[0]):
            v = np.int64(np.rint(xr[f] * s))
            fr[f] -= v
            to[f] += v
    else:
        for f in range(xr.shape[0]):
            fr[f] -= xr[f]
        for f in range(xr.shape[0]):
            to[f] += xr[f]


@njit(cache=True, nogil=True, inline="always")
def _add_row(x, r, new, xsq, sums, counts, sq, scale):  # pragma: no cover - compiled
    # row r joins cluster new, from none (as every row does in a first pass). Float rows
    # (scale > 0) count in fixed point; float32 ones are scaled in float32 where the scale is
    # one (8 SIMD lanes instead of 4): a power of two, so the product is exact unless it is
    # subnormal, and rint makes those 0 either way. Inlined, through 1-d row views: a first
    # pass of 30k float32 MNIST rows, one thread, 35 against 38-40 ms.
    xr = x[r]
    sx = xr.dtype.type(scale)
    if np.float64(sx) == scale:
        _add_units(xr, sums[new], sx)
    else:
        _add_units(xr, sums[new], scale)
    counts[new] += 1
    sq[new] += xsq[r]


@njit(cache=True, nogil=True)
def _move(x, r, old, new, xsq, sums, counts, sq, scale):  # pragma: no cover - compiled
    # row r leaves cluster old for new (see _add_row); not inlined: moves are few after a
    # first pass, and inlining it into every pass kernel took 10 s more to compile
    xr = x[r]
    sx = xr.dtype.type(scale)
    if np.float64(sx) == scale:
        _shift_units(xr, sums[old], sums[new], sx)
    else:
        _shift_units(xr, sums[old], sums[new], scale)
    counts[old] -= 1
    sq[old] -= xsq[r]
    counts[new] += 1
    sq[new] += xsq[r]


@njit(cache=True, nogil=True, inline="always")
def _relabel(x, r, m, a, best, labels, xsq, sums, counts, sq, scale):  # pragma: no cover
    # row r's label for model m (centres from a) becomes best: moved between the sums if it
    # changed (from none on a first pass); returns 1 if it did
    old = labels[r, m]
    if old == best - a:
        return 0
    if old >= 0:
        _move(x, r, a + old, best, xsq, sums, counts, sq, scale)
    else:
        _add_row(x, r, best, xsq, sums, counts, sq, scale)
    labels[r, m] = best - a
    return 1


@njit(cache=True, nogil=True, inline="always", fastmath={"reassoc", "contract"})
def _dot(xf, c, j):  # pragma: no cover - compiled
    # in the compute dtype (float32 or float64): within the GEMM's error bound in any order
    acc = xf[0] * c[j, 0]
    for p in range(1, xf.shape[0]):
        acc += xf[p] * c[j, p]
    return acc


@njit(cache=True, nogil=True, inline="always")
def _code_err(coef, slack, h, qn, x2, lo, sqd, r2, rs):  # pragma: no cover - compiled
    # Bound on the rounding of ||xhat - c||^2 as _code_d2 computes it, for the centres of a
    # model (r2, rs: their largest squared norm and its root): q . c as a GEMM of exact
    # integers scaled by h, the rest in float64 (|lo * sum(c)| <= |lo| sqrt(d) ||c||).
    return coef * h * qn * rs + slack * (x2 + r2 + 2.0 * abs(lo) * sqd * rs + 1.0)


@njit(cache=True, nogil=True, inline="always", fastmath={"reassoc", "contract"})
def _code_d2(qf, lo, step, x2, c, csum, cnorm, j):  # pragma: no cover - compiled
    # ||xhat - c_j||^2 with xhat = lo + step * q: see the error bound where it is used
    return x2 + cnorm[j] - 2.0 * (lo * csum[j] + step * np.float64(_dot(qf, c, j)))


@njit(cache=True, nogil=True)
def _full_block(dots, rows, x, xnorm, xs, xsq, starts, stops, cnorm, craw, r2, rs, r2c, rsc,
                coef, slack, bounds, labels, upper, lower, sums, counts, sq,
                scale):  # pragma: no cover - compiled
    # Every distance of a block's rows from its GEMM (dots[i] is row rows[i]): decide, move
    # changed rows, set fresh bounds.
    changed = 0
    for i in range(dots.shape[0]):
        r = rows[i]
        if bounds:  # one flat loop over all centres (r2c, rsc: their model's r2, rs): SIMD
            for j in range(cnorm.shape[0]):
                e = coef * xs[r] * rsc[j] + slack * (xnorm[r] + r2c[j] + 1.0)
                lo = xnorm[r] + cnorm[j] - 2.0 * dots[i, j] - e
                lower[r, j] = _f32_down(np.sqrt(max(lo, 0.0)))
        for m in range(starts.shape[0]):
            a = starts[m]
            b = stops[m]
            best, bestv, second = kernels.top2(dots, i, cnorm, a, b, 0)
            e = kernels.err_bound(xnorm[r], xs[r], r2[m], rs[m], coef, slack)
            if not second - bestv > 2.0 * e:  # near tie: decide exactly
                best = kernels.exact_argmin(x[r], craw, a, b)
                bestv = cnorm[best] - 2.0 * dots[i, best]
            changed += _relabel(x, r, m, a, best, labels, xsq, sums, counts, sq, scale)
            if bounds:
                upper[r, m] = _f32_up(np.sqrt(max(xnorm[r] + bestv + e, 0.0)))
    return changed


@njit(cache=True, nogil=True)
def _coded_full(x, xnorm, xs, xsq, starts, stops, cnorm, craw, r2, rs, r2c, rsc, coef, slack,
                bounds, labels, upper, lower, sums, counts, sq, scale, c32, xi, mask, shift,
                bits, mnmx, qc, qlo, qstep, qeps, qx2, qn, u, dots,
                every):  # pragma: no cover - compiled
    # The first pass of float32 rows with few centres, building their code on the way: per
    # block of dots' rows (small enough to stay in L2), the code, the dot products
    # (_few_dots, as gemm_blocks would compute them) and _full_block, so the rows come from
    # memory once instead of three times. Returns the labels changed.
    n = x.shape[0]
    rows = dots.shape[0]
    changed = 0
    for s in range(0, n, rows):
        e = min(s + rows, n)
        _row_code(x[s:e], xi[s:e], mask, shift, bits, mnmx, qc[s:e], qlo[s:e], qstep[s:e],
                  qeps[s:e], qx2[s:e], qn[s:e], u)
        kernels._few_dots(x[s:e], c32, dots[:e - s])
        changed += _full_block(dots[:e - s], every[s:e], x, xnorm, xs, xsq, starts, stops,
                               cnorm, craw, r2, rs, r2c, rsc, coef, slack, bounds, labels,
                               upper, lower, sums, counts, sq, scale)
    return changed


@njit(cache=True, nogil=True)
def _code_full(x, xnorm, xs, xsq, starts, stops, cnorm, craw, r2, rs, r2c, rsc, coef, slack,
               bounds, labels, upper, lower, sums, counts, sq, scale, c32, csum, qc, qlo,
               qstep, qeps, qx2, qn, qdots, xdots):  # pragma: no cover - compiled
    # A GEMM pass over float32 rows' code instead of the rows: every code distance, from
    # q . c (uint8 codes, as pixels are read) in blocks of qdots' rows. A row whose nearest
    # centre the code proves, for every model, gets that label, the code's bounds, and is read
    # only if it moves; any other row is read and decided from its own dot products by
    # _full_block (the same dots: _few_dots computes each row alone). Labels are the
    # canonical ones either way: the code settles a label only where the exact decision
    # (exact_argmin's, within slack) could not differ, as in _bounded. Returns the labels
    # changed and the rows read.
    n, d = x.shape
    nmodel = starts.shape[0]
    sqd = np.sqrt(np.float64(d))
    rows = qdots.shape[0]
    bests = np.empty(nmodel, dtype=np.int64)
    pend = np.empty(rows, dtype=np.int64)  # the block's rows that the code moves, and where
    pbest = np.empty((rows, nmodel), dtype=np.int64)
    one = np.empty(1, dtype=np.int64)  # the row _full_block decides, its xdots row
    changed = 0
    read = 0
    exact = 0
    for s in range(0, n, rows):
        nb = min(rows, n - s)
        npend = 0
        kernels._few_dots(qc[s:s + nb], c32, qdots[:nb])
        for i in range(nb):
            r = s + i
            h = qstep[r]
            lo = qlo[r]
            eps = qeps[r]
            settled = True
            for m in range(nmodel):
                a = starts[m]
                b = stops[m]
                ec = _code_err(coef, slack, h, qn[r], qx2[r], lo, sqd, r2[m], rs[m])
                best = a
                bestv = np.inf
                for j in range(a, b):
                    v = cnorm[j] - 2.0 * (lo * csum[j] + h * np.float64(qdots[i, j]))
                    best = j if v < bestv else best
                    bestv = min(bestv, v)
                u = np.float64(_f32_up(np.sqrt(max(qx2[r] + bestv + ec, 0.0)) + eps))
                tiny = slack * (xnorm[r] + r2[m] + 1.0)
                for j in range(a, b):
                    v = qx2[r] + cnorm[j] - 2.0 * (lo * csum[j] + h * np.float64(qdots[i, j]))
                    lb = np.float64(_f32_down(max(np.sqrt(max(v - ec, 0.0)) - eps, 0.0)))
                    settled &= (j == best) | ((lb > u) & (lb * lb - u * u > tiny))
                    if bounds:
                        lower[r, j] = lb
                if not settled:
                    break
                bests[m] = best
                if bounds:
                    upper[r, m] = u
            if settled:
                moves = False
                for m in range(nmodel):
                    moves |= labels[r, m] != bests[m] - starts[m]
                if moves:
                    pend[npend] = r
                    pbest[npend] = bests
                    npend += 1
                continue
            kernels._few_dots(x[r:r + 1], c32, xdots)
            read += 1
            one[0] = r
            changed += _full_block(xdots, one, x, xnorm, xs, xsq, starts, stops,
                                   cnorm, craw, r2, rs, r2c, rsc, coef, slack, bounds, labels,
                                   upper, lower, sums, counts, sq, scale)
            exact += 1
        # the rows the code moved, after the block's decisions: reading them in between
        # evicted the code and dots the loop works on (30k float32 MNIST rows, one thread,
        # second and third passes: 17.9 and 15.6 against 19.6 and 17.5 ms)
        for k in range(npend):
            r = pend[k]
            for m in range(nmodel):
                changed += _relabel(x, r, m, starts[m], pbest[k, m], labels, xsq, sums,
                                    counts, sq, scale)
        read += npend
    return changed, read, exact


@njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _bounded(x, xnorm, xs, xsq, c32, cnorm, craw, starts, stops, drift, r2, rs, coef, slack,
             labels, upper, lower, sums, counts, sq, fval, js, xf, pixels, div, scale,
             coded, qc, qlo, qstep, qeps, qx2, qn, csum, qf):  # pragma: no cover - compiled
    # Elkan's pass: compute only the distances that a bound cannot rule out. Returns the
    # distances computed, the labels changed, the rows read, and the (row, model) pairs the
    # code tried to settle and settled.
    computed = 0
    changed = 0
    read = 0
    tried = 0
    decided = 0
    sqd = np.sqrt(np.float64(x.shape[1]))
    inv = 1.0 / div if pixels else 1.0
    for r in range(x.shape[0]):
        xn = xnorm[r]
        converted = False
        qconv = False
        moved = False  # the row moved by the code's decision (its values read for the sums)
        for m in range(starts.shape[0]):
            a = starts[m]
            b = stops[m]
            own = a + labels[r, m]
            tiny = slack * (xn + r2[m] + 1.0)
            u = np.float64(upper[r, m]) + drift[own]
            settled = True
            for j in range(a, b):
                lo = np.float64(lower[r, j]) - drift[j]
                # the exact decision keeps the own label when d_j^2 - d_own^2 > its rounding
                settled &= (j == own) | ((lo > u) & (lo * lo - u * u > tiny))
            if settled:  # every other centre is provably farther: the label stands
                continue
            if coded:  # try to decide it from the code first: a byte per value to read
                if not qconv:
                    for p in range(x.shape[1]):
                        qf[p] = qc[r, p]
                    qconv = True
                h = qstep[r]
                ql = qlo[r]
                qx = qx2[r]
                qe = qeps[r]
                ec = _code_err(coef, slack, h, qn[r], qx, ql, sqd, r2[m], rs[m])
                d_own = _code_d2(qf, ql, h, qx, c32, csum, cnorm, own)
                ust = _f32_up(np.sqrt(max(d_own + ec, 0.0)) + qe - drift[own])
                if np.float64(ust) + drift[own] < u:
                    upper[r, m] = ust
                    u = np.float64(ust) + drift[own]
                # every centre the bounds cannot rule out, from the code: the nearest of
                # those it cannot rule out either is where the row may move
                best = own
                bestv = d_own
                settled = True
                for j in range(a, b):
                    lo = np.float64(lower[r, j]) - drift[j]
                    if j == own or ((lo > u) & (lo * lo - u * u > tiny)):
                        continue
                    computed += 1
                    dc = _code_d2(qf, ql, h, qx, c32, csum, cnorm, j)
                    lst = _f32_down(np.sqrt(max(dc - ec, 0.0)) - qe + drift[j])
                    if lst > lower[r, j]:
                        lower[r, j] = lst
                        lo = np.float64(lst) - drift[j]
                    if not ((lo > u) & (lo * lo - u * u > tiny)):
                        settled = False
                        best = j if dc < bestv else best
                        bestv = min(bestv, dc)
                computed += 1
                tried += 1
                if settled:  # the label stands
                    decided += 1
                    continue
                if best != own:  # the row moves to best if the code proves every other
                    # centre farther, by the criterion above (the own one by its code bound)
                    ub = np.float64(_f32_up(np.sqrt(max(bestv + ec, 0.0)) + qe))
                    lown = max(np.sqrt(max(d_own - ec, 0.0)) - qe,
                               np.float64(lower[r, own]) - drift[own])
                    moves = (lown > ub) & (lown * lown - ub * ub > tiny)
                    for j in range(a, b):
                        lo = np.float64(lower[r, j]) - drift[j]
                        far = (lo > ub) & (lo * lo - ub * ub > tiny)
                        moves &= (j == own) | (j == best) | far
                    if moves:
                        decided += 1
                        lower[r, own] = _f32_down(lown + drift[own])
                        upper[r, m] = _f32_up(ub - drift[best])
                        _move(x, r, own, best, xsq, sums, counts, sq, scale)
                        labels[r, m] = best - a
                        changed += 1
                        moved = True
                        continue
            if not converted:  # the row in the compute dtype, once (a copy for float rows
                # too: x may be read-only, and one kernel serves both). Pixels stay raw
                # (exact in float32) and their dot products are scaled by 1 / div instead:
                # a division per value cost 30% of the pass (1.02M rows, 2 workers). The
                # rounding stays within err_bound: a float32 dot of exact values errs by
                # gamma_d sum |x_p c_p| in raw units, and the scaling by two float64 ulps.
                if pixels:
                    for p in range(x.shape[1]):
                        xf[p] = np.float32(x[r, p])
                else:
                    for p in range(x.shape[1]):
                        xf[p] = x[r, p]
                converted = True
                read += 1
            e = kernels.err_bound(xn, xs[r], r2[m], rs[m], coef, slack)
            # the own distance first: it tightens the upper bound
            fown = cnorm[own] - 2.0 * (inv * np.float64(_dot(xf, c32, own)))
            u = np.sqrt(max(xn + fown + e, 0.0))
            nj = 0
            for j in range(a, b):
                fval[j] = np.inf
                lo = np.float64(lower[r, j]) - drift[j]
                if j != own and not ((lo > u) & (lo * lo - u * u > tiny)):
                    js[nj] = j
                    nj += 1
            fval[own] = fown
            computed += 1 + nj
            for q in range(nj):
                j = js[q]
                v = cnorm[j] - 2.0 * (inv * np.float64(_dot(xf, c32, j)))
                fval[j] = v
                lower[r, j] = _f32_down(np.sqrt(max(xn + v - e, 0.0)) + drift[j])
            best = a
            bestv = fval[a]
            second = np.inf
            for j in range(a + 1, b):  # nearest and runner-up among the computed
                v = fval[j]
                second = min(second, max(bestv, v))
                best = j if v < bestv else best
                bestv = min(bestv, v)
            if not second - bestv > 2.0 * e:  # near tie among the computed: decide exactly
                best = kernels.exact_argmin(x[r], craw, a, b)
                bestv = fval[best]
            if best != own:
                lower[r, own] = _f32_down(np.sqrt(max(xn + fown - e, 0.0)) + drift[own])
                _move(x, r, own, best, xsq, sums, counts, sq, scale)
                labels[r, m] = best - a
                changed += 1
            upper[r, m] = _f32_up(np.sqrt(max(xn + bestv + e, 0.0)) - drift[best])
        read += moved and not converted
    return computed, changed, read, tried, decided


def _reuse(prev: Bounds | None, ids: tuple, starts: np.ndarray, stops: np.ndarray, n: int,
           d: int, sdt: np.dtype, fixed: kernels.Fixed | None) -> Bounds | None:
    """``prev`` rearranged for the models ``ids`` (None where it cannot serve all of them)."""
    if prev is None or prev.labels.shape[0] != n or prev.sums.dtype != sdt \
            or prev.centres.shape[1] != d or prev.fixed != fixed:
        return None
    if prev.ids == ids:
        return prev
    where = {i: m for m, i in enumerate(prev.ids)}
    if not all(i in where for i in ids):
        return None
    sizes = stops - starts
    old = [where[i] for i in ids]
    if any(prev.stops[o] - prev.starts[o] != k for o, k in zip(old, sizes, strict=True)):
        return None
    return select(prev, ids)


def select(state: Bounds, ids: tuple, with_bounds: bool = True) -> Bounds:
    """The part of ``state`` about the models ``ids`` (each one of its ids), in that order;
    without its distance bounds if not ``with_bounds`` (labels and sums are the small part)."""
    where = {i: m for m, i in enumerate(state.ids)}
    old = [where[i] for i in ids]
    starts, stops = kernels.stack_bounds([int(state.stops[o] - state.starts[o]) for o in old])
    cols = np.concatenate([np.arange(state.starts[o], state.stops[o]) for o in old])
    has = with_bounds and state.upper is not None
    c_order = np.ascontiguousarray  # column picks come out in Fortran order: one layout only
    return Bounds(ids=tuple(ids), centres=state.centres[cols], starts=starts, stops=stops,
                  labels=c_order(state.labels[:, old]), sums=state.sums[cols],
                  counts=state.counts[cols], sq=state.sq[cols],
                  upper=c_order(state.upper[:, old]) if has else None,
                  lower=c_order(state.lower[:, cols]) if has else None,
                  drift=state.drift[cols] if has else None, bounded=state.bounded,
                  computed=state.computed, changed=state.changed, fixed=state.fixed,
                  code=state.code)


def join(a: Bounds | None, b: Bounds | None) -> Bounds | None:
    """The states of one chunk for two disjoint sets of models, as one state (e.g. the models
    still running and those that stopped earlier, for the final pass). None where they do not
    fit together: the next pass then starts from scratch, with the same results."""
    if a is None or b is None:
        return b if a is None else a
    if a.labels.shape[0] != b.labels.shape[0] or a.sums.dtype != b.sums.dtype \
            or a.centres.dtype != b.centres.dtype or a.fixed != b.fixed:
        return None
    has = a.upper is not None and b.upper is not None
    starts, stops = kernels.stack_bounds([int(k) for k in np.concatenate(
        [a.stops - a.starts, b.stops - b.starts])])
    return Bounds(ids=a.ids + b.ids, centres=np.concatenate([a.centres, b.centres]),
                  starts=starts, stops=stops, labels=np.hstack([a.labels, b.labels]),
                  sums=np.concatenate([a.sums, b.sums]),
                  counts=np.concatenate([a.counts, b.counts]), sq=np.concatenate([a.sq, b.sq]),
                  upper=np.hstack([a.upper, b.upper]) if has else None,
                  lower=np.hstack([a.lower, b.lower]) if has else None,
                  drift=np.concatenate([a.drift, b.drift]) if has else None,
                  # whichever part argues for a GEMM pass decides (see lloyd_pass)
                  bounded=a.bounded or b.bounded, computed=max(a.computed, b.computed),
                  changed=max(a.changed, b.changed), fixed=a.fixed,
                  code=a.code if a.code is not None else b.code)


def bounds_usable(state: Bounds | None) -> bool:
    """Whether a pass from ``state`` takes Elkan's bounded way (see :func:`lloyd_pass`): it
    has bounds, and the pass that made them did not compute too many distances."""
    return state is not None and state.upper is not None \
        and not (state.bounded and state.computed > _ELKAN_MAX)


def lloyd_pass(chunk: kernels.Chunk, centres: np.ndarray, starts: np.ndarray,
               stops: np.ndarray, ids: tuple | None = None, prev: Bounds | None = None,
               keep: bool = True, bounds: bool = True, fixed: kernels.Fixed | None = None
               ) -> tuple[PassResult, Bounds | None]:
    """One Lloyd assignment pass over a chunk for every model, reusing ``prev``.

    Three ways, chosen from ``prev``; all give the same result:

    - no state: one GEMM per row block against every centre (like
      :func:`kmdask.engine.kernels.assign`), summing every row;
    - labels from the previous pass: the same GEMM, but only rows whose label changed move
      between the per-cluster sums (summing every row costs about half the GEMM). Once few
      labels change, this pass also sets distance bounds (a square root per row and centre);
    - bounds from the previous pass: Elkan's pass, computing only the distances the bounds
      cannot rule out. It pays only once centres barely move: a distance computed alone costs
      several times its share of a GEMM, so after a pass that still computed many, the bounds
      are dropped until labels settle again.

    Float rows with a state are decided from their :class:`RowCode` first (in both kinds of
    pass), reading the rows only where it cannot decide; the first pass builds the code.

    Parameters
    ----------
    chunk : a :class:`kmdask.engine.kernels.Chunk` of uint8, float32 or float64 rows.
    centres : (M, d) all models' centres stacked (scaled units); used in the compute dtype
        (float32, float64 for float64 rows).
    starts, stops : model ``m`` owns ``centres[starts[m]:stops[m]]``.
    ids : a hashable id per model, so that ``prev`` can be matched to the models.
    prev : what this chunk's previous pass returned, or None. It is *consumed*: updated in
        place, so the caller must drop its reference before the call (a failed pass then
        leaves no half-updated state behind).
    keep : build the state for the next pass (False when the chunk will not be seen again).
    bounds : keep distance bounds in the state (4 bytes per row and centre, plus a byte per
        value for float rows' code); without them the state holds labels and sums only and
        every pass is a GEMM pass of the rows themselves.
    fixed : the integer units of float rows' sums (required for them; see
        :func:`kmdask.engine.kernels.fixed_for`); uint8 rows are summed as raw integers.

    Returns
    -------
    The chunk's integer sums/counts/squared norms per cluster, and the new state (or None).
    """
    x = chunk.x
    pixels = x.dtype == np.uint8
    if not pixels and fixed is None:
        raise TypeError(f"lloyd_pass needs the fixed-point units of {x.dtype} rows")
    fixed = None if pixels else fixed
    n, d = x.shape
    nmodel = starts.shape[0]
    ids = tuple(range(nmodel)) if ids is None else tuple(ids)
    c = np.ascontiguousarray(centres, dtype=kernels.compute_dtype(x.dtype))
    c64 = c.astype(np.float64)
    dec = kernels.decision(chunk, c, starts, stops)
    cnorm, craw, r2, rs, xs = dec.cnorm, dec.craw, dec.r2, dec.rs, dec.xs
    coef, slack = dec.coef, dec.slack
    scale = 0.0 if fixed is None else fixed.scale
    xsq = kernels.row_sq_units(chunk, fixed)
    m_total = c.shape[0]
    possible = n * m_total
    sdt = np.dtype(np.int32 if pixels and 255 * n < 2**31 else np.int64)
    state = _reuse(prev, ids, starts, stops, n, d, sdt, fixed) if keep else None
    bounds = bounds and keep
    if bounds and bounds_usable(state):
        labels, sums, counts, sq = state.labels, state.sums, state.counts, state.sq
        upper, lower = state.upper, state.lower
        # each centre's movement, rounded up, added to what it moved before
        delta = np.sqrt(((c64 - state.centres.astype(np.float64)) ** 2).sum(axis=1))
        drift = state.drift + delta * (1.0 + 1e-9)
        code = state.code
        rc = _NO_CODE if code is None else code
        computed, changed, read, tried, decided = _bounded(
            x, chunk.xnorm, xs, xsq, c, cnorm, craw, starts, stops, drift, r2, rs, coef,
            slack, labels, upper, lower, sums, counts, sq, np.empty(m_total),
            np.empty(m_total, dtype=np.int64),
            np.empty(d, dtype=c.dtype), pixels, chunk.divisor, scale,
            code is not None, rc.q, rc.lo, rc.step, rc.eps, rc.x2, rc.qn, c64.sum(axis=1),
            np.empty(d, dtype=c.dtype))
        if tried and decided < _CODE_MIN_SETTLED * tried:
            code = None  # too coarse for these rows' gaps: it costs more than it saves
        bounded = True
    else:
        code = None
        if state is not None:
            labels, sums, counts, sq = state.labels, state.sums, state.counts, state.sq
            code = state.code
        else:
            labels = np.full((n, nmodel), -1, dtype=np.int32)
            sums = np.zeros((m_total, d), dtype=sdt)
            counts = np.zeros(m_total, dtype=np.int64)
            sq = np.zeros(m_total, dtype=np.int64)
        # float rows' code: built while a full pass has each block in cache, used by the
        # passes after it (kept with the bounds, so not where bounds are off): bounded ones,
        # and with few float32 centres GEMM ones too (module docstring)
        build = (_CODE and bounds and code is None and not pixels and chunk.divisor == 1.0
                 and d <= CODE_MAX_D and m_total <= _CODE_MAX_CENTRES and state is None)
        if build:
            code = empty_code(n, d)
        bounds = bounds and state is not None and state.changed <= _BOUNDS_FROM
        upper = np.empty((n, nmodel) if bounds else (1, 1), dtype=np.float32)
        lower = np.empty((n, m_total) if bounds else (1, 1), dtype=np.float32)
        drift = np.zeros(m_total)
        which = np.repeat(np.arange(nmodel), stops - starts)  # each centre's model
        r2c, rsc = r2[which], rs[which]
        exact = (xs, xsq, starts, stops, cnorm, craw, r2, rs, r2c, rsc, coef, slack, bounds,
                 labels, upper, lower, sums, counts, sq, scale)
        changed = 0
        computed = possible
        few32 = x.dtype == np.float32 and m_total <= kernels.FEW_CENTRES and n > 0
        if code is not None and not build and few32:
            # a GEMM pass of the code: a quarter of the bytes to read (float32 rows' GEMM
            # passes are bound by reading them: 30k MNIST rows, one thread, 15.9 ms streamed
            # against 9.3 from cache), the rows read only where the code cannot decide
            changed, read, tough = _code_full(
                x, chunk.xnorm, *exact, c, c64.sum(axis=1), code.q, code.lo, code.step,
                code.eps, code.x2, code.qn,
                kernels.scratch("code.dots", (min(_CODE_ROWS, n), m_total), np.float32),
                np.empty((1, m_total), dtype=np.float32))
            if tough > (1.0 - _CODE_MIN_SETTLED) * n:
                code = None  # too coarse for these rows' gaps
        elif build and few32 and d > 0:
            # the first pass in one compiled loop (_coded_full), the same dots and decisions
            # as below: 30k MNIST rows, one thread, 41.5 against 43.5-45 ms
            xc = np.ascontiguousarray(x)
            bits = np.empty(2, dtype=np.int32)
            changed = _coded_full(
                xc, chunk.xnorm, *exact, c, xc.view(np.int32), np.int32(2**31 - 1),
                np.int32(31), bits, bits.view(np.float32), code.q, code.lo, code.step,
                code.eps, code.x2, code.qn, 2.0**-24,
                kernels.scratch("code.dots", (min(_CODE_ROWS, n), m_total), np.float32),
                np.arange(n))
            read = n
        else:
            every = np.arange(n)
            for s, xr, dots in kernels.gemm_blocks(chunk, c, decide_only=True):
                if build:
                    code_rows(xr, code, s)
                changed += _full_block(dots, every[s:s + xr.shape[0]], x, chunk.xnorm,
                                       *exact)
            read = n
        bounded = False
        if not bounds:
            upper = lower = drift = None
    result = PassResult(sums=sums.astype(np.int64), counts=counts.copy(), sq=sq.copy(),
                        computed=int(computed), possible=possible, changed=int(changed),
                        read=int(read))
    if not keep:
        return result, None
    return result, Bounds(ids=ids, centres=c, starts=starts, stops=stops, labels=labels,
                          sums=sums, counts=counts, sq=sq, upper=upper, lower=lower,
                          drift=drift, bounded=bounded, computed=computed / possible,
                          changed=changed / (n * nmodel), fixed=fixed, code=code)


def inertia(result_sums: np.ndarray, counts: np.ndarray, sq: np.ndarray, centres: np.ndarray,
            starts: np.ndarray, stops: np.ndarray, divisors: tuple[float, float] = (255.0, 65025.0)
            ) -> np.ndarray:
    """Per model, sum of squared distances of the rows to their centres, from exact sums.

    sum_k (sum_i ||x_i||^2 - 2 c_k . sum_i x_i + n_k ||c_k||^2), in scaled units, with the
    centres the pass used (in its compute dtype); ``divisors`` turn the integer sums and
    squared norms into scaled units (:func:`kmdask.engine.kernels.sum_divisors`). Exact
    integers in, so independent of chunking.
    """
    c = np.asarray(centres).astype(np.float64)
    sdiv, qdiv = divisors
    per = (sq / qdiv - 2.0 * np.einsum("kd,kd->k", c, result_sums.astype(np.float64)) / sdiv
           + counts * np.einsum("kd,kd->k", c, c))
    out = np.array([per[a:b].sum() for a, b in zip(starts, stops, strict=True)])
    return np.maximum(out, 0.0)
