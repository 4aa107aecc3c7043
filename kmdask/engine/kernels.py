"""Per-chunk K-Means maths: pure numpy plus one compiled (numba) loop. No dask, no I/O.

Many models share one pass: their centres are stacked into one matrix ``C`` of shape
``(M, d)``; model ``m`` owns rows ``starts[m]:stops[m]``. A chunk is processed in row blocks
small enough to stay in cache: one GEMM ``x_block @ C.T`` gives every model's dot products, then
a single compiled loop does, per row and model, the argmin (ties to the lowest index), the
squared distance, and the per-cluster count and sum. Sums are exact integers, so centres do
not depend on the order of accumulation (chunking, workers, which rows a pass skipped): uint8
pixels are added as they are; float rows in fixed point (:class:`Fixed`: each value rounded to
a grid of 2**-s fine enough that any sum of the data's rows fits an int64).

Labels are *canonical*: the GEMM (float32, or float64 for float64 rows) decides a row only when
the gap to the runner-up exceeds a proven bound on its rounding error; near ties are re-decided
with sequential float64 distances. Labels therefore do not depend on how the GEMM was blocked,
which rows shared it, or which other models rode along, so a pass that skips rows by distance
bounds (:mod:`kmdask.engine.incremental`) gives the very same labels as a full pass.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np
from numba import njit

BLOCK_ROWS = 1024  # 1024 x 784 float32 = 3 MiB: the block and its GEMM output stay in cache

# What the compiled loop accumulates.
MODE_ASSIGN = 0  # labels and distances only
MODE_COUNTS = 1  # + per-cluster counts
MODE_SUMS = 2  # + per-cluster counts and sums


def compute_dtype(dtype: np.dtype) -> np.dtype:
    """float64 data is clustered in float64; uint8 and float32 in float32."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


# Float32 distances hold squared row norms up to this: a dot product of a row and a centre
# (a mean of rows) is at most the largest squared norm, and ||x - c||^2 at most four times it,
# with room for rounding below float32's largest value (3.4e38).
F32_MAX_SQ_NORM = 2.0**120


def float32_overflow(dtype: np.dtype, stats: list[tuple]) -> float | None:
    """The largest squared row norm of float32 rows whose distances would overflow float32
    (``stats`` from :func:`chunk_stats`), else None."""
    if np.dtype(dtype) != np.float32:
        return None
    big = max((float(s[5]) for s in stats), default=0.0)
    return big if big > F32_MAX_SQ_NORM else None


def scale_for(dtype: np.dtype) -> float:
    """uint8 pixels are scaled to [0, 1]; float data is used as is."""
    return 255.0 if np.dtype(dtype) == np.uint8 else 1.0


def to_compute(x: np.ndarray, divisor: float) -> np.ndarray:
    """Rows as the compute dtype; uint8 is divided by 255 in float32 (as ``x / 255``)."""
    out = x.astype(compute_dtype(x.dtype), copy=True)
    if divisor != 1.0:
        out /= out.dtype.type(divisor)
    return out


@dataclass(frozen=True)
class Chunk:
    """A chunk of rows ready for the kernels: raw values plus cached squared row norms.

    ``cache`` holds values derived from this chunk between passes (e.g. the distance bounds of
    :mod:`kmdask.engine.incremental`); it travels with the chunk and is empty for a fresh one."""

    x: np.ndarray  # (n, d) raw dtype (uint8/float32/float64)
    xnorm: np.ndarray  # (n,) float64, of the scaled values
    divisor: float
    offset: int  # global index of the first row
    index: int  # chunk number
    xsq: np.ndarray | None = None  # (n,) int64 raw squared norms of uint8 rows
    cache: dict = field(default_factory=dict, compare=False, repr=False)

    def __getstate__(self) -> dict:
        # a chunk sent to another worker travels without its cache: rebuilding it there costs
        # one full pass, shipping it would cost more than the chunk itself
        return {k: v for k, v in self.__dict__.items() if k != "cache"}

    def __setstate__(self, state: dict) -> None:
        for k, v in {**state, "cache": {}}.items():
            object.__setattr__(self, k, v)


