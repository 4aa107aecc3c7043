"""The report: the figure suite of one or more run directories, and an ``index.html`` showing it.

``write_report(run_dirs, out)`` reads only run directories (:mod:`kmdask.batch.rundir`; it never
refits, never opens the data store and never imports dask), draws every figure the run's job
asks for (by figure kind, :mod:`kmdask.report.kinds`) and writes::

    out/index.html           one static page: every run's parameters, metrics, timings, figures
    out/<job>/<figure>.png   that run's figures (``<job>-<run id>`` when one job appears twice)

Every run is checked before anything is drawn, so a missing or incomplete run directory is a
one-line :class:`~kmdask.errors.DataError` and nothing is written. Figures are drawn into a
temporary directory inside ``out`` and moved into place at the end, ``index.html`` last (an
atomic rename), so a failed report never leaves a half-written page.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from kmdask.batch import extensions
from kmdask.batch.rundir import Run, open_run
from kmdask.batch.spec import JobSpec, parse_job
from kmdask.errors import ConfigError, DataError, KmdaskError

log = logging.getLogger(__name__)

def load_run(path: str | Path) -> tuple[Run, JobSpec]:
    """Open a complete run directory and check that it holds every fit its figures need."""
    run = open_run(path)
    mf = run.path / "manifest.json"
    spec_raw = run.manifest.get("spec")
    if not isinstance(spec_raw, dict):
        raise DataError(f"{mf}: no job spec recorded (run written by an older kmdask?)")
    try:
        job = parse_job(spec_raw, source=f"{mf} (spec)")
    except ConfigError as exc:
        raise DataError(str(exc)) from None
    fits = run.manifest.get("fits", {})
    for fig in job.figures:
        for fit in fig.fits:
            info = fits.get(fit)
            if not isinstance(info, dict) or not info.get("results"):
                raise DataError(f"{mf}: figure {fig.name!r} needs fit {fit!r}, which the run "
                                "does not hold (incomplete run?)")
            for k in info.get("ks", []):
                if str(k) not in info["results"]:
                    raise DataError(f"{mf}: figure {fig.name!r} needs fit {fit!r} at K={k}, "
                                    "which the run does not hold (incomplete run?)")
            if fig.kind == "experiment" and fit not in run.manifest.get("experiments", {}):
                raise DataError(f"{mf}: figure {fig.name!r} needs the experiment on fit "
                                f"{fit!r}, which the run does not hold (incomplete run?)")
    return run, job


def _subdir_names(runs: list[tuple[Run, JobSpec]]) -> list[str]:
    """A folder per run: the job's name, with the run id when a job appears more than once."""
    jobs = [r.manifest.get("job", j.name) for r, j in runs]
    names: list[str] = []
    for j, (r, _) in zip(jobs, runs, strict=True):
        name = j if jobs.count(j) == 1 else f"{j}-{r.manifest.get('run_id', r.path.name)}"
        base, n = name, 2
        while name in names:
            name, n = f"{base}-{n}", n + 1
        names.append(name)
    return names


def write_report(run_dirs: list[Path | str], out: Path | str) -> Path:
    """Draw the figures of every run directory into ``out`` and return ``out/index.html``."""
    if not run_dirs:
        raise DataError("no run directories given")
    seen: set[Path] = set()
    runs: list[tuple[Run, JobSpec]] = []
    for d in run_dirs:  # check everything before drawing anything
        real = Path(d).resolve()
        if real in seen:
            continue
        seen.add(real)
        runs.append(load_run(d))
    out = Path(out)
    t0 = time.perf_counter()
    # matplotlib is imported only once the inputs are known good
    from kmdask.report import kinds
    from kmdask.report.html import render_index

    known = kinds.figure_kinds()

    try:
        out.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=".report-", dir=out))
    except OSError as exc:
        raise KmdaskError(f"{out}: cannot write the report there ({exc.strerror})") from None
    mode = 0o777 & ~_umask()
    try:
        sections = []
        names = _subdir_names(runs)
        for (run, job), sub in zip(runs, names, strict=True):
            (stage / sub).mkdir()
            drawn, written = [], {}
            for fig in job.figures:
                t1 = time.perf_counter()
                kind = known[fig.kind]
                pngs = kind.draw(run, fig, stage / sub)
                for p in pngs:
                    if p.path.name in written:
                        raise DataError(f"{run.path / 'manifest.json'}: figures "
                                        f"{written[p.path.name]!r} and {fig.name!r} both write "
                                        f"{p.path.name}; rename one of them in the job")
                    written[p.path.name] = fig.name
                drawn.append((fig, kind.describe(fig), pngs))
                log.info("kmdask: report: %s/%s (%s): %s (%.1f s)", sub, fig.name, fig.kind,
                         ", ".join(p.path.name for p in pngs), time.perf_counter() - t1)
            extra = [part.html(run) for part in kinds.parts(extensions.used_by(job))
                     if part.html is not None]
            sections.append((run, job, sub, drawn, extra))
        page = render_index(sections)
        (stage / "index.html").write_text(page, encoding="utf-8")
        for sub in names:  # move each run's figures into place, then the page
            os.chmod(stage / sub, mode)
            final = out / sub
            if final.exists():
                old = stage / f".old-{sub}"
                os.replace(final, old)
            os.replace(stage / sub, final)
        os.replace(stage / "index.html", out / "index.html")
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    n = sum(len(p) for s in sections for _, _, p in s[3])
    log.info("kmdask: report: %d figure(s) for %d run(s) in %.1f s: %s", n, len(runs),
             time.perf_counter() - t0, out / "index.html")
    return out / "index.html"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
