"""Figure kinds by name: what the report can draw, and what extensions add to it.

A :class:`FigureKind` draws one figure spec of a run into PNG files and describes it for the
page. The built-in kinds live in :mod:`kmdask.report.clusters`, :mod:`kmdask.report.charts` and
:mod:`kmdask.report.choosing`;
a job extension adds kinds (and a section of the page) through its :class:`ReportPart`, found
by :mod:`kmdask.batch.extensions`. The job spec's list of kind names
(:func:`kmdask.batch.spec.figure_kinds`) and this registry always agree (tested).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kmdask.batch import extensions


@dataclass(frozen=True)
class FigureKind:
    """How to draw one kind of figure.

    Attributes
    ----------
    name : str
        What a job's ``figures[].kind`` says.
    draw : callable
        ``draw(run, fig, out_dir) -> list[Drawn]``: read the run, write PNG(s) into ``out_dir``.
    describe : callable
        ``describe(fig) -> str``: the paragraph the page shows above the figure.
    """

    name: str
    draw: Callable[[Any, Any, Path], list]
    describe: Callable[[Any], str]


@dataclass(frozen=True)
class ReportPart:
    """What an extension adds to the report: figure kinds, and an HTML section per run
    (``html(run) -> str``, shown after the run's fits table)."""

    kinds: tuple[FigureKind, ...] = ()
    html: Callable[[Any], str] | None = None


def text(description: str) -> Callable[[Any], str]:
    """A ``describe`` that says the same for every figure of the kind."""
    return lambda fig: description


@functools.cache
def figure_kinds() -> dict[str, FigureKind]:
    """Every figure kind by name: the built-in ones, then those of every extension (built once
    per process)."""
    from kmdask.report import charts, choosing, clusters

    out = {k.name: k for k in (clusters.KIND, *charts.KINDS, choosing.KIND)}
    for part in parts(extensions.extensions()):
        out.update({k.name: k for k in part.kinds})
    return out


def parts(exts) -> list[ReportPart]:
    """The report parts of the extensions ``exts``."""
    return [e.report_part() for e in exts if e.report]