@njit(cache=True, nogil=True)
def _pixels_to_f32(x, divisor, out):  # pragma: no cover - compiled
    # float32(x) / float32(divisor): bit-identical to numpy's x / np.float32(255), but 3x
    # faster than np.divide's casting loop (it cost as much as the GEMM)
    d = np.float32(divisor)
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            out[i, j] = np.float32(x[i, j]) / d


@njit(cache=True, nogil=True)
def _row_sq_norms_u8(x, out, raw, div2):  # pragma: no cover - compiled
    # exact integer sum of squares per row (SIMD-friendly), scaled once: (sum x^2) / divisor^2
    for i in range(x.shape[0]):
        acc = 0
        for j in range(x.shape[1]):
            v = np.int32(x[i, j])
            acc += v * v
        raw[i] = acc
        out[i] = acc / div2


@njit(cache=True, nogil=True)
def _row_sq_norms_f(x, out):  # pragma: no cover - compiled
    # Each row summed in column order (one value whatever the chunking), eight rows at a
    # time: their independent sums fill a vector, where one row's chain of dependent adds
    # left it waiting (3x faster on 10,000 float32 MNIST rows; bit-identical).
    n, d = x.shape
    n8 = n - n % 8
    acc = np.zeros(8)
    for i in range(0, n8, 8):
        acc[:] = 0.0
        for j in range(d):
            for r in range(8):
                v = np.float64(x[i + r, j])
                acc[r] += v * v
        out[i:i + 8] = acc
    for i in range(n8, n):
        t = 0.0
        for j in range(d):
            v = np.float64(x[i, j])
            t += v * v
        out[i] = t


def prepare_chunk(x: np.ndarray, divisor: float, offset: int, index: int) -> Chunk:
    """Cache the squared norms of a chunk's (scaled) rows; the data stays in its raw dtype."""
    x = np.ascontiguousarray(x)
    xnorm = np.empty(x.shape[0], dtype=np.float64)
    xsq = None
    # no temporaries (see the note on buffers in assign); uint8 norms are exact
    if x.dtype == np.uint8:  # every uint8 chunk has its exact raw norms (assign sums them)
        xsq = np.empty(x.shape[0], dtype=np.int64)
        _row_sq_norms_u8(x, xnorm, xsq, float(divisor) * float(divisor))
    elif divisor == 1.0:
        _row_sq_norms_f(x, xnorm)
    else:
        xnorm[:] = np.einsum("ij,ij->i", x.astype(np.float64), x.astype(np.float64))
        xnorm /= divisor * divisor
    return Chunk(x=x, xnorm=xnorm, divisor=divisor, offset=offset, index=index, xsq=xsq)


@njit(cache=True, nogil=True)
def _col_stats_u8(x, s1, s2):  # pragma: no cover - compiled
    # int32 partial sums over blocks of rows (255**2 * 32768 < 2**31), added into the int64
    # totals: twice the SIMD lanes of int64 sums (10,000 MNIST rows: 0.74 against 1.48 ms)
    d = x.shape[1]
    a1 = np.zeros(d, dtype=np.int32)
    a2 = np.zeros(d, dtype=np.int32)
    for b in range(0, x.shape[0], 32768):
        a1[:] = 0
        a2[:] = 0
        for i in range(b, min(b + 32768, x.shape[0])):
            for j in range(d):
                v = np.int32(x[i, j])
                a1[j] = np.int32(a1[j] + v)  # cast back: numba widens int32 arithmetic
                a2[j] = np.int32(a2[j] + v * v)
        for j in range(d):
            s1[j] += a1[j]
            s2[j] += a2[j]


