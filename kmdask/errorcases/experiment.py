"""The specialist-routing experiment: do per-error-cluster specialists beat the general network?

For a fit that clusters the training cases' probability vectors (``experiments:`` of a job):

1. Every non-reliable cluster j gets a **specialist**: the general network fine-tuned (restarted
   cosine schedule, same shift augmentation) on the cluster's *neighbourhood* = every training
   image of the cluster's classes (a class counts when at least ``class_share`` of the
   cluster's cases carry it as true label or among the network's top two), the cluster's own
   cases repeated ``member_weight`` more times, and a random ``others`` share of the remaining
   training images, so that the specialist can still answer any class. Its logits are
   corrected for the neighbourhood's class frequencies (label shift) before the argmax.
2. **Routing**: a test image whose top probability is below the fit's ``zero_out`` goes to the
   specialist of the nearest non-reliable cluster centre (its probability vector, raised to the
   fit's power, against the centres); every other test image keeps the general answer.
   Variant (b'), also reported: the reliable centre competes too, and a case nearest to it
   keeps the general answer (the clustering itself would put it in the reliable cluster).
   Design ``mixture`` (when the experiment lists it in ``designs:``): a routed case gets the
   average of every specialist's (label-shift corrected) class probabilities, weighted by the
   inverse squared distance of its case vector to each specialist's centre, so a case between
   two error clusters is answered by both.
   Design ``gated`` (needs ``classifier.validation``): nearest-centre routing, but a cluster's
   specialist answers only if it beat the general network on the validation cases routed to
   that cluster; otherwise those cases keep the general answer.
3. **Baseline** with the same extra budget: the general network fine-tuned the same way on the
   whole training set for as many examples as all specialists together saw.

Accuracies of (a) general, (b) routed, (c) baseline with percentile bootstrap intervals over the
test cases (paired resamples, so differences get intervals too) and exact McNemar tests of
(a) vs (b) and (c) vs (b). Written to ``experiments/<fit>/experiment.json`` (+ the predictions
in ``predictions.npz``), and the first experiment's numbers to ``experiment.json``.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path

import numpy as np

from kmdask.batch import rundir
from kmdask.batch.spec import JobSpec
from kmdask.errorcases.classifier import train
from kmdask.errorcases.spec import ClassifierSpec, ExperimentSpec
from kmdask.errorcases.vectors import CaseData, transform
from kmdask.report.build import processes

log = logging.getLogger(__name__)


def route(probs: np.ndarray, centres: np.ndarray, reliable: int | None, threshold: float,
          power: int, *, include_reliable: bool = False) -> np.ndarray:
    """Cluster index of each case sent to a specialist, -1 for those the general net keeps.

    A case is routed when its top probability is < ``threshold``; it goes to the nearest
    (Euclidean, ties to the lowest index) centre other than the reliable one. With
    ``include_reliable`` the reliable centre competes too (the clustering's own assignment);
    a case nearest to it has no specialist and keeps the general answer (-1)."""
    low = np.asarray(probs).max(axis=1) < threshold
    cands = np.array([j for j in range(centres.shape[0])
                      if include_reliable or j != reliable], dtype=np.int64)
    out = np.full(probs.shape[0], -1, dtype=np.int64)
    if cands.size == 0 or not low.any():
        return out
    v = transform(probs[low], None, "probs", power)
    d = ((v[:, None, :] - centres[cands][None, :, :]) ** 2).sum(axis=2)
    out[low] = cands[np.argmin(d, axis=1)]
    if include_reliable and reliable is not None:
        out[out == reliable] = -1
    return out


def mixture_weights(probs: np.ndarray, centres: np.ndarray, reliable: int | None,
                    power: int) -> tuple[np.ndarray, np.ndarray]:
    """``(clusters, weights)`` of the mixture design: for each case, a weight per non-reliable
    centre (columns in ``clusters`` order) proportional to 1 / squared distance of its case
    vector to it, rows summing to 1; a case on a centre gets that centre's weight 1."""
    cands = np.array([j for j in range(centres.shape[0]) if j != reliable], dtype=np.int64)
    v = transform(probs, None, "probs", power)
    d = ((v[:, None, :] - centres[cands][None, :, :]) ** 2).sum(axis=2)
    on = d <= 1e-24
    w = np.where(on.any(axis=1, keepdims=True), on.astype(np.float64),
                 1.0 / np.maximum(d, 1e-24))
    return cands, w / w.sum(axis=1, keepdims=True)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def class_set(true: np.ndarray, probs: np.ndarray, share: float) -> list[int]:
    """The classes a cluster confuses: those carried by >= ``share`` of its cases as true
    label or among the network's two top classes (and never fewer than the two most
    frequent of those)."""
    n = max(true.shape[0], 1)
    t = np.bincount(true, minlength=10) / n
    top2 = np.argsort(-probs, axis=1, kind="stable")[:, :2]
    p = np.bincount(top2.ravel(), minlength=10) / n
    keep = set(np.flatnonzero((t >= share) | (p >= share)).tolist())
    if true.size:
        keep.update(int(c) for c in np.argsort(-p, kind="stable")[:2])
        keep.add(int(np.argmax(t)))
    return sorted(keep)


def bootstrap_ci(correct: dict[str, np.ndarray], n_boot: int, seed: int, level: float = 0.95,
                 pairs: tuple[tuple[str, str], ...] = ()) -> dict[str, list[float]]:
    """Percentile intervals of the accuracies (and of paired differences ``a-b``), all from the
    same resamples of the test cases."""
    rng = np.random.default_rng(seed)
    names = list(correct)
    n = len(next(iter(correct.values())))
    stack = np.stack([correct[k].astype(np.float64) for k in names])
    stats = np.empty((len(names), n_boot))
    for s in range(0, n_boot, 100):  # resamples in blocks: bounded memory
        b = min(100, n_boot - s)
        idx = rng.integers(0, n, size=(b, n))
        stats[:, s:s + b] = stack[:, idx].mean(axis=2)
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    out = {k: [float(np.percentile(stats[i], lo)), float(np.percentile(stats[i], hi))]
           for i, k in enumerate(names)}
    for a, b in pairs:
        d = stats[names.index(a)] - stats[names.index(b)]
        out[f"{a}-{b}"] = [float(np.percentile(d, lo)), float(np.percentile(d, hi))]
    return out


def mcnemar(correct_a: np.ndarray, correct_b: np.ndarray) -> dict:
    """Exact two-sided McNemar test: a right & b wrong vs a wrong & b right."""
    n01 = int(np.sum(correct_a & ~correct_b))
    n10 = int(np.sum(~correct_a & correct_b))
    n = n01 + n10
    if n == 0:
        return {"a_only": 0, "b_only": 0, "p_value": 1.0}
    tail = sum(math.comb(n, i) for i in range(min(n01, n10) + 1))
    p = min(1.0, 2 * tail / 2**n)
    return {"a_only": n01, "b_only": n10, "p_value": float(p)}


def evaluate(y: np.ndarray, general: np.ndarray, routed: np.ndarray, baseline: np.ndarray,
             routes: np.ndarray, n_boot: int = 2000, seed: int = 0,
             nearest: np.ndarray | None = None,
             designs: dict[str, np.ndarray] | None = None) -> dict:
    """Accuracies, intervals, tests and the per-group table; every test case counted once
    (group = the cluster it was routed to, or ``general`` for the cases kept). ``nearest``:
    the answers of the variant that keeps cases nearest the reliable centre general;
    ``designs``: the answers of further routing designs, by name (``routed_<name>_...`` keys,
    from the same resamples)."""
    ca, cb, cc = general == y, routed == y, baseline == y
    groups = sorted(set(routes.tolist()))
    per_group = {}
    for g in groups:
        m = routes == g
        per_group["general" if g < 0 else str(g)] = {
            "n": int(m.sum()), "general": float(ca[m].mean()), "routed": float(cb[m].mean()),
            "baseline": float(cc[m].mean())}
    counted = sum(v["n"] for v in per_group.values())
    if counted != y.shape[0]:
        raise AssertionError(f"accounting: {counted} cases in groups, {y.shape[0]} tested")
    correct = {"general": ca, "routed": cb, "baseline": cc}
    extra: dict = {}
    if nearest is not None:
        correct["routed_nearest"] = nearest == y
        extra = {"routed_nearest_accuracy": float(correct["routed_nearest"].mean()),
                 "mcnemar_general_vs_routed_nearest": mcnemar(ca, correct["routed_nearest"])}
    for name, answers in (designs or {}).items():
        key = f"routed_{name}"
        correct[key] = answers == y
        extra.update({f"{key}_accuracy": float(correct[key].mean()),
                      f"mcnemar_general_vs_{key}": mcnemar(ca, correct[key]),
                      f"mcnemar_baseline_vs_{key}": mcnemar(cc, correct[key])})
    pairs = [("routed", "general"), ("routed", "baseline")]
    pairs += [(f"routed_{n}", "general") for n in designs or {}]
    pairs += [(f"routed_{n}", "baseline") for n in designs or {}]
    ci = bootstrap_ci(correct, n_boot, seed, pairs=tuple(pairs))
    if nearest is not None:
        extra["routed_nearest_ci"] = ci["routed_nearest"]
    for name in designs or {}:
        key = f"routed_{name}"
        extra.update({f"{key}_ci": ci[key],
                      f"{key}_minus_general_ci": ci[f"{key}-general"],
                      f"{key}_minus_baseline_ci": ci[f"{key}-baseline"]})
    return {
        **extra,
        "n_test": int(y.shape[0]), "n_routed": int((routes >= 0).sum()),
        "general_accuracy": float(ca.mean()), "routed_accuracy": float(cb.mean()),
        "baseline_accuracy": float(cc.mean()),
        "general_ci": ci["general"], "routed_ci": ci["routed"], "baseline_ci": ci["baseline"],
        "routed_minus_general_ci": ci["routed-general"],
        "routed_minus_baseline_ci": ci["routed-baseline"],
        "mcnemar_general_vs_routed": mcnemar(ca, cb),
        "mcnemar_baseline_vs_routed": mcnemar(cc, cb),
        "groups": per_group, "bootstrap": {"resamples": n_boot, "level": 0.95, "seed": seed},
    }


def _gate(net, shift: np.ndarray, x: np.ndarray, y: np.ndarray, probs: np.ndarray,
          mask: np.ndarray) -> dict:
    """Design ``gated``: does the specialist beat the general network on the validation cases
    routed to its cluster (``mask``)? With none routed there, it is not used."""
    n = int(mask.sum())
    general = float(np.mean(np.argmax(probs[mask], axis=1) == y[mask])) if n else 1.0
    special = (float(np.mean(np.argmax(net.logits(x[mask]) + shift, axis=1) == y[mask]))
               if n else 0.0)
    return {"validation_routed": n, "validation_general": general,
            "validation_specialist": special, "used": special > general}


def _fit_result(run: Path, fit: str, k: int) -> tuple[dict, np.ndarray, np.ndarray]:
    d = rundir.fit_dir(run, fit, k)
    res = json.loads((d / "result.json").read_text())
    return res, np.load(d / "centers.npy"), np.load(d / "labels.npy")


#: what the forked training processes read (set before the fork, so nothing is pickled)
_SHARED: tuple = ()


def _train_one(task: tuple) -> tuple:
    """One training of :func:`train_many`, in this process (one BLAS thread in a pool's)."""
    x, y, clf, init, lr = _SHARED
    idx, examples, seed = task
    xs, ys = (x, y) if idx is None else (x[idx], y[idx])
    return train(xs, ys, clf, init=init, examples=examples, learning_rate=lr, seed=seed)


def _one_thread() -> None:
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)  # stays set in this process: one core a training


