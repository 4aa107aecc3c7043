"""Passes that reuse labels, sums and distance bounds give exactly what a fresh pass gives."""

from __future__ import annotations

import pickle

import dask.array as da
import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from kmdask.engine import incremental as pruned
from kmdask.engine import kernels, lloyd
from kmdask.engine.estimator import fit_models

SWEEP = [k for k in range(2, 11) for _ in range(3)]  # K=2..10 x 3 trials: 27 models


@pytest.fixture(scope="module")
def mnist8(mnist_train):
    return mnist_train[:6000]


def _chunk(x):
    return kernels.prepare_chunk(x, 255.0, 0, 0)


def _update(res, starts, stops):
    """Lloyd's centre update from a pass (empty clusters keep a zero centre: fine here)."""
    cnt = np.maximum(res.counts, 1)[:, None]
    return np.concatenate([res.sums[a:b] / 255.0 / cnt[a:b]
                           for a, b in zip(starts, stops, strict=True)])


def _exact_labels(x, c, starts, stops):
    d = ((x.astype(np.float64)[:, None, :] / 255.0 - c.astype(np.float32)
          .astype(np.float64)[None]) ** 2).sum(-1)
    return np.stack([d[:, a:b].argmin(1) for a, b in zip(starts, stops, strict=True)],
                    axis=1)


def test_near_ties_are_decided_exactly():
    # two nearly identical centres: their float32 distances differ by less than the GEMM's
    # rounding, so float32 alone gets some rows wrong; the exact re-decision must not
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(2000, 64), dtype=np.uint8)
    c1 = rng.random(64).astype(np.float32)
    c2 = c1.copy()
    c2[:8] += np.float32(3e-6) * rng.choice([-1, 1], 8).astype(np.float32)
    c = np.stack([c1, c2, rng.random(64).astype(np.float32) + 5])
    starts, stops = kernels.stack_bounds([3])
    want = _exact_labels(x, c, starts, stops)[:, 0]
    xf = x.astype(np.float32) / np.float32(255)
    f32 = (np.einsum("ij,ij->i", c, c)[None] - 2 * (xf @ c.T)).argmin(1)
    assert (f32 != want).any(), "the case must trip float32 up, or it tests nothing"
    got = kernels.assign(_chunk(x), c, starts, stops, kernels.MODE_ASSIGN).labels[0]
    assert_array_equal(got, want)
    res, state = pruned.lloyd_pass(_chunk(x), c, starts, stops)
    assert_array_equal(state.labels[:, 0], want)
    assert_array_equal(res.counts, np.bincount(want, minlength=3))


@pytest.mark.parametrize("force_bounds", [False, True])
def test_reused_state_equals_fresh_pass(mnist8, monkeypatch, force_bounds):
    if force_bounds:  # bounds from the second pass on, and Elkan passes whatever they cost
        monkeypatch.setattr(pruned, "_BOUNDS_FROM", 1.0)
        monkeypatch.setattr(pruned, "_ELKAN_MAX", 1.0)
    x = mnist8
    chunk = _chunk(x)
    starts, stops = kernels.stack_bounds(SWEEP)
    rng = np.random.default_rng(1)
    c = x[rng.choice(x.shape[0], sum(SWEEP), replace=False)].astype(np.float64) / 255
    state, bounded, computed = None, 0, []
    for _ in range(12):
        res, state = pruned.lloyd_pass(chunk, c, starts, stops, prev=state)
        fresh, _ = pruned.lloyd_pass(chunk, c, starts, stops, keep=False)
        for f in ("sums", "counts", "sq"):
            assert_array_equal(getattr(res, f), getattr(fresh, f))
        ref = kernels.assign(chunk, c, starts, stops, kernels.MODE_SUMS)
        assert_array_equal(state.labels.T, ref.labels)
        assert_array_equal(res.sums, ref.sums)
        assert_allclose(pruned.inertia(res.sums, res.counts, res.sq, c, starts, stops),
                        ref.inertia, rtol=1e-6)
        bounded += state.bounded
        computed.append(res.computed / res.possible)
        c = _update(res, starts, stops)
    if force_bounds:
        assert bounded >= 10
        assert computed[-1] < 0.5  # the bounds did skip most distances