def chunk_stats(chunk: Chunk) -> tuple[int, np.ndarray, np.ndarray, bool, float, float]:
    """Row count, per-feature sum and sum of squares (scaled, float64), all-finite flag, and
    the largest absolute value and squared row norm (raw units; for :func:`fixed_for`)."""
    d = chunk.x.shape[1]
    nmax = float(chunk.xnorm.max()) if chunk.x.shape[0] else 0.0
    if chunk.x.dtype == np.uint8:  # exact integer sums, no float temporaries
        s1i = np.zeros(d, dtype=np.int64)
        s2i = np.zeros(d, dtype=np.int64)
        _col_stats_u8(chunk.x, s1i, s2i)
        # pixels' sums need no fixed point: 255 bounds them, no pass to find the largest
        return chunk.x.shape[0], s1i / chunk.divisor, s2i / chunk.divisor**2, True, 255.0, nmax
    s1 = np.zeros(d)
    s2 = np.zeros(d)
    amax = np.zeros(d)
    bad = np.zeros(d, dtype=np.int64)
    # one compiled pass (numpy took five: a copy, isfinite, two sums and a max)
    _col_stats_f(chunk.x, 1.0 / chunk.divisor, s1, s2, amax, bad)
    return (chunk.x.shape[0], s1, s2, not bad.any(), float(amax.max(initial=0.0)), nmax)


@njit(cache=True, nogil=True)
def _col_stats_f(x, inv, s1, s2, amax, bad):  # pragma: no cover - compiled
    # Everything per column, so the loop over a row's values vectorises: a running max or
    # finiteness flag over the whole chunk is a chain the compiler must keep in order (2.2x
    # slower). NaN and inf fail ``<= big``; a NaN never enters amax (``>`` is false for it).
    big = np.finfo(x.dtype).max
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            v = np.float64(x[i, j])
            a = abs(v)
            bad[j] += not (a <= big)
            amax[j] = a if a > amax[j] else amax[j]
            v *= inv
            s1[j] += v
            s2[j] += v * v


@dataclass(frozen=True)
class Fixed:
    """Fixed-point units of a row set's cluster sums. Float rows add a value ``v`` as the
    integer ``rint(v * scale)`` and a squared row norm ``q`` as ``rint(q * sq_scale)`` (int64);
    uint8 rows add raw pixels, which are integers already (the scales are then unused).

    Integer sums make the centres independent of the order of accumulation: of chunking,
    workers, and which rows changed cluster in an incremental pass. Both scales are powers of
    two chosen from the data (:func:`fixed_for`) so that no sum of its rows can overflow; the
    rounding is then at most 2**-(62 - log2(rows * max|v|)) of a value, far below float32's
    resolution and below the error of summing the rows in float64.
    """

    scale: float
    sq_scale: float


def _pow2_for(n: int, vmax: float) -> float:
    # the largest 2**s with n * vmax * 2**s <= 2**62 (an int64 holds any sum of n values)
    if not (vmax > 0.0) or n == 0:
        return 1.0
    s = int(np.floor(62.0 - np.log2(float(n)) - np.log2(vmax)))
    return float(np.ldexp(1.0, min(max(s, -1000), 1000)))


def fixed_for(stats: list[tuple]) -> Fixed:
    """The fixed-point units for rows whose :func:`chunk_stats` are ``stats`` (one set of rows,
    all its chunks: the units then depend on the rows alone, not on how they are chunked)."""
    n = sum(int(s[0]) for s in stats)
    return Fixed(scale=_pow2_for(n, max((s[4] for s in stats), default=0.0)),
                 sq_scale=_pow2_for(n, max((s[5] for s in stats), default=0.0)))


def sum_divisors(dtype: np.dtype, divisor: float, fixed: Fixed | None) -> tuple[float, float]:
    """What the integer sums and squared-norm sums of rows of ``dtype`` are divided by to
    give scaled units: the pixel scale for uint8 rows, the fixed-point scales for float rows."""
    if np.dtype(dtype) == np.uint8:
        return divisor, divisor * divisor
    return fixed.scale, fixed.sq_scale


