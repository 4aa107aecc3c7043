"""The report's page: ``index.html``, a static file (inline style and script, no server, no
network).

Per run: its parameters, its fits table (sortable; a link to each model's drill-down page,
:mod:`kmdask.report.pages`), what extensions add (their :class:`ReportPart` ``html``), then its
figures as thumbnails linking to the full PNGs, a figure with several PNGs behind a selector.
Without script everything is shown; the script only sorts and switches.
"""

from __future__ import annotations

import html
import time
from urllib.parse import quote

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
code,.kv td{overflow-wrap:anywhere}td.n{white-space:nowrap}
figure{margin:.6em 0 1.4em}figure img{max-width:100%;max-height:92vh;width:auto;height:auto;
 border:1px solid #26251f;background:#000}
figcaption{color:#a8a48f;font-size:13px;max-width:70em;margin-top:.3em}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(min(600px,100%),1fr));gap:1em}
.grid figure{margin:0}.sw{display:inline-block;width:.9em;height:.9em;margin-right:.25em;
 vertical-align:-.1em;border:1px solid #000}
nav ul{margin:.2em 0;padding-left:1.2em}
.cnt{white-space:nowrap;margin-right:.35em}td.counts{min-width:24em}.nw{white-space:nowrap}
.scroll{overflow-x:auto;max-width:100%}.scroll table{margin-top:0}caption{text-align:left;
 color:#a8a48f;padding:.2em 0}
a:focus-visible,button:focus-visible{outline:3px solid #ffb400;outline-offset:2px}
button{font:inherit;color:inherit;background:#15140f;border:1px solid #46443c;cursor:pointer}
th button{border:0;padding:0;font-weight:600;background:none;text-align:left}
th[aria-sort=ascending] button::after{content:" \\25b2"}
th[aria-sort=descending] button::after{content:" \\25bc"}
.picker{display:flex;flex-wrap:wrap;gap:.3em;margin:.4em 0}.picker button{padding:2px 10px}
.picker button[aria-pressed=true]{background:#ffb400;color:#000}
.js .pick .grid{display:block}.js .pick figure[data-off]{display:none}
img.px{image-rendering:pixelated;max-width:100%;height:auto}
td.top{color:#ffb400;font-weight:600}.pair{display:flex;flex-wrap:wrap;gap:1.5em;
 align-items:flex-start}.pair figure{margin:.3em 0;flex:0 0 auto;max-width:100%}
section.cluster{margin-bottom:2em}
"""

# Vanilla script, inline (pages open from file:// with no network): sort tables, switch figures.
JS = """document.documentElement.classList.add('js');
document.querySelectorAll('table.sortable').forEach(function(t){
 t.querySelectorAll('th button').forEach(function(b){b.addEventListener('click',function(){
  var th=b.parentNode,col=Array.prototype.indexOf.call(th.parentNode.children,th);
  var asc=th.getAttribute('aria-sort')!=='ascending',body=t.tBodies[0];
  th.parentNode.querySelectorAll('th').forEach(function(h){h.removeAttribute('aria-sort');});
  th.setAttribute('aria-sort',asc?'ascending':'descending');
  var rows=Array.prototype.slice.call(body.rows);
  function key(r){var c=r.cells[col],v=c?(c.getAttribute('data-v')||c.textContent):'';
   var n=parseFloat(v);return isNaN(n)||v===''?[1,v]:[0,n];}
  rows.sort(function(a,b){var x=key(a),y=key(b);
   var d=x[0]-y[0]||(x[1]<y[1]?-1:x[1]>y[1]?1:0);return asc?d:-d;});
  rows.forEach(function(r){body.appendChild(r);});});});});
document.querySelectorAll('.pick').forEach(function(p){
 var bar=p.querySelector('.picker'),figs=p.querySelectorAll('figure');bar.hidden=false;
 function show(i){figs.forEach(function(f,j){if(j===i){f.removeAttribute('data-off');}
  else{f.setAttribute('data-off','');}});
  bar.querySelectorAll('button').forEach(function(b,j){b.setAttribute('aria-pressed',
   j===i?'true':'false');});}
 bar.querySelectorAll('button').forEach(function(b,j){b.addEventListener('click',
  function(){show(j);});});show(0);});
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
        return " ".join(f'<span class=cnt><span class=sw style="background:'
                        f'rgb{cluster_colour(j)}"></span>{c}</span>'
                        for j, c in enumerate(counts))
    rel = result.get("reliable_cluster")
    return " ".join(
        f'<span class=cnt><span class=sw style="background:rgb{cluster_colour(pos)}"></span>'
        f'{counts[j]}<span class=muted>{"=reliable" if j == rel else f"=#{j}"}</span></span>'
        for pos, j in enumerate(order))


# the criteria's column headers (the full name shows as the header's tooltip)
SHORT = {"calinski_harabasz": "CH", "davies_bouldin": "DB", "gap_sk": "gap s_k"}


def _title(col: str) -> str:
    return f' title="{esc(col.replace("_", " "))}"' if col in SHORT else ""


def _cell(value, text: str | None = None, cls: str = "n") -> str:
    """A table cell sorted by ``value`` (``data-v``), showing ``text`` (or the value)."""
    v = "" if value is None else esc(value)
    shown = esc(value) if text is None else text
    return f'<td class={cls} data-v="{v}">{shown}</td>' if cls else f'<td data-v="{v}">{shown}</td>'


def _fits_table(run: Run, job: JobSpec, pages=None) -> str:
    """One row per model (fit, K), sortable by any column (vanilla script); the choosing-K
    criteria as columns where any model's result holds them."""
    fits = run.manifest.get("fits", {})
    named = [f.name for f in job.fits]
    order = [n for n in named if n in fits] + [n for n in fits if n not in named]
    results = {} if pages is None else pages.results
    models = [(name, int(k), {**fits[name]["results"][k], **results.get((name, int(k)), {})})
              for name in order for k in sorted(fits[name].get("results", {}), key=int)]
    # older runs have no criteria: the columns appear only for names some model holds
    crit = sorted({c for _, _, r in models for c, v in (r.get("criteria") or {}).items()
                   if isinstance(v, int | float)})
    cols = (["fit", "algorithm", "rows", "iterations \u00d7 trials", "seed", "seconds", "K",
             "WCSS", "iterations run", "best trial", "NMI", "ARI"] + crit
            + ["counts (cluster order)", "clusters"])
    head = "".join(f"<th scope=col{_title(c)}><button type=button>{esc(SHORT.get(c, c))}"
                   "</button></th>" for c in cols)
    body = []
    for name, k, r in models:
        info = fits[name]
        link = ""
        if pages is not None and (name, k) in pages.models:
            link = f'<a href="{esc(pages.models[(name, k)])}">{esc(name)} K={k}</a>'
        cv = r.get("criteria") or {}
        body.append(
            "<tr>" + _cell(name, f"<b>{esc(name)}</b>", "")
            + _cell(info.get("algorithm"), cls="")
            + _cell(info.get("rows"))
            + _cell(info.get("iterations"), f"{esc(info.get('iterations'))} \u00d7 "
                                            f"{esc(info.get('trials'))}")
            + _cell(info.get("seed")) + _cell(info.get("seconds"),
                                              num(info.get("seconds"), "{:.1f}"))
            + _cell(k) + _cell(r.get("inertia"), num(r.get("inertia")))
            + _cell(r.get("n_iter")) + _cell(r.get("best_trial"))
            + _cell(r.get("nmi"), num(r.get("nmi"), "{:.3f}"))
            + _cell(r.get("ari"), num(r.get("ari"), "{:.3f}"))
            + "".join(_cell(cv.get(c), num(cv.get(c), "{:.4g}")) for c in crit)
            + f"<td class=counts>{_counts_html(r.get('counts', []), r)}</td>"
            + f"<td class=nw>{link}</td></tr>")
    return (f'<div class=scroll><table class=sortable><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>")


def _label(fig, stem: str) -> str:
    """A selector button's label: what distinguishes this PNG of the figure (K = 3, a fit)."""
    rest = stem[len(fig.name):].lstrip("_") if stem.startswith(fig.name) else stem
    return f"K = {rest}" if rest.isdigit() else (rest or stem)


def _figure_html(sub: str, fig, desc: str, pngs, thumbs: dict[str, str] | None = None) -> str:
    anchor = f"{sub}-{fig.name}"
    fits = ", ".join(fig.fits)
    parts = [f'<h3 id="{esc(anchor)}">{esc(fig.name)} <span class=muted>({esc(fig.kind)}; fits '
             f'{esc(fits)})</span></h3>']
    parts.append(f"<p>{esc(desc)}</p>")
    grid = len(pngs) > 1
    if grid:
        # every PNG stays in the page (visible without script); the script shows one at a time
        buttons = "".join(f"<button type=button aria-pressed=false>{esc(_label(fig, p.path.stem))}"
                          "</button>" for p in pngs)
        parts.append(f'<div class=pick><div class=picker role=group aria-label="'
                     f'{esc(fig.name)}: choose which to show" hidden>{buttons}</div>'
                     '<div class="grid">')
    for p in pngs:
        rel = f"{quote(sub)}/{quote(p.path.name)}"
        src = (thumbs or {}).get(p.path.name, rel)
        cap = (f"<b>{esc(p.path.name)}</b>: " if grid else "") + esc(p.caption)
        alt = f"{fig.name} ({fig.kind}) figure {p.path.stem}: {p.caption}"
        parts.append(f'<figure><a href="{esc(rel)}"><img src="{esc(src)}" alt="{esc(alt)}"'
                     f' loading="lazy"></a><figcaption>{cap}</figcaption></figure>')
    if grid:
        parts.append("</div></div>")
    return "\n".join(parts)


def render_index(sections, pages: dict | None = None) -> str:
    """The page: a table of contents, then per run its parameters, fits and figures.

    Parameters
    ----------
    sections : list
        Per run ``(run, job, sub, drawn, extra)`` where ``sub`` is the run's folder, ``drawn``
        its ``(figure spec, description, PNGs)`` and ``extra`` the extensions' HTML.
    pages : dict, optional
        ``sub -> RunPages`` (:mod:`kmdask.report.pages`): thumbnails, drill-down pages and
        results read from the models' files; without it figures are shown full size.

    Returns
    -------
    str
        The HTML of ``index.html``.
    """
    pages = pages or {}
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
        rp = pages.get(sub)
        body.append(f'<h3 id="{esc(sub)}-fits">Fits</h3>' + _fits_table(run, job, rp))
        # extensions' sections hold wide tables: they scroll in their own box, not the page
        body.extend(f"<div class=scroll>{x}</div>" for x in extra if x)
        if not drawn:
            body.append("<p class=muted>This job asks for no figures.</p>")
        for fig, desc, pngs in drawn:
            body.append(_figure_html(sub, fig, desc, pngs, rp.thumbs if rp else None))
        body.append("</section>")
    when = time.strftime("%Y-%m-%d %H:%M:%S %z")
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        "<meta name=viewport content=\"width=device-width,initial-scale=1\">"
        f"<title>kmdask report</title><style>{CSS}</style></head><body>\n"
        "<h1>kmdask report</h1>"
        f"<p class=muted>K-Means++ on dask; figures drawn from run directories only. "
        f"Written {esc(when)}. Click a figure for full size, a model in a fits table for its "
        f"clusters.</p><nav><ul>{''.join(toc)}</ul></nav>\n" + "\n".join(body)
        + f"\n<script>{JS}</script></body></html>\n")