def train_many(x: np.ndarray, y: np.ndarray, clf: ClassifierSpec, init, lr: float,
               tasks: list[tuple]) -> list[tuple]:
    """Fine-tune ``init`` once per task ``(rows or None for all, examples, seed)``; the
    (network, history) of each, in task order.

    The trainings are independent and small-matrix GEMMs scale poorly over BLAS threads (on 2
    cores two one-thread trainings at once do 1.5x the work of one two-thread training), so a
    pool of forked processes with one BLAS thread each runs them, biggest first.
    ``KMDASK_EXPERIMENT_PROCESSES`` sets their number (default one per core; 1: here, in turn,
    with the BLAS threads of this process). Each result depends on its task only.
    """
    global _SHARED
    n = min(processes("KMDASK_EXPERIMENT_PROCESSES"), len(tasks))
    _SHARED = (x, y, clf, init, lr)
    try:
        if n <= 1:
            return [_train_one(t) for t in tasks]
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        order = sorted(range(len(tasks)), key=lambda i: -tasks[i][1])
        with ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("fork"),
                                 initializer=_one_thread) as pool:
            futs = {i: pool.submit(_train_one, tasks[i]) for i in order}
            return [futs[i].result() for i in range(len(tasks))]
    finally:
        _SHARED = ()


