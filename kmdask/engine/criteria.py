"""Choosing K: internal criteria of a sweep's final models, computed on the workers.

Given a fit's rows and the final labels of every K, :func:`choosing_k` computes

* Calinski–Harabasz and Davies–Bouldin for all models in one read of the data: one dask graph
  in which every chunk is read once and feeds two small tasks, the per-cluster counts and sums
  of every model (hence the centroids, the means of each model's labels), then the per-row
  distances to the own centroid (squared for the WCSS, unsquared for DB's S_i). The partial
  sums are reduced on the client in chunk order; the sums of uint8 pixels are exact integers
  and the distance sums are accumulated exactly (:func:`exact_partials`), so the results do
  not depend on the chunking at all;
* the silhouette on a stated sample of rows (numpy ``default_rng(seed)``, without
  replacement, the same rows for every K), its pairwise distances in row blocks as dask
  tasks, with per-cluster quantiles of the silhouette values for the figures;
* the gap statistic (Tibshirani et al. 2001) with B reference sets drawn uniformly in the
  bounding box of a seeded gap sample (a subset of the silhouette sample, 2,000 rows by
  default; uint8 pixels as uniform integers, so the sets keep the data's dtype), each with as
  many rows as the gap sample, every (set, K) model seeded by k-means++ on its set. The
  engine's fits (``algorithm: scalable``) fit them in their own passes: the sets are extra
  row groups of the fit's data (:func:`gap_references`, then ``fit_models(..., also=...)``),
  so the gap costs no pass of its own. For fits of other algorithms :func:`reference_log_w`
  fits every set and K in the same passes on the cluster (the same result for the same
  iterations and tol: each model is fitted to its own set alone either way). The real
  data's W_K is the WCSS of the gap sample's rows under the fit's labels;
* the knee of the elbow (kneedle, :func:`kneedle`).

Everything is on pixel scale (uint8 rows divided by the run's divisor), in float64, so that the
values equal scikit-learn's ``calinski_harabasz_score``, ``davies_bouldin_score`` and
``silhouette_score`` on ``X / divisor`` with the same labels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numba
import numpy as np

#: what a fit computes unless its spec says otherwise
SILHOUETTE_SAMPLE = 10_000
GAP_REFERENCES = 10
GAP_ROWS = 2_000  # rows of the gap statistic's sample (a seeded subset of the silhouette's)
GAP_ITERATIONS = 300  # a reference fit runs to convergence (the engine's tol), as the real ones
SILHOUETTE_BLOCK = 1_000  # rows per silhouette task: 1,000 x 10,000 float64 = 80 MB a block
PROFILE_POINTS = 41  # quantiles kept per cluster for the silhouette plots
_SPLIT = 26  # mantissas split into 27-bit halves: bincount's float64 sums stay exact


# -- chunk kernels (pure: numpy / numba, no dask) ------------------------------------------


def to_float(x: np.ndarray, divisor: float) -> np.ndarray:
    """Rows as float64 on pixel scale: uint8 divided by ``divisor``, float rows as they are."""
    if x.dtype == np.uint8:
        return x.astype(np.float64) / divisor
    return np.asarray(x, dtype=np.float64)


def chunk_sums(x: np.ndarray, labels: np.ndarray, ks: Sequence[int]
               ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per model: (counts (k,), sums (k, d)) of one chunk's rows by cluster.

    uint8 rows are summed as raw bytes in float64: integer products and sums below 2**53 are
    exact, so they add up to the same value in any order (any chunking). ``labels`` is
    (n_models, rows)."""
    xf = x.astype(np.float64) if x.dtype == np.uint8 else np.asarray(x, dtype=np.float64)
    out = []
    for lab, k in zip(labels, ks, strict=True):
        onehot = np.zeros((k, x.shape[0]))
        onehot[lab, np.arange(x.shape[0])] = 1.0
        out.append((np.bincount(lab, minlength=k).astype(np.int64), onehot @ xf))
    return out


@numba.njit(cache=True, nogil=True)
def _own_dists(x, divisor, scaled, means, labels, sq, d):  # pragma: no cover - compiled
    # row by row, in one fixed order: a row's distance does not depend on its chunk
    for i in range(x.shape[0]):
        c = labels[i]
        s = 0.0
        for j in range(x.shape[1]):
            v = x[i, j] / divisor if scaled else x[i, j]
            t = v - means[c, j]
            s += t * t
        sq[i] = s
        d[i] = math.sqrt(s)


