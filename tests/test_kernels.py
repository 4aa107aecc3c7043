"""Per-chunk kernels on hand-computed toy sets."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from kmdask.engine import kernels


def _chunk(x, divisor=1.0, offset=0):
    return kernels.prepare_chunk(np.asarray(x), divisor, offset, 0)


def test_assign_two_models_by_hand():
    x = np.array([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0], [11.0, 1.0]])
    # model 0: two centres; model 1: one centre
    c = np.array([[0.5, 0.0], [10.5, 0.5], [0.0, 0.0]])
    starts, stops = kernels.stack_bounds([2, 1])
    a = kernels.assign(_chunk(x), c, starts, stops, kernels.MODE_SUMS)
    assert_array_equal(a.labels[0], [0, 0, 1, 1])
    assert_array_equal(a.labels[1], [0, 0, 0, 0])
    assert_allclose(a.mind[0], [0.25, 0.25, 0.5, 0.5])
    assert_allclose(a.inertia, [1.5, 0 + 1 + 100 + 122])
    assert_array_equal(a.counts, [2, 2, 4])
    assert_allclose(a.sums, [[1, 0], [21, 1], [22, 1]])


def test_ties_go_to_lowest_index():
    x = np.array([[1.0, 0.0]])
    c = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 0.0]])
    starts, stops = kernels.stack_bounds([3])
    a = kernels.assign(_chunk(x), c, starts, stops, kernels.MODE_ASSIGN)
    assert a.labels[0, 0] == 0


@pytest.mark.parametrize("divisor", [255.0, 1.0, 16.0])  # data.divisor: any scale of bytes
def test_uint8_is_scaled_and_sums_are_exact_raw_integers(divisor):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(3000, 16), dtype=np.uint8)  # > one block
    c = (x[:3].astype(np.float32) / np.float32(divisor))
    starts, stops = kernels.stack_bounds([3])
    chunk = _chunk(x, divisor)
    # every uint8 chunk carries its exact raw squared norms, which the sums pass adds up
    assert_array_equal(chunk.xsq, (x.astype(np.int64) ** 2).sum(1))
    a = kernels.assign(chunk, c, starts, stops, kernels.MODE_SUMS)
    xf = x.astype(np.float64) / divisor
    d = ((xf[:, None, :] - c.astype(np.float64)[None]) ** 2).sum(-1)
    assert_array_equal(a.labels[0], d.argmin(1))
    assert_allclose(a.inertia[0], d.min(1).sum(), rtol=1e-6)
    for j in range(3):
        assert_array_equal(a.sums[j], x[a.labels[0] == j].sum(0))  # exact integers
        assert a.counts[j] == (a.labels[0] == j).sum()
        assert a.sq[j] == chunk.xsq[a.labels[0] == j].sum()


def test_chunk_stats_and_finite_flag():
    x = np.array([[1.0, 2.0], [3.0, np.nan]])
    n, s1, s2, finite, *_ = kernels.chunk_stats(_chunk(x))
    assert n == 2 and not finite
    n, s1, s2, finite, *_ = kernels.chunk_stats(_chunk(np.array([[1.0, 2.0], [3.0, 4.0]])))
    assert finite
    assert_allclose(s1, [4, 6])
    assert_allclose(s2, [10, 20])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float_chunk_stats_and_norms_match_numpy(dtype):
    rng = np.random.default_rng(4)
    x = (rng.normal(size=(1003, 37)) * 10.0 ** rng.integers(-3, 4, size=37)).astype(dtype)
    chunk = kernels.prepare_chunk(x, 1.0, 0, 0)
    # each row's squared norm is its float64 sum in column order, bit for bit
    x64 = x.astype(np.float64)
    want = np.zeros(x.shape[0])
    for j in range(x.shape[1]):
        want += x64[:, j] * x64[:, j]
    assert_array_equal(chunk.xnorm, want)
    n, s1, s2, finite, amax, nmax = kernels.chunk_stats(chunk)
    assert n == 1003 and finite and amax == np.abs(x64).max() and nmax == want.max()
    assert_allclose(s1, x64.sum(0), rtol=1e-12)
    assert_allclose(s2, (x64 ** 2).sum(0), rtol=1e-12)
    for bad in (np.inf, -np.inf, np.nan):
        y = x.copy()
        y[517, 11] = bad
        assert not kernels.chunk_stats(kernels.prepare_chunk(y, 1.0, 0, 0))[3]


def test_weighted_kmeanspp_and_lloyd_find_weighted_groups():
    pts = np.array([[0.0], [0.1], [10.0], [10.1], [20.0]])
    w = np.array([5.0, 5.0, 5.0, 5.0, 1e-9])
    rng = np.random.default_rng(0)
    chosen = kernels.weighted_kmeanspp(pts, w, 2, rng)
    assert len(set(chosen.tolist())) == 2
    c = kernels.weighted_lloyd(pts, w, pts[chosen])
    assert_allclose(np.sort(c[:, 0]), [0.05, 10.05], atol=1e-6)


def test_sq_dists_matches_direct():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(7, 5)), rng.normal(size=(4, 5))
    assert_allclose(kernels.sq_dists(a, b), ((a[:, None] - b[None]) ** 2).sum(-1), atol=1e-12)


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
@pytest.mark.parametrize("k", [1, 3, 10, kernels.FEW_CENTRES, 16])
def test_decision_dots_stay_within_the_error_bound(dtype, k):
    """gemm_blocks(decide_only=True) takes the fastest way (raw pixels against scaled centres;
    a compiled loop for few centres), so its dots differ from the seeding's in the last bits,
    but never by more than gemm_error_coef allows: canonical decisions rest on that bound."""
    rng = np.random.default_rng(k)
    raw = rng.integers(0, 256, size=(2500, 784)).astype(np.uint8)
    raw[::7] = 255  # rows of the largest norm
    x = raw if dtype == np.uint8 else (raw / np.float32(255) * 3 - 1).astype(np.float32)
    div = 255.0 if dtype == np.uint8 else 1.0
    chunk = kernels.prepare_chunk(x, div, 0, 0)
    c = (rng.random((k, 784)) * 2 - 0.5).astype(np.float32)
    exact = (x.astype(np.float64) / div) @ c.astype(np.float64).T
    bound = kernels.gemm_error_coef(784) / 2 * np.sqrt(chunk.xnorm)[:, None] \
        * np.linalg.norm(c.astype(np.float64), axis=1)[None, :]
    seen = 0
    for s, xr, dots in kernels.gemm_blocks(chunk, c, decide_only=True):
        err = np.abs(dots.astype(np.float64) - exact[s:s + xr.shape[0]])
        assert (err <= bound[s:s + xr.shape[0]]).all()
        assert err.max() > 0 or k == 1  # rounded, not exact: the bound is what is tested
        seen += xr.shape[0]
    assert seen == x.shape[0]


@pytest.mark.parametrize("n", [1, 32768, 32769, 70001])
def test_pixel_column_stats_are_exact_across_partial_sum_blocks(n):
    """uint8 column sums run in int32 blocks of 32,768 rows: all-255 rows are the worst case
    for their range, and the totals must still equal numpy's int64 sums exactly."""
    x = np.full((n, 3), 255, dtype=np.uint8)
    x[::5, 1] = np.arange(0, n, 5) % 256
    count, s1, s2, finite, *_ = kernels.chunk_stats(kernels.prepare_chunk(x, 1.0, 0, 0))
    wide = x.astype(np.int64)
    assert count == n and finite
    assert_array_equal(s1, wide.sum(axis=0).astype(np.float64))
    assert_array_equal(s2, (wide**2).sum(axis=0).astype(np.float64))