def run_experiment(run: Path, job: JobSpec, exp: ExperimentSpec, cases: CaseData) -> dict:
    """Train the specialists and the baseline, route, evaluate; returns experiment.json."""
    t0 = time.perf_counter()
    fit = job.fit(exp.fit)
    res, centres, labels = _fit_result(run, exp.fit, exp.k)
    reliable = res.get("reliable_cluster")
    clf = job.classifier or ClassifierSpec()
    sp = exp.specialist
    n_train = cases.train_rows  # validation rows, if any, stay out of every training
    threshold = cases.thresholds[exp.fit]
    x_tr, y_tr = cases.images["train"][:n_train], cases.labels["train"][:n_train]
    p_tr = cases.probs["train"][:n_train]
    rng = np.random.default_rng(exp.seed)
    p_te, y_te, x_te = cases.probs["test"], cases.labels["test"], cases.images["test"]
    val = slice(n_train, cases.info.get("validation_rows", [0, n_train])[1])
    x_va, y_va, p_va = (cases.images["train"][val], cases.labels["train"][val],
                        cases.probs["train"][val])
    routes_va = route(p_va, centres, reliable, threshold, fit.cases.power)
    general = np.argmax(p_te, axis=1)
    gated = general.copy()
    routes = route(p_te, centres, reliable, threshold, fit.cases.power)
    routes_nearest = route(p_te, centres, reliable, threshold, fit.cases.power,
                           include_reliable=True)
    routed, nearest = general.copy(), general.copy()
    low = p_te.max(axis=1) < threshold
    mix_clusters, mix_w = mixture_weights(p_te[low], centres, reliable, fit.cases.power)
    mix = np.zeros((int(low.sum()), p_te.shape[1]))  # the mixture design's probabilities
    prior = np.log(np.bincount(y_tr, minlength=10) + 1.0)
    # The neighbourhoods first (the random draws in cluster order, as before), then every
    # training at once: the baseline's budget is known from them without training them.
    plans = []
    for j in range(exp.k):
        if j == reliable:
            continue
        members = np.flatnonzero(labels == j)
        if members.size == 0:  # cannot happen for a finished fit; keep the general answer
            continue
        classes = class_set(y_tr[members], p_tr[members], sp.class_share)
        inside = np.isin(y_tr, classes)
        rest = np.flatnonzero(~inside)
        idx = np.concatenate([np.flatnonzero(inside), np.repeat(members, sp.member_weight),
                              rest[rng.random(rest.size) < sp.others]])
        plans.append((j, members, classes, idx))
    budget = sum(max(1, sp.epochs * idx.shape[0]) for *_, idx in plans)
    trained = train_many(x_tr, y_tr, clf, cases.network, sp.learning_rate,
                         [(None, max(budget, 1), exp.seed)] +
                         [(idx, sp.epochs * idx.shape[0], exp.seed + 1 + j)
                          for j, _, _, idx in plans])
    (base_net, base_hist), trained = trained[0], trained[1:]
    clusters = []
    for (j, members, classes, idx), (net, hist) in zip(plans, trained, strict=True):
        # label-shift correction: the neighbourhood over-represents the cluster's classes, so
        # its class frequencies are traded back for the training set's before the argmax
        shift = prior - np.log(np.bincount(y_tr[idx], minlength=10) + 1.0)
        # every case a design routes is a low-confidence one: one forward pass serves them all
        z = net.logits(x_te[low]) + shift
        m, mn = routes == j, routes_nearest == j
        routed[m] = np.argmax(z[m[low]], axis=1)
        nearest[mn] = np.argmax(z[mn[low]], axis=1)
        gate = None
        if "gated" in exp.designs:  # the specialist answers only where it won on validation
            gate = _gate(net, shift, x_va, y_va, p_va, routes_va == j)
            if gate["used"]:
                gated[m] = routed[m]
        if "mixture" in exp.designs:
            col = int(np.flatnonzero(mix_clusters == j)[0])
            mix += mix_w[:, col:col + 1] * _softmax(z)
        clusters.append({"cluster": j, "train_cases": int(members.size), "classes": classes,
                         "neighbourhood": int(idx.shape[0]), "examples": hist["examples"],
                         "seconds": hist["seconds"], "test_routed": int(m.sum()),
                         **({"gate": gate} if gate else {})})
        log.info(f"  experiment {exp.fit}: specialist {j} on classes {classes}: "
                 f"{members.size} cases, neighbourhood {idx.shape[0]}, {m.sum()} test cases "
                 f"routed ({hist['seconds']:.1f} s)")
    baseline = np.argmax(base_net.logits(x_te), axis=1)
    designs = {}
    if "mixture" in exp.designs:
        designs["mixture"] = general.copy()
        designs["mixture"][low] = np.argmax(mix, axis=1)
    if "gated" in exp.designs:
        designs["gated"] = gated
    out = evaluate(y_te, general, routed, baseline, routes, exp.bootstrap, exp.seed,
                   nearest=nearest, designs=designs)
    out["designs"] = list(exp.designs)
    out["n_low_confidence"] = int(low.sum())
    out["n_routed_nearest"] = int((routes_nearest >= 0).sum())
    out.update({
        "fit": exp.fit, "k": exp.k, "algorithm": fit.algorithm, "threshold": threshold,
        "threshold_rule": (None if fit.cases.validation_error is None else
                           {"validation_error": fit.cases.validation_error,
                            "validation_rows": [cases.train_rows,
                                                cases.info.get("validation_rows", [0, 0])[1]]}),
        "power": fit.cases.power, "reliable_cluster": reliable, "specialists": clusters,
        "specialist_settings": vars(sp).copy(),
        "baseline": {"kind": "general network trained longer (same examples as all "
                             "specialists together)", "examples": base_hist["examples"],
                     "seconds": base_hist["seconds"]},
        "extra_examples": budget, "seconds": time.perf_counter() - t0,
    })
    d = run / "experiments" / exp.fit
    d.mkdir(parents=True, exist_ok=True)
    np.savez(d / "predictions.npz", y=y_te, general=general, routed=routed, baseline=baseline,
             route=routes, top=p_te.max(axis=1), routed_nearest=nearest,
             route_nearest=routes_nearest, **{f"routed_{n}": a for n, a in designs.items()})
    rundir.write_json(d / "experiment.json", out)
    rundir.seal(d)  # a resume reuses the experiment only while its files match
    log.info("  experiment %s: general %.2f%%, routed %.2f%%, baseline %.2f%% (%d routed; "
             "McNemar p %.3g / %.3g)", exp.fit, 100 * out["general_accuracy"],
             100 * out["routed_accuracy"], 100 * out["baseline_accuracy"], out["n_routed"],
             out["mcnemar_general_vs_routed"]["p_value"],
             out["mcnemar_baseline_vs_routed"]["p_value"])
    return out


