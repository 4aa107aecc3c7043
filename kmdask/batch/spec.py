"""Job specs (``jobs/*.yaml``): what a job computes and draws, validated into frozen dataclasses.

Every error is a :class:`~kmdask.errors.ConfigError` whose one-line message names the file, the
key (as a path such as ``fits[2].k``) and the bad value. Nothing here touches dask.

The vocabulary is open at three points: a fit's ``algorithm`` names a fit kind
(:mod:`kmdask.batch.fitkinds`), a figure's ``kind`` a figure kind (:data:`FIGURE_KINDS`, plus
those of extensions), and job extensions (:mod:`kmdask.batch.extensions`) own further top-level
sections and fit keys; their parsed values are in :attr:`JobSpec.sections` and
:attr:`FitSpec.extras`, and read like attributes (``job.experiments``, ``fit.cases``).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kmdask.batch import extensions, fitkinds
from kmdask.batch.checks import Checker, load_yaml, show
from kmdask.data.registry import REGISTRY

__all__ = ["FIGURE_KINDS", "CriteriaSpec", "FigureSpec", "FitSpec", "JobSpec", "load_job",
           "parse_job"]

INITS = ("k-means||", "k-means++")
SPLITS = ("train", "test")

#: Built-in figure kinds (drawn by :mod:`kmdask.report`), each with the check a figure of that
#: kind makes on its fits (None: any fit will do). Extensions add theirs.
FIGURE_KINDS: dict[str, Callable | None] = {
    "clusters": None, "elbow": None, "composition": None, "scores": None,
    "convergence": None, "timing": None,
    "choosing_k": lambda c, key, kind, fit, job: _check_choosing(c, key, fit),
}


def _check_choosing(c: Checker, key: str, fit: FitSpec) -> None:
    """A choosing-K figure needs a fit of two or more K whose criteria are computed."""
    if len(fit.ks) < 2:
        raise c.fail(key, f"fit {fit.name!r} has one K; choosing_k needs two or more")
    if fit.criteria is None:
        raise c.fail(key, f"fit {fit.name!r} sets criteria: false; choosing_k draws them")

_FIT_KEYS = {"name", "algorithm", "rows", "k", "iterations", "trials", "seed", "init", "tol",
             "oversampling_factor", "init_rounds", "persist", "criteria"}
_CRITERIA_KEYS = {"silhouette_sample", "gap_references", "gap_rows"}
_FIG_KEYS = {"name", "kind", "fits", "samples", "per_cluster", "threshold", "title"}
_JOB_KEYS = {"job", "description", "data", "defaults", "fits", "figures"}
_DATA_KEYS = {"dataset", "store", "split", "array", "labels", "divisor", "image_shape"}
_FIT_DEFAULTS: dict[str, Any] = {
    "algorithm": "scalable", "iterations": 300, "trials": 1, "seed": 0, "init": "k-means||",
    "tol": 1e-4, "oversampling_factor": 2.0, "init_rounds": 5, "persist": "auto",
}


class _Extras:
    """Extension values read like attributes (``fit.cases``, ``job.experiments``)."""

    _extras_field = ""

    def __getattr__(self, name: str) -> Any:
        extras = self.__dict__.get(self._extras_field) or {}
        if name in extras:
            return extras[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")


@dataclass(frozen=True)
class FitSpec(_Extras):
    """One clustering in a job: K values x trials of one fit kind on the first ``rows`` rows.

    ``init`` .. ``persist`` are the scalable engine's settings (other kinds refuse them when a
    fit sets them, and ignore them when they come from ``defaults:``). ``extras`` holds the
    values of extension keys, by key.
    """

    _extras_field = "extras"

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
    # choosing K (a fit of two or more K); None: not computed (``criteria: false``)
    criteria: CriteriaSpec | None = None
    extras: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class CriteriaSpec:
    """A fit's ``criteria:`` settings: the choosing-K criteria computed after its models are
    final (:mod:`kmdask.engine.criteria`). ``true`` (or no key, for a fit that a
    ``choosing_k`` figure draws) gives these defaults."""

    silhouette_sample: int = 10_000  # rows of the seeded silhouette (and gap) sample
    gap_references: int = 10  # B, the gap statistic's reference sets (0: no gap statistic)
    gap_rows: int = 2_000  # rows of the gap sample (a seeded subset of the silhouette sample)


def _criteria(c: Checker, value: Any, key: str, drawn: bool) -> CriteriaSpec | None:
    """``criteria:`` of a fit; unset, they are computed only for a fit a ``choosing_k`` figure
    draws (they cost a silhouette sample's pairwise distances and the gap's reference fits)."""
    if value is False or (value is None and not drawn):
        return None
    if value is True or value is None:
        return CriteriaSpec()
    if not isinstance(value, dict):
        raise c.fail(key, "expected true, false or a mapping of "
                     f"{', '.join(sorted(_CRITERIA_KEYS))}, got {show(value)}")
    c.mapping(value, key, _CRITERIA_KEYS)
    d = CriteriaSpec()
    return CriteriaSpec(
        silhouette_sample=c.integer(value.get("silhouette_sample", d.silhouette_sample),
                                    f"{key}.silhouette_sample", 2, 100_000),
        gap_references=c.integer(value.get("gap_references", d.gap_references),
                                 f"{key}.gap_references", 0, 100),
        gap_rows=c.integer(value.get("gap_rows", d.gap_rows), f"{key}.gap_rows", 2, 100_000))


@dataclass(frozen=True)
class FigureSpec:
    """One figure of the report: a figure kind drawn from some of the job's fits."""

    name: str
    kind: str
    fits: tuple[str, ...]
    samples: int | None = None  # first N rows placed into their clusters
    per_cluster: int = 60  # at most this many samples drawn per cluster
    threshold: float | None = None  # draw only pixels above it (the original's 0.35)
    title: str | None = None


