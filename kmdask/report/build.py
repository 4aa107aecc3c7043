"""The report: the figure suite of one or more run directories, and an ``index.html`` showing it.

``write_report(run_dirs, out)`` reads only run directories (:mod:`kmdask.batch.rundir`; it never refits
and never opens the data store), draws every figure the run's job asks for
(:mod:`kmdask.report.clusters`, one function per figure kind) and writes::

    out/index.html           one static page: every run's parameters, metrics, timings, figures
    out/<job>/<figure>.png   that run's figures (``<job>-<run id>`` when one job appears twice)

Every run is checked before anything is drawn, so a missing or incomplete run directory is a
one-line :class:`~kmdask.errors.DataError` and nothing is written. Figures are drawn into a
temporary directory inside ``out`` and moved into place at the end, ``index.html`` last (an
atomic rename), so a failed report never leaves a half-written page.
"""

from __future__ import annotations

import html
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from kmdask.batch.spec import JobSpec, parse_job
from kmdask.errors import ConfigError, DataError, KmdaskError
from kmdask.batch.rundir import Run, open_run

DESCRIPTIONS = {
    "clusters": "One column per cluster, in the order its centre was drawn: the cluster's size "
                "in a box of its colour, its mean image (full grey levels, orange tint), and "
                "sample images of its members, five per row.",
    "elbow": "Within-cluster sum of squares against K.",
    "composition": "Which true digits make up each cluster.",
    "scores": "Cluster quality against the true digit labels.",
    "convergence": "How each trial's WCSS fell, iteration by iteration.",
    "timing": "Where the run's time went.",
    "cases": "The original's error-case figure: the general network's outputs for every "
             "training image (case vectors) clustered. Per cluster: its size, a bar chart of "
             "its mean vector (bar colour = class colour, class under each bar, one scale for "
             "all clusters) and MNIST images of its members. Cases whose top probability "
             "reaches ZeroOut are zeroed: they form the reliable cluster, drawn first in red "
             "(the cluster holding the zeroed cases; its index in the algorithm's order is "
             "shown above its bars).",
    "case_confusion": "The general network's confusion matrix restricted to each cluster's "
                      "cases: which digits it mixes up where.",
    "experiment": "Do per-cluster specialists beat the general network? Test accuracy of the "
                  "general network, of the system that routes uncertain test cases to the "
                  "specialist of their nearest error cluster, and of a baseline given the "
                  "same extra training.",
}


