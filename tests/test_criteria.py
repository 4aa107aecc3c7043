"""Choosing K (kmdask.engine.criteria): CH, DB and the silhouette against scikit-learn on the
same labels, the one-graph driver on a real LocalCluster across chunkings, the gap statistic
against a direct numpy computation, kneedle on known curves, the spec option, the runner's
wiring for both fit kinds and the figure."""

from __future__ import annotations

import json
import math
import re

import dask.array as da
import numpy as np
import pytest
from sklearn.metrics import calinski_harabasz_score, davies_bouldin_score, silhouette_score

from kmdask.engine import criteria as cr
from kmdask.errors import ConfigError

REL = 1e-9


def _labels(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Nearest of k seeded rows: a cheap, deterministic clustering to score."""
    c = x[np.random.default_rng(seed).choice(x.shape[0], k, replace=False)]
    return np.argmin(((x[:, None, :] - c[None]) ** 2).sum(-1), axis=1)


@pytest.fixture(scope="module")
def rows(mnist_train) -> tuple[np.ndarray, list[int], list[np.ndarray]]:
    """2,000 real MNIST rows (uint8) and labels for K = 2, 5, 10."""
    x = mnist_train[:2000]
    ks = [2, 5, 10]
    xf = x[:, ::4].astype(np.float64) / 255.0  # every 4th pixel: labels cheaply
    return x, ks, [_labels(xf, k, k) for k in ks]


def test_ch_db_and_silhouette_equal_sklearn_on_mnist(rows):
    x, ks, labs = rows
    xf = x / 255.0
    sums = cr.cluster_sums(x, labs, ks, 255.0)
    sil = cr.silhouettes(xf, labs, ks, block=700)
    for j, (k, lab, s) in enumerate(zip(ks, labs, sums, strict=True)):
        assert cr.calinski_harabasz(s) == pytest.approx(calinski_harabasz_score(xf, lab),
                                                        rel=REL), k
        assert cr.davies_bouldin(s) == pytest.approx(davies_bouldin_score(xf, lab), rel=REL), k
        assert sil[j].mean() == pytest.approx(silhouette_score(xf, lab), rel=REL), k


def test_edge_cases_singleton_cluster_and_k2():
    rng = np.random.default_rng(3)
    x = np.vstack([rng.normal(0, 1, (40, 3)), rng.normal(6, 1, (30, 3)), [[20.0, 20, 20]]])
    lab3 = np.r_[np.zeros(40, int), np.ones(30, int), [2]]  # cluster 2: one row
    lab2 = np.r_[np.zeros(40, int), np.ones(31, int)]
    for k, lab in ((3, lab3), (2, lab2)):
        s = cr.cluster_sums(x, [lab], [k], 1.0)[0]
        assert cr.calinski_harabasz(s) == pytest.approx(calinski_harabasz_score(x, lab), rel=REL)
        assert cr.davies_bouldin(s) == pytest.approx(davies_bouldin_score(x, lab), rel=REL)
        sil = cr.silhouettes(x, [lab], [k], block=16)[0]
        assert sil.mean() == pytest.approx(silhouette_score(x, lab), rel=REL)
        if k == 3:
            assert sil[-1] == 0.0  # a row alone in its cluster scores 0, as scikit-learn


def test_driver_on_the_cluster_is_bit_identical_across_chunkings(client, rows):
    x, ks, labs = rows
    ref = cr.cluster_sums(x, labs, ks, 255.0)  # one in-memory chunk
    for chunk in (2000, 512, 333):
        got = cr.cluster_sums(da.from_array(x, chunks=(chunk, 784)), labs, ks, 255.0)
        for a, b in zip(got, ref, strict=True):
            assert np.array_equal(a.counts, b.counts) and np.array_equal(a.means, b.means)
            assert np.array_equal(a.wcss, b.wcss) and np.array_equal(a.dist, b.dist)
            assert cr.calinski_harabasz(a) == cr.calinski_harabasz(b)
            assert cr.davies_bouldin(a) == cr.davies_bouldin(b)


def test_exact_partials_are_order_free():
    rng = np.random.default_rng(0)
    v = rng.random(5000) * 10.0 ** rng.integers(-8, 8, 5000)
    g = rng.integers(0, 3, 5000)
    whole = cr.merge_partials([cr.exact_partials(v, g)], 3)
    parts = [cr.exact_partials(v[a:a + 700], g[a:a + 700]) for a in range(0, 5000, 700)]
    assert np.array_equal(cr.merge_partials(parts[::-1], 3), whole)
    assert np.array_equal(whole, [math.fsum(v[g == i]) for i in range(3)])  # correctly rounded


def test_silhouette_sample_is_seeded_and_stated():
    a, b = cr.sample_rows(60000, 10000, 7), cr.sample_rows(60000, 10000, 7)
    assert np.array_equal(a, b) and np.unique(a).size == 10000
    assert np.array_equal(a, np.sort(np.random.default_rng(7).choice(60000, 10000,
                                                                     replace=False)))
    assert np.array_equal(cr.sample_rows(500, 10000, 0), np.arange(500))


def test_gap_statistic_against_direct_numpy():
    rng = np.random.default_rng(1)
    x = rng.random((50, 4))
    lab = rng.integers(0, 3, 50)
    direct = sum(((x[lab == c] - x[lab == c].mean(0)) ** 2).sum() for c in range(3))
    assert cr.wcss(x, lab, 3) == pytest.approx(direct, rel=1e-12)
    log_w = np.log([10.0, 6.0, 4.0, 3.5])
    ref = np.log([[12.0, 8.0, 6.0, 5.0], [12.5, 8.4, 6.2, 5.1], [11.6, 7.9, 5.9, 4.8]])
    gap, sk = cr.gap_statistic(log_w, ref)
    b = ref.shape[0]
    for j in range(4):
        col = ref[:, j]
        assert gap[j] == pytest.approx(col.mean() - log_w[j], rel=1e-12)
        sd = math.sqrt(((col - col.mean()) ** 2).sum() / b)
        assert sk[j] == pytest.approx(sd * math.sqrt(1 + 1 / b), rel=1e-12)
    ks = [2, 3, 4, 5]
    first = next(k for i, k in enumerate(ks[:-1]) if gap[i] >= gap[i + 1] - sk[i + 1])
    assert cr.gap_choice(ks, gap, sk) == first
    assert cr.gap_choice([2, 3, 4], np.array([0.1, 0.2, 0.3]), np.zeros(3)) == 4


def test_reference_sets_lie_in_the_bounding_box():
    x = np.random.default_rng(2).normal(size=(100, 3))
    refs = cr.reference_sets(x, 3, seed=5)
    assert len(refs) == 3 and all(r.shape == x.shape for r in refs)
    assert all((r >= x.min(0)).all() and (r <= x.max(0)).all() for r in refs)
    assert np.array_equal(refs[1], cr.reference_sets(x, 3, seed=5)[1])
    pixels = np.random.default_rng(3).integers(20, 200, size=(300, 5), dtype=np.uint8)
    pixels[:, 4] = 7  # a constant column stays constant
    got = cr.reference_sets(pixels, 2, seed=5)
    assert all(r.dtype == np.uint8 and r.shape == pixels.shape for r in got)
    assert all((r >= pixels.min(0)).all() and (r <= pixels.max(0)).all() for r in got)
    assert (got[0][:, 4] == 7).all() and set(np.unique(got[0][:, 0])) >= {
        pixels[:, 0].min(), pixels[:, 0].max()}  # both ends of the box are drawn


def test_reference_sets_in_the_fit_s_passes_equal_fitting_them_alone(client, rows):
    """The gap's reference sets as extra row groups of a fit: the fit's own models are
    unchanged, and every reference model is bit-identical to fitting its set alone."""
    from kmdask.engine.estimator import fit_models, fit_sets

    x = rows[0][:1500]
    X = da.from_array(x, chunks=(500, 784))
    ks = [2, 4]
    refs, inits = cr.gap_references(X, ks, silhouette_sample=800, gap_references=2,
                                    gap_rows=300, seed=1)
    fused = fit_models(X, ks, n_init=2, max_iter=30, random_state=0,
                       also=list(zip(refs, inits, strict=True)))
    plain = fit_models(X, ks, n_init=2, max_iter=30, random_state=0)
    for a, b in zip(fused.results, plain.results, strict=True):
        assert np.array_equal(a.centres, b.centres) and a.inertia == b.inertia
        assert np.array_equal(np.concatenate(a.labels), np.concatenate(b.labels))
    alone = fit_sets(refs, inits, max_iter=30, divisor=255.0)
    one = fit_models(refs[1], [4], init=inits[1][1], max_iter=30, divisor=255.0).results[0]
    assert np.array_equal(alone[1][1].centres, one.centres) and alone[1][1].n_iter == one.n_iter
    for got_set, want_set in zip(fused.also, alone, strict=True):
        for a, b in zip(got_set, want_set, strict=True):
            assert np.array_equal(a.centres, b.centres) and a.n_iter == b.n_iter
            assert np.array_equal(np.concatenate(a.labels), np.concatenate(b.labels))
            assert a.inertia == b.inertia
    assert np.array_equal(cr.reference_log_w_of(refs, ks, fused.also, 255.0),
                          cr.reference_log_w(refs, ks, seed=1, max_iter=30))


def test_kneedle_on_known_curves():
    # hand computation: x_n = 0, 1/3, 2/3, 1; 1 - y_n = 0, 2/3, 8/9, 1; difference peaks at 2
    assert cr.kneedle([1, 2, 3, 4], [10.0, 4.0, 2.0, 1.0]) == 2
    ks = list(range(1, 11))  # steep down to K=4, then nearly flat: the knee is 4
    y = [100.0 - 30 * (k - 1) if k <= 4 else 10.0 - (k - 4) for k in ks]
    assert cr.kneedle(ks, y) == 4
    assert cr.kneedle(ks, [1000.0 / k for k in ks]) == 3  # 1/x on 1..10
    assert cr.kneedle([2, 3], [5.0, 4.0]) == 2


def test_choosing_k_end_to_end_with_the_gap(client, rows):
    x, ks, labs = rows
    got = cr.choosing_k(da.from_array(x[:600], chunks=(250, 784)), [v[:600] for v in labs], ks,
                        [3.0, 2.0, 1.5], silhouette_sample=400, gap_references=2, gap_rows=250,
                        seed=3, gap_iterations=5)
    idx = cr.sample_rows(600, 400, 3)
    xs = x[:600][idx] / 255.0
    g = cr.sample_rows(400, 250, 4)  # the gap sample: positions in the silhouette sample
    log_w = np.log([cr.wcss(xs[g], v[:600][idx][g], k) for v, k in zip(labs, ks, strict=True)])
    ref = cr.reference_log_w(cr.reference_sets(x[:600][idx][g], 2, 3), ks, seed=3, max_iter=5)
    gap, sk = cr.gap_statistic(log_w, ref)
    for j, k in enumerate(ks):
        v = got.per_k[k]
        assert v["gap"] == gap[j] and v["gap_sk"] == sk[j]
        assert v["silhouette"] == pytest.approx(silhouette_score(xs, labs[j][:600][idx]),
                                                rel=REL)
        assert sum(got.profiles[k]["counts"]) == 400
    assert got.choices["gap"] == cr.gap_choice(ks, gap, sk)
    assert got.settings["silhouette_sample"] == 400 and got.settings["gap_rows"] == 250


def _job(criteria=None, figure=True, ks=(2, 3)) -> dict:
    fit = {"name": "a", "algorithm": "scalable", "rows": 100, "k": list(ks)}
    if criteria is not None:
        fit["criteria"] = criteria
    job = {"job": "j", "fits": [fit]}
    if figure:
        job["figures"] = [{"name": "c", "kind": "choosing_k", "fits": ["a"]}]
    return job


def test_the_spec_option():
    from kmdask.batch.spec import CriteriaSpec, parse_job

    assert parse_job(_job()).fits[0].criteria == CriteriaSpec(10_000, 10, 2_000)
    got = parse_job(_job({"silhouette_sample": 500, "gap_references": 0})).fits[0].criteria
    assert got == CriteriaSpec(500, 0, 2_000)
    assert parse_job(_job({"gap_rows": 300})).fits[0].criteria.gap_rows == 300
    assert parse_job(_job(False, figure=False)).fits[0].criteria is None
    for bad, what in (({"silhouette": 5}, "fits[0].criteria.silhouette: unknown key"),
                      ({"silhouette_sample": 1}, "fits[0].criteria.silhouette_sample: must be"),
                      ({"gap_references": "x"}, "gap_references: expected an integer"),
                      ("yes", "fits[0].criteria: expected true, false or a mapping"),
                      (False, "sets criteria: false; choosing_k draws them")):
        with pytest.raises(ConfigError, match=re.escape(what)) as e:
            parse_job(_job(bad))
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="has one K; choosing_k needs two or more"):
        parse_job(_job(ks=(3,)))


@pytest.mark.parametrize("algorithm", ["scalable", "mccaffrey"])
def test_the_runner_stores_criteria_for_both_fit_kinds(client, rows, tmp_path, algorithm):
    from kmdask.batch import runner
    from kmdask.batch.spec import parse_job

    x = da.from_array(rows[0][:500], chunks=(200, 784))
    fit = {"name": "f", "algorithm": algorithm, "rows": 500, "k": [2, 3], "iterations": 5,
           "trials": 1, "criteria": {"silhouette_sample": 300, "gap_references": 2}}
    spec = parse_job({"job": "j", "fits": [fit]}).fits[0]
    section = runner._run_fit(tmp_path, spec, x, x, None, [], 255.0)
    assert set(section["criteria"]["choices"]) == {"knee", "gap", "silhouette",
                                                   "calinski_harabasz", "davies_bouldin"}
    assert section["criteria"]["silhouette_sample"] == 300
    for k in (2, 3):
        res = json.loads((tmp_path / "fits" / "f" / f"k{k}" / "result.json").read_text())
        assert set(res["criteria"]) == {"calinski_harabasz", "davies_bouldin", "silhouette",
                                        "gap", "gap_sk"}
        assert all(isinstance(v, float) for v in res["criteria"].values())
        lab = np.load(tmp_path / "fits" / "f" / f"k{k}" / "labels.npy")
        xf = rows[0][:500] / 255.0
        assert res["criteria"]["calinski_harabasz"] == pytest.approx(
            calinski_harabasz_score(xf, lab), rel=REL)


def test_the_figure_draws_from_the_manifest_alone(rows, tmp_path):
    from kmdask.batch.rundir import Run
    from kmdask.batch.spec import FigureSpec
    from kmdask.report.choosing import draw_choosing_k

    x, ks, labs = rows
    got = cr.choosing_k(x[:300], [v[:300] for v in labs], ks, [3.0, 2.0, 1.5],
                        silhouette_sample=200, gap_references=0)
    results = {str(k): {"k": k, "inertia": w, "criteria": got.per_k[k],
                        "silhouette_profile": got.profiles[k]}
               for k, w in zip(ks, [3.0, 2.0, 1.5], strict=True)}
    info = {"algorithm": "scalable", "rows": 300, "iterations": 5, "trials": 1,
            "results": results, "criteria": {"choices": got.choices, **got.settings}}
    run = Run(tmp_path, {"fits": {"f": info}, "data": {}})
    drawn = draw_choosing_k(run, FigureSpec("ck", "choosing_k", ("f",)), tmp_path)
    assert [d.path.name for d in drawn] == ["ck.png"] and drawn[0].path.stat().st_size > 0