@dataclass(frozen=True)
class JobSpec(_Extras):
    """A validated job. ``raw`` is the document as written (its fingerprint input);
    ``sections`` holds the parsed extension sections, by key."""

    _extras_field = "sections"

    name: str
    source: str
    dataset: str
    store: str | None
    split: str
    fits: tuple[FitSpec, ...]
    figures: tuple[FigureSpec, ...] = field(default_factory=tuple)
    description: str = ""
    raw: dict = field(default_factory=dict, compare=False)
    sections: dict[str, Any] = field(default_factory=dict, compare=False)
    array: str | None = None  # an existing zarr array or .npy of rows (instead of a store)
    labels: str | None = None  # its labels (zarr or .npy), optional
    divisor: float | None = None  # uint8 rows are divided by it (default 255)
    image_shape: tuple[int, int] | None = None  # (height, width) of image rows, for figures

    def fit(self, name: str) -> FitSpec:
        """The fit called ``name`` (KeyError when there is none)."""
        for f in self.fits:
            if f.name == name:
                return f
        raise KeyError(name)


def _fit_keys() -> dict[str, Callable]:
    return {k: p for e in extensions.extensions() for k, p in e.fit_keys.items()}


def _fit_spec(c: Checker, raw: Any, key: str, defaults: dict, ext_keys: dict,
              drawn: frozenset[str] = frozenset()) -> FitSpec:
    c.mapping(raw, key, _FIT_KEYS | set(ext_keys))
    v = {**defaults, **raw}
    for k in ext_keys:  # a fit refines a mapping given in defaults
        if isinstance(defaults.get(k), dict) and isinstance(raw.get(k), dict):
            v[k] = {**defaults[k], **raw[k]}
    name = c.string(v.get("name"), f"{key}.name")
    if "k" not in v:
        raise c.fail(f"{key}.k", "missing (the number of clusters, or a list of them)")
    algorithm = c.string(v["algorithm"], f"{key}.algorithm", tuple(fitkinds.FIT_KINDS))
    fitkinds.FIT_KINDS[algorithm].check(c, raw, key)
    persist = v["persist"]
    if persist not in ("auto", True, False):
        raise c.fail(f"{key}.persist", f"expected auto, true or false, got {show(persist)}")
    rows = v.get("rows")
    return FitSpec(
        name=name,
        algorithm=algorithm,
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
        criteria=_criteria(c, v.get("criteria"), f"{key}.criteria", name in drawn),
        extras={k: parse(c, v[k], f"{key}.{k}") for k, parse in ext_keys.items()
                if v.get(k) is not None},
    )


def figure_kinds() -> dict[str, Callable | None]:
    """Every figure kind a job may name: the built-in ones, then the extensions'."""
    out = dict(FIGURE_KINDS)
    for e in extensions.extensions():
        out.update(e.figure_rules)
    return out


def _figure_spec(c: Checker, raw: Any, key: str, job: JobSpec, kinds: dict) -> FigureSpec:
    c.mapping(raw, key, _FIG_KEYS)
    fit_names = {f.name for f in job.fits}
    fits = raw.get("fits")
    if isinstance(fits, str):
        fits = [fits]
    if not isinstance(fits, list) or not fits:
        raise c.fail(f"{key}.fits", f"expected a list of fit names, got {show(fits)}")
    for i, f in enumerate(fits):
        if f not in fit_names:
            raise c.fail(f"{key}.fits[{i}]", f"no fit named {show(f)} in this job")
    kind = c.string(raw.get("kind", "clusters"), f"{key}.kind", tuple(kinds))
    if kinds[kind] is not None:
        for i, f in enumerate(fits):
            kinds[kind](c, f"{key}.fits[{i}]", kind, job.fit(f), job)
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


