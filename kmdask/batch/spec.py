"""Loading and validating job specs (``jobs/*.yaml``) and cluster profiles (``cluster.yaml``).

Every error is a :class:`~kmdask.errors.ConfigError` whose one-line message names the file, the
key (as a path such as ``fits[2].k``) and the bad value. Nothing here touches dask.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kmdask.errorcases.spec import (
    CasesSpec,
    ClassifierSpec,
    ExperimentSpec,
    SpecialistSpec,
    cases_spec,
    classifier_spec,
    experiment_spec,
)
from kmdask.errors import ConfigError

ALGORITHMS = ("scalable", "mccaffrey")
INITS = ("k-means||", "k-means++")
FIGURE_KINDS = ("clusters", "elbow", "composition", "scores", "convergence", "timing", "cases",
                "case_confusion", "experiment")
CASE_FIGURES = ("cases", "case_confusion")  # need fits that cluster case vectors
__all__ = ["CasesSpec", "ClassifierSpec", "ExperimentSpec", "FigureSpec", "FitSpec", "JobSpec",
           "SpecialistSpec", "load_job", "load_profile", "parse_job"]


def load_yaml(path: str | Path) -> Any:
    """Parse a YAML file safely; a missing file or a syntax error is a one-line ConfigError."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such file") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read: {exc.__class__.__name__}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{p}: YAML does not parse{where}: {problem}") from None


class _Checker:
    """Reads typed values out of a mapping, raising errors that name file and key."""

    def __init__(self, source: str | Path):
        self.source = str(source)

    def fail(self, key: str, msg: str) -> ConfigError:
        return ConfigError(f"{self.source}: {key}: {msg}")

    def mapping(self, value: Any, key: str, allowed: set[str]) -> dict:
        if not isinstance(value, dict):
            raise self.fail(key or "(top level)", f"expected a mapping, got {_show(value)}")
        unknown = sorted(str(k) for k in value if k not in allowed)
        if unknown:
            raise self.fail(f"{key}.{unknown[0]}" if key else unknown[0],
                            f"unknown key (allowed: {', '.join(sorted(allowed))})")
        return value

    def integer(self, value: Any, key: str, lo: int | None = None, hi: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"expected an integer, got {_show(value)}")
        if lo is not None and value < lo:
            raise self.fail(key, f"must be >= {lo}, got {value}")
        if hi is not None and value > hi:
            raise self.fail(key, f"must be <= {hi}, got {value}")
        return value

    def number(self, value: Any, key: str, lo: float | None = None,
               hi: float | None = None) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(key, f"expected a number, got {_show(value)}")
        if not math.isfinite(value):
            raise self.fail(key, f"expected a finite number, got {value}")
        if lo is not None and value < lo:
            raise self.fail(key, f"must be >= {lo}, got {value}")
        if hi is not None and value > hi:
            raise self.fail(key, f"must be <= {hi}, got {value}")
        return float(value)

    def string(self, value: Any, key: str, choices: tuple[str, ...] | None = None) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(key, f"expected a non-empty string, got {_show(value)}")
        if choices is not None and value not in choices:
            raise self.fail(key, f"expected one of {', '.join(choices)}, got {value!r}")
        return value

    def ks(self, value: Any, key: str) -> list[int]:
        if isinstance(value, dict) and set(value) == {"from", "to"}:
            lo = self.integer(value["from"], f"{key}.from", 1)
            hi = self.integer(value["to"], f"{key}.to", lo)
            return list(range(lo, hi + 1))
        if isinstance(value, list):
            if not value:
                raise self.fail(key, "expected at least one K")
            return [self.integer(v, f"{key}[{i}]", 1) for i, v in enumerate(value)]
        return [self.integer(value, key, 1)]


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --------------------------------------------------------------------------------------------
# Job specs

_FIT_KEYS = {"name", "algorithm", "rows", "k", "iterations", "trials", "seed", "init", "tol",
             "oversampling_factor", "init_rounds", "persist", "cases"}
_FIG_KEYS = {"name", "kind", "fits", "samples", "per_cluster", "threshold", "title"}
_JOB_KEYS = {"job", "description", "data", "defaults", "fits", "figures", "classifier",
             "experiments"}
_DATA_KEYS = {"dataset", "store", "split"}
@dataclass(frozen=True)
class FitSpec:
    """One clustering in a job: K values x trials of one algorithm on the first ``rows`` rows."""

    name: str
    algorithm: str
    rows: int | None  # None: every row of the split
    ks: tuple[int, ...]
    iterations: int
    trials: int
    seed: int
    init: str
    tol: float
    oversampling_factor: float
    init_rounds: int
    persist: bool | str
    cases: CasesSpec | None = None  # None: cluster image rows


@dataclass(frozen=True)
class FigureSpec:
    name: str
    kind: str
    fits: tuple[str, ...]
    samples: int | None = None  # first N rows placed into their clusters
    per_cluster: int = 60  # at most this many samples drawn per cluster
    threshold: float | None = None  # draw only pixels above it (the original's 0.35)
    title: str | None = None


