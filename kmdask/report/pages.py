"""The report's drill-down pages and thumbnails: what the index links to besides full figures.

Per run folder ``out/<sub>/``::

    thumbs/<figure>.png            each figure downscaled to at most :data:`THUMB_WIDTH` px wide
    models/<fit>-k<K>.html         one page per fitted model (fit, K): its clusters
    models/<fit>-k<K>-c<j>.png     cluster j's kept members (``members.npy``), one sprite
    models/<fit>-k<K>-m<j>.png     cluster j's mean image (its centre, or its members' mean)

Images are composed with numpy and written by PIL (no matplotlib figure per image), thumbnails
are a box-filter reduction of the PNG already drawn (never a redraw), so the pages cost a
fraction of the figures. Every write failure is a one-line :class:`~kmdask.errors.KmdaskError`
naming the file; the caller writes all of this under its temporary directory.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import numpy as np
from PIL import Image

from kmdask.batch.rundir import Run, fit_dir
from kmdask.errors import DataError, KmdaskError
from kmdask.report.style import tinted

THUMB_WIDTH = 1600  # px; the index shows figures at most 1500 CSS px wide
# Member and mean images are written at their own size and enlarged by the browser
# (image-rendering: pixelated): a ninth of the pixels to encode, the same sight on screen.
MEMBER_SCALE = 3  # 28 px images shown 84 px: readable, and 105 of them fit a screen
MEMBERS_PER_ROW = 10
MEAN_SCALE = 6
TILE_GAP = 1  # image px between tiles (3 px on screen)


@dataclass
class RunPages:
    """What the pages module wrote for one run, for the index to link to.

    Attributes
    ----------
    sub : str
        The run's folder under the report.
    results : dict
        ``(fit, K) -> result`` as read from each model's ``result.json`` (over the manifest's).
    thumbs : dict
        Figure PNG name -> its thumbnail's path relative to the report.
    models : dict
        ``(fit, K) -> `` its drill-down page's path relative to the report.
    """

    sub: str
    results: dict[tuple[str, int], dict]
    thumbs: dict[str, str] = field(default_factory=dict)
    models: dict[tuple[str, int], str] = field(default_factory=dict)


@contextlib.contextmanager
def writing(path: Path, shown: Path | None = None) -> Iterator[None]:
    """Turn an OSError while writing ``path`` into a one-line KmdaskError naming ``shown``
    (the file's final place, when ``path`` is under a temporary directory)."""
    try:
        yield
    except OSError as exc:
        raise KmdaskError(f"{shown or path}: cannot write the report file "
                          f"({exc.strerror or exc})") from None


def run_results(run: Run) -> dict[tuple[str, int], dict]:
    """Every model's result: the manifest's, updated from its ``result.json`` (which can hold
    what the manifest does not, e.g. ``criteria``). A missing or unreadable file is a one-line
    DataError naming it."""
    out: dict[tuple[str, int], dict] = {}
    for fit, info in run.manifest.get("fits", {}).items():
        for k, res in info.get("results", {}).items():
            path = fit_dir(run.path, fit, int(k)) / "result.json"
            try:
                parsed = json.loads(path.read_text(encoding="utf-8"))
            except FileNotFoundError:
                raise DataError(f"{path}: missing from the run directory (incomplete run?)"
                                ) from None
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                why = getattr(exc, "msg", None) or getattr(exc, "strerror", None) or exc
                raise DataError(f"{path}: unreadable ({why}; truncated or damaged run?)"
                                ) from None
            if not isinstance(parsed, dict):
                raise DataError(f"{path}: not a JSON object (damaged run?)")
            out[(fit, int(k))] = {**res, **parsed}
    return out


def _save(arr: np.ndarray, path: Path, shown: Path | None = None) -> None:
    with writing(path, shown):
        # zlib level 3: a fraction of the default's time, files barely larger
        Image.fromarray(arr).save(path, format="PNG", compress_level=3)


def _save_all(images: list[tuple[np.ndarray, Path, Path]]) -> None:
    """Write (array, path, final path) PNGs on a few threads."""
    with _pool(len(images)) as ex:
        for f in [ex.submit(_save, a, p, s) for a, p, s in images]:
            f.result()


def _thumb(src: Path, dst: Path, width: int, shown: Path | None) -> bool:
    """Write ``src`` reduced by the smallest integer factor that makes it ``width`` px wide or
    less (a box filter: fast, and sharp enough for text); False, writing nothing, when it
    already is."""
    with Image.open(src) as im:
        factor = math.ceil(im.width / width)
        if factor <= 1:
            return False
        small = im.reduce(factor)
    with writing(dst, shown):
        small.save(dst, format="PNG", compress_level=1)
    return True


def write_thumbnails(pngs: list[Path], out_dir: Path, final_dir: Path | None = None,
                     width: int = THUMB_WIDTH) -> dict[str, Path]:
    """Write a copy of each PNG at most ``width`` px wide into ``out_dir`` (same names).

    Parameters
    ----------
    pngs : list of Path
        The figures drawn.
    out_dir : Path
        Where the thumbnails go (created).
    final_dir : Path, optional
        Where ``out_dir`` will end up, for error messages.
    width : int
        The largest width written; a narrower figure is copied as it is.

    Returns
    -------
    dict
        PNG name -> its thumbnail's path, for the PNGs wider than ``width`` (a narrower one is
        its own thumbnail).
    """
    with writing(out_dir, final_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
    jobs = {p.name: out_dir / p.name for p in pngs}
    with _pool(len(pngs)) as ex:
        futures = {p.name: ex.submit(_thumb, p, jobs[p.name], width,
                                     None if final_dir is None else final_dir / p.name)
                   for p in pngs}
        return {n: jobs[n] for n, f in futures.items() if f.result()}


def _pool(n: int) -> ThreadPoolExecutor:
    # PIL releases the GIL while decoding, reducing and encoding: threads overlap the images
    return ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1, n)))