def row_sq_units(chunk: Chunk, fixed: Fixed | None) -> np.ndarray:
    """Each row's squared norm as an integer in the units of :func:`sum_divisors` (int64)."""
    if chunk.x.dtype == np.uint8:
        return chunk.xsq
    return np.rint(chunk.xnorm * fixed.sq_scale).astype(np.int64)


def to_sum_units(rows: np.ndarray, fixed: Fixed | None) -> np.ndarray:
    """Rows (raw) as the integers the cluster sums add up (int64)."""
    if rows.dtype == np.uint8:
        return rows.astype(np.int64)
    return np.rint(rows.astype(np.float64) * fixed.scale).astype(np.int64)


def gemm_error_coef(d: int, dtype: np.dtype = np.float32) -> float:
    """Bound on |fl(cn - 2 x.c) - (cn - 2 x.c)| per unit of ||x|| ||c||, for a GEMM in
    ``dtype`` (float32, or float64 for float64 rows).

    A GEMM of ``d`` terms errs by at most gamma_d * sum|x_p c_p| in any summation order (FMA
    and blocking included); the conversion x / 255 of pixels, or c / 255 of the centres where
    raw pixels meet scaled centres, adds one rounding per value; and sum|x_p c_p| <= ||x|| ||c||
    (Cauchy-Schwarz), whatever the signs.
    """
    u = 2.0**-53 if np.dtype(dtype) == np.float64 else 2.0**-24
    if d * u >= 0.5:  # absurdly wide rows: certify nothing, decide every row exactly
        return np.inf
    return 2.0 * (d * u / (1.0 - d * u) + 2.0 * u) * 1.01


def f64_slack(d: int) -> float:
    """Bound on the float64 rounding of a squared distance of ``d`` terms (exact_argmin_u8,
    the bounds' arithmetic), per unit of ||x||^2 + ||c||^2 + 1, with a wide margin."""
    return 1e-14 * (d + 100)


@njit(cache=True, nogil=True, inline="always")
def err_bound(xnorm, xs, r2, rs, coef, slack):  # pragma: no cover - compiled
    # float32 GEMM error on cn_j - 2 x.c_j (see gemm_error_coef; xs = ||x||, rs = max ||c||)
    # plus float64 slack
    return coef * xs * rs + slack * (xnorm + r2 + 1.0)


@njit(cache=True, nogil=True)
def exact_argmin(xrow, craw, a, b):  # pragma: no cover - compiled
    # The canonical decision for rows whose GEMM gap is within the error bound: float64 sum
    # of (x - craw)^2 in raw units (craw = divisor * c), in a fixed order (four interleaved
    # partial sums, added at the end: the same on every machine), ties to the lowest index.
    # Its rounding (relative ~1e-16 * d) is what f64_slack covers.
    best = a
    bestv = np.inf
    d = xrow.shape[0]
    d4 = d - d % 4
    for j in range(a, b):
        s0 = 0.0
        s1 = 0.0
        s2 = 0.0
        s3 = 0.0
        for p in range(0, d4, 4):
            t0 = np.float64(xrow[p]) - craw[j, p]
            t1 = np.float64(xrow[p + 1]) - craw[j, p + 1]
            t2 = np.float64(xrow[p + 2]) - craw[j, p + 2]
            t3 = np.float64(xrow[p + 3]) - craw[j, p + 3]
            s0 += t0 * t0
            s1 += t1 * t1
            s2 += t2 * t2
            s3 += t3 * t3
        for p in range(d4, d):
            t0 = np.float64(xrow[p]) - craw[j, p]
            s0 += t0 * t0
        acc = (s0 + s1) + (s2 + s3)
        if acc < bestv:
            bestv = acc
            best = j
    return best