@dataclass(frozen=True)
class JobSpec:
    name: str
    source: str
    dataset: str
    store: str | None
    split: str
    fits: tuple[FitSpec, ...]
    figures: tuple[FigureSpec, ...] = field(default_factory=tuple)
    description: str = ""
    raw: dict = field(default_factory=dict, compare=False)
    classifier: ClassifierSpec | None = None  # set when a fit clusters case vectors
    experiments: tuple[ExperimentSpec, ...] = ()

    @property
    def uses_cases(self) -> bool:
        return any(f.cases is not None for f in self.fits)

    def experiment(self, fit: str) -> ExperimentSpec | None:
        return next((e for e in self.experiments if e.fit == fit), None)

    def fit(self, name: str) -> FitSpec:
        for f in self.fits:
            if f.name == name:
                return f
        raise KeyError(name)


_FIT_DEFAULTS: dict[str, Any] = {
    "algorithm": "scalable", "iterations": 300, "trials": 1, "seed": 0, "init": "k-means||",
    "tol": 1e-4, "oversampling_factor": 2.0, "init_rounds": 5, "persist": "auto",
}


def _fit_spec(c: _Checker, raw: Any, key: str, defaults: dict) -> FitSpec:
    c.mapping(raw, key, _FIT_KEYS)
    v = {**defaults, **raw}
    if isinstance(defaults.get("cases"), dict) and isinstance(raw.get("cases"), dict):
        v["cases"] = {**defaults["cases"], **raw["cases"]}  # a fit refines the default cases
    name = c.string(v.get("name"), f"{key}.name")
    if "k" not in v:
        raise c.fail(f"{key}.k", "missing (the number of clusters, or a list of them)")
    persist = v["persist"]
    if persist not in ("auto", True, False):
        raise c.fail(f"{key}.persist", f"expected auto, true or false, got {_show(persist)}")
    rows = v.get("rows")
    return FitSpec(
        name=name,
        algorithm=c.string(v["algorithm"], f"{key}.algorithm", ALGORITHMS),
        rows=None if rows is None else c.integer(rows, f"{key}.rows", 1),
        ks=tuple(c.ks(v["k"], f"{key}.k")),
        iterations=c.integer(v["iterations"], f"{key}.iterations", 1),
        trials=c.integer(v["trials"], f"{key}.trials", 1),
        seed=c.integer(v["seed"], f"{key}.seed", 0, 2**31 - 1),
        init=c.string(v["init"], f"{key}.init", INITS),
        tol=c.number(v["tol"], f"{key}.tol", 0.0),
        oversampling_factor=c.number(v["oversampling_factor"], f"{key}.oversampling_factor",
                                     1e-9),
        init_rounds=c.integer(v["init_rounds"], f"{key}.init_rounds", 1, 100),
        persist=persist,
        cases=cases_spec(c, v.get("cases"), f"{key}.cases"),
    )


def _figure_spec(c: _Checker, raw: Any, key: str, specs: dict[str, FitSpec],
                 experiments: set[str]) -> FigureSpec:
    c.mapping(raw, key, _FIG_KEYS)
    fit_names = set(specs)
    fits = raw.get("fits")
    if isinstance(fits, str):
        fits = [fits]
    if not isinstance(fits, list) or not fits:
        raise c.fail(f"{key}.fits", f"expected a list of fit names, got {_show(fits)}")
    for i, f in enumerate(fits):
        if f not in fit_names:
            raise c.fail(f"{key}.fits[{i}]", f"no fit named {_show(f)} in this job")
    kind = c.string(raw.get("kind", "clusters"), f"{key}.kind", FIGURE_KINDS)
    for i, f in enumerate(fits):
        if kind in CASE_FIGURES and specs[f].cases is None:
            raise c.fail(f"{key}.fits[{i}]", f"fit {f!r} clusters images; kind {kind} needs "
                         "a fit with cases:")
        if kind == "experiment" and f not in experiments:
            raise c.fail(f"{key}.fits[{i}]", f"no experiment on fit {f!r} in this job")
    thr = raw.get("threshold")
    samples = raw.get("samples")
    return FigureSpec(
        name=c.string(raw.get("name"), f"{key}.name"),
        kind=kind,
        fits=tuple(fits),
        samples=None if samples is None else c.integer(samples, f"{key}.samples", 0),
        per_cluster=c.integer(raw.get("per_cluster", 60), f"{key}.per_cluster", 0, 10_000),
        threshold=None if thr is None else c.number(thr, f"{key}.threshold", 0.0),
        title=None if raw.get("title") is None else c.string(raw["title"], f"{key}.title"),
    )