def own_distances(x: np.ndarray, labels: np.ndarray, means: np.ndarray, divisor: float
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(squared, plain) Euclidean distance of every row to its own cluster's centroid."""
    sq = np.empty(x.shape[0])
    d = np.empty(x.shape[0])
    scaled = x.dtype == np.uint8
    xx = x if scaled else np.asarray(x, dtype=np.float64)
    _own_dists(xx, float(divisor), scaled, means, labels.astype(np.int64), sq, d)
    return sq, d


def exact_partials(values: np.ndarray, groups: np.ndarray) -> dict:
    """The exact per-group sums of non-negative float64 ``values``, as integer mantissa sums
    by binary exponent: ``{(group, exponent): (high, low)}``. Partials of several chunks add
    up exactly (:func:`merge_partials`), so the total is the same for every chunking."""
    mant, exp = np.frexp(values)
    m = (mant * 2.0**53).astype(np.int64)  # exact: 53-bit mantissas
    key = groups.astype(np.int64) * 4096 + (exp.astype(np.int64) + 2048)
    uniq, inv = np.unique(key, return_inverse=True)
    hi = np.bincount(inv, weights=(m >> _SPLIT).astype(np.float64), minlength=uniq.size)
    lo = np.bincount(inv, weights=(m & ((1 << _SPLIT) - 1)).astype(np.float64),
                     minlength=uniq.size)
    return {(int(u) // 4096, int(u) % 4096 - 2048 - 53): (int(h), int(lw))
            for u, h, lw in zip(uniq, hi, lo, strict=True)}


def merge_partials(parts: Sequence[dict], n_groups: int) -> np.ndarray:
    """The correctly rounded float64 per-group totals of :func:`exact_partials` results."""
    total = [0] * n_groups
    shift = 1200  # covers every float64: mantissa exponents are >= -1127
    for p in parts:
        for (g, e), (h, lw) in p.items():
            total[g] += ((h << _SPLIT) + lw) << (e + shift)
    return np.array([float(Fraction(t, 1 << shift)) for t in total])


def chunk_dists(x: np.ndarray, labels: np.ndarray, means: Sequence[np.ndarray],
                divisor: float) -> list[tuple[dict, dict]]:
    """Per model: exact partial sums of (squared, plain) distances to the own centroid."""
    out = []
    for lab, m in zip(labels, means, strict=True):
        sq, d = own_distances(x, lab, m, divisor)
        out.append((exact_partials(sq, lab), exact_partials(d, lab)))
    return out


# -- criteria from per-cluster sums ----------------------------------------------------------


@dataclass
class ClusterSums:
    """Per-cluster sums of one model: what CH and DB follow from."""

    counts: np.ndarray  # (k,)
    means: np.ndarray  # (k, d) centroids (means of the labels), pixel scale
    overall: np.ndarray  # (d,) mean of all rows
    wcss: np.ndarray  # (k,) sum of squared distances to the own centroid
    dist: np.ndarray  # (k,) sum of distances to the own centroid


def calinski_harabasz(s: ClusterSums) -> float:
    """[B / (K - 1)] / [W / (n - K)] over the non-empty clusters (scikit-learn's definition)."""
    keep = s.counts > 0
    k, n = int(keep.sum()), int(s.counts.sum())
    between = float(np.sum(s.counts[keep] * np.sum((s.means[keep] - s.overall) ** 2, axis=1)))
    within = float(s.wcss[keep].sum())
    return 1.0 if within == 0.0 else between * (n - k) / (within * (k - 1.0))


def davies_bouldin(s: ClusterSums) -> float:
    """Mean over clusters of max_j (S_i + S_j) / d(c_i, c_j), S_i the mean distance to the
    centroid (scikit-learn's definition, with its zero-distance conventions)."""
    keep = s.counts > 0
    c = s.means[keep]
    spread = s.dist[keep] / s.counts[keep]
    gaps = np.sqrt(np.maximum(((c[:, None, :] - c[None, :, :]) ** 2).sum(-1), 0.0))
    if np.allclose(spread, 0) or np.allclose(gaps, 0):
        return 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = (spread[:, None] + spread[None, :]) / gaps
    ratio[np.isinf(ratio)] = 0.0
    ratio[np.isnan(ratio)] = 0.0
    np.fill_diagonal(ratio, 0.0)
    return float(ratio.max(axis=1).mean())


def cluster_sums(X: Any, labels: Sequence[np.ndarray], ks: Sequence[int],
                 divisor: float) -> list[ClusterSums]:
    """:class:`ClusterSums` of every model, in one dask graph over the chunks of ``X``.

    Parameters
    ----------
    X : dask array or numpy array, (n, d)
        uint8 pixels (divided by ``divisor``) or float rows.
    labels : sequence of (n,) int arrays
        The final labels of each model.
    ks : sequence of int
        Each model's number of clusters.
    divisor : float
        uint8 rows are divided by it.
    """
    import dask
    import dask.array as da

    if not isinstance(X, da.Array):
        X = da.from_array(np.asarray(X), chunks=(10_000, -1))
    X = X.rechunk({1: -1})
    lab = np.stack([np.asarray(v, dtype=np.int32) for v in labels])
    bounds = np.concatenate([[0], np.cumsum(X.chunks[0])]).astype(int)
    blocks = list(X.to_delayed().ravel())
    slices = [lab[:, a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    ks = [int(k) for k in ks]
    sums = [dask.delayed(chunk_sums)(b, s, ks) for b, s in zip(blocks, slices, strict=True)]
    means = dask.delayed(_means)(sums, float(divisor), X.dtype == np.uint8)
    dists = [dask.delayed(chunk_dists)(b, s, means[0], float(divisor))
             for b, s in zip(blocks, slices, strict=True)]
    # one graph: a chunk is read once and feeds both of its tasks
    (ms, overall, counts), parts = dask.compute(means, dists)
    out = []
    for j, k in enumerate(ks):
        out.append(ClusterSums(counts[j], ms[j], overall,
                               merge_partials([p[j][0] for p in parts], k),
                               merge_partials([p[j][1] for p in parts], k)))
    return out


def _means(sums: list, divisor: float, scaled: bool) -> tuple[list, np.ndarray, list]:
    """Centroids of every model, the overall mean and the counts, from the chunks' sums (added
    in chunk order)."""
    counts = [sum(p[j][0] for p in sums) for j in range(len(sums[0]))]
    totals = [sum(p[j][1] for p in sums) for j in range(len(sums[0]))]
    scale = divisor if scaled else 1.0
    n = counts[0].sum()
    means = [(t / np.maximum(c, 1)[:, None]) / scale for c, t in zip(counts, totals, strict=True)]
    return means, (totals[0].sum(axis=0) / n) / scale, counts


# -- silhouette ------------------------------------------------------------------------------


def sample_rows(n: int, size: int, seed: int) -> np.ndarray:
    """The silhouette sample: ``size`` row indices drawn by ``default_rng(seed)`` without
    replacement (every row when ``size >= n``), sorted."""
    if size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


def silhouette_block(xs: np.ndarray, start: int, stop: int, labels: np.ndarray,
                     ks: Sequence[int]) -> np.ndarray:
    """Silhouette values of sample rows ``start:stop`` for every model, (n_models, stop-start).

    Distances as scikit-learn's ``euclidean_distances`` computes them (norms and a product,
    clipped at 0, a row's distance to itself 0); a row alone in its cluster scores 0."""
    x = xs[start:stop]
    nx = (x * x).sum(1)
    ny = (xs * xs).sum(1)
    d2 = nx[:, None] - 2.0 * (x @ xs.T) + ny[None, :]
    np.maximum(d2, 0.0, out=d2)
    d = np.sqrt(d2)
    d[np.arange(stop - start), np.arange(start, stop)] = 0.0
    out = np.empty((len(ks), stop - start))
    for j, k in enumerate(ks):
        lab = labels[j]
        onehot = np.zeros((xs.shape[0], k))
        onehot[np.arange(xs.shape[0]), lab] = 1.0
        sums = d @ onehot  # (rows, k): distance sums to every cluster
        counts = np.bincount(lab, minlength=k).astype(np.float64)
        own = lab[start:stop]
        rows = np.arange(stop - start)
        n_own = counts[own]
        with np.errstate(divide="ignore", invalid="ignore"):
            a = sums[rows, own] / (n_own - 1.0)
            mean_other = sums / counts[None, :]
        mean_other[rows, own] = np.inf
        mean_other[:, counts == 0] = np.inf
        b = mean_other.min(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            s = (b - a) / np.maximum(a, b)
        s[n_own <= 1] = 0.0
        out[j] = np.nan_to_num(s)
    return out


def silhouettes(xs: np.ndarray, labels: Sequence[np.ndarray], ks: Sequence[int],
                block: int = SILHOUETTE_BLOCK) -> np.ndarray:
    """Silhouette values of every sample row for every model, (n_models, rows): one dask task
    per block of rows (on the cluster when there is a client), the sample sent once."""
    import dask

    from kmdask.engine.waits import current_client

    lab = np.stack([np.asarray(v, dtype=np.int64) for v in labels])
    xs = np.ascontiguousarray(xs, dtype=np.float64)
    client = current_client()
    if client is not None:  # sent to the workers once, not inside every task
        xs_d, lab_d = client.scatter([xs, lab], broadcast=True, hash=False)
    else:
        xs_d, lab_d = (dask.delayed(v, traverse=False) for v in (xs, lab))
    ks = [int(k) for k in ks]
    n = xs.shape[0]
    tasks = [dask.delayed(silhouette_block)(xs_d, a, min(a + block, n), lab_d, ks)
             for a in range(0, n, block)]
    return np.concatenate(dask.compute(*tasks), axis=1)


def silhouette_profile(values: np.ndarray, labels: np.ndarray, k: int,
                       points: int = PROFILE_POINTS) -> dict:
    """Per cluster: its sample count and ``points`` quantiles (0..1) of its silhouette values,
    enough to draw a silhouette plot."""
    q = np.linspace(0.0, 1.0, points)
    counts = np.bincount(labels, minlength=k)
    return {"counts": counts.tolist(),
            "quantiles": [np.quantile(values[labels == c], q).tolist() if counts[c] else []
                          for c in range(k)]}


# -- gap statistic, kneedle ------------------------------------------------------------------


def wcss(x: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Within-cluster sum of squared distances to the means of ``labels`` (float64 rows)."""
    total = 0.0
    for c in range(k):
        m = x[labels == c]
        if m.shape[0]:
            total += float(((m - m.mean(axis=0)) ** 2).sum())
    return total


def gap_statistic(log_w: np.ndarray, log_w_ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(Gap(K), s_K) from log W_K (n_k,) and the references' log W*_Kb (B, n_k):
    Gap = mean_b log W*_Kb - log W_K, s_K = sd_K sqrt(1 + 1/B) (sd with 1/B, as the paper)."""
    b = log_w_ref.shape[0]
    gap = log_w_ref.mean(axis=0) - log_w
    sk = log_w_ref.std(axis=0) * math.sqrt(1.0 + 1.0 / b)
    return gap, sk


def gap_choice(ks: Sequence[int], gap: np.ndarray, sk: np.ndarray) -> int:
    """The smallest K with Gap(K) >= Gap(K+1) - s_{K+1} (the largest K when none is)."""
    for i in range(len(ks) - 1):
        if gap[i] >= gap[i + 1] - sk[i + 1]:
            return int(ks[i])
    return int(ks[-1])


def kneedle(ks: Sequence[int], values: Sequence[float]) -> int:
    """The knee of a decreasing convex curve (kneedle, Satopää et al. 2011, offline, no
    smoothing): both axes normalised to [0, 1], ``y`` flipped (``1 - y_norm``, which makes
    the curve increasing and concave), the difference curve ``(1 - y_norm) - x_norm``; the K
    where it peaks (the first on ties; the first K for fewer than 3 points or a flat curve)."""
    x = np.asarray(ks, dtype=np.float64)
    y = np.asarray(values, dtype=np.float64)
    if x.size < 3 or y.max() == y.min():
        return int(x[0])
    xn = (x - x.min()) / (x.max() - x.min())
    yn = (y - y.min()) / (y.max() - y.min())
    diff = (1.0 - yn) - xn  # decreasing convex: flip y, then distance above the diagonal
    return int(x[int(np.argmax(diff))])


def reference_sets(raw: np.ndarray, b: int, seed: int) -> list[np.ndarray]:
    """``b`` data sets of ``raw``'s shape and dtype drawn uniformly in its bounding box
    (seeded): uint8 pixels as integers uniform in each column's [min, max], float rows as
    reals uniform in it. The integer draw keeps the references in the data's own dtype, so
    that they can share the fit's passes."""
    lo, hi = raw.min(axis=0), raw.max(axis=0)
    rng = np.random.default_rng([seed, 1])
    if raw.dtype == np.uint8:
        return [rng.integers(lo, hi, size=raw.shape, dtype=np.uint8, endpoint=True)
                for _ in range(b)]
    lo, hi = lo.astype(np.float64), hi.astype(np.float64)
    return [(lo + (hi - lo) * rng.random(raw.shape)).astype(raw.dtype) for _ in range(b)]


def reference_inits(refs: Sequence[np.ndarray], ks: Sequence[int], seed: int,
                    divisor: float) -> list[list[np.ndarray]]:
    """Initial centres of every reference set's models, one per K (scaled units): k-means++ on
    the set's rows, seeded by (seed, set, K). A set is small (the gap sample's rows), so it is
    seeded here, not in passes over the data."""
    from kmdask.engine.kernels import weighted_kmeanspp
    from kmdask.rng import keyed_rng

    out = []
    for b, r in enumerate(refs):
        xs = to_float(r, divisor)
        ones = np.ones(xs.shape[0])
        out.append([xs[weighted_kmeanspp(xs, ones, int(k), keyed_rng(seed, 7, b, int(k)))]
                    for k in ks])
    return out


def reference_log_w_of(refs: Sequence[np.ndarray], ks: Sequence[int], fitted: Sequence,
                       divisor: float) -> np.ndarray:
    """log W*_Kb, (B, n_k): the WCSS of each reference set under its fitted models' labels
    (``fitted[b][j]``: set b's model for ``ks[j]``, a :class:`~kmdask.engine.lloyd.ModelResult`)."""
    out = np.empty((len(refs), len(ks)))
    for b, r in enumerate(refs):
        xs = to_float(r, divisor)
        for j, k in enumerate(ks):
            out[b, j] = math.log(wcss(xs, np.concatenate(fitted[b][j].labels), int(k)))
    return out


def reference_log_w(refs: Sequence[np.ndarray], ks: Sequence[int], *, seed: int,
                    max_iter: int, divisor: float = 255.0) -> np.ndarray:
    """log W*_Kb of every reference set and K, (B, n_k), with every set and K fitted in the
    same passes (:func:`kmdask.engine.estimator.fit_sets`) on the current cluster, each from
    :func:`reference_inits`."""
    from kmdask.engine.estimator import fit_sets

    fitted = fit_sets(refs, reference_inits(refs, ks, seed, divisor), max_iter=max_iter,
                      divisor=divisor if refs[0].dtype == np.uint8 else None)
    return reference_log_w_of(refs, ks, fitted, divisor)


def gap_references(X: Any, ks: Sequence[int], *, silhouette_sample: int = SILHOUETTE_SAMPLE,
                   gap_references: int = GAP_REFERENCES, gap_rows: int = GAP_ROWS,
                   seed: int = 0, divisor: float = 255.0
                   ) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    """The reference sets :func:`choosing_k` draws for a fit's rows ``X`` (same arguments), and
    their models' initial centres (for ``sorted(ks)``): for fitting them in the fit's own passes
    (``fit_models(..., also=zip(refs, inits))``), then :func:`reference_log_w_of`."""
    _, raw_g = _samples(X, silhouette_sample, gap_rows, seed)
    refs = reference_sets(raw_g, gap_references, seed)
    return refs, reference_inits(refs, sorted(int(k) for k in ks), seed, divisor)


def _samples(X: Any, silhouette_sample: int, gap_rows: int, seed: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """(positions of the silhouette sample in X, the gap sample's raw rows)."""
    idx = sample_rows(int(X.shape[0]), silhouette_sample, seed)
    raw = np.asarray(X[idx].compute() if hasattr(X, "compute") else X[idx])
    return idx, raw[sample_rows(idx.size, gap_rows, seed + 1)]


# -- the driver ------------------------------------------------------------------------------


@dataclass
class Criteria:
    """The criteria of a fit's models: per K values, per criterion the chosen K."""

    ks: list[int]
    per_k: dict[int, dict[str, float]]
    profiles: dict[int, dict]  # per K: silhouette quantiles per cluster
    choices: dict[str, int]
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)  # seconds by part


def choosing_k(X: Any, labels: Sequence[np.ndarray], ks: Sequence[int], inertia: Sequence[float],
               *, divisor: float = 255.0, silhouette_sample: int = SILHOUETTE_SAMPLE,
               gap_references: int = GAP_REFERENCES, gap_rows: int = GAP_ROWS, seed: int = 0,
               gap_iterations: int = GAP_ITERATIONS,
               fitted_references: np.ndarray | None = None) -> Criteria:
    """Every criterion of a sweep's final models.

    Parameters
    ----------
    X : dask array or numpy array, (n, d)
        The fit's rows (uint8 pixels divided by ``divisor``, or float rows).
    labels : sequence of (n,) int arrays
        Each model's final labels, in the order of ``ks``.
    ks : sequence of int
        Each model's K (increasing).
    inertia : sequence of float
        Each model's WCSS as the fit reports it (the elbow the knee is found on).
    divisor : float
        uint8 rows are divided by it.
    silhouette_sample : int
        Rows of the silhouette (and gap) sample; every row when the fit has fewer.
    gap_references : int
        B, the reference sets of the gap statistic (0: no gap statistic).
    gap_rows : int
        Rows of the gap statistic's sample: a seeded subset of the silhouette sample (all of
        it when smaller); the reference sets have as many rows, and W_K is the WCSS of these
        rows under the fit's labels.
    seed : int
        Seeds the sample and the reference sets.
    gap_iterations : int
        Lloyd iterations at most for the reference fits.
    fitted_references : (B, n_k) array, optional
        log W*_Kb already fitted (in the fit's own passes, from :func:`gap_references`, K
        increasing); else the reference sets are fitted here, all in the same passes.

    Returns
    -------
    Criteria
    """
    import time

    t0 = time.perf_counter()
    order = np.argsort(ks, kind="stable")  # the knee and the gap read the curves by K
    ks = [int(ks[i]) for i in order]
    labels = [labels[i] for i in order]
    inertia = [float(inertia[i]) for i in order]
    n = int(X.shape[0])
    sums = cluster_sums(X, labels, ks, divisor)
    t_sums = time.perf_counter()
    per_k = {k: {"calinski_harabasz": calinski_harabasz(s), "davies_bouldin": davies_bouldin(s)}
             for k, s in zip(ks, sums, strict=True)}
    idx = sample_rows(n, silhouette_sample, seed)
    raw = np.asarray(X[idx].compute() if hasattr(X, "compute") else X[idx])
    xs = to_float(raw, divisor)
    lab_s = [np.asarray(v)[idx] for v in labels]
    t_sample = time.perf_counter()
    sil = silhouettes(xs, lab_s, ks)
    profiles = {}
    for j, k in enumerate(ks):
        per_k[k]["silhouette"] = float(sil[j].mean())
        profiles[k] = silhouette_profile(sil[j], lab_s[j], k)
    choices = {"knee": kneedle(ks, inertia),
               "silhouette": max(ks, key=lambda k: per_k[k]["silhouette"]),
               "calinski_harabasz": max(ks, key=lambda k: per_k[k]["calinski_harabasz"]),
               "davies_bouldin": min(ks, key=lambda k: per_k[k]["davies_bouldin"])}
    t_sil = time.perf_counter()
    gap_idx = sample_rows(idx.size, gap_rows, seed + 1)  # positions in the sample
    if gap_references > 0:
        xg = xs[gap_idx]
        log_w = np.array([math.log(wcss(xg, v[gap_idx], k))
                          for v, k in zip(lab_s, ks, strict=True)])
        ref = fitted_references
        if ref is None:
            ref = reference_log_w(reference_sets(raw[gap_idx], gap_references, seed), ks,
                                  seed=seed, max_iter=gap_iterations, divisor=divisor)
        elif ref.shape != (gap_references, len(ks)):
            raise ValueError(f"fitted_references has shape {ref.shape}, expected "
                             f"({gap_references}, {len(ks)})")
        gap, sk = gap_statistic(log_w, ref)
        for j, k in enumerate(ks):
            per_k[k]["gap"], per_k[k]["gap_sk"] = float(gap[j]), float(sk[j])
        choices["gap"] = gap_choice(ks, gap, sk)
    settings = {"silhouette_sample": int(idx.size), "sample_seed": seed,
                "sample": "numpy default_rng(seed).choice(rows, size, replace=False)",
                "gap_references": gap_references,
                "gap_rows": int(gap_idx.size) if gap_references else 0,
                "gap_sample": "default_rng(seed + 1).choice(silhouette sample, gap_rows, "
                              "replace=False)",
                "gap_iterations": gap_iterations,
                "gap_fit": ("in the fit's own passes" if fitted_references is not None else
                            "all reference sets and K in the same passes")}
    t_end = time.perf_counter()
    timings = {"ch_db": t_sums - t0, "sample": t_sample - t_sums, "silhouette": t_sil - t_sample,
               "gap": t_end - t_sil}
    return Criteria(ks, per_k, profiles, choices, settings, t_end - t0, timings)
