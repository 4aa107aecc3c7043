"""The report: figures and an ``index.html`` drawn from run directories only (never dask)."""

from __future__ import annotations


def __getattr__(name: str):
    # lazy: `import kmdask.report` must not import matplotlib
    if name == "write_report":
        from kmdask.report.build import write_report

        return write_report
    raise AttributeError(name)
