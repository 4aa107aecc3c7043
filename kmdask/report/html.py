"""The report's page: ``index.html``, one static file (no script, no server, no network).

Per run: its parameters, its fits table, what extensions add (their :class:`ReportPart`
``html``), then its figures with their captions.
"""

from __future__ import annotations

import html
import time

from kmdask.batch.rundir import Run
from kmdask.batch.spec import JobSpec
from kmdask.report.style import cluster_colour

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


def esc(x) -> str:
    """``x`` as HTML text (attribute-safe)."""
    return html.escape(str(x), quote=True)


def kv_table(rows: list[tuple[str, str]]) -> str:
    """A two-column table of (name, HTML value) rows."""
    body = "".join(f"<tr><th>{esc(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<table class="kv">{body}</table>'


def num(x, fmt: str = "{:,.2f}") -> str:
    """A number formatted, or nothing for None."""
    return "" if x is None else fmt.format(x)


def pct(x: float) -> str:
    """A share as a percentage with two decimals."""
    return f"{100 * x:.2f}%"


def _data_cell(d: dict, chunk_txt: str) -> str:
    """What was clustered: the set, where it lay (a staged store or an array), its shape."""
    split = f" ({esc(d['split'])})" if d.get("split") else ""
    where = d.get("store") or d.get("array")
    notes = []
    if d.get("image_shape"):
        notes.append(f"{d['image_shape'][0]}\u00d7{d['image_shape'][1]} images")
    if d.get("dtype") and d["dtype"] != "uint8":
        notes.append(f"{esc(d['dtype'])} rows")
    if d.get("verified") is False:
        notes.append("<b>unverified</b>: no known checksums")
    if d.get("labels") is False:
        notes.append("no labels")
    return (f"{esc(d.get('dataset'))}{split}, {esc(d.get('rows'))} rows in "
            f"<code>{esc(where)}</code>, {esc(chunk_txt)}"
            + "".join(f"; {n}" for n in notes)
            + f"; data fingerprint <code>{esc(d.get('fingerprint'))}</code>")


def _params_table(run: Run, job: JobSpec) -> str:
    m = run.manifest
    d, prof, t = m.get("data", {}), m.get("profile", {}), m.get("timings", {})
    chunks = d.get("chunks") or []
    chunk_txt = f"{len(chunks)} chunk(s) of \u2264 {max(chunks)} rows" if chunks else ""
    versions = ", ".join(f"{k} {v}" for k, v in sorted(m.get("versions", {}).items()))
    rows = [
        ("job", f"<b>{esc(m.get('job'))}</b> <span class=muted>{esc(job.description)}</span>"),
        ("run id", f"<code>{esc(m.get('run_id'))}</code>"),
        ("fingerprint", f"<code>{esc(m.get('fingerprint'))}</code>"),
        ("finished", esc(m.get("finished", ""))),
        ("data", _data_cell(d, chunk_txt)),
        ("profile", f"{esc(prof.get('name'))} ({esc(prof.get('kind'))})"),
        ("timings", f"total {num(t.get('total'), '{:.1f}')} s, connect "
                    f"{num(t.get('connect'), '{:.1f}')} s"),
        ("versions", esc(versions)),
        ("run directory", f"<code>{esc(run.path)}</code>" + (
            f" \u2192 <code>{esc(run.path.resolve())}</code>" if run.path.is_symlink() else "")),
    ]
    return kv_table(rows)


def _counts_html(counts: list[int], result: dict | None = None) -> str:
    """Counts in cluster order; for a cases fit in display order (reliable first, red, as in
    its figure), each with the algorithm's cluster index."""
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
                lead = (f"<td{span}><b>{esc(name)}</b></td><td{span}>{esc(info.get('algorithm'))}"
                        f"</td><td{span} class=n>{esc(info.get('rows'))}</td><td{span} class=n>"
                        f"{esc(info.get('iterations'))} \u00d7 {esc(info.get('trials'))}</td>"
                        f"<td{span} class=n>{esc(info.get('seed'))}</td><td{span} class=n>"
                        f"{num(info.get('seconds'), '{:.1f}')}</td>")
            body.append(
                f"<tr>{lead}<td class=n>{esc(k)}</td><td class=n>{num(r.get('inertia'))}</td>"
                f"<td class=n>{esc(r.get('n_iter', ''))}</td>"
                f"<td class=n>{esc(r.get('best_trial', ''))}</td>"
                f"<td class=n>{num(r.get('nmi'), '{:.3f}')}</td>"
                f"<td class=n>{num(r.get('ari'), '{:.3f}')}</td>"
                f"<td>{_counts_html(r.get('counts', []), r)}</td></tr>")
    return f"<table>{head}{''.join(body)}</table>"


def _figure_html(sub: str, fig, desc: str, pngs) -> str:
    anchor = f"{sub}-{fig.name}"
    fits = ", ".join(fig.fits)
    parts = [f'<h3 id="{esc(anchor)}">{esc(fig.name)} <span class=muted>({esc(fig.kind)}; fits '
             f'{esc(fits)})</span></h3>']
    parts.append(f"<p>{esc(desc)}</p>")
    grid = len(pngs) > 1
    if grid:
        parts.append('<div class="grid">')
    for p in pngs:
        rel = f"{sub}/{p.path.name}"
        cap = (f"<b>{esc(p.path.name)}</b>: " if grid else "") + esc(p.caption)
        parts.append(f'<figure><a href="{esc(rel)}"><img src="{esc(rel)}" alt="{esc(p.path.stem)}"'
                     f' loading="lazy"></a><figcaption>{cap}</figcaption></figure>')
    if grid:
        parts.append("</div>")
    return "\n".join(parts)


def render_index(sections) -> str:
    """The page: a table of contents, then per run its parameters, fits and figures.

    ``sections``: per run ``(run, job, sub, drawn, extra)`` where ``sub`` is the run's folder,
    ``drawn`` its ``(figure spec, description, PNGs)`` and ``extra`` the extensions' HTML."""
    toc, body = [], []
    for run, job, sub, drawn, extra in sections:
        m = run.manifest
        rid = f"run-{sub}"
        links = " \u00b7 ".join(f'<a href="#{esc(sub)}-{esc(f.name)}">{esc(f.name)}</a>'
                                for f, _, _ in drawn)
        toc.append(f'<li><a href="#{esc(rid)}">{esc(m.get("job"))} '
                   f'<code>{esc(m.get("run_id"))}</code></a>: {links}</li>')
        body.append(f'<section><h2 id="{esc(rid)}">Run {esc(m.get("job"))} '
                    f'<code>{esc(m.get("run_id"))}</code></h2>')
        body.append(_params_table(run, job))
        body.append("<h3>Fits</h3>" + _fits_table(run, job))
        body.extend(extra)
        if not drawn:
            body.append("<p class=muted>This job asks for no figures.</p>")
        for fig, desc, pngs in drawn:
            body.append(_figure_html(sub, fig, desc, pngs))
        body.append("</section>")
    when = time.strftime("%Y-%m-%d %H:%M:%S %z")
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        "<meta name=viewport content=\"width=device-width,initial-scale=1\">"
        f"<title>kmdask report</title><style>{CSS}</style></head><body>\n"
        "<h1>kmdask report</h1>"
        f"<p class=muted>K-Means++ on dask; figures drawn from run directories only. "
        f"Written {esc(when)}. Click a figure for full size.</p>"
        f"<nav><ul>{''.join(toc)}</ul></nav>\n" + "\n".join(body) + "\n</body></html>\n")