# figure kinds that draw one PNG per model; the others (elbow, timing, ...) span many models
PER_MODEL_KINDS = frozenset({"clusters", "cases", "case_confusion"})


def related_pngs(drawn: list, fit: str, k: int, n_ks: int) -> list[tuple[object, object]]:
    """The figures' PNGs that show model (``fit``, ``k``): ``(figure spec, Drawn)`` pairs.

    The per-model kinds name a PNG ``<figure>`` or ``<figure>_<fit>`` (``n_ks``, the fit's
    number of K, is 1) and ``<figure><K>`` or ``<figure>_<fit><K>`` otherwise."""
    out = []
    for fig, _desc, pngs in drawn:
        if fit not in fig.fits or fig.kind not in PER_MODEL_KINDS:
            continue
        n = fig.name
        names = {f"{n}{k}", f"{n}_{fit}{k}"} | ({n, f"{n}_{fit}"} if n_ks == 1 else set())
        out += [(fig, p) for p in pngs if p.path.stem in names]
    return out


def model_href(sub: str, fit: str, k: int) -> str:
    """The drill-down page of (``fit``, ``k``) relative to the report (URL-quoted)."""
    return f"{quote(sub)}/models/{quote(fit)}-k{k}.html"


def _sprite(images: np.ndarray, shape: tuple[int, int], divisor: float) -> np.ndarray:
    """(n, d) rows -> one RGB canvas of tiles, MEMBERS_PER_ROW per row, in row order."""
    h, w = shape
    n = images.shape[0]
    cols = min(MEMBERS_PER_ROW, max(n, 1))
    rows = max(math.ceil(n / cols), 1)
    th, tw = h, w
    canvas = np.zeros((rows * (th + TILE_GAP) - TILE_GAP, cols * (tw + TILE_GAP) - TILE_GAP, 3),
                      np.uint8)
    if n == 0:
        return canvas
    v = images.reshape(n, h, w).astype(np.float32)
    if images.dtype == np.uint8:
        v /= np.float32(divisor)
    rgb = tinted(v)  # (n, h, w, 3)
    for i in range(n):
        r, c = divmod(i, cols)
        y, x = r * (th + TILE_GAP), c * (tw + TILE_GAP)
        canvas[y:y + th, x:x + tw] = rgb[i]
    return canvas


@dataclass
class _Cluster:
    j: int
    count: int
    kept: int
    nearest: int | None
    distance: float | None
    by_class: np.ndarray | None
    mean_note: str
    vector: str
    sprite: tuple[int, int] = (0, 0)  # (height, width) in image px


