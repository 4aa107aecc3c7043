"""The report: the figure suite of one or more run directories, and an ``index.html`` showing it.

``write_report(run_dirs, out)`` reads only run directories (:mod:`kmdask.batch.rundir`; it never
refits, never opens the data store and never imports dask), draws every figure the run's job
asks for (by figure kind, :mod:`kmdask.report.kinds`) and writes::

    out/index.html           one static page: every run's parameters, metrics, timings, figures
    out/<job>/<figure>.png   that run's figures (``<job>-<run id>`` when one job appears twice)
    out/<job>/thumbs/        the figures downscaled, shown on the index (:mod:`.pages`)
    out/<job>/models/        a drill-down page per fitted model (fit, K), with its images

Every run is checked before anything is drawn, so a missing or incomplete run directory is a
one-line :class:`~kmdask.errors.DataError` and nothing is written (every model's
``result.json`` is read then, too). Figures are drawn into a temporary directory inside ``out``
and moved into place at the end, ``index.html`` last (an atomic rename), so a failed report
never leaves a half-written page; a file that cannot be written (a full disk, a read-only
directory) is a one-line :class:`~kmdask.errors.KmdaskError` naming it, and the previous
report stays as it was.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

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
    from kmdask.report import kinds, pages
    from kmdask.report.html import render_index

    names = _subdir_names(runs)
    extras = {sub: pages.RunPages(sub, pages.run_results(run))
              for (run, _), sub in zip(runs, names, strict=True)}

    known = kinds.figure_kinds()

    try:
        out.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=".report-", dir=out))
    except OSError as exc:
        raise KmdaskError(f"{out}: cannot write the report there ({exc.strerror})") from None
    mode = 0o777 & ~_umask()
    try:
        sections = []
        todo = []
        for (run, job), sub in zip(runs, names, strict=True):
            (stage / sub).mkdir()
            todo += [(run, fig, stage / sub) for fig in job.figures]
        try:
            done = iter(_draw_figures(todo))
        except OSError as exc:  # full disk, read-only directory: name the file
            raise KmdaskError(f"{_final(exc.filename, stage, out) or out}: cannot write the "
                              f"report file ({exc.strerror or exc})") from None
        for (run, job), sub in zip(runs, names, strict=True):
            drawn, written = [], {}
            for fig in job.figures:
                pngs, seconds = next(done)
                for p in pngs:
                    if p.path.name in written:
                        raise DataError(f"{run.path / 'manifest.json'}: figures "
                                        f"{written[p.path.name]!r} and {fig.name!r} both write "
                                        f"{p.path.name}; rename one of them in the job")
                    written[p.path.name] = fig.name
                drawn.append((fig, known[fig.kind].describe(fig), pngs))
                log.info("kmdask: report: %s/%s (%s): %s (%.1f s)", sub, fig.name, fig.kind,
                         ", ".join(p.path.name for p in pngs), seconds)
            t1 = time.perf_counter()
            rp = extras[sub]
            thumbs = pages.write_thumbnails([p.path for _, _, ps in drawn for p in ps],
                                            stage / sub / "thumbs", out / sub / "thumbs")
            rp.thumbs = {n: f"{quote(sub)}/thumbs/{quote(n)}" for n in thumbs}
            pages.write_model_pages(run, job, sub, rp, drawn, stage / sub, out / sub)
            log.info("kmdask: report: %s: %d thumbnail(s), %d model page(s) (%.1f s)", sub,
                     len(thumbs), len(rp.models), time.perf_counter() - t1)
            extra = [part.html(run) for part in kinds.parts(extensions.used_by(job))
                     if part.html is not None]
            sections.append((run, job, sub, drawn, extra))
        page = render_index(sections, extras)
        with pages.writing(stage / "index.html", out / "index.html"):
            (stage / "index.html").write_text(page, encoding="utf-8")
        try:
            for sub in names:  # move each run's figures into place, then the page
                os.chmod(stage / sub, mode)
                for d in (stage / sub).rglob("*"):
                    if d.is_dir():  # mkdtemp's 0700 is not what a published report wants
                        os.chmod(d, mode)
                final = out / sub
                if final.exists():
                    old = stage / f".old-{sub}"
                    os.replace(final, old)
                os.replace(stage / sub, final)
            os.replace(stage / "index.html", out / "index.html")
        except OSError as exc:
            raise KmdaskError(f"{exc.filename or out}: cannot put the report in place "
                              f"({exc.strerror or exc})") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    n = sum(len(p) for s in sections for _, _, p in s[3])
    log.info("kmdask: report: %d figure(s) for %d run(s) in %.1f s: %s", n, len(runs),
             time.perf_counter() - t0, out / "index.html")
    return out / "index.html"


_TODO: list = []  # the figures being drawn, for the forked drawing processes to read


def _draw_figures(todo: list) -> list[tuple[list, float]]:
    """Draw every ``(run, figure spec, directory)`` of ``todo``: (its PNGs, seconds) each, in
    order.

    Figures are independent and drawing them is CPU-bound Python (matplotlib), so with several
    cores a pool of processes draws them. The processes are forked: they start in milliseconds
    with the runs already read and the figure registry as it is here, and send back only each
    PNG's path and caption. ``KMDASK_REPORT_PROCESSES`` sets their number (default: one per
    core; 1 draws here, one after the other).
    """
    global _TODO
    n = min(processes("KMDASK_REPORT_PROCESSES"), len(todo))
    if n <= 1:
        return [_draw(*t) for t in todo]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    _TODO = todo
    try:
        with ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("fork")) as pool:
            return list(pool.map(_draw_todo, range(len(todo))))
    finally:
        _TODO = []


def processes(var: str) -> int:
    """How many processes a pool of CPU-bound work gets: ``$var`` if set (and a number),
    else one per core this process may use."""
    try:
        return max(1, int(os.environ.get(var, "0")) or len(os.sched_getaffinity(0)))
    except ValueError:
        return 1


def _draw_todo(i: int) -> tuple[list, float]:
    """In a drawing process: figure ``i``, returning paths and captions only (a clusters
    figure's canvas is tens of megabytes)."""
    from kmdask.report.style import Drawn

    pngs, seconds = _draw(*_TODO[i])
    return [Drawn(p.path, p.caption) for p in pngs], seconds


def _draw(run: Run, fig, directory: Path) -> tuple[list, float]:
    from kmdask.report import kinds

    t = time.perf_counter()
    try:
        pngs = kinds.figure_kinds()[fig.kind].draw(run, fig, directory)
    except OSError as exc:
        if exc.filename is None:  # PIL's write errors name no file: name the directory
            raise OSError(exc.errno, exc.strerror or str(exc), str(directory)) from None
        raise
    return pngs, time.perf_counter() - t


def _final(path, stage: Path, out: Path) -> Path | None:
    """Where a file being written under the temporary ``stage`` will end up under ``out``."""
    if not path:
        return None
    p = Path(os.fsdecode(path))
    try:
        return out / p.relative_to(stage)
    except ValueError:
        return p


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
