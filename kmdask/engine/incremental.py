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

The state (:class:`Bounds`) is kept by the caller next to the chunk and passed back; without it
(streamed data, a recomputed chunk, a resumed fit) the pass simply computes every row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from kmdask.engine import kernels

_BOUNDS_FROM = 0.15  # set bounds up once a pass changes at most this share of the labels
_ELKAN_MAX = 0.25  # drop them after a bounded pass that computed more than this share


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


@njit(cache=True, nogil=True, inline="always")
def _f32_up(v):  # pragma: no cover - compiled
    # float32 >= v: float32 rounding moves a value by at most 2**-24 of it (plus 2**-150
    # for subnormals), so step out by more first
    return np.float32(v + abs(v) * 2.0**-22 + 1e-30)


@njit(cache=True, nogil=True, inline="always")
def _f32_down(v):  # pragma: no cover - compiled
    return np.float32(v - abs(v) * 2.0**-22 - 1e-30)


@njit(cache=True, nogil=True)
def _move(x, r, old, new, xsq, sums, counts, sq, scale):  # pragma: no cover - compiled
    # row r leaves cluster old (-1: none) for new; float rows (scale > 0) count in fixed point
    if old >= 0:
        if scale > 0.0:
            for f in range(x.shape[1]):
                sums[old, f] -= np.int64(np.rint(x[r, f] * scale))
        else:
            for f in range(x.shape[1]):
                sums[old, f] -= x[r, f]
        counts[old] -= 1
        sq[old] -= xsq[r]
    if scale > 0.0:
        for f in range(x.shape[1]):
            sums[new, f] += np.int64(np.rint(x[r, f] * scale))
    else:
        for f in range(x.shape[1]):
            sums[new, f] += x[r, f]
    counts[new] += 1
    sq[new] += xsq[r]


@njit(cache=True, nogil=True, inline="always", fastmath={"reassoc", "contract"})
def _dot(xf, c, j):  # pragma: no cover - compiled
    # in the compute dtype (float32 or float64): within the GEMM's error bound in any order
    acc = xf[0] * c[j, 0]
    for p in range(1, xf.shape[0]):
        acc += xf[p] * c[j, p]
    return acc


@njit(cache=True, nogil=True)
def _full_block(dots, s, x, xnorm, xs, xsq, starts, stops, cnorm, craw, r2, rs, r2c, rsc, coef,
                slack, bounds, labels, upper, lower, sums, counts, sq, scale):  # pragma: no cover
    # Every distance of a block from its GEMM: decide, move changed rows, set fresh bounds.
    changed = 0
    for i in range(dots.shape[0]):
        r = s + i
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
            old = labels[r, m]
            if old != best - a:
                _move(x, r, a + old if old >= 0 else -1, best, xsq, sums, counts, sq, scale)
                labels[r, m] = best - a
                changed += 1
            if bounds:
                upper[r, m] = _f32_up(np.sqrt(max(xnorm[r] + bestv + e, 0.0)))
    return changed


@njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _bounded(x, xnorm, xs, xsq, c32, cnorm, craw, starts, stops, drift, r2, rs, coef, slack,
             labels, upper, lower, sums, counts, sq, fval, js, xf, pixels, div,
             scale):  # pragma: no cover - compiled
    # Elkan's pass: compute only the distances that a bound cannot rule out. Returns the
    # distances computed and the labels changed.
    computed = 0
    changed = 0
    for r in range(x.shape[0]):
        xn = xnorm[r]
        converted = False
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
            if not converted:  # the row in the compute dtype, once, as the GEMM pass has it
                # (a copy for float rows too: x may be read-only, and one kernel serves both)
                if pixels:
                    for p in range(x.shape[1]):
                        xf[p] = np.float32(x[r, p]) / np.float32(div)
                else:
                    for p in range(x.shape[1]):
                        xf[p] = x[r, p]
                converted = True
            e = kernels.err_bound(xn, xs[r], r2[m], rs[m], coef, slack)
            # the own distance first: it tightens the upper bound
            fown = cnorm[own] - 2.0 * np.float64(_dot(xf, c32, own))
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
                v = cnorm[j] - 2.0 * np.float64(_dot(xf, c32, j))
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
    return computed, changed


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
    return Bounds(ids=tuple(ids), centres=state.centres[cols], starts=starts, stops=stops,
                  labels=state.labels[:, old], sums=state.sums[cols],
                  counts=state.counts[cols], sq=state.sq[cols],
                  upper=state.upper[:, old] if has else None,
                  lower=state.lower[:, cols] if has else None,
                  drift=state.drift[cols] if has else None, bounded=state.bounded,
                  computed=state.computed, changed=state.changed, fixed=state.fixed)


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
                  changed=max(a.changed, b.changed), fixed=a.fixed)


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
    bounds : keep distance bounds in the state (4 bytes per row and centre); without them the
        state holds labels and sums only and every pass is a GEMM pass.
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
    if state is not None and state.upper is not None and bounds \
            and not (state.bounded and state.computed > _ELKAN_MAX):
        labels, sums, counts, sq = state.labels, state.sums, state.counts, state.sq
        upper, lower = state.upper, state.lower
        # each centre's movement, rounded up, added to what it moved before
        delta = np.sqrt(((c64 - state.centres.astype(np.float64)) ** 2).sum(axis=1))
        drift = state.drift + delta * (1.0 + 1e-9)
        computed, changed = _bounded(
            x, chunk.xnorm, xs, xsq, c, cnorm, craw, starts, stops, drift, r2, rs, coef,
            slack, labels, upper, lower, sums, counts, sq, np.empty(m_total),
            np.empty(m_total, dtype=np.int64),
            np.empty(d, dtype=c.dtype), pixels, chunk.divisor, scale)
        bounded = True
    else:
        if state is not None:
            labels, sums, counts, sq = state.labels, state.sums, state.counts, state.sq
        else:
            labels = np.full((n, nmodel), -1, dtype=np.int32)
            sums = np.zeros((m_total, d), dtype=sdt)
            counts = np.zeros(m_total, dtype=np.int64)
            sq = np.zeros(m_total, dtype=np.int64)
        bounds = bounds and state is not None and state.changed <= _BOUNDS_FROM
        upper = np.empty((n, nmodel) if bounds else (1, 1), dtype=np.float32)
        lower = np.empty((n, m_total) if bounds else (1, 1), dtype=np.float32)
        drift = np.zeros(m_total)
        which = np.repeat(np.arange(nmodel), stops - starts)  # each centre's model
        r2c, rsc = r2[which], rs[which]
        changed = 0
        for s, _, dots in kernels.gemm_blocks(chunk, c):
            changed += _full_block(dots, s, x, chunk.xnorm, xs, xsq, starts, stops,
                                   cnorm, craw, r2, rs, r2c, rsc, coef, slack, bounds,
                                   labels, upper, lower, sums, counts, sq, scale)
        computed = possible
        bounded = False
        if not bounds:
            upper = lower = drift = None
    result = PassResult(sums=sums.astype(np.int64), counts=counts.copy(), sq=sq.copy(),
                        computed=int(computed), possible=possible, changed=int(changed))
    if not keep:
        return result, None
    return result, Bounds(ids=ids, centres=c, starts=starts, stops=stops, labels=labels,
                          sums=sums, counts=counts, sq=sq, upper=upper, lower=lower,
                          drift=drift, bounded=bounded, computed=computed / possible,
                          changed=changed / (n * nmodel), fixed=fixed)


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