def _clusters(run: Run, fit: str, k: int, result: dict, shape, stage: Path, final: Path,
              stem: str) -> list[_Cluster]:
    """Write each cluster's sprite and mean image; return what the page says about it."""
    model = run.model(fit, k)
    centers = model.centers
    members, idx = model.members, model.members_idx
    d = centers.shape[1]
    dist = np.sqrt(((centers[:, None, :] - centers[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(dist, np.inf)
    comp = None
    if run.has_labels:
        labels = run.fit_labels(fit, k)
        truth = run.truth(labels.shape[0]).astype(np.int64)
        names = run.manifest.get("data", {}).get("class_names") or []
        nc = max(int(truth.max(initial=0)) + 1, len(names), 1)
        comp = np.bincount(labels.astype(np.int64) * nc + truth,
                           minlength=k * nc).reshape(k, nc)
    counts = result.get("counts") or [int((model.labels == j).sum()) for j in range(k)]
    out, todo = [], []
    for j in range(k):
        kept = members[j][idx[j] >= 0]
        note, vector, size = "", "", (0, 0)
        if shape is not None:
            sprite = _sprite(kept, shape, run.divisor)
            size = sprite.shape[:2]
            todo.append((sprite, stage / f"{stem}-c{j}.png", final / f"{stem}-c{j}.png"))
            if d == shape[0] * shape[1]:
                mean = centers[j].reshape(shape)
                note = "the cluster's centre"
            else:
                # clusters of other vectors (e.g. error cases): their members' mean image
                mean = (kept.reshape(-1, *shape).astype(np.float64).mean(0) / run.divisor
                        if kept.shape[0] else np.zeros(shape))
                note = f"the mean of its {kept.shape[0]} kept members' images"
                top = np.argsort(centers[j])[::-1][:3]
                vector = ", ".join(f"{run.class_name(int(i)) if d <= 100 else int(i)}: "
                                   f"{centers[j][i]:.3g}" for i in top)
            todo.append((tinted(mean), stage / f"{stem}-m{j}.png", final / f"{stem}-m{j}.png"))
        n = int(np.argmin(dist[j])) if k > 1 else None
        out.append(_Cluster(j, int(counts[j]), int(kept.shape[0]), n,
                            None if n is None else float(dist[j, n]),
                            None if comp is None else comp[j], note, vector, size))
    _save_all(todo)
    return out


def _class_table(run: Run, cl: list[_Cluster], order: list[int]) -> str:
    from kmdask.report.html import esc

    if cl[0].by_class is None:
        return "<p class=muted>The clustered rows came without true classes.</p>"
    nc = cl[0].by_class.shape[0]
    head = ("<tr><th scope=col>cluster</th>"
            + "".join(f"<th scope=col>{esc(run.class_name(c))}</th>" for c in range(nc))
            + "<th scope=col>total</th></tr>")
    rows = []
    for j in order:
        c = cl[j].by_class
        top = int(np.argmax(c))
        cells = "".join(f'<td class="n{" top" if i == top and v else ""}">{v}</td>'
                        for i, v in enumerate(c.tolist()))
        rows.append(f'<tr><th scope=row><a href="#c{j}">cluster {j}</a></th>{cells}'
                    f"<td class=n>{int(c.sum())}</td></tr>")
    return (f'<div class=scroll><table class=classes><caption>Rows of each cluster by true '
            f'{esc(run.class_noun)}</caption>{head}{"".join(rows)}</table></div>')


def model_page(run: Run, job, sub: str, fit: str, k: int, result: dict, drawn: list,
               thumbs: dict[str, str], stage_sub: Path, final_sub: Path) -> str:
    """Write the images of model (``fit``, ``k``) and return its page's HTML.

    Parameters
    ----------
    run, job
        The run and its job spec.
    sub : str
        The run's folder in the report.
    fit, k
        The model.
    result : dict
        Its result (:func:`run_results`).
    drawn : list
        The run's ``(figure spec, description, PNGs)``.
    thumbs : dict
        PNG name -> thumbnail path relative to the report.
    stage_sub, final_sub : Path
        The run's folder being written, and where it will end up (for error messages).
    """
    from kmdask.report.html import CSS, JS, esc, num

    stage, final = stage_sub / "models", final_sub / "models"
    with writing(stage, final):
        stage.mkdir(exist_ok=True)
    stem = f"{fit}-k{k}"
    shape = run.image_shape
    cl = _clusters(run, fit, k, result, shape, stage, final, stem)
    info = run.fit_info(fit)
    order = [int(j) for j in (result.get("display_order") or range(k))]
    reliable = result.get("reliable_cluster")
    qstem = quote(stem)
    m = run.manifest
    crit = result.get("criteria") or {}
    facts = [("run", f'<a href="../../index.html#run-{esc(sub)}">{esc(m.get("job"))} '
                     f'<code>{esc(m.get("run_id"))}</code></a>'),
             ("fit", f"<b>{esc(fit)}</b> ({esc(info.get('algorithm'))}, {esc(info.get('rows'))}"
                     f" rows, {esc(info.get('iterations'))} iterations \u00d7 "
                     f"{esc(info.get('trials'))} trials, seed {esc(info.get('seed'))})"),
             ("K", str(k)), ("WCSS", num(result.get("inertia"))),
             ("NMI / ARI", f"{num(result.get('nmi'), '{:.3f}')} / "
                           f"{num(result.get('ari'), '{:.3f}')}")]
    facts += [(name, num(v, "{:.4g}")) for name, v in sorted(crit.items())
              if isinstance(v, int | float)]
    from kmdask.report.html import kv_table

    parts = [f"<h1>{esc(fit)}, K = {k}</h1>",
             f'<p><a href="../../index.html#run-{esc(sub)}">\u2190 back to the report</a></p>',
             kv_table(facts)]
    rel = related_pngs(drawn, fit, k, len(run.ks(fit)))
    if rel:
        parts.append("<h2 id=figures>Figures of this model</h2><div class=grid>")
        for fig, p in rel:
            full = f"../{quote(p.path.name)}"
            th = "../../" + thumbs[p.path.name] if p.path.name in thumbs else full
            parts.append(f'<figure><a href="{esc(full)}"><img src="{esc(th)}" alt="'
                         f'{esc(fig.name)} ({esc(fig.kind)}) figure of {esc(fit)}, K = {k}">'
                         f"</a><figcaption><b>{esc(p.path.name)}</b>: {esc(p.caption)}"
                         "</figcaption></figure>")
        parts.append("</div>")
    summary = []
    for j in order:
        c = cl[j]
        most = ""
        if c.by_class is not None and c.by_class.sum():
            top = int(np.argmax(c.by_class))
            most = f"{esc(run.class_name(top))} ({c.by_class[top] / c.by_class.sum():.0%})"
        near = ("" if c.nearest is None else
                f'<a href="#c{c.nearest}">cluster {c.nearest}</a> ({c.distance:.3g})')
        tag = " <span class=muted>(reliable)</span>" if j == reliable else ""
        summary.append(f'<tr><th scope=row><a href="#c{j}">cluster {j}</a>{tag}</th>'
                       f"<td class=n>{c.count}</td><td class=n>{c.kept}</td><td>{most}</td>"
                       f"<td>{near}</td></tr>")
    parts.append("<h2 id=clusters>Clusters</h2><div class=scroll><table><tr><th scope=col>"
                 "cluster</th><th scope=col>rows</th><th scope=col>members shown</th>"
                 "<th scope=col>mostly</th><th scope=col>nearest other cluster (centre "
                 f"distance)</th></tr>{''.join(summary)}</table></div>")
    parts.append(_class_table(run, cl, order))
    conf = [p for fig, p in rel if fig.kind == "case_confusion"]
    for j in order:
        c = cl[j]
        parts.append(f'<section class=cluster><h3 id="c{j}">cluster {j}'
                     + (" (reliable)" if j == reliable else "") + f": {c.count} rows</h3>")
        if c.nearest is not None:
            parts.append(f'<p>Nearest other cluster: <a href="#c{c.nearest}">cluster '
                         f"{c.nearest}</a> (centre distance {c.distance:.3g}).</p>")
        if c.vector:
            parts.append(f"<p>Centre's largest components: {esc(c.vector)}.</p>")
        for p in conf:
            parts.append(f'<p>Its confusion panel: "cluster {j}" in <a href="../'
                         f'{esc(quote(p.path.name))}">{esc(p.path.name)}</a>.</p>')
        if shape is not None:
            parts.append(
                f'<div class=pair><figure><img class=px src="{qstem}-m{j}.png" width='
                f'{shape[1] * MEAN_SCALE} height={shape[0] * MEAN_SCALE} style="width:'
                f'{shape[1] * MEAN_SCALE}px" alt="mean image of '
                f'cluster {j} ({esc(c.mean_note)})"><figcaption>Mean: {esc(c.mean_note)}.'
                f'</figcaption></figure><figure><img class=px src="{qstem}-c{j}.png" width='
                f'{c.sprite[1] * MEMBER_SCALE} height={c.sprite[0] * MEMBER_SCALE} style="width:'
                f'{c.sprite[1] * MEMBER_SCALE}px" alt="the first '
                f'{c.kept} members of cluster {j}, in row order" loading=lazy>'
                f"<figcaption>Its first {c.kept} members in row order (of {c.count}).</figcaption>"
                "</figure></div>")
        parts.append("</section>")
    return page(f"{fit}, K = {k} \u2014 kmdask report", "\n".join(parts), CSS, JS)


def page(title: str, body: str, css: str, js: str = "") -> str:
    """A complete static HTML page (inline style and script; nothing fetched)."""
    from kmdask.report.html import esc

    script = f"<script>{js}</script>" if js else ""
    return ("<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
            "<meta name=viewport content=\"width=device-width,initial-scale=1\">"
            f"<title>{esc(title)}</title><style>{css}</style></head><body>\n{body}\n"
            f"{script}</body></html>\n")


def write_model_pages(run: Run, job, sub: str, pages: RunPages, drawn: list, stage_sub: Path,
                      final_sub: Path) -> None:
    """Write every model's drill-down page (and its images) of one run into ``stage_sub``,
    recording each page's path in ``pages.models``."""
    for (fit, k), result in pages.results.items():
        html_text = model_page(run, job, sub, fit, k, result, drawn, pages.thumbs, stage_sub,
                               final_sub)
        path = stage_sub / "models" / f"{fit}-k{k}.html"
        with writing(path, final_sub / "models" / path.name):
            path.write_text(html_text, encoding="utf-8")
        pages.models[(fit, k)] = model_href(sub, fit, k)
