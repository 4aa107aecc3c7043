"""Job-spec sections of the error-case extension: ``cases:`` (per fit), ``classifier:`` and
``experiments:``, and the checks its figure kinds make on their fits.

Each parser gets the job spec's :class:`~kmdask.batch.checks.Checker`, so every error names the
file, the key and the bad value in one line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kmdask.batch.checks import Checker, show

VECTORS = ("probs", "error")


_CASES_KEYS = {"vector", "power", "zero_out"}
_CLASSIFIER_KEYS = {"hidden", "epochs", "batch", "learning_rate", "momentum", "weight_decay",
                    "shift", "seed", "rows", "validation"}
_EXPERIMENT_KEYS = {"fit", "k", "specialist", "bootstrap", "seed", "designs"}
# routing designs beyond the nearest centre (which every experiment reports, with (b'))
DESIGNS = ("mixture", "gated")
_SPECIALIST_KEYS = {"epochs", "learning_rate", "member_weight", "class_share", "others"}


@dataclass(frozen=True)
class CasesSpec:
    """A fit clusters the general network's case vectors, not images (``cases:`` of a fit).

    vector: ``probs`` (class probabilities) or ``error`` (one-hot target - probabilities);
    power: each component raised to it, sign kept (the original's "density");
    zero_out: cases whose top probability is >= it become the zero vector (None: none do);
    validation_error: instead of a fixed zero_out, the lowest threshold at which the network
    errs on at most this share of the held-out validation cases it would zero (chosen on the
    classifier's validation rows, never on the test set).
    """

    vector: str = "probs"
    power: int = 1
    zero_out: float | None = None
    validation_error: float | None = None


@dataclass(frozen=True)
class ClassifierSpec:
    """How the general network is trained (the job's ``classifier:`` section)."""

    hidden: tuple[int, ...] = (800,)
    epochs: int = 20
    batch: int = 128
    learning_rate: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
    shift: int = 2
    seed: int = 0
    rows: int | None = None  # train on the first N training rows only (tests)
    validation: int = 0  # the last N of those rows are held out: every choice is made on them

    def settings(self) -> dict:
        # validation only when set: a job without it keeps its classifier's fingerprint
        return {"hidden": list(self.hidden), "epochs": self.epochs, "batch": self.batch,
                "learning_rate": self.learning_rate, "momentum": self.momentum,
                "weight_decay": self.weight_decay, "shift": self.shift, "seed": self.seed,
                "rows": self.rows, **({"validation": self.validation} if self.validation
                                      else {})}

    def split_rows(self, n_train: int) -> tuple[int, int]:
        """(rows the networks train on, first row after the validation rows) of a training
        split of ``n_train`` rows: training rows are [0, a), validation rows [a, b)."""
        b = min(self.rows or n_train, n_train)
        return b - self.validation, b


@dataclass(frozen=True)
class SpecialistSpec:
    """How each error cluster's specialist is fine-tuned from the general network."""

    epochs: int = 3  # passes over its neighbourhood
    learning_rate: float = 0.01  # peak of the restarted cosine schedule
    member_weight: int = 4  # the cluster's own training cases are repeated this often
    class_share: float = 0.1  # a class joins the neighbourhood at this share of the members
    others: float = 0.1  # share of the remaining training images added (keeps every class)


@dataclass(frozen=True)
class ExperimentSpec:
    """Route uncertain test cases to per-cluster specialists (``experiments:`` entry)."""

    fit: str
    k: int
    specialist: SpecialistSpec = field(default_factory=SpecialistSpec)
    bootstrap: int = 2000
    seed: int = 0
    designs: tuple[str, ...] = ()  # routing designs of :data:`DESIGNS` compared too


def cases_spec(c: Checker, raw: Any, key: str) -> CasesSpec:
    """A fit's ``cases:`` (the fit clusters case vectors instead of images)."""
    c.mapping(raw, key, _CASES_KEYS)
    power = c.integer(raw.get("power", 1), f"{key}.power", 1, 3)
    zero, rule = raw.get("zero_out"), None
    if isinstance(zero, dict):  # {validation_error: E}: chosen on the validation rows
        c.mapping(zero, f"{key}.zero_out", {"validation_error"})
        if "validation_error" not in zero:
            raise c.fail(f"{key}.zero_out", "expected a number or {validation_error: E}")
        rule = c.number(zero["validation_error"], f"{key}.zero_out.validation_error", 0.0, 1.0)
        zero = None
    return CasesSpec(vector=c.string(raw.get("vector", "probs"), f"{key}.vector", VECTORS),
                     power=power,
                     zero_out=None if zero is None else c.number(zero, f"{key}.zero_out",
                                                                 1e-9, 1.0),
                     validation_error=rule)


def classifier_section(c: Checker, raw: Any, key: str, job: Any) -> ClassifierSpec | None:
    """The job's ``classifier:``: set whenever a fit clusters case vectors (defaults then)."""
    if raw is None and not any("cases" in f.extras for f in job.fits):
        return None
    if job.array is not None:
        # the network trains on a staged store's train split and is scored on its test split
        raise c.fail(key, "error cases need a staged store with train and test splits "
                     "(data.store or data.dataset), not data.array")
    spec = classifier_spec(c, raw or {}, key)
    for f in job.fits:
        if "cases" in f.extras and f.cases.validation_error is not None and not spec.validation:
            raise c.fail(f"{key}.validation", f"fit {f.name!r} chooses zero_out on validation "
                         "rows; set classifier.validation (rows held out of training)")
    return spec


def classifier_spec(c: Checker, raw: Any, key: str) -> ClassifierSpec:
    """How the general network is trained."""
    c.mapping(raw, key, _CLASSIFIER_KEYS)
    d = ClassifierSpec()
    hidden = raw.get("hidden", list(d.hidden))
    if not isinstance(hidden, list) or not hidden or len(hidden) > 4:
        raise c.fail(f"{key}.hidden", f"expected a list of 1 to 4 layer widths, got "
                     f"{show(hidden)}")
    rows = raw.get("rows")
    return ClassifierSpec(
        hidden=tuple(c.integer(h, f"{key}.hidden[{i}]", 1, 8192) for i, h in enumerate(hidden)),
        epochs=c.integer(raw.get("epochs", d.epochs), f"{key}.epochs", 1, 1000),
        batch=c.integer(raw.get("batch", d.batch), f"{key}.batch", 1, 65536),
        learning_rate=c.number(raw.get("learning_rate", d.learning_rate),
                               f"{key}.learning_rate", 1e-9, 10.0),
        momentum=c.number(raw.get("momentum", d.momentum), f"{key}.momentum", 0.0, 0.999),
        weight_decay=c.number(raw.get("weight_decay", d.weight_decay), f"{key}.weight_decay",
                              0.0, 1.0),
        shift=c.integer(raw.get("shift", d.shift), f"{key}.shift", 0, 4),
        seed=c.integer(raw.get("seed", d.seed), f"{key}.seed", 0, 2**31 - 1),
        rows=None if rows is None else c.integer(rows, f"{key}.rows", 100),
        validation=c.integer(raw.get("validation", 0), f"{key}.validation", 0,
                             (rows or 10**9) - 100),
    )


def experiments_section(c: Checker, raw: Any, key: str, job: Any) -> tuple[ExperimentSpec, ...]:
    """The job's ``experiments:`` list (empty when absent)."""
    raw = raw or []
    if not isinstance(raw, list):
        raise c.fail(key, f"expected a list, got {show(raw)}")
    fits = {f.name: f for f in job.fits}
    exps = [experiment_spec(c, e, f"{key}[{i}]", fits, job.split) for i, e in enumerate(raw)]
    clf = job.sections.get("classifier")  # parsed before this section
    for i, e in enumerate(exps):
        if "gated" in e.designs and not (clf and clf.validation):
            raise c.fail(f"{key}[{i}].designs", "design gated decides on validation rows; set "
                         "classifier.validation (rows held out of training)")
    for i, e in enumerate(exps):
        if any(o.fit == e.fit for o in exps[:i]):
            raise c.fail(f"{key}[{i}].fit", f"a second experiment on fit {e.fit!r}")
    return tuple(exps)


def experiment_spec(c: Checker, raw: Any, key: str, fits: dict[str, Any],
                    split: str) -> ExperimentSpec:
    """One entry of ``experiments:``."""
    c.mapping(raw, key, _EXPERIMENT_KEYS)
    name = c.string(raw.get("fit"), f"{key}.fit")
    fit = fits.get(name)
    if fit is None:
        raise c.fail(f"{key}.fit", f"no fit named {name!r} in this job")
    if "cases" not in fit.extras:
        raise c.fail(f"{key}.fit", f"fit {name!r} clusters images; an experiment needs a fit "
                     "with cases:")
    if fit.cases.vector != "probs" or (fit.cases.zero_out is None
                                       and fit.cases.validation_error is None):
        raise c.fail(f"{key}.fit", f"fit {name!r}: routing needs cases with vector: probs (an "
                     "error vector uses the true label, unknown at test time) and a zero_out "
                     "threshold")
    if split != "train":
        raise c.fail("data.split", f"experiments train specialists on the training cases; "
                     f"expected train, got {split!r}")
    if "k" in raw:
        k = c.integer(raw["k"], f"{key}.k", 2)
        if k not in fit.ks:
            raise c.fail(f"{key}.k", f"fit {name!r} has no K={k} (has {list(fit.ks)})")
    elif len(fit.ks) == 1 and fit.ks[0] >= 2:
        k = fit.ks[0]
    else:
        raise c.fail(f"{key}.k", f"missing: fit {name!r} has K={list(fit.ks)}; name one >= 2")
    sp = c.mapping(raw.get("specialist", {}), f"{key}.specialist", _SPECIALIST_KEYS)
    d = SpecialistSpec()
    specialist = SpecialistSpec(
        epochs=c.integer(sp.get("epochs", d.epochs), f"{key}.specialist.epochs", 1, 100),
        learning_rate=c.number(sp.get("learning_rate", d.learning_rate),
                               f"{key}.specialist.learning_rate", 1e-9, 10.0),
        member_weight=c.integer(sp.get("member_weight", d.member_weight),
                                f"{key}.specialist.member_weight", 1, 100),
        class_share=c.number(sp.get("class_share", d.class_share),
                             f"{key}.specialist.class_share", 0.0, 1.0),
        others=c.number(sp.get("others", d.others), f"{key}.specialist.others", 0.0, 1.0))
    designs = raw.get("designs", [])
    if not isinstance(designs, list):
        raise c.fail(f"{key}.designs", f"expected a list of {', '.join(DESIGNS)}, got "
                     f"{show(designs)}")
    return ExperimentSpec(
        fit=name, k=k, specialist=specialist,
        designs=tuple(c.string(d, f"{key}.designs[{i}]", DESIGNS) for i, d in enumerate(designs)),
        bootstrap=c.integer(raw.get("bootstrap", 2000), f"{key}.bootstrap", 100, 100_000),
        seed=c.integer(raw.get("seed", 0), f"{key}.seed", 0, 2**31 - 1))


def needs_cases(c: Checker, key: str, kind: str, fit: Any, job: Any) -> None:
    """Figure kinds ``cases`` and ``case_confusion`` draw fits that cluster case vectors."""
    if "cases" not in fit.extras:
        raise c.fail(key, f"fit {fit.name!r} clusters images; kind {kind} needs a fit with "
                     "cases:")


def needs_experiment(c: Checker, key: str, kind: str, fit: Any, job: Any) -> None:
    """Figure kind ``experiment`` draws a fit that has an experiment."""
    if not any(e.fit == fit.name for e in job.sections.get("experiments") or ()):
        raise c.fail(key, f"no experiment on fit {fit.name!r} in this job")


def run_files(manifest: dict) -> list[str]:
    """What a complete run of an error-case job holds besides the fits (relative paths)."""
    out = []
    if "classifier" in manifest:
        out += ["classifier/weights.npz", "classifier/classifier.json", "cases.zarr/zarr.json"]
    for fit in manifest.get("experiments", {}):
        out += [f"experiments/{fit}/experiment.json", f"experiments/{fit}/predictions.npz"]
    return out