SUMMARY_KEYS = ("general_accuracy", "routed_accuracy", "baseline_accuracy", "general_ci",
                "routed_ci", "baseline_ci", "routed_minus_general_ci",
                "routed_minus_baseline_ci", "n_test", "n_routed", "k", "threshold",
                "routed_nearest_accuracy", "routed_nearest_ci", "n_routed_nearest",
                "routed_mixture_accuracy", "routed_mixture_ci",
                "routed_mixture_minus_general_ci", "routed_mixture_minus_baseline_ci",
                "routed_gated_accuracy", "routed_gated_ci",
                "routed_gated_minus_general_ci", "routed_gated_minus_baseline_ci",
                "threshold_rule")


def run_experiments(run: Path, job: JobSpec, cases: CaseData) -> dict:
    """Every experiment of the job (finished ones of an interrupted run are kept); writes
    ``experiment.json`` = the first experiment's numbers + all of them under ``experiments``."""
    done: dict[str, dict] = {}
    for exp in job.experiments:
        d = run / "experiments" / exp.fit
        problems = rundir.damaged(d, ("experiment.json",)) if d.is_dir() else None
        if problems == []:
            log.info(f"  experiment {exp.fit}: already done in this partial run")
            done[exp.fit] = json.loads((d / "experiment.json").read_text())
            continue
        if problems:
            log.warning("%s: experiment %s is run again", rundir.describe_damage(
                problems), exp.fit)
            shutil.rmtree(d)
        done[exp.fit] = run_experiment(run, job, exp, cases)
    first = done[job.experiments[0].fit]
    rundir.write_json(run / "experiment.json",
                      {**first, "headline_fit": job.experiments[0].fit, "experiments": done})
    return {f: {k: e[k] for k in SUMMARY_KEYS if k in e} | {
        "p_general_vs_routed": e["mcnemar_general_vs_routed"]["p_value"],
        "p_baseline_vs_routed": e["mcnemar_baseline_vs_routed"]["p_value"]}
        for f, e in done.items()}
