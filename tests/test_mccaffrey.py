"""mccaffrey mode: exact kernels, a sequential reference, the published table, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from kmdask.errors import ConfigError, DataError, KmdaskError
from kmdask.mccaffrey import kernels as mk
from kmdask.mccaffrey.dotnet_random import DotNetRandom
from kmdask.mccaffrey.fit import fit_mccaffrey, mccaffrey_draws

# da.from_array embeds the rows in the graph; that is the point of these tests, not a problem.
pytestmark = pytest.mark.filterwarnings("ignore:Sending large graph:UserWarning")

# docs/original-demo.md, "Published numbers to reproduce exactly" (seed 0).
TABLE = [
    (100, 3, 20, 20, [16, 66, 18]),
    (100, 3, 30, 30, [45, 38, 17]),
    (100, 3, 100, 100, [45, 38, 17]),
    (10000, 3, 20, 20, [3103, 3150, 3747]),
    (10000, 3, 30, 30, [3734, 3152, 3114]),
    (10000, 3, 100, 100, [3734, 3152, 3114]),
]
MAIN = (60000, 10, 20, 20, [4436, 5670, 8520, 4552, 5797, 4624, 4291, 6044, 7159, 8907])


# --------------------------------------------------------------------------------------------
# A plain sequential reference: the spec, line by line, in numpy. Distances are the original's
# (feature-order float64 sum of squared differences, via cumsum, then sqrt).


def _dist(rows: np.ndarray, c: np.ndarray) -> np.ndarray:
    return np.sqrt(np.cumsum((rows - c) ** 2, axis=1)[:, -1])


def reference_fit(X: np.ndarray, K: int, max_iter: int, T: int, seed: int = 0):
    """Sequential mccaffrey mode: ``(counts, labels, centers, wcss_per_trial, best)``."""
    x = (X.astype(np.float32) / np.float32(255)).astype(np.float64)
    N = x.shape[0]
    rnd = DotNetRandom(seed)
    trials = []
    for t in range(T):
        chosen = [rnd.next(0, N)]
        for _ in range(1, K):
            dmin = np.min([_dist(x, x[i]) for i in chosen], axis=0)
            d2 = dmin * dmin
            total = np.cumsum(d2)[-1]  # row-order sum
            p = rnd.next_double()
            cum, pick = 0.0, N - 1
            with np.errstate(invalid="ignore", divide="ignore"):  # ΣD² = 0 gives NaN, as in C#
                for i in range(N):
                    cum += d2[i] / total
                    if cum > p:
                        pick = i
                        break
            chosen.append(pick)
        labels = np.argmin(np.stack([_dist(x, x[i]) for i in chosen], 1), axis=1)
        it = 0
        while it < max_iter:
            counts = np.bincount(labels, minlength=K)
            if (counts == 0).any():
                raise KmdaskError(f"trial {t}: empty cluster")
            means = np.stack([x[labels == k].sum(0) / counts[k] for k in range(K)])
            new = np.argmin(np.stack([_dist(x, m) for m in means], 1), axis=1)
            if np.array_equal(new, labels) or (np.bincount(new, minlength=K) == 0).any():
                break
            labels = new
            it += 1
        d = np.sqrt(np.cumsum((x - means[labels]) ** 2, axis=1)[:, -1])
        trials.append((np.cumsum(d * d)[-1], labels, means, it))
    best = 0
    for t in range(1, T):
        if trials[t][0] < trials[best][0]:
            best = t
    w, labels, means, _ = trials[best]
    return np.bincount(labels, minlength=K), labels, means, [tr[0] for tr in trials], best


@pytest.fixture(scope="module")
def mnist(mnist_train) -> np.ndarray:
    return mnist_train


# --------------------------------------------------------------------------------------------
# Kernels


def test_pixel_table_is_float32_division() -> None:
    b = np.arange(256)
    assert np.array_equal(mk.PIXEL, (b.astype(np.float32) / np.float32(255)).astype(np.float64))
    # and no double-rounding surprise if the division had been done in float64 first
    assert np.array_equal(mk.PIXEL, (b / 255.0).astype(np.float32).astype(np.float64))


def _near_tie_case(rng, d=784):
    """A row and K means where two means are *exactly* equidistant in real arithmetic (one is
    the other with two features swapped where the row is equal), so only the feature-order
    rounding decides — as it did in the original."""
    u8 = np.zeros((1, d), np.uint8)
    u8[0, rng.choice(d, 120, replace=False)] = rng.integers(1, 256, 120)
    f, g = rng.choice(d, 2, replace=False)
    u8[0, g] = u8[0, f]
    base = rng.random(d) * 0.6
    swapped = base.copy()
    swapped[[f, g]] = base[[g, f]]
    means = np.stack([base + 0.05, swapped, base, rng.random(d)])[rng.permutation(4)]
    return u8, means


def test_lloyd_pass_matches_sequential_distances_on_near_ties() -> None:
    rng = np.random.default_rng(1)
    rechecked = 0
    for _ in range(200):
        u8, means = _near_tie_case(rng)
        chunk = mk.prepare_chunk(u8, 0)
        labels, sums, counts, r = mk.lloyd_pass(chunk, means[None])
        x = mk.PIXEL[u8]
        want = np.argmin(np.stack([_dist(x, m) for m in means], 1), axis=1)
        assert labels[0, 0] == want[0]
        rechecked += r
        assert counts.sum() == 1 and np.array_equal(sums[0, labels[0, 0]], x[0])
    assert rechecked > 100  # the exact path really was exercised


def test_lloyd_pass_exact_tie_goes_to_lowest_index() -> None:
    rng = np.random.default_rng(2)
    u8 = rng.integers(0, 256, (50, 784), dtype=np.uint8)
    m = rng.random(784)
    means = np.stack([rng.random(784) + 5.0, m, m.copy(), m.copy()])[None]
    labels, _, counts, rechecked = mk.lloyd_pass(mk.prepare_chunk(u8, 0), means)
    assert (labels == 1).all() and rechecked == 50 and counts[0, 1] == 50


def test_lloyd_pass_matches_reference_many_trials() -> None:
    rng = np.random.default_rng(3)
    u8 = rng.integers(0, 256, (2500, 784), dtype=np.uint8)  # > 2 GEMM blocks
    means = rng.random((3, 5, 784))
    labels, sums, counts, _ = mk.lloyd_pass(mk.prepare_chunk(u8, 0), means)
    x = mk.PIXEL[u8]
    for a in range(3):
        want = np.argmin(np.stack([_dist(x, m) for m in means[a]], 1), axis=1)
        assert np.array_equal(labels[a], want)
        assert np.array_equal(counts[a], np.bincount(want, minlength=5))
        for k in range(5):
            assert np.array_equal(sums[a, k], x[want == k].sum(0))  # exact, any order


def test_moving_rows_between_sums_equals_summing_from_scratch(mnist) -> None:
    """Later Lloyd passes move only the rows whose label changed; pixel sums are exact, so the
    result is the very sums of a pass from scratch, bit for bit."""
    rng = np.random.default_rng(5)
    chunk = mk.prepare_chunk(mnist[:3000], 0)
    old = rng.integers(0, 6, (4, 3000)).astype(np.int16)
    new = old.copy()
    flip = rng.random((4, 3000)) < [[0.0], [0.01], [0.3], [1.0]]  # none, few, many, all
    new[flip] = rng.integers(0, 6, int(flip.sum()))
    sums, counts = mk.cluster_sums(chunk, old, 6)
    moved, moved_counts = mk.move_rows(chunk, old, new, sums, counts)
    want, want_counts = mk.cluster_sums(chunk, new, 6)
    assert moved.tobytes() == want.tobytes()
    assert np.array_equal(moved_counts, want_counts)
    assert np.array_equal(sums, mk.cluster_sums(chunk, old, 6)[0])  # inputs left as they were


@pytest.mark.parametrize("splits", [[0, 1000], [0, 1, 999, 1000], [0, 250, 500, 750, 1000],
                                    list(range(0, 1001, 37)) + [1000]])
def test_roulette_chain_is_exact_for_any_chunking(splits) -> None:
    rng = np.random.default_rng(4)
    n, T = 1000, 6
    dmin = np.sqrt(rng.random((T, n)) * 50)
    dmin[:, rng.choice(n, 100, replace=False)] = 0.0  # chosen rows / duplicates: D² = 0
    d2 = dmin * dmin
    total = np.cumsum(d2, axis=1)[:, -1]
    cums = [np.cumsum(d2[t] / total[t]) for t in range(T)]
    # thresholds exactly on running totals (strictly greater is needed), at 0, and past the end
    p = np.array([cums[0][10], cums[1][500], 0.0, cums[3][-1], 0.5, np.nextafter(cums[5][3], 1)])
    want = []
    for t in range(T):
        hit = np.flatnonzero(cums[t] > p[t])
        want.append(int(hit[0]) if hit.size else -1)
    states = [(dmin[:, a:b], None) for a, b in zip(splits[:-1], splits[1:], strict=True)]
    tot = np.zeros(T)
    for st in states:
        tot = mk.d2_sum(st, tot)
    assert np.array_equal(tot, total)
    carry = (np.zeros(T), np.full(T, -1, dtype=np.int64))
    for st, a in zip(states, splits[:-1], strict=True):
        carry = mk.roulette_step(st, a, tot, p, carry)
    assert carry[1].tolist() == want
    assert want[3] == -1 and want[0] > 10  # the "last row" case and a skipped zero run


# --------------------------------------------------------------------------------------------
# Whole fits against the reference


def test_draws_follow_dotnet_order() -> None:
    first, p = mccaffrey_draws(0, 100, 3, 2)
    r = DotNetRandom(0)
    want = [r.next(0, 100), r.next_double(), r.next_double(), r.next(0, 100)]
    assert [first[0], p[0, 0], p[0, 1], first[1]] == want and first[0] == 72


@pytest.mark.mnist
@pytest.mark.parametrize("K", range(2, 11))
def test_k_series_matches_reference(mnist, K: int) -> None:
    X = mnist[:300]
    res = fit_mccaffrey(X, K, 10, 3, chunk_rows=128)
    counts, labels, centers, wcss, best = reference_fit(X, K, 10, 3)
    assert res.best_trial == best and list(res.trial_wcss) == wcss
    assert np.array_equal(res.labels, labels) and np.array_equal(res.centers, centers)
    assert np.array_equal(res.counts, counts)


@pytest.mark.mnist
@pytest.mark.parametrize("max_iter", [1, 2, 5])
def test_stale_means_quirk(mnist, max_iter: int) -> None:
    X = mnist[1000:1400]
    res = fit_mccaffrey(X, 4, max_iter, 2)
    counts, labels, centers, wcss, best = reference_fit(X, 4, max_iter, 2)
    assert np.array_equal(res.labels, labels) and np.array_equal(res.centers, centers)
    if res.trial_n_iter[best] == max_iter:  # kept means are *not* those of the kept labels
        x = mk.PIXEL[X]
        own = np.stack([x[labels == k].mean(0) for k in range(4)])
        assert not np.array_equal(own, res.centers)


@pytest.mark.mnist
def test_duplicate_rows_and_ties(mnist) -> None:
    # Many exact duplicates: zero D² runs in the roulette and exact distance ties.
    X = np.repeat(mnist[:40], 5, axis=0)[np.random.default_rng(5).permutation(200)]
    res = fit_mccaffrey(X, 3, 10, 6, chunk_rows=33)
    counts, labels, centers, wcss, best = reference_fit(X, 3, 10, 6)
    assert np.array_equal(res.labels, labels) and list(res.trial_wcss) == wcss
    # a dask array without a cluster runs the same kernels in-process
    import dask.array as da

    res2 = fit_mccaffrey(da.from_array(X, chunks=(70, 784)), 3, 10, 6)
    assert np.array_equal(res2.labels, labels) and res2.trial_history == res.trial_history


def test_empty_initial_cluster_is_an_error() -> None:
    X = np.zeros((20, 784), np.uint8)  # every row identical: centre 1 gets no row
    with pytest.raises(KmdaskError, match="cluster 1 is empty after initialisation"):
        fit_mccaffrey(X, 2, 5, 1)
    with pytest.raises(KmdaskError):
        reference_fit(X, 2, 5, 1)


def test_bad_arguments() -> None:
    X = np.zeros((5, 4), np.uint8)
    with pytest.raises(DataError, match="uint8"):
        fit_mccaffrey(X.astype(np.float32), 2, 1, 1)
    with pytest.raises(ConfigError, match="n_clusters=6 exceeds the 5 rows"):
        fit_mccaffrey(X, 6, 1, 1)
    with pytest.raises(ConfigError, match="max_iter must be an integer >= 1, got 0"):
        fit_mccaffrey(X, 2, 0, 1)


# --------------------------------------------------------------------------------------------
# The published table and determinism


@pytest.mark.mnist
@pytest.mark.parametrize("N,K,iters,trials,want", TABLE)
def test_published_table(mnist, client, N, K, iters, trials, want) -> None:
    # the 100-row cases run in-process, the 10,000-row ones on the 2-worker cluster
    res = fit_mccaffrey(mnist[:N], K, iters, trials, client=client if N > 1000 else None)
    assert res.counts.tolist() == want


@pytest.mark.mnist
def test_same_result_for_any_input_chunking_and_cluster(mnist, client) -> None:
    import dask.array as da
    from distributed import Client, LocalCluster

    X = mnist[:5000]  # the published 10,000-row counts: test_published_table
    base = fit_mccaffrey(X, 3, 20, 20)
    runs = [
        fit_mccaffrey(X, 3, 20, 20, client=client),
        fit_mccaffrey(da.from_array(X, chunks=(1250, 784)), 3, 20, 20, client=client),
        fit_mccaffrey(da.from_array(X, chunks=(1667, 392)), 3, 20, 20, client=client),
    ]
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address="127.0.0.1:0") as cl, Client(cl) as one:
        runs.append(fit_mccaffrey(da.from_array(X, chunks=(3500, 784)), 3, 20, 20, client=one))
    for r in runs:
        assert np.array_equal(r.labels, base.labels) and np.array_equal(r.centers, base.centers)
        assert r.trial_wcss == base.trial_wcss and r.trial_history == base.trial_history
        assert np.array_equal(r.init_rows, base.init_rows) and r.trial_n_iter == base.trial_n_iter
    assert base.counts.tolist() == [1636, 1647, 1717]  # pinned: the first 5,000 rows
    assert base.n_rechecked > 0  # real near-ties went through the exact recheck


@pytest.mark.slow
@pytest.mark.mnist
def test_published_main_row_on_cluster(mnist, client) -> None:
    import dask.array as da

    N, K, iters, trials, want = MAIN
    res = fit_mccaffrey(da.from_array(mnist[:N], chunks=(10000, 784)), K, iters, trials,
                        client=client)
    assert res.counts.tolist() == want  # timed by `python -m kmdask.bench internal`, not here