@njit(cache=True, nogil=True, inline="always")  # a call here cost 30% of the loop
def top2(dots, i, cnorm, a, b, c0):  # pragma: no cover - compiled
    # nearest (ties to the lowest index) and runner-up of cnorm_j - 2 dots[i, j + c0]; branch
    # free: a data-dependent branch here mispredicts so often that it cost 5x the loop
    best = a
    bestv = cnorm[a] - 2.0 * dots[i, a + c0]
    second = np.inf
    for j in range(a + 1, b):
        v = cnorm[j] - 2.0 * dots[i, j + c0]
        second = min(second, max(bestv, v))
        best = j if v < bestv else best
        bestv = min(bestv, v)
    return best, bestv, second


@njit(cache=True, nogil=True)
def _assign_block(dots, cnorm, xnorm, starts, stops, x, mode, sums, counts, inertia, labels, mind,
                  row0, keep_rows, int_sums, scale, craw, r2, coef, xs, rs, slack, xsq,
                  sq, with_sq):  # pragma: no cover - compiled
    nrow = dots.shape[0]
    nmodel = starts.shape[0]
    d = x.shape[1]
    for i in range(nrow):
        for m in range(nmodel):
            a = starts[m]
            b = stops[m]
            best, bestv, second = top2(dots, i, cnorm, a, b, 0)
            e = err_bound(xnorm[i], xs[row0 + i], r2[m], rs[m], coef, slack)
            if not second - bestv > 2.0 * e:
                # a near tie: GEMM rounding could decide it either way, so decide it
                # exactly; labels then do not depend on how the GEMM was blocked
                best = exact_argmin(x[i], craw, a, b)
                bestv = cnorm[best] - 2.0 * dots[i, best]
            dist = xnorm[i] + bestv
            if dist < 0.0:  # rounding of the expanded form
                dist = 0.0
            inertia[m] += dist
            if keep_rows:
                labels[m, row0 + i] = best - a
                mind[m, row0 + i] = dist
            if mode >= 1:
                counts[best] += 1
            if mode >= 2:
                if int_sums:  # uint8 rows: exact integer sums, 16 SIMD lanes of int32
                    for f in range(d):
                        sums[best, f] += np.int32(x[i, f])
                elif scale > 0.0:  # float rows in fixed point (see Fixed)
                    for f in range(d):
                        sums[best, f] += np.int64(np.rint(x[i, f] * scale))
                else:
                    for f in range(d):
                        sums[best, f] += x[i, f]
                if with_sq:
                    sq[best] += xsq[row0 + i]