def parse_job(raw: Any, source: str | Path = "<job>") -> JobSpec:
    """Validate a job document (already parsed YAML) into a :class:`JobSpec`."""
    c = _Checker(source)
    c.mapping(raw, "", _JOB_KEYS)
    name = c.string(raw.get("job"), "job")
    if not all(ch.isalnum() or ch in "-_." for ch in name) or name.startswith((".", "_")):
        raise c.fail("job", f"use letters, digits, '-', '_' and '.' (not first: '.', '_' are "
                     f"kmdask's own), got {name!r}")
    data = c.mapping(raw.get("data", {}), "data", _DATA_KEYS)
    dataset = c.string(data.get("dataset", "mnist"), "data.dataset", ("mnist", "fashion-mnist"))
    store = data.get("store")
    if store is not None:
        store = c.string(store, "data.store")
    split = c.string(data.get("split", "train"), "data.split", ("train", "test"))
    defaults = c.mapping(raw.get("defaults", {}), "defaults", _FIT_KEYS - {"name"})
    defaults = {**_FIT_DEFAULTS, **defaults}
    fits_raw = raw.get("fits")
    if not isinstance(fits_raw, list) or not fits_raw:
        raise c.fail("fits", f"expected a non-empty list of fits, got {_show(fits_raw)}")
    fits = [_fit_spec(c, f, f"fits[{i}]", defaults) for i, f in enumerate(fits_raw)]
    seen: set[str] = set()
    for i, f in enumerate(fits):
        if f.name in seen:
            raise c.fail(f"fits[{i}].name", f"duplicate fit name {f.name!r}")
        seen.add(f.name)
    by_name = {f.name: f for f in fits}
    exps_raw = raw.get("experiments", []) or []
    if not isinstance(exps_raw, list):
        raise c.fail("experiments", f"expected a list, got {_show(exps_raw)}")
    exps = [experiment_spec(c, e, f"experiments[{i}]", by_name, split)
            for i, e in enumerate(exps_raw)]
    for i, e in enumerate(exps):
        if any(o.fit == e.fit for o in exps[:i]):
            raise c.fail(f"experiments[{i}].fit", f"a second experiment on fit {e.fit!r}")
    figs_raw = raw.get("figures", []) or []
    if not isinstance(figs_raw, list):
        raise c.fail("figures", f"expected a list, got {_show(figs_raw)}")
    figures = [_figure_spec(c, f, f"figures[{i}]", by_name, {e.fit for e in exps})
               for i, f in enumerate(figs_raw)]
    classifier = None
    if "classifier" in raw or any(f.cases is not None for f in fits):
        classifier = classifier_spec(c, raw.get("classifier") or {}, "classifier")
    return JobSpec(name=name, source=str(source), dataset=dataset, store=store, split=split,
                   fits=tuple(fits), figures=tuple(figures),
                   description=str(raw.get("description", "")), raw=copy.deepcopy(raw),
                   classifier=classifier, experiments=tuple(exps))


def load_job(path: str | Path) -> JobSpec:
    """Load and validate ``jobs/NAME.yaml`` (a bare NAME is looked up under ``jobs/``)."""
    p = Path(path)
    if not p.exists() and p.suffix == "" and (Path("jobs") / f"{p}.yaml").exists():
        p = Path("jobs") / f"{p}.yaml"
    return parse_job(load_yaml(p), p)


# --------------------------------------------------------------------------------------------
# Cluster profiles

PROFILE_KINDS = ("local", "address", "slurm", "pbs")
_PROFILE_KEYS = {"kind", "description", "n_workers", "threads_per_worker", "memory_limit",
                 "host", "dashboard_address", "address", "scheduler_file", "timeout", "scale",
                 "adapt", "config", "security", "submit"}


def deep_merge(base: dict, extra: dict) -> dict:
    """Merge ``extra`` into a copy of ``base``, recursing into nested mappings."""
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def default_cluster_file() -> Path:
    """``$KMDASK_CLUSTER_FILE``, else ``./cluster.yaml``."""
    return Path(os.environ.get("KMDASK_CLUSTER_FILE", "cluster.yaml"))


def load_profile(name: str | None = None, cluster_file: str | Path | None = None) -> dict:
    """The named profile (``--profile``, else ``$KMDASK_PROFILE``, else the file's ``default``),
    with ``base`` settings deep-merged under it. Returns a plain dict with ``name`` added."""
    path = Path(cluster_file) if cluster_file else default_cluster_file()
    doc = load_yaml(path)
    c = _Checker(path)
    c.mapping(doc, "", {"default", "base", "profiles"})
    profiles = c.mapping(doc.get("profiles"), "profiles", set(doc.get("profiles") or {}))
    name = name or os.environ.get("KMDASK_PROFILE") or doc.get("default") or "local"
    if name not in profiles:
        raise ConfigError(f"{path}: profiles.{name}: no such profile (have: "
                          f"{', '.join(sorted(profiles))})")
    body = c.mapping(profiles[name], f"profiles.{name}", _PROFILE_KEYS)
    base = doc.get("base") or {}
    merged = deep_merge(c.mapping(base, "base", _PROFILE_KEYS), body)
    c.string(merged.get("kind"), f"profiles.{name}.kind", PROFILE_KINDS)
    merged["name"] = name
    merged["source"] = str(path)
    return merged
