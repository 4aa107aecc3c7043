"""Fashion-MNIST through the suite: garment names in the figures, thresholds chosen on held-out
validation rows, the mixture routing design, and `kmdask sweep --dataset fashion-mnist` end to
end on small versions of the shipped jobs (real Fashion-MNIST bytes from Debian's package)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import run_kmdask, unavailable

from kmdask.batch.spec import load_job, parse_job
from kmdask.errorcases.experiment import mixture_weights, route
from kmdask.errorcases.vectors import choose_threshold
from kmdask.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist")


# --------------------------------------------------------------------------------------------
# thresholds chosen on validation rows, and the mixture design, on hand-made cases


def _probs(tops: list[float], answers: list[int]) -> np.ndarray:
    p = np.full((len(tops), 10), 0.0)
    for i, (t, a) in enumerate(zip(tops, answers, strict=True)):
        p[i] = (1 - t) / 9
        p[i, a] = t
    return p


def test_threshold_is_the_lowest_with_few_enough_errors_above_it():
    # by top probability: .99 right, .95 right, .9 wrong, .8 right, .7 wrong, .6 wrong
    p = _probs([0.9, 0.99, 0.6, 0.95, 0.8, 0.7], [1, 2, 3, 4, 5, 6])
    y = np.array([0, 2, 0, 4, 5, 0])  # the .9, .6 and .7 answers are wrong
    assert choose_threshold(p, y, 0.0) == 0.95  # no error: only the two top cases
    assert choose_threshold(p, y, 0.2) == 0.95  # 1 error in 3 (or 4) is too many
    assert choose_threshold(p, y, 0.25) == 0.8  # 1 in 4: the longest prefix, not the first
    assert choose_threshold(p, y, 0.5) == 0.6  # 3 errors in 6
    assert choose_threshold(_probs([0.9], [1]), np.array([0]), 0.0) == 1.0  # none reliable


def test_mixture_weights_follow_inverse_squared_distance():
    centres = np.zeros((3, 10))
    centres[1, 0], centres[2, 1] = 1.0, 1.0  # centre 0 is the reliable one (zero vector)
    p = np.zeros((3, 10))
    p[0, 0] = 1.0  # on centre 1
    p[1, :2] = np.sqrt(0.5)  # power 2: vector (0.5, 0.5): equally far from centres 1 and 2
    p[2, 0], p[2, 1] = np.sqrt(0.75), np.sqrt(0.25)  # (0.75, 0.25): d2 = 0.125 vs 1.125
    cands, w = mixture_weights(p, centres, reliable=0, power=2)
    assert cands.tolist() == [1, 2]  # the reliable cluster has no specialist
    np.testing.assert_allclose(w[0], [1.0, 0.0])
    np.testing.assert_allclose(w[1], [0.5, 0.5])
    np.testing.assert_allclose(w[2], [0.9, 0.1])  # 1/0.125 : 1/1.125 = 9 : 1
    np.testing.assert_allclose(w.sum(axis=1), 1.0)


@pytest.mark.parametrize("change,match", [
    ({"classifier": {"validation": 0}}, r"classifier\.validation: fit 'cases3' chooses zero_out"),
    ({"fit": {"cases": {"zero_out": {"validation_eror": 0.1}}}},
     r"zero_out\.validation_eror: unknown key \(allowed: validation_error\)"),
    ({"fit": {"cases": {"zero_out": {"validation_error": 2}}}}, r"validation_error"),
    ({"experiment": {"designs": ["nearest-pair"]}}, r"designs\[0\]: expected one of mixture"),
    ({"classifier": {"validation": 0}, "fits": {"cases": {"zero_out": 0.9}},
      "experiment": {"designs": ["gated"]}}, r"designs: design gated decides on validation"),
])
def test_bad_fashion_specs_are_one_line_errors(change, match):
    raw = yaml.safe_load((REPO / "jobs" / "errorcases-fashion.yaml").read_text())
    if "classifier" in change:
        raw["classifier"].update(change["classifier"])
    if "fit" in change:
        raw["fits"][0].update(change["fit"])
    for f in raw["fits"] if "fits" in change else []:
        f.update(change["fits"])
    if "experiment" in change:
        raw["experiments"][0].update(change["experiment"])
    with pytest.raises(ConfigError, match=match) as e:
        parse_job(raw, "job.yaml")
    assert "\n" not in str(e.value)


def test_shipped_fashion_jobs_and_sweep_command():
    from kmdask.cli import SWEEPS, build_parser

    job = load_job(REPO / "jobs" / "errorcases-fashion.yaml")
    assert job.dataset == "fashion-mnist" and job.classifier.validation == 5000
    assert job.classifier.split_rows(60000) == (55000, 60000)
    assert {f.name: f.cases.validation_error for f in job.fits} == \
        {"cases3": 0.005, "cases10": 0.02, "scalable3": 0.005}
    assert all(e.designs == ("mixture", "gated") for e in job.experiments)
    suite = load_job(REPO / "jobs" / "fashion.yaml")
    assert suite.dataset == "fashion-mnist"
    assert (suite.fit("main").ks, suite.fit("main").iterations, suite.fit("main").trials) == \
        ((10,), 20, 20)
    args = build_parser().parse_args(["sweep", "--dataset", "fashion-mnist"])
    assert SWEEPS[args.dataset] == (["jobs/fashion.yaml", "jobs/errorcases-fashion.yaml"],
                                    Path("report") / "fashion-mnist")


# --------------------------------------------------------------------------------------------
# kmdask sweep --dataset fashion-mnist, on small versions of the two jobs


# the choosing_k figure's criteria, cheaper (tests/test_criteria.py checks them in full)
SMALL_CRITERIA = {"silhouette_sample": 1000, "gap_references": 2, "gap_rows": 500}


def _small_jobs(jobs: Path) -> None:
    jobs.mkdir()
    suite = yaml.safe_load((REPO / "jobs" / "fashion.yaml").read_text())
    suite["fits"] = [
        {"name": "main", "rows": 2000, "k": 10, "iterations": 5, "trials": 2},
        {"name": "series", "rows": 2000, "k": {"from": 2, "to": 4}, "iterations": 5,
         "trials": 2, "criteria": SMALL_CRITERIA},
        {"name": "scalable", "algorithm": "scalable", "rows": 2000, "k": {"from": 2, "to": 4},
         "iterations": 20, "trials": 1, "criteria": SMALL_CRITERIA}]
    (jobs / "fashion.yaml").write_text(yaml.safe_dump(suite))
    ec = yaml.safe_load((REPO / "jobs" / "errorcases-fashion.yaml").read_text())
    ec["classifier"].update(hidden=[32], epochs=1, rows=6000, validation=1000)
    ec["defaults"]["rows"] = 3000
    ec["fits"] = [dict(ec["fits"][0], iterations=20, trials=5,
                       cases={"zero_out": {"validation_error": 0.05}})]
    ec["experiments"] = [dict(ec["experiments"][0], bootstrap=200,
                              specialist={"epochs": 1})]
    ec["figures"] = [f for f in ec["figures"] if f["fits"] == ["cases3"]]
    (jobs / "errorcases-fashion.yaml").write_text(yaml.safe_dump(ec))


@pytest.fixture(scope="module")
def fashion_sweep(tmp_path_factory) -> Path:
    if not (FASHION / "train-images-idx3-ubyte.gz").exists():
        unavailable(f"{FASHION} absent (apt-get install dataset-fashion-mnist; .ci/run "
                    "installs it)")
    work = tmp_path_factory.mktemp("fashion")
    (work / "cluster.yaml").write_text(yaml.safe_dump({"default": "local", "profiles": {
        "local": {"kind": "local", "n_workers": 2, "threads_per_worker": 1,
                  "memory_limit": "2GiB"}}}))
    _small_jobs(work / "jobs")
    r = run_kmdask("sweep", "--dataset", "fashion-mnist", cwd=work)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("report/fashion-mnist/index.html")
    return work


def _run(work: Path, job: str) -> Path:
    return (work / "runs" / job / "latest").resolve()


def test_fashion_sweep_names_garments(fashion_sweep):
    from kmdask.batch.rundir import open_run

    run = open_run(_run(fashion_sweep, "fashion"))
    assert run.manifest["data"]["dataset"] == "fashion-mnist"
    assert [run.class_name(c) for c in (0, 4, 9)] == ["T-shirt/top", "Coat", "Ankle boot"]
    page = (fashion_sweep / "report" / "fashion-mnist" / "index.html").read_text()
    assert "each column a true class" in page and "true digit" not in page
    figs = fashion_sweep / "report" / "fashion-mnist" / "fashion"
    assert {"main.png", "composition.png", "K2.png", "K4.png"} <= {p.name for p in
                                                                  figs.iterdir()}
    # the clusters figure's "mostly ..." line names the garment of its majority class
    from kmdask.report.clusters import _panel

    fig = next(f for f in load_job(fashion_sweep / "jobs" / "fashion.yaml").figures
               if f.name == "main")
    panel = _panel(run, fig, "main", 10)
    names = {run.class_name(c) for c, _ in panel.majority}
    assert names <= set(run.manifest["data"]["class_names"]) and len(names) >= 3


def test_fashion_error_cases_choose_on_validation_and_compare_designs(fashion_sweep):
    import zarr

    from kmdask.data.store import open_labels
    from kmdask.errorcases.figures import _top_classes

    run = _run(fashion_sweep, "errorcases-fashion")
    clf = json.loads((run / "classifier" / "classifier.json").read_text())
    assert clf["train_rows"] == 5000 and clf["validation_rows"] == [5000, 6000]
    assert 0.3 < clf["validation_accuracy"] <= 1
    # the threshold is the rule applied to the validation rows' probabilities, nothing else
    probs = np.asarray(zarr.open_group(str(run / "cases.zarr"), mode="r")["train/probs"][...])
    labels = np.asarray(open_labels(fashion_sweep / "data" / "fashion-mnist.zarr",
                                    "train").compute())
    want = choose_threshold(probs[5000:6000], labels[5000:6000], 0.05)
    e = json.loads((run / "experiments" / "cases3" / "experiment.json").read_text())
    assert e["threshold"] == want and 0 < want < 1
    assert e["threshold_rule"] == {"validation_error": 0.05, "validation_rows": [5000, 6000]}
    res = json.loads((run / "fits" / "cases3" / "k3" / "result.json").read_text())
    assert res["zero_out"] == want
    assert res["n_zeroed"] == int((probs[:3000].max(axis=1) >= want).sum())
    # every design answered the same test cases; the kept ones keep the general answer
    p = np.load(run / "experiments" / "cases3" / "predictions.npz")
    low = p["top"] < want
    assert e["n_routed"] == int(low.sum()) > 0 and e["designs"] == ["mixture", "gated"]
    for key in ("routed", "routed_mixture", "routed_gated"):
        np.testing.assert_array_equal(p[key][~low], p["general"][~low])
    # gated: a cluster's routed cases take the specialist's answer exactly where its gate,
    # decided on the validation rows, let it (recomputed here from the validation answers)
    val_routes = route(probs[5000:6000], np.load(run / "fits" / "cases3" / "k3" /
                                                 "centers.npy"),
                       res["reliable_cluster"], want, 2)
    for s in e["specialists"]:
        m, gate = p["route"] == s["cluster"], s["gate"]
        assert gate["validation_routed"] == int((val_routes == s["cluster"]).sum())
        mv = val_routes == s["cluster"]
        if mv.any():
            assert gate["validation_general"] == pytest.approx(np.mean(
                probs[5000:6000][mv].argmax(axis=1) == labels[5000:6000][mv]))
        assert gate["used"] == (gate["validation_specialist"] > gate["validation_general"])
        want_answers = p["routed"][m] if gate["used"] else p["general"][m]
        np.testing.assert_array_equal(p["routed_gated"][m], want_answers)
    assert e["routed_mixture_accuracy"] == pytest.approx(np.mean(p["routed_mixture"] == p["y"]))
    lo, hi = e["routed_mixture_ci"]
    assert lo <= e["routed_mixture_accuracy"] <= hi
    page = (fashion_sweep / "report" / "fashion-mnist" / "index.html").read_text()
    assert "(d) mixture by distance" in page and "chosen on validation" in page
    assert "(e) gated on validation" in page
    assert "4 Coat" in page  # the cases figure's caption names the bars' classes
    from kmdask.batch.rundir import open_run

    mean = np.zeros(10)
    mean[[4, 6]] = [0.5, 0.3]
    assert _top_classes(mean, open_run(run)) == "mostly Coat / Shirt"
