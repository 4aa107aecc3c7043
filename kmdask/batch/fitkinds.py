"""Fit kinds: the algorithms a job's fits name (``algorithm:``), in a registry.

The runner reaches every algorithm through :data:`FIT_KINDS` alone: a kind checks its part of a
fit's spec, fits rows into one :class:`ModelRecord` per K, and says whether it keeps
per-iteration checkpoints that an interrupted run resumes from. Adding an algorithm is adding
an entry here; nothing else in :mod:`kmdask.batch` changes.

The algorithms themselves are imported only when a fit runs, so that reading job specs never
imports dask.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from kmdask.batch.checks import Checker
from kmdask.errors import ConfigError

log = logging.getLogger(__name__)

#: the scalable engine's settings: fits of other kinds may not set them
ENGINE_OPTIONS = ("init", "tol", "oversampling_factor", "init_rounds", "persist")


@dataclass
class ModelRecord:
    """One fitted model (the best trial of one K) as the runner writes it."""

    k: int
    labels: np.ndarray  # (rows,) cluster of every row
    centres: np.ndarray  # (k, d) float64
    result: dict = field(default_factory=dict)  # JSON-ready: inertia, n_iter, histories, ...


@dataclass
class FitContext:
    """What a fit gets from the runner besides its rows and spec."""

    checkpoint: Any = None  # a Checkpoint (load/save of model states) for kinds that resume
    progress: Callable[[dict], None] | None = None  # one call per Lloyd iteration
    divisor: float = 255.0  # uint8 rows are divided by it (float rows are used as they are)
    # log W* of the gap statistic's reference sets where the fit fitted them in its own passes
    fitted_references: np.ndarray | None = None


class FitKind(Protocol):
    """An algorithm a job can name."""

    name: str
    resumes: bool  # keeps per-iteration checkpoints; an interrupted run resumes from them
    ordered: bool  # its cluster numbers mean something, so nothing may renumber them

    def check(self, c: Checker, raw: dict, key: str) -> None:
        """Refuse what this kind cannot do with the keys the fit sets (``raw``)."""

    def fit(self, X: Any, spec: Any, ctx: FitContext) -> list[ModelRecord]:
        """Fit every K of ``spec`` on the rows ``X`` (a dask array)."""


class Scalable:
    """kmdask's engine: k-means|| (or k-means++) seeding and fused Lloyd passes, every K and
    trial of the fit in the same passes over the data."""

    name = "scalable"
    resumes = True
    ordered = False

    def check(self, c: Checker, raw: dict, key: str) -> None:
        pass  # every key of a fit applies

    def fit(self, X: Any, spec: Any, ctx: FitContext) -> list[ModelRecord]:
        from kmdask.engine import criteria
        from kmdask.engine.estimator import fit_models

        refs, inits, c = [], [], spec.criteria
        if c is not None and c.gap_references > 0 and len(spec.ks) > 1:
            # the gap statistic's reference sets ride along in this fit's passes
            refs, inits = criteria.gap_references(
                X, spec.ks, silhouette_sample=c.silhouette_sample,
                gap_references=c.gap_references, gap_rows=c.gap_rows, seed=spec.seed,
                divisor=ctx.divisor)
        res = fit_models(X, spec.ks, n_init=spec.trials, init=spec.init,
                         max_iter=spec.iterations, tol=spec.tol, random_state=spec.seed,
                         oversampling_factor=spec.oversampling_factor,
                         init_rounds=spec.init_rounds, persist=spec.persist,
                         progress=ctx.progress, checkpoint=ctx.checkpoint,
                         divisor=ctx.divisor if X.dtype == np.uint8 else None,
                         also=list(zip(refs, inits, strict=True)))
        if refs:
            ctx.fitted_references = criteria.reference_log_w_of(
                refs, sorted(spec.ks), res.also, ctx.divisor)
        out = []
        for k in spec.ks:
            trial, best = res.best(k)
            trials = [r for (kk, _), r in zip(res.models, res.results, strict=True) if kk == k]
            out.append(ModelRecord(k, np.concatenate(best.labels), np.asarray(best.centres), {
                "inertia": best.inertia, "n_iter": best.n_iter, "best_trial": trial,
                "inertia_history": best.inertia_history, "shift_history": best.shift_history,
                "trial_inertia": [r.inertia for r in trials],
                "trial_history": [r.inertia_history for r in trials],
                "seconds": res.timings["total"]}))
        return out


class McCaffrey:
    """The original demo's algorithm, bit for bit (see :mod:`kmdask.mccaffrey`), one K at a
    time."""

    name = "mccaffrey"
    resumes = False
    ordered = True  # the order the centres were drawn, which the original's figures follow

    def check(self, c: Checker, raw: dict, key: str) -> None:
        for k in ENGINE_OPTIONS:
            if k in raw:
                raise c.fail(f"{key}.{k}", "does not apply to algorithm mccaffrey (the "
                             "original's seeding and stopping rules; only k, rows, "
                             "iterations, trials and seed)")

    def fit(self, X: Any, spec: Any, ctx: FitContext) -> list[ModelRecord]:
        from kmdask.mccaffrey.fit import fit_mccaffrey

        if X.dtype == np.uint8 and ctx.divisor != 255.0:
            raise ConfigError(f"fit {spec.name!r}: algorithm mccaffrey reads a byte b as "
                              f"float32(b / 255), the original's pixels; data.divisor "
                              f"{ctx.divisor:g} does not apply")
        out = []
        for k in spec.ks:
            t0 = time.perf_counter()
            # its passes are many and short (every K in turn): shown with -v only
            r = fit_mccaffrey(X, k, spec.iterations, spec.trials, spec.seed,
                              progress=ctx.progress if log.isEnabledFor(logging.DEBUG) else None)
            out.append(ModelRecord(k, np.asarray(r.labels), np.asarray(r.centers), {
                "inertia": r.wcss, "n_iter": int(r.trial_n_iter[r.best_trial]),
                "best_trial": r.best_trial, "trial_inertia": list(r.trial_wcss),
                "trial_n_iter": list(r.trial_n_iter),
                "trial_history": [list(h) for h in r.trial_history],
                "inertia_history": list(r.trial_history[r.best_trial]),
                "seconds": time.perf_counter() - t0}))
        return out


def choosing_k(X: Any, records: list[ModelRecord], spec: Any, ctx: FitContext) -> dict | None:
    """The choosing-K criteria of a fit's final models (any kind), computed on the workers by
    :func:`kmdask.engine.criteria.choosing_k`; None for a fit of one K or ``criteria: false``.

    Returns
    -------
    dict or None
        ``per_k`` (K -> criteria values), ``profiles`` (K -> silhouette quantiles per
        cluster), ``choices`` (criterion -> K), ``settings`` and ``seconds``.
    """
    if spec.criteria is None or len(records) < 2:
        return None
    from kmdask.engine.criteria import choosing_k as compute

    got = compute(X, [r.labels for r in records], [r.k for r in records],
                  [float(r.result["inertia"]) for r in records], divisor=ctx.divisor,
                  silhouette_sample=spec.criteria.silhouette_sample,
                  gap_references=spec.criteria.gap_references,
                  gap_rows=spec.criteria.gap_rows, seed=spec.seed,
                  fitted_references=ctx.fitted_references,
                  **({"gap_iterations": spec.iterations}
                     if ctx.fitted_references is not None else {}))
    log.info("  %s: choosing K in %.1f s (%s): %s", spec.name, got.seconds,
             ", ".join(f"{k} {v:.1f} s" for k, v in got.timings.items()),
             ", ".join(f"{k} {v}" for k, v in got.choices.items()))
    return {"per_k": got.per_k, "profiles": got.profiles, "choices": got.choices,
            "settings": got.settings, "seconds": got.seconds, "timings": got.timings}


#: every fit kind, by the name a job's ``algorithm:`` gives (the first is the default)
FIT_KINDS: dict[str, FitKind] = {k.name: k for k in (Scalable(), McCaffrey())}


def warm() -> None:
    """Load every compiled kernel the fit kinds call, in this process (about a second).

    numba loads each kernel from its on-disk cache at first call, and the first load in a
    process also initialises numba's compiler (~0.25 s): about a second per worker process
    before a first fit's first pass. Tiny fits of each kind on each data kind (uint8 pixels,
    float32 and float64 rows), run here without a cluster, pay it ahead of time;
    :mod:`kmdask.batch.preload` runs this in the server LocalCluster's workers are forked from.
    """
    from kmdask.engine.estimator import fit_models
    from kmdask.mccaffrey.fit import fit_mccaffrey

    pixels = np.random.default_rng(0).integers(0, 256, size=(64, 16), dtype=np.uint8)
    for x in (pixels, pixels.astype(np.float32) / 255, pixels.astype(np.float64) / 255):
        # k-means|| seeding and pruned incremental passes, as a real fit runs them
        fit_models(x, [2, 3], n_init=2, max_iter=4, tol=0.0, random_state=0)
    for x in (pixels, pixels.astype(np.float64) / 255):
        fit_mccaffrey(x, 2, max_iter=3, n_init=2, seed=0)
