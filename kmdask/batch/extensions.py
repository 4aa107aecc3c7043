"""Job extensions: optional parts of a job that the runner and the report reach only through
this registry.

An extension owns spec keys (top-level sections of a job and keys of its fits), figure kinds,
and hooks that run around the fits: prepare inputs before them, give each fit its rows, adjust
each model's result, and finish with work of its own (the error-case experiment is one). Its
descriptor (:class:`Extension`) is plain data and imports nothing heavy; the hooks that need
dask, and the figure drawers that need matplotlib, are named as ``"module:attribute"`` and
imported only when used.

Extensions come from :data:`BUILTIN` and from the ``kmdask.extensions`` entry-point group, so a
package of its own can add one without touching kmdask.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Protocol

from kmdask.data.location import Location
from kmdask.errors import ConfigError

#: the extensions that ship with kmdask, as "module:attribute" of their :class:`Extension`
BUILTIN = ("kmdask.errorcases:EXTENSION",)


class JobHooks(Protocol):
    """What an extension does while a job runs (all optional but :meth:`prepare`)."""

    def fingerprint_inputs(self, job: Any, store: Location) -> dict:
        """Further inputs that a run's results depend on (added to its fingerprint)."""

    def prepare(self, run: Path, job: Any, store: Location, runs_dir: Path) -> Any:
        """Before the fits, with the partial run directory: returns this run's state."""

    def fit_rows(self, state: Any, fit: Any, n: int) -> Any:
        """The first ``n`` rows ``fit`` clusters (a dask array), or None: the job's images.
        The members a model keeps are images either way."""

    def model_result(self, state: Any, fit: Any, labels: Any, centres: Any
                     ) -> tuple[Any, Any, dict]:
        """A finished model's labels and centres (possibly renumbered) and extra result keys."""

    def finish(self, run: Path, job: Any, state: Any) -> tuple[dict, dict]:
        """After the fits: (manifest sections, timings in seconds)."""


@dataclass(frozen=True)
class Extension:
    """An extension's descriptor.

    Attributes
    ----------
    name : str
        Unique name (also how its figure drawers are found).
    job_keys : mapping of str to callable
        Top-level job keys it owns: ``parse(checker, raw or None, key, job) -> value or None``,
        called after the fits are parsed (``job`` holds them).
    fit_keys : mapping of str to callable
        Keys of a fit it owns: ``parse(checker, raw, key) -> value``, called when present.
    figure_rules : mapping of str to callable
        Figure kinds it adds: ``check(checker, key, kind, fit, job) -> None``, raising when a
        figure of that kind cannot be drawn from that fit (``key`` names it in the message).
    run_files : callable
        ``run_files(manifest) -> list of relative paths`` a complete run of a job using the
        extension must hold (the report refuses a run without them).
    runtime : str
        ``"module:attribute"`` of its :class:`JobHooks`.
    report : str
        ``"module:attribute"`` of its report part (see :mod:`kmdask.report.kinds`).
    """

    name: str
    job_keys: Mapping[str, Callable] = field(default_factory=dict)
    fit_keys: Mapping[str, Callable] = field(default_factory=dict)
    figure_rules: Mapping[str, Callable] = field(default_factory=dict)
    run_files: Callable[[dict], list[str]] = lambda manifest: []
    runtime: str = ""
    report: str = ""

    def used_by(self, job: Any) -> bool:
        """Whether ``job`` uses this extension (a section of it is set, or a fit has its key)."""
        return any(job.sections.get(k) for k in self.job_keys) or any(
            k in f.extras for f in job.fits for k in self.fit_keys)

    def hooks(self) -> JobHooks:
        return load(self.runtime)

    def report_part(self) -> Any:
        return load(self.report)


def load(target: str) -> Any:
    """The object named by ``"module:attribute"``."""
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


@functools.cache
def extensions() -> tuple[Extension, ...]:
    """Every registered extension (built-in first, then entry points), each name once."""
    found: dict[str, Extension] = {}
    targets = [*BUILTIN, *(f"{ep.module}:{ep.attr}"
                           for ep in entry_points(group="kmdask.extensions"))]
    for target in targets:
        ext = load(target)
        if not isinstance(ext, Extension):
            raise ConfigError(f"extension {target}: not a kmdask.batch.extensions.Extension")
        found.setdefault(ext.name, ext)
    return tuple(found.values())


def used_by(job: Any) -> list[Extension]:
    """The extensions ``job`` uses, in registry order."""
    return [e for e in extensions() if e.used_by(job)]