def _say(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


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


def write_report(run_dirs: list[Path | str], out: Path | str, *, quiet: bool = False) -> Path:
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
    from kmdask import figures  # matplotlib is imported only once the inputs are known good

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
                pngs = figures.DRAW[fig.kind](run, fig, stage / sub)
                for p in pngs:
                    if p.path.name in written:
                        raise DataError(f"{run.path / 'manifest.json'}: figures "
                                        f"{written[p.path.name]!r} and {fig.name!r} both write "
                                        f"{p.path.name}; rename one of them in the job")
                    written[p.path.name] = fig.name
                drawn.append((fig, pngs))
                _say(f"kmdask: report: {sub}/{fig.name} ({fig.kind}): "
                     f"{', '.join(p.path.name for p in pngs)} ({time.perf_counter() - t1:.1f} s)",
                     quiet)
            sections.append((run, job, sub, drawn))
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
    n = sum(len(p) for s in sections for _, p in s[3])
    _say(f"kmdask: report: {n} figure(s) for {len(runs)} run(s) in "
         f"{time.perf_counter() - t0:.1f} s: {out / 'index.html'}", quiet)
    return out / "index.html"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# =============================================================================================
# index.html

CSS = """
body{background:#000;color:rgb(205,199,168);font:15px/1.45 "DejaVu Sans",Verdana,sans-serif;
 margin:0 auto;max-width:1500px;padding:1.2em 2em 4em}
a{color:#ffb400}h1{font-size:1.7em;margin:.3em 0}h2{font-size:1.35em;margin:1.8em 0 .4em;
 border-bottom:1px solid #46443c;padding-bottom:.2em}h3{font-size:1.1em;margin:1.6em 0 .3em}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:13px}
td,th{border:1px solid #2e2d28;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#15140f;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums}
.kv th{width:11em}.muted{color:#8a877a}code{font-size:12px}
figure{margin:.6em 0 1.4em}figure img{max-width:100%;max-height:92vh;width:auto;height:auto;
 border:1px solid #26251f;background:#000}
figcaption{color:#a8a48f;font-size:13px;max-width:70em;margin-top:.3em}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(600px,1fr));gap:1em}
.grid figure{margin:0}.sw{display:inline-block;width:.9em;height:.9em;margin-right:.25em;
 vertical-align:-.1em;border:1px solid #000}
nav ul{margin:.2em 0;padding-left:1.2em}
"""


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _kv(rows: list[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<table class="kv">{body}</table>'


def _num(x, fmt: str = "{:,.2f}") -> str:
    return "" if x is None else fmt.format(x)


def _params_table(run: Run, job: JobSpec) -> str:
    m = run.manifest
    d, prof, t = m.get("data", {}), m.get("profile", {}), m.get("timings", {})
    chunks = d.get("chunks") or []
    chunk_txt = f"{len(chunks)} chunk(s) of \u2264 {max(chunks)} rows" if chunks else ""
    versions = ", ".join(f"{k} {v}" for k, v in sorted(m.get("versions", {}).items()))
    rows = [
        ("job", f"<b>{_e(m.get('job'))}</b> <span class=muted>{_e(job.description)}</span>"),
        ("run id", f"<code>{_e(m.get('run_id'))}</code>"),
        ("fingerprint", f"<code>{_e(m.get('fingerprint'))}</code>"),
        ("finished", _e(m.get("finished", ""))),
        ("data", f"{_e(d.get('dataset'))} ({_e(d.get('split'))}), {_e(d.get('rows'))} rows in "
                 f"<code>{_e(d.get('store'))}</code>, {_e(chunk_txt)}; data fingerprint "
                 f"<code>{_e(d.get('fingerprint'))}</code>"),
        ("profile", f"{_e(prof.get('name'))} ({_e(prof.get('kind'))})"),
        ("timings", f"total {_num(t.get('total'), '{:.1f}')} s, connect "
                    f"{_num(t.get('connect'), '{:.1f}')} s"),
        ("versions", _e(versions)),
        ("run directory", f"<code>{_e(run.path)}</code>" + (
            f" \u2192 <code>{_e(run.path.resolve())}</code>" if run.path.is_symlink() else "")),
    ]
    return _kv(rows)


def _counts_html(counts: list[int], result: dict | None = None) -> str:
    """Counts in cluster order; for a cases fit in display order (reliable first, red, as in
    its figure), each with the algorithm's cluster index."""
    from kmdask.report.clusters import cluster_colour

    order = (result or {}).get("display_order")
    if not order:
        return " ".join(f'<span class=sw style="background:rgb{cluster_colour(j)}"></span>{c}'
                        for j, c in enumerate(counts))
    rel = result.get("reliable_cluster")
    return " ".join(
        f'<span class=sw style="background:rgb{cluster_colour(pos)}"></span>{counts[j]}'
        f'<span class=muted>{"=reliable" if j == rel else f"=#{j}"}</span>'
        for pos, j in enumerate(order))


def _fits_table(run: Run, job: JobSpec) -> str:
    head = ("<tr><th>fit</th><th>algorithm</th><th>rows</th><th>iterations \u00d7 trials</th>"
            "<th>seed</th><th>seconds</th><th>K</th><th>WCSS</th><th>iterations run</th>"
            "<th>best trial</th><th>NMI</th><th>ARI</th><th>counts (cluster order)</th></tr>")
    body = []
    fits = run.manifest.get("fits", {})
    named = [f.name for f in job.fits]
    order = [n for n in named if n in fits] + [n for n in fits if n not in named]
    for name in order:
        info = fits[name]
        ks = sorted(info.get("results", {}), key=int)
        for i, k in enumerate(ks):
            r = info["results"][k]
            lead = ""
            if i == 0:
                span = f' rowspan="{len(ks)}"'
                lead = (f"<td{span}><b>{_e(name)}</b></td><td{span}>{_e(info.get('algorithm'))}"
                        f"</td><td{span} class=n>{_e(info.get('rows'))}</td><td{span} class=n>"
                        f"{_e(info.get('iterations'))} \u00d7 {_e(info.get('trials'))}</td>"
                        f"<td{span} class=n>{_e(info.get('seed'))}</td><td{span} class=n>"
                        f"{_num(info.get('seconds'), '{:.1f}')}</td>")
            body.append(
                f"<tr>{lead}<td class=n>{_e(k)}</td><td class=n>{_num(r.get('inertia'))}</td>"
                f"<td class=n>{_e(r.get('n_iter', ''))}</td>"
                f"<td class=n>{_e(r.get('best_trial', ''))}</td>"
                f"<td class=n>{_num(r.get('nmi'), '{:.3f}')}</td>"
                f"<td class=n>{_num(r.get('ari'), '{:.3f}')}</td>"
                f"<td>{_counts_html(r.get('counts', []), r)}</td></tr>")
    return f"<table>{head}{''.join(body)}</table>"


def _figure_html(sub: str, fig, pngs) -> str:
    anchor = f"{sub}-{fig.name}"
    desc = DESCRIPTIONS.get(fig.kind, "")
    fits = ", ".join(fig.fits)
    parts = [f'<h3 id="{_e(anchor)}">{_e(fig.name)} <span class=muted>({_e(fig.kind)}; fits '
             f'{_e(fits)})</span></h3>']
    if fig.kind == "clusters":
        extra = []
        if fig.samples is not None:
            extra.append(f"samples: the first {fig.samples} data rows placed into their "
                         f"clusters in row order, at most {fig.per_cluster} per cluster")
        else:
            extra.append(f"samples: each cluster's first {fig.per_cluster} members")
        if fig.threshold is not None:
            extra.append(f"mean images show only pixels above {fig.threshold:g}")
        desc = desc + " " + "; ".join(extra).capitalize() + "."
    parts.append(f"<p>{_e(desc)}</p>")
    grid = len(pngs) > 1
    if grid:
        parts.append('<div class="grid">')
    for p in pngs:
        rel = f"{sub}/{p.path.name}"
        cap = (f"<b>{_e(p.path.name)}</b>: " if grid else "") + _e(p.caption)
        parts.append(f'<figure><a href="{_e(rel)}"><img src="{_e(rel)}" alt="{_e(p.path.stem)}"'
                     f' loading="lazy"></a><figcaption>{cap}</figcaption></figure>')
    if grid:
        parts.append("</div>")
    return "\n".join(parts)


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _ci(v: list[float]) -> str:
    return f"[{_pct(v[0])}, {_pct(v[1])}]"


def _errorcases_html(run: Run) -> str:
    """The general network, and each experiment's table (empty for image-only runs)."""
    m = run.manifest
    clf = m.get("classifier")
    if not clf:
        return ""
    st = clf.get("settings", {})
    parts = ["<h3>General network</h3>", _kv([
        ("network", _e(f"784-{'-'.join(map(str, st.get('hidden', [])))}-10 MLP (numpy), "
                       f"{st.get('epochs')} epochs, shifts ≤ {st.get('shift')} px, "
                       f"seed {st.get('seed')}")),
        ("test accuracy", f"<b>{_pct(clf['test_accuracy'])}</b> (train "
                          f"{_pct(clf['train_accuracy'])})"),
        ("training", _e(f"{clf['train_seconds']:.1f} s on {clf['train_rows']} rows"
                        + ("; this run reused the cached model" if clf.get("reused") else ""))),
        ("fingerprint", f"<code>{_e(clf['fingerprint'][:16])}</code> (cached under "
                        "<code>runs/_models/</code>)")])]
    head = ("<tr><th>experiment (fit)</th><th>K</th><th>routed test cases</th><th>(a) general"
            "</th><th>(b) routed</th><th>(c) baseline</th><th>(b)−(a)</th>"
            "<th>(b′) reliable centre competing</th>"
            "<th>McNemar p (a) vs (b)</th><th>McNemar p (c) vs (b)</th></tr>")
    rows = []
    for fit, e in m.get("experiments", {}).items():
        d = e["routed_minus_general_ci"]
        rows.append(
            f"<tr><td><b>{_e(fit)}</b></td><td class=n>{e['k']}</td><td class=n>"
            f"{e['n_routed']} of {e['n_test']} (top p &lt; {e['threshold']:g})</td>"
            + "".join(f"<td class=n>{_pct(e[f'{s}_accuracy'])} {_ci(e[f'{s}_ci'])}</td>"
                      for s in ("general", "routed", "baseline"))
            + f"<td class=n>[{100 * d[0]:+.2f}, {100 * d[1]:+.2f}] pts</td>"
            + (f"<td class=n>{_pct(e['routed_nearest_accuracy'])} "
               f"{_ci(e['routed_nearest_ci'])}, {e['n_routed_nearest']} routed</td>"
               if e.get("routed_nearest_ci") else "<td></td>")
            + f"<td class=n>{e['p_general_vs_routed']:.3g}</td>"
            f"<td class=n>{e['p_baseline_vs_routed']:.3g}</td></tr>")
    if rows:
        parts.append("<h3>Specialist experiments</h3><p class=muted>Test accuracy with 95% "
                     "bootstrap intervals; details in each run's "
                     "<code>experiment.json</code>.</p>"
                     f"<table>{head}{''.join(rows)}</table>")
    return "\n".join(parts)


def render_index(sections) -> str:
    """The page: a table of contents, then per run its parameters, fits and figures."""
    toc, body = [], []
    for run, job, sub, drawn in sections:
        m = run.manifest
        rid = f"run-{sub}"
        links = " \u00b7 ".join(f'<a href="#{_e(sub)}-{_e(f.name)}">{_e(f.name)}</a>'
                                for f, _ in drawn)
        toc.append(f'<li><a href="#{_e(rid)}">{_e(m.get("job"))} '
                   f'<code>{_e(m.get("run_id"))}</code></a>: {links}</li>')
        body.append(f'<section><h2 id="{_e(rid)}">Run {_e(m.get("job"))} '
                    f'<code>{_e(m.get("run_id"))}</code></h2>')
        body.append(_params_table(run, job))
        body.append("<h3>Fits</h3>" + _fits_table(run, job))
        body.append(_errorcases_html(run))
        if not drawn:
            body.append("<p class=muted>This job asks for no figures.</p>")
        for fig, pngs in drawn:
            body.append(_figure_html(sub, fig, pngs))
        body.append("</section>")
    when = time.strftime("%Y-%m-%d %H:%M:%S %z")
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        "<meta name=viewport content=\"width=device-width,initial-scale=1\">"
        f"<title>kmdask report</title><style>{CSS}</style></head><body>\n"
        "<h1>kmdask report</h1>"
        f"<p class=muted>K-Means++ on dask; figures drawn from run directories only. "
        f"Written {_e(when)}. Click a figure for full size.</p>"
        f"<nav><ul>{''.join(toc)}</ul></nav>\n" + "\n".join(body) + "\n</body></html>\n")