def _array_data(c: Checker, data: dict) -> tuple[str | None, dict]:
    """``data.array`` (with its labels, divisor, image shape) or nothing: the job's rows come
    from a staged store (``store`` / ``dataset``) or from an existing array, not both."""
    if "array" not in data:
        for k in ("labels", "divisor"):
            if k in data:
                raise c.fail(f"data.{k}", "goes with data.array (a staged store has its own "
                             "labels and scale)")
        shape = data.get("image_shape")
        return None, {"image_shape": None if shape is None else _shape(c, shape)}
    for k in ("store", "dataset", "split"):
        if k in data:
            raise c.fail(f"data.{k}", "give data.array or a staged store (data.store / "
                         "data.dataset), not both")
    labels = data.get("labels")
    divisor = data.get("divisor")
    shape = data.get("image_shape")
    return c.string(data["array"], "data.array"), {
        "labels": None if labels is None else c.string(labels, "data.labels"),
        "divisor": None if divisor is None else c.number(divisor, "data.divisor", 1e-12),
        "image_shape": None if shape is None else _shape(c, shape)}


def _shape(c: Checker, value: Any) -> tuple[int, int]:
    if not isinstance(value, list) or len(value) != 2:
        raise c.fail("data.image_shape", f"expected [height, width], got {show(value)}")
    return (c.integer(value[0], "data.image_shape[0]", 1),
            c.integer(value[1], "data.image_shape[1]", 1))


def parse_job(raw: Any, source: str | Path = "<job>") -> JobSpec:
    """Validate a job document (already parsed YAML) into a :class:`JobSpec`.

    Parameters
    ----------
    raw : Any
        The parsed document.
    source : str or Path
        Where it came from, first in every error message.

    Raises
    ------
    ConfigError
        One line naming the file, the key and the bad value.
    """
    c = Checker(source)
    exts = extensions.extensions()
    job_keys = {k: p for e in exts for k, p in e.job_keys.items()}
    ext_fit_keys = _fit_keys()
    c.mapping(raw, "", _JOB_KEYS | set(job_keys))
    name = c.string(raw.get("job"), "job")
    if not all(ch.isalnum() or ch in "-_." for ch in name) or name.startswith((".", "_")):
        raise c.fail("job", f"use letters, digits, '-', '_' and '.' (not first: '.', '_' are "
                     f"kmdask's own), got {name!r}")
    data = c.mapping(raw.get("data", {}), "data", _DATA_KEYS)
    dataset = c.string(data.get("dataset", "mnist"), "data.dataset", tuple(REGISTRY))
    store = data.get("store")
    if store is not None:
        store = c.string(store, "data.store")
    split = c.string(data.get("split", "train"), "data.split", SPLITS)
    array, extra = _array_data(c, data)
    defaults = c.mapping(raw.get("defaults", {}), "defaults",
                         (_FIT_KEYS | set(ext_fit_keys)) - {"name"})
    defaults = {**_FIT_DEFAULTS, **defaults}
    fits_raw = raw.get("fits")
    if not isinstance(fits_raw, list) or not fits_raw:
        raise c.fail("fits", f"expected a non-empty list of fits, got {show(fits_raw)}")
    figs_raw = raw.get("figures", []) or []
    # the fits a choosing_k figure draws: their criteria are computed unless switched off
    drawn = frozenset(n for f in (figs_raw if isinstance(figs_raw, list) else [])
                      if isinstance(f, dict) and f.get("kind") == "choosing_k"
                      for n in (f.get("fits") or []) if isinstance(n, str))
    fits = [_fit_spec(c, f, f"fits[{i}]", defaults, ext_fit_keys, drawn)
            for i, f in enumerate(fits_raw)]
    seen: set[str] = set()
    for i, f in enumerate(fits):
        if f.name in seen:
            raise c.fail(f"fits[{i}].name", f"duplicate fit name {f.name!r}")
        seen.add(f.name)
    job = JobSpec(name=name, source=str(source), dataset=dataset, store=store, split=split,
                  fits=tuple(fits), description=str(raw.get("description", "")),
                  raw=copy.deepcopy(raw), array=array, **extra)
    for key, parse in job_keys.items():  # in order: a section's parser sees those before it
        job.sections[key] = parse(c, raw.get(key), key, job)
    if not isinstance(figs_raw, list):
        raise c.fail("figures", f"expected a list, got {show(figs_raw)}")
    kinds = figure_kinds()
    return dataclasses.replace(job, figures=tuple(
        _figure_spec(c, f, f"figures[{i}]", job, kinds) for i, f in enumerate(figs_raw)))


def load_job(path: str | Path) -> JobSpec:
    """Load and validate ``jobs/NAME.yaml`` (a bare NAME is looked up under ``jobs/``)."""
    p = Path(path)
    if not p.exists() and p.suffix == "" and (Path("jobs") / f"{p}.yaml").exists():
        p = Path("jobs") / f"{p}.yaml"
    return parse_job(load_yaml(p), p)