def model_r2(cnorm: np.ndarray, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """Per model, the largest squared centre norm (for the error bound)."""
    return np.array([cnorm[a:b].max() for a, b in zip(starts, stops, strict=True)])


@dataclass(frozen=True)
class Decision:
    """What a nearest-centre decision needs besides the dot products (top2, err_bound and,
    for near ties, exact_argmin)."""

    cnorm: np.ndarray  # (M,) float64 squared centre norms
    craw: np.ndarray  # (M, d) float64 centres in raw units (divisor * c), for exact re-decisions
    r2: np.ndarray  # (n_models,) largest squared centre norm per model
    rs: np.ndarray  # (n_models,) its square root
    xs: np.ndarray  # (n,) row norms
    coef: float
    slack: float


def decision(chunk: Chunk, c: np.ndarray, starts: np.ndarray, stops: np.ndarray) -> Decision:
    """Per-pass constants of the decision for centres ``c`` (in the compute dtype)."""
    c64 = c.astype(np.float64)
    cnorm = np.einsum("ij,ij->i", c64, c64)
    r2 = model_r2(cnorm, starts, stops)
    d = chunk.x.shape[1]
    return Decision(cnorm=cnorm, craw=c64 * chunk.divisor, r2=r2, rs=np.sqrt(r2),
                    xs=np.sqrt(chunk.xnorm), coef=gemm_error_coef(d, c.dtype),
                    slack=f64_slack(d))


_SCRATCH = threading.local()


def scratch(name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A per-thread scratch array of ``shape`` (contents undefined), reused across calls.

    Dask's nanny sets a low ``MALLOC_TRIM_THRESHOLD_``, which also pins glibc's mmap threshold
    at 128 KiB: every larger temporary is a fresh mapping that page-faults on first touch, which
    made a pass's block buffers cost up to a fifth of the pass. A name may be held by one
    user at a time per thread (the caller's contract: the names are module-private)."""
    pool = _SCRATCH.__dict__.setdefault("pool", {})
    dt = np.dtype(dtype)
    size = int(np.prod(shape))
    buf = pool.get((name, dt))
    if buf is None or buf.size < size:
        buf = pool[(name, dt)] = np.empty(max(size, 1), dtype=dt)
    return buf[:size].reshape(shape)


# Up to this many float32 centres, _few_dots beats the BLAS GEMM (one thread, 200k MNIST rows:
# K=10 59 against 114 ms for pixels, 94 against 126 for float32 rows; K=12 even for float32,
# K=16 BLAS ahead). A GEMM with so few columns is bound by reading the rows, which BLAS
# copies into its own panels first.
FEW_CENTRES = 12


@njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _few_dots(x, c, out):  # pragma: no cover - compiled
    # out[i, j] = x[i] . c[j] in float32, four centres per sweep over a row (the row stays in
    # L1 and each value is loaded once per sweep); any summation order is within gamma_d
    d = x.shape[1]
    k = c.shape[0]
    for r in range(x.shape[0]):
        j = 0
        while j + 4 <= k:
            a0 = np.float32(0.0)
            a1 = np.float32(0.0)
            a2 = np.float32(0.0)
            a3 = np.float32(0.0)
            for p in range(d):
                v = np.float32(x[r, p])
                a0 += v * c[j, p]
                a1 += v * c[j + 1, p]
                a2 += v * c[j + 2, p]
                a3 += v * c[j + 3, p]
            out[r, j] = a0
            out[r, j + 1] = a1
            out[r, j + 2] = a2
            out[r, j + 3] = a3
            j += 4
        while j < k:
            a0 = np.float32(0.0)
            for p in range(d):
                a0 += np.float32(x[r, p]) * c[j, p]
            out[r, j] = a0
            j += 1


def gemm_blocks(chunk: Chunk, c: np.ndarray, decide_only: bool = False):
    """Yield ``(start, raw rows, dots)`` per row block: one GEMM of the scaled rows against all
    centres ``c`` (compute dtype). ``dots`` is a reused buffer, valid until the next block.

    ``decide_only``: the caller needs the dots only within :func:`gemm_error_coef`'s bound (for
    canonical decisions, as Lloyd passes), not rounded as seeding's sampling weights are, so
    the fastest way is taken. uint8 rows then enter as they are (exact in float32) against
    the centres divided by the divisor (the bound's conversion term then covers the rounding
    of the centres instead of the rows), without a division per value, which cost a third of
    a Lloyd GEMM pass (1.02M rows: 93 of 300 ms a worker); and up to :data:`FEW_CENTRES`
    float32 centres, a compiled loop (:func:`_few_dots`) replaces the GEMM.
    """
    x = chunk.x
    n, d = x.shape
    cdt = c.dtype
    raw = decide_only and x.dtype == np.uint8
    if raw:
        c = (c.astype(np.float64) / chunk.divisor).astype(cdt)
    few = (decide_only and cdt == np.float32 and c.shape[0] <= FEW_CENTRES
           and (raw or (x.dtype == cdt and chunk.divisor == 1.0)))
    if few:
        c = np.ascontiguousarray(c)
        dbuf = scratch("gemm.dots", (min(BLOCK_ROWS, n), c.shape[0]), cdt)
        for s in range(0, n, BLOCK_ROWS):
            xr = x[s : s + BLOCK_ROWS]
            _few_dots(xr, c, dbuf[: xr.shape[0]])
            yield s, xr, dbuf[: xr.shape[0]]
        return
    ct = np.ascontiguousarray(c.T)
    # Buffers reused across blocks: fresh multi-MB temporaries page-fault on every block in
    # dask workers (the nanny sets a low MALLOC_TRIM_THRESHOLD_), which made this 4x slower.
    rows = min(BLOCK_ROWS, n)
    xbuf = scratch("gemm.x", (rows, d) if x.dtype != cdt else (1, 1), cdt)
    dbuf = scratch("gemm.dots", (rows, c.shape[0]), cdt)
    div = cdt.type(chunk.divisor)
    for s in range(0, n, BLOCK_ROWS):
        xr = x[s : s + BLOCK_ROWS]
        nb = xr.shape[0]
        if raw:
            xb = xbuf[:nb]
            np.copyto(xb, xr)  # exact: integers below 2**24
        elif x.dtype == np.uint8:
            xb = xbuf[:nb]
            _pixels_to_f32(xr, chunk.divisor, xb)
        elif chunk.divisor != 1.0:
            xb = xbuf[:nb]
            np.divide(xr, div, out=xb)
        else:  # float rows are used in place
            xb = xr
        yield s, xr, np.matmul(xb, ct, out=dbuf[:nb])


@dataclass
class Assignment:
    """Result of :func:`assign` for one chunk. ``sums`` are in raw units (divide by divisor)."""

    labels: np.ndarray | None  # (n_models, n) int32, local cluster index per model
    mind: np.ndarray | None  # (n_models, n) float64, squared distance to the nearest centre
    inertia: np.ndarray  # (n_models,) float64
    counts: np.ndarray | None  # (M,) int64
    sums: np.ndarray | None  # (M, d): exact int64 for uint8 rows (raw) and with ``fixed``
    # (its units), else float64 (raw)
    sq: np.ndarray | None = None  # (M,) int64 squared norms per cluster, in the same units


def stack_bounds(sizes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Start/stop row of each model's centres in the stacked centre matrix."""
    stops = np.cumsum(np.asarray(sizes, dtype=np.int64))
    starts = stops - np.asarray(sizes, dtype=np.int64)
    return starts, stops


def assign(chunk: Chunk, centres: np.ndarray, starts: np.ndarray, stops: np.ndarray,
           mode: int = MODE_SUMS, keep_rows: bool = True, fixed: Fixed | None = None,
           decide_only: bool = False) -> Assignment:
    """Nearest centre of every row for every model, with optional counts and sums.

    Parameters
    ----------
    chunk : Chunk
    centres : (M, d) array in the compute dtype — all models' centres stacked.
    starts, stops : (n_models,) int64 — model ``m`` owns ``centres[starts[m]:stops[m]]``.
    mode : MODE_ASSIGN, MODE_COUNTS or MODE_SUMS.
    keep_rows : return per-row labels and distances (Lloyd's hot pass needs neither).
    fixed : float rows only: sum them (and their squared norms) as exact integers in these
        units instead of in float64 (uint8 sums are always exact integers).
    decide_only : the dot products only decide labels (see :func:`gemm_blocks`): the same
        canonical labels and sums, faster; distances and inertia then carry that way's
        rounding (Lloyd passes take the inertia from the exact sums).
    """
    x = chunk.x
    n, d = x.shape
    c = np.ascontiguousarray(centres, dtype=compute_dtype(x.dtype))
    dec = decision(chunk, c, starts, stops)
    nmodel = starts.shape[0]
    m_total = c.shape[0]
    shape = (nmodel, n) if keep_rows else (1, 1)
    labels = np.empty(shape, dtype=np.int32)
    mind = np.empty(shape, dtype=np.float64)
    inertia = np.zeros(nmodel, dtype=np.float64)
    counts = np.zeros(m_total, dtype=np.int64)
    # uint8 sums are exact integers: int32 while 255 * rows fits, else int64
    int_sums = x.dtype == np.uint8
    fixed = None if int_sums else fixed
    sdt = ((np.int32 if 255 * n < 2**31 else np.int64) if int_sums
           else np.int64 if fixed is not None else np.float64)
    sums = np.zeros((m_total, d) if mode >= MODE_SUMS else (1, 1), dtype=sdt)
    with_sq = mode >= MODE_SUMS and (fixed is not None or (int_sums and chunk.xsq is not None))
    sq = np.zeros(m_total if with_sq else 1, dtype=np.int64)
    xsq = row_sq_units(chunk, fixed) if with_sq else np.zeros(1, dtype=np.int64)
    scale = fixed.scale if fixed is not None else 0.0
    for s, xr, dots in gemm_blocks(chunk, c, decide_only):
        _assign_block(dots, dec.cnorm, chunk.xnorm[s : s + BLOCK_ROWS], starts, stops, xr, mode,
                      sums, counts, inertia, labels, mind, s, keep_rows, int_sums, scale,
                      dec.craw, dec.r2, dec.coef, dec.xs, dec.rs, dec.slack, xsq, sq, with_sq)
    return Assignment(
        labels=labels if keep_rows else None,
        mind=mind if keep_rows else None,
        inertia=inertia,
        counts=counts if mode >= MODE_COUNTS else None,
        # widened so that adding many chunks' sums on the client cannot overflow
        sums=(sums.astype(np.int64) if int_sums else sums) if mode >= MODE_SUMS else None,
        sq=sq if with_sq else None,
    )


# ---------------------------------------------------------------------------------------------
# Small local problems (candidates of k-means||): numpy on the client.


def sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances between rows of ``a`` and ``b`` (float64, clipped at 0)."""
    a = a.astype(np.float64, copy=False)
    b = b.astype(np.float64, copy=False)
    d = (a * a).sum(1)[:, None] - 2.0 * (a @ b.T) + (b * b).sum(1)[None, :]
    np.maximum(d, 0.0, out=d)
    return d


def weighted_kmeanspp(points: np.ndarray, weights: np.ndarray, k: int,
                      rng: np.random.Generator, n_local_trials: int | None = None) -> np.ndarray:
    """Greedy weighted k-means++ on a small point set; returns indices of the chosen points.

    Each step samples ``n_local_trials`` candidates with probability proportional to
    weight x D², and keeps the one that lowers the weighted potential most.
    """
    n = points.shape[0]
    w = weights.astype(np.float64)
    if n_local_trials is None:
        n_local_trials = 2 + int(np.log(k))
    chosen = [int(rng.choice(n, p=w / w.sum()))]
    closest = sq_dists(points, points[chosen])[:, 0]
    for _ in range(1, k):
        pot = w * closest
        total = pot.sum()
        if total <= 0.0:  # every point already coincides with a centre: take unused ones
            unused = np.setdiff1d(np.arange(n), chosen)
            chosen.append(int(unused[0]) if unused.size else chosen[-1])
            continue
        cum = np.cumsum(pot)
        r = rng.random(n_local_trials) * cum[-1]
        cand = np.minimum(np.searchsorted(cum, r, side="right"), n - 1)
        dc = sq_dists(points[cand], points)  # (trials, n)
        np.minimum(dc, closest[None, :], out=dc)
        best = int(np.argmin((dc * w[None, :]).sum(1)))
        chosen.append(int(cand[best]))
        closest = dc[best]
    return np.asarray(chosen)


def weighted_lloyd(points: np.ndarray, weights: np.ndarray, centres: np.ndarray,
                   max_iter: int = 50) -> np.ndarray:
    """A few weighted Lloyd steps on a small point set (empty clusters keep their centre)."""
    c = centres.astype(np.float64).copy()
    p = points.astype(np.float64)
    w = weights.astype(np.float64)
    prev = None
    for _ in range(max_iter):
        lab = np.argmin(sq_dists(p, c), axis=1)
        if prev is not None and np.array_equal(lab, prev):
            break
        prev = lab
        tot = np.bincount(lab, weights=w, minlength=c.shape[0])
        for j in np.nonzero(tot > 0)[0]:
            sel = lab == j
            c[j] = (w[sel, None] * p[sel]).sum(0) / tot[j]
    return c
