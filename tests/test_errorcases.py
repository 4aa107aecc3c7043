"""Error-case clustering: case-vector transforms, zero-out, routing, the experiment's accounting,
the float64 mccaffrey path against a sequential reference, and a real cases job end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from kmdask.batch.spec import load_job, parse_job
from kmdask.errorcases.experiment import bootstrap_ci, class_set, evaluate, mcnemar, route
from kmdask.errorcases.spec import CasesSpec
from kmdask.errorcases.vectors import (
    case_order,
    case_vectors,
    reliable_cluster,
    transform,
    zero_mask,
)
from kmdask.errors import ConfigError, DataError
from kmdask.mccaffrey.dotnet_random import DotNetRandom
from kmdask.mccaffrey.fit import fit_mccaffrey

pytestmark = pytest.mark.filterwarnings("ignore:Sending large graph:UserWarning")

P = np.array([[0.5, 0.3, 0.2, 0, 0, 0, 0, 0, 0, 0],
              [0.0, 0.0, 0.0, 0, 0, 0, 0, 0, 0, 1.0],
              [0.1, 0.0, 0.0, 0, 0, 0, 0, 0.9, 0, 0]])
T = np.array([1, 9, 7])


# --------------------------------------------------------------------------------------------
# case vectors


def test_transforms_on_toy_probabilities():
    np.testing.assert_array_equal(transform(P, None, "probs", 1), P)
    np.testing.assert_allclose(transform(P, None, "probs", 2)[0, :3], [0.25, 0.09, 0.04])
    np.testing.assert_allclose(transform(P, None, "probs", 3)[2, [0, 7]], [0.001, 0.729])
    err = transform(P, T, "error", 1)
    np.testing.assert_allclose(err[0, :3], [-0.5, 0.7, -0.2])
    np.testing.assert_allclose(err[1], 0.0, atol=0)  # certain and right: no error
    np.testing.assert_allclose(err.sum(axis=1), 0.0, atol=1e-12)  # one-hot minus a simplex
    sq = transform(P, T, "error", 2)  # the sign of an error survives an even power
    np.testing.assert_allclose(sq[0, :3], [-0.25, 0.49, -0.04])
    np.testing.assert_allclose(transform(P, T, "error", 3)[0, :3], [-0.125, 0.343, -0.008])
    with pytest.raises(ValueError):
        transform(P, None, "error", 1)


def test_zero_out_threshold_is_inclusive_and_zeroes_whole_rows():
    probs = np.array([[0.9999, 0.0001] + [0] * 8, [0.99989, 0.00011] + [0] * 8,
                      [1.0] + [0] * 9])
    np.testing.assert_array_equal(zero_mask(probs, 0.9999), [True, False, True])
    np.testing.assert_array_equal(zero_mask(probs, None), [False, False, False])
    for vector in ("probs", "error"):
        v, z = case_vectors(probs, np.array([0, 1, 0]), CasesSpec(vector, 2, 0.9999))
        np.testing.assert_array_equal(z, [True, False, True])
        assert (v[z] == 0).all() and (v[~z] != 0).any()
    v, z = case_vectors(P, T, CasesSpec("probs", 2, 0.95))
    assert z.tolist() == [False, True, False]
    np.testing.assert_array_equal(v[1], 0.0)
    np.testing.assert_allclose(v[2, 7], 0.81)


def test_reliable_cluster_first_only_where_the_algorithm_allows():
    zeroed = np.array([False, True, True, False, True])
    labels = np.array([0, 2, 2, 1, 2])
    centres = np.arange(6.0).reshape(3, 2)
    assert reliable_cluster(labels, zeroed) == 2
    assert reliable_cluster(labels, np.zeros(5, bool)) is None
    # scalable: renumbered so that the reliable cluster is 0 (centres follow the labels)
    lab, cen, info = case_order("scalable", labels, centres, zeroed)
    assert info["reliable_cluster"] == 0 and info["relabelled"]
    np.testing.assert_array_equal(lab, [1, 0, 0, 2, 0])
    np.testing.assert_array_equal(cen, centres[[2, 0, 1]])
    # mccaffrey: the bit-exact order is kept; the figures draw cluster 2 first
    lab, cen, info = case_order("mccaffrey", labels, centres, zeroed)
    np.testing.assert_array_equal(lab, labels)
    assert info["reliable_cluster"] == 2 and info["display_order"] == [2, 0, 1]
    assert info["n_zeroed"] == 3 and not info["relabelled"]


# --------------------------------------------------------------------------------------------
# routing and the experiment's statistics


def test_routing_sends_exactly_the_low_confidence_cases():
    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.full(10, 0.08), size=2000)
    centres = np.vstack([np.zeros(10), rng.dirichlet(np.ones(10), size=3) ** 2])
    routes = route(probs, centres, reliable=0, threshold=0.99, power=2)
    low = probs.max(axis=1) < 0.99
    assert 0 < low.sum() < 2000
    np.testing.assert_array_equal(routes >= 0, low)  # routed <=> top probability < threshold
    assert not (routes == 0).any()  # never to the reliable cluster
    d = (((probs[low] ** 2)[:, None, :] - centres[None, 1:, :]) ** 2).sum(axis=2)
    np.testing.assert_array_equal(routes[low], 1 + np.argmin(d, axis=1))
    assert (route(probs, centres, 0, 0.0, 2) == -1).all()  # nothing below a 0 threshold


def test_experiment_accounting_counts_every_test_case_once():
    rng = np.random.default_rng(0)
    n = 3000
    y = rng.integers(0, 10, n)
    general = np.where(rng.random(n) < 0.95, y, (y + 1) % 10)
    routes = np.where(rng.random(n) < 0.2, rng.integers(1, 4, n), -1)
    routed = general.copy()
    fix = (routes >= 0) & (rng.random(n) < 0.5)
    routed[fix] = y[fix]
    baseline = np.where(rng.random(n) < 0.96, y, (y + 2) % 10)
    e = evaluate(y, general, routed, baseline, routes, n_boot=300, seed=1)
    assert sum(g["n"] for g in e["groups"].values()) == n == e["n_test"]
    assert e["n_routed"] == int((routes >= 0).sum()) == n - e["groups"]["general"]["n"]
    kept = e["groups"]["general"]
    assert kept["general"] == kept["routed"]  # cases not routed keep the general answer
    # overall accuracy = the groups' accuracies weighted by their sizes
    for s in ("general", "routed", "baseline"):
        w = sum(g["n"] * g[s] for g in e["groups"].values()) / n
        assert w == pytest.approx(e[f"{s}_accuracy"])
        lo, hi = e[f"{s}_ci"]
        assert lo <= e[f"{s}_accuracy"] <= hi
    assert e["routed_accuracy"] > e["general_accuracy"]
    assert e["mcnemar_general_vs_routed"]["a_only"] == 0
    b_only = e["mcnemar_general_vs_routed"]["b_only"]
    assert b_only == int(np.sum((routed == y) & (general != y))) > 5
    assert e["mcnemar_general_vs_routed"]["p_value"] == pytest.approx(2 * 0.5**b_only)
    lo, hi = e["routed_minus_general_ci"]
    assert 0 <= lo < hi


def test_mcnemar_exact_and_bootstrap_reproducible():
    a = np.array([True, True, True, False, True])
    b = np.array([False, False, False, False, True])
    r = mcnemar(a, b)
    assert (r["a_only"], r["b_only"]) == (3, 0)
    assert r["p_value"] == pytest.approx(0.25)  # 2 * (1/2)^3
    assert mcnemar(a, a)["p_value"] == 1.0
    c = {"x": np.arange(100) % 3 == 0}
    assert bootstrap_ci(c, 200, seed=5) == bootstrap_ci(c, 200, seed=5)


def test_class_set_holds_the_confused_classes():
    probs = np.zeros((20, 10))
    probs[:, 4], probs[:, 9] = 0.6, 0.4
    probs[:2, 7], probs[:2, 9] = 0.45, 0.0
    true = np.array([4] * 12 + [9] * 8)
    assert class_set(true, probs, 0.05) == [4, 7, 9]
    assert class_set(true, probs, 0.5) == [4, 9]


# --------------------------------------------------------------------------------------------
# mccaffrey mode on float64 rows


def _dist(rows: np.ndarray, c: np.ndarray) -> np.ndarray:
    return np.sqrt(np.cumsum((rows - c) ** 2, axis=1)[:, -1])


def float_reference(x: np.ndarray, K: int, max_iter: int, T: int, seed: int = 0):
    """The original's algorithm on float rows, line by line: feature-order distances,
    row-order cluster sums (np.cumsum is a running sum), stale means at max_iter."""
    N = x.shape[0]
    rnd = DotNetRandom(seed)
    trials = []
    for _ in range(T):
        chosen = [rnd.next(0, N)]
        for _ in range(1, K):
            dmin = np.min([_dist(x, x[i]) for i in chosen], axis=0)
            d2 = dmin * dmin
            total = np.cumsum(d2)[-1]
            p = rnd.next_double()
            cum, pick = 0.0, N - 1
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
            means = np.stack([np.cumsum(x[labels == k], axis=0)[-1] / counts[k]
                              for k in range(K)])
            new = np.argmin(np.stack([_dist(x, m) for m in means], 1), axis=1)
            if np.array_equal(new, labels) or (np.bincount(new, minlength=K) == 0).any():
                break
            labels = new
            it += 1
        d = _dist(x, means[labels])
        trials.append((np.cumsum(d * d)[-1], labels, means))
    best = min(range(T), key=lambda t: (trials[t][0], t))
    return trials[best][1], trials[best][2], [t[0] for t in trials], best


@pytest.fixture(scope="module")
def float_rows() -> np.ndarray:
    rng = np.random.default_rng(1)
    x = rng.dirichlet(np.full(10, 0.3), size=700) ** 2
    x[rng.random(700) < 0.5] = 0.0  # a big zeroed ("reliable") group, as in the real vectors
    x[::7] -= 0.05  # and some negative values (error vectors)
    return x


@pytest.mark.parametrize(("K", "iters", "trials"), [(3, 20, 8), (5, 3, 6)])
def test_float_mccaffrey_matches_sequential_reference(float_rows, K, iters, trials):
    lab, means, wcss, best = float_reference(float_rows, K, iters, trials)
    for chunk_rows in (None, 97, 700):
        r = fit_mccaffrey(float_rows, K, iters, trials, 0, chunk_rows=chunk_rows)
        np.testing.assert_array_equal(r.labels, lab)
        np.testing.assert_array_equal(r.centers, means)  # bit for bit
        assert list(r.trial_wcss) == wcss and r.best_trial == best
        assert r.n_rechecked == 0


def test_float_mccaffrey_on_a_cluster_and_dask_is_bit_identical(float_rows, client):
    import dask.array as da

    ref = fit_mccaffrey(float_rows, 3, 20, 8, 0, chunk_rows=100)
    for X in (float_rows, da.from_array(float_rows, chunks=(130, 10))):
        r = fit_mccaffrey(X, 3, 20, 8, 0, client=client)
        np.testing.assert_array_equal(r.labels, ref.labels)
        assert r.centers.tobytes() == ref.centers.tobytes() and r.wcss == ref.wcss


def test_float_mccaffrey_refuses_bad_rows(float_rows):
    bad = float_rows.copy()
    bad[123, 4] = np.nan
    with pytest.raises(DataError, match="row 123 holds NaN"):
        fit_mccaffrey(bad, 3, 5, 2)
    with pytest.raises(DataError, match="uint8 pixel rows or float64 rows, got dtype float32"):
        fit_mccaffrey(float_rows.astype(np.float32), 3, 5, 2)


# --------------------------------------------------------------------------------------------
# job specs

BAD = [
    ({"cases": {"vector": "logits"}}, "fits[0].cases.vector: expected one of probs, error"),
    ({"cases": {"power": 4}}, "fits[0].cases.power: must be <= 3, got 4"),
    ({"cases": {"zero_out": 1.5}}, "fits[0].cases.zero_out: must be <= 1.0, got 1.5"),
    ({"cases": {"zero_out": "high"}}, "fits[0].cases.zero_out: expected a number, got 'high'"),
    ({"cases": {"colour": 1}}, "fits[0].cases.colour: unknown key"),
]


@pytest.mark.parametrize(("fit", "match"), BAD)
def test_bad_cases_specs_are_one_line_errors(fit, match):
    doc = {"job": "x", "fits": [{"name": "a", "k": 3, **fit}]}
    with pytest.raises(ConfigError, match=r"^j\.yaml: ") as ei:
        parse_job(doc, "j.yaml")
    assert match in str(ei.value) and "\n" not in str(ei.value)


@pytest.mark.parametrize(("extra", "match"), [
    ({"classifier": {"hidden": []}}, "classifier.hidden: expected a list of 1 to 4"),
    ({"classifier": {"epochs": 0}}, "classifier.epochs: must be >= 1, got 0"),
    ({"experiments": [{"fit": "b"}]}, "experiments[0].fit: no fit named 'b'"),
    ({"experiments": [{"fit": "img"}]}, "experiments[0].fit: fit 'img' clusters images"),
    ({"experiments": [{"fit": "err"}]}, "routing needs cases with vector: probs"),
    ({"experiments": [{"fit": "a", "k": 4}]}, "experiments[0].k: fit 'a' has no K=4"),
    ({"experiments": [{"fit": "a"}, {"fit": "a"}]}, "experiments[1].fit: a second experiment"),
    ({"figures": [{"name": "f", "kind": "cases", "fits": ["img"]}]},
     "figures[0].fits[0]: fit 'img' clusters images; kind cases needs a fit with cases:"),
    ({"figures": [{"name": "f", "kind": "experiment", "fits": ["a"]}]},
     "figures[0].fits[0]: no experiment on fit 'a'"),
    ({"job": "_models"}, "job: use letters"),
])
def test_bad_experiment_specs_are_one_line_errors(extra, match):
    doc = {"job": "x", "fits": [
        {"name": "a", "k": 3, "cases": {"zero_out": 0.9}},
        {"name": "err", "k": 3, "cases": {"vector": "error", "zero_out": 0.9}},
        {"name": "img", "k": 3}], **extra}
    with pytest.raises(ConfigError) as ei:
        parse_job(doc, "j.yaml")
    assert match in str(ei.value) and "\n" not in str(ei.value)


def test_shipped_errorcases_job():
    job = load_job(Path(__file__).resolve().parents[1] / "jobs" / "errorcases.yaml")
    c3, c10 = job.fit("cases3"), job.fit("cases10")
    assert (c3.algorithm, c3.ks, c3.iterations, c3.trials, c3.cases.zero_out) == \
        ("mccaffrey", (3,), 60, 100, 0.9999)
    assert (c10.algorithm, c10.ks, c10.iterations, c10.trials, c10.cases.zero_out) == \
        ("mccaffrey", (10,), 30, 50, 0.90)
    assert {e.fit for e in job.experiments} == {"cases3", "cases10"}
    from kmdask.cli import SWEEPS, build_parser

    args = build_parser().parse_args(["sweep"])
    assert SWEEPS[args.dataset][0] == ["jobs/sweep.yaml", "jobs/errorcases.yaml"]


# --------------------------------------------------------------------------------------------
# a real cases job, end to end

JOB = {
    "job": "cases",
    "data": {"store": None, "split": "train"},
    "classifier": {"hidden": [32], "epochs": 1, "rows": 6000, "seed": 0},
    "defaults": {"seed": 0, "rows": 2000, "cases": {"vector": "probs", "power": 2}},
    "fits": [
        {"name": "mcc", "algorithm": "mccaffrey", "k": 3, "iterations": 20, "trials": 10,
         "cases": {"zero_out": 0.99}},
        {"name": "scal", "algorithm": "scalable", "k": 3, "iterations": 50, "trials": 2,
         "cases": {"vector": "error", "zero_out": 0.99}},
    ],
    "experiments": [{"fit": "mcc", "specialist": {"epochs": 1}, "bootstrap": 200}],
    "figures": [
        {"name": "ec", "kind": "cases", "fits": ["mcc", "scal"], "per_cluster": 105},
        {"name": "conf", "kind": "case_confusion", "fits": ["mcc"]},
        {"name": "exp", "kind": "experiment", "fits": ["mcc"]},
    ],
}


def _env(tmp: Path) -> dict:
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp / "xdg"), KMDASK_MIRRORS="",
               KMDASK_NO_PYPI="1")
    env.pop("KMDASK_DATA_DIR", None)
    return env


def _run(work: Path, *args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "kmdask", *args], cwd=work, env=_env(work),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return r


@pytest.fixture(scope="module")
def cases_run(tmp_path_factory, mnist_store) -> tuple[Path, Path, str]:
    work = tmp_path_factory.mktemp("cases")
    (work / "cluster.yaml").write_text(yaml.safe_dump({"default": "local", "profiles": {
        "local": {"kind": "local", "n_workers": 2, "threads_per_worker": 1,
                  "memory_limit": "2GiB"}}}))
    job = json.loads(json.dumps(JOB))
    job["data"]["store"] = str(mnist_store)
    (work / "cases.yaml").write_text(yaml.safe_dump(job))
    r = _run(work, "run", "cases.yaml")
    return work, work / r.stdout.strip(), r.stderr


def test_cases_job_writes_classifier_vectors_and_clusters(cases_run, mnist_store):
    import zarr

    from kmdask.data.store import open_images
    from kmdask.errorcases.classifier import Network

    work, run, log = cases_run
    assert "classifier: training (32,) on 6000 rows" in log
    info = json.loads((run / "classifier" / "classifier.json").read_text())
    assert info["train_rows"] == 6000 and 0.5 < info["test_accuracy"] <= 1
    net = Network.load(run / "classifier" / "weights.npz")
    assert [w.shape for w in net.weights] == [(784, 32), (32,), (32, 10), (10,)]
    root = zarr.open_group(str(run / "cases.zarr"), mode="r")
    probs = np.asarray(root["train/probs"][...])
    assert root["train/probs"].shape == (60000, 10) and root["test/probs"].shape == (10000, 10)
    assert root["train/probs"].chunks == (10000, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    m = json.loads((run / "manifest.json").read_text())
    assert m["classifier"]["test_accuracy"] == info["test_accuracy"]
    images = np.asarray(open_images(mnist_store)[:2000].compute())
    for fit, vector in (("mcc", "probs"), ("scal", "error")):
        v = np.asarray(root[f"vectors/{fit}/train"][...])
        zeroed = probs.max(axis=1) >= 0.99
        assert (v[zeroed] == 0).all() and (np.abs(v[~zeroed]).sum(axis=1) > 0).all()
        if vector == "probs":
            np.testing.assert_array_equal(v[~zeroed], probs[~zeroed] ** 2)
        res = m["fits"][fit]["results"]["3"]
        d = run / "fits" / fit / "k3"
        labels = np.load(d / "labels.npy")
        rel = res["reliable_cluster"]
        assert set(np.unique(labels[zeroed[:2000]])) == {rel}
        assert res["n_zeroed"] == int(zeroed[:2000].sum())
        if fit == "scal":
            assert rel == 0  # the scalable engine's clusters are renumbered
        members, idx = np.load(d / "members.npy"), np.load(d / "members_idx.npy")
        assert members.dtype == np.uint8 and members.shape == (3, 105, 784)
        for j in range(3):  # the members kept are MNIST images, not vectors
            ok = idx[j] >= 0
            np.testing.assert_array_equal(members[j][ok], images[idx[j][ok]])


def test_cases_job_experiment_and_report(cases_run, tmp_path):
    from kmdask.report.build import write_report

    work, run, log = cases_run
    e = json.loads((run / "experiment.json").read_text())
    for key in ("general_accuracy", "routed_accuracy", "baseline_accuracy", "general_ci",
                "routed_ci", "baseline_ci"):
        assert key in e
    assert e["experiments"]["mcc"]["routed_accuracy"] == e["routed_accuracy"]
    preds = np.load(run / "experiments" / "mcc" / "predictions.npz")
    low = preds["top"] < 0.99
    assert e["n_routed"] == int(low.sum()) and e["n_test"] == 10000
    np.testing.assert_array_equal(preds["route"] >= 0, low)
    np.testing.assert_array_equal(preds["routed"][~low], preds["general"][~low])
    assert sum(g["n"] for g in e["groups"].values()) == 10000
    assert e["routed_accuracy"] == pytest.approx(np.mean(preds["routed"] == preds["y"]))
    assert e["baseline"]["examples"] == e["extra_examples"] > 0
    out = tmp_path / "report"
    index = write_report([run], out)
    pngs = {p.name for p in (out / "cases").iterdir() if p.is_file()}
    assert pngs == {"ec_mcc.png", "ec_scal.png", "conf.png", "exp.png"}
    page = index.read_text()
    assert "Specialist experiments" in page and "General network" in page
    assert f"{100 * e['routed_accuracy']:.2f}%" in page


def test_same_classifier_is_reused_and_models_are_not_runs(cases_run, mnist_store):
    work, run, _ = cases_run
    job = json.loads(json.dumps(JOB))
    job["data"]["store"] = str(mnist_store)
    job["job"] = "cases2"
    job["fits"] = [dict(JOB["fits"][0], trials=5)]
    job["figures"] = []
    (work / "cases2.yaml").write_text(yaml.safe_dump(job))
    r = _run(work, "run", "cases2.yaml")
    assert "classifier: reusing" in r.stderr and "classifier: training" not in r.stderr
    run2 = work / r.stdout.strip()
    for name in ("weights.npz", "classifier.json"):
        assert (run2 / "classifier" / name).read_bytes() == \
            (run / "classifier" / name).read_bytes()
    listing = json.loads(_run(work, "runs", "--json").stdout)
    assert {row["job"] for row in listing} == {"cases", "cases2"}


def test_classifier_is_deterministic(mnist_store):
    from kmdask.data.store import open_images, open_labels
    from kmdask.errorcases.classifier import train
    from kmdask.errorcases.spec import ClassifierSpec

    x = np.asarray(open_images(mnist_store)[:1500].compute())
    y = np.asarray(open_labels(mnist_store)[:1500].compute())
    spec = ClassifierSpec(hidden=(24,), epochs=2, seed=7)
    a, _ = train(x, y, spec)
    b, _ = train(x, y, spec)
    c, _ = train(x, y, ClassifierSpec(hidden=(24,), epochs=2, seed=8))
    assert all(u.tobytes() == v.tobytes() for u, v in zip(a.weights, b.weights, strict=True))
    assert a.weights[0].tobytes() != c.weights[0].tobytes()