def test_state_follows_a_subset_of_models(mnist8, monkeypatch):
    monkeypatch.setattr(pruned, "_BOUNDS_FROM", 1.0)
    x = mnist8[:3000]
    chunk = _chunk(x)
    sizes, ids = [3, 5, 4], ("a", "b", "c")
    rng = np.random.default_rng(2)
    c = x[rng.choice(x.shape[0], 12, replace=False)].astype(np.float64) / 255
    starts, stops = kernels.stack_bounds(sizes)
    state = None
    for _ in range(4):
        res, state = pruned.lloyd_pass(chunk, c, starts, stops, ids, state)
        c = _update(res, starts, stops)
    # model "b" converged and left the pass; "c" now comes first
    keep = [2, 0]
    c2 = np.concatenate([c[starts[m]:stops[m]] for m in keep])
    s2, e2 = kernels.stack_bounds([sizes[m] for m in keep])
    res, state = pruned.lloyd_pass(chunk, c2, s2, e2, ("c", "a"), state)
    assert state.bounded
    fresh, _ = pruned.lloyd_pass(chunk, c2, s2, e2, keep=False)
    assert_array_equal(res.sums, fresh.sums)
    assert_array_equal(res.counts, fresh.counts)
    # a state for other models is not used at all
    res, state = pruned.lloyd_pass(chunk, c2, s2, e2, ("x", "y"), state)
    assert not state.bounded and res.computed == res.possible


def test_chunk_travels_without_its_cache(mnist8):
    chunk = _chunk(mnist8[:100])
    chunk.cache["anything"] = np.zeros(10**6)
    back = pickle.loads(pickle.dumps(chunk))
    assert back.cache == {}
    assert_array_equal(back.x, chunk.x)
    assert_array_equal(back.xsq, chunk.xsq)


def test_fit_with_bounds_equals_fit_without(mnist8, client, monkeypatch):
    """Through the engine, on real workers: bit-identical centres, labels and histories."""
    X = da.from_array(mnist8, chunks=(1500, 784))
    runs = []
    for use in (True, False):
        monkeypatch.setattr(lloyd, "USE_BOUNDS", use)
        computed: list[float] = []
        res = fit_models(X, [3, 8], n_init=2, random_state=5, max_iter=60, tol=1e-6,
                         persist=True, progress=lambda p, got=computed: got.append(p["computed"]))
        runs.append((res, computed))
    (a, comp_a), (b, comp_b) = runs
    assert min(comp_a) < 0.3 and min(comp_b) == 1.0  # bounds were used, and only there
    assert a.models == b.models
    for ma, mb in zip(a.results, b.results, strict=True):
        assert_array_equal(ma.centres, mb.centres)
        assert ma.n_iter == mb.n_iter
        assert ma.inertia_history == mb.inertia_history
        assert_array_equal(np.concatenate(ma.labels), np.concatenate(mb.labels))


def test_plain_kernel_gives_the_same_sums_and_squares(mnist8):
    """Streamed passes use kernels.assign: its integer results must equal the pruned pass's."""
    chunk = _chunk(mnist8[:2500])
    starts, stops = kernels.stack_bounds([4, 7])
    c = mnist8[100:111].astype(np.float64) / 255
    a = kernels.assign(chunk, c, starts, stops, kernels.MODE_SUMS, keep_rows=False)
    res, _ = pruned.lloyd_pass(chunk, c, starts, stops, keep=False)
    assert_array_equal(a.sums, res.sums)
    assert_array_equal(a.counts, res.counts)
    assert_array_equal(a.sq, res.sq)
