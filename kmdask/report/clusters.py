"""The original's figure: per cluster its count, mean image and sample images (figure kind
``clusters``); matplotlib's Agg canvas only.

The figure is composed as one pixel-exact RGB canvas (every 28x28 image scaled by an integer
factor, nearest neighbour, placed 1:1 in the PNG) with matplotlib drawing only the text on
top. The charts (:mod:`kmdask.report.charts`) are matplotlib axes in a dark theme matching it
(:mod:`kmdask.report.style`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kmdask.batch.rundir import Run
from kmdask.batch.spec import FigureSpec
from kmdask.errors import DataError
from kmdask.report.kinds import FigureKind
from kmdask.report.style import (
    BOX_H,
    BOX_W,
    COL_GAP,
    DATASET_TITLES,
    GAP,
    GUTTER,
    HEADER_PX,
    LINE,
    MARGIN,
    PANEL_GAP,
    PER_ROW,
    SEPARATOR,
    TITLE_PX,
    Drawn,
    MeanTile,
    Tiles,
    algorithm_title,
    canvas_figure,
    cluster_colour,
    composition,
    mean_image_rgb,
    pt,
    sample_image_rgb,
    save_canvas,
    text_width,
    upscale,
)

# =============================================================================================
# clusters: the original's per-run figure


@dataclass
class _Panel:
    fit: str
    k: int
    info: dict
    result: dict
    centers: np.ndarray
    samples: list[np.ndarray]  # per cluster: (n, 784) uint8
    majority: list[tuple[int, float]] | None  # per cluster: (class, share) of its true classes
    shown: str


def _panel(run: Run, fig: FigureSpec, fit: str, k: int) -> _Panel:
    info = run.fit_info(fit)
    model = run.model(fit, k)
    centers = model.centers
    if centers.shape[0] != k:
        raise DataError(f"{model.path / 'centers.npy'}: {centers.shape[0]} centres for K={k}")
    labels = run.fit_labels(fit, k)
    majority = None
    if run.has_labels:
        comp = composition(labels, run.truth(labels.shape[0]), k)
        majority = [(int(np.argmax(c)), float(c.max() / max(c.sum(), 1))) for c in comp]
    cap = fig.per_cluster
    if fig.samples is not None:
        head = run.head_images
        n = min(fig.samples, head.shape[0], labels.shape[0])
        samples = [head[:n][labels[:n] == j][:cap] for j in range(k)]
        shown = f"Shown = first {n} rows, \u2264 {cap} per cluster"
    else:
        members, idx = model.members, model.members_idx
        samples = [members[j][idx[j] >= 0][:cap] for j in range(k)]
        shown = f"Shown = first {min(cap, members.shape[1])} members per cluster"
    return _Panel(fit, k, info, model.result, centers, samples, majority, shown)


def _header_groups(p: _Panel, threshold: float | None) -> list[list[str]]:
    """The header: the original's lines (K, samples, iterations, trials), then ours."""
    r, i = p.result, p.info
    groups = [[f"K = {p.k}", f"Samples = {i['rows']}", f"Iterations = {i['iterations']}",
               f"Trials = {i['trials']}"],
              [f"WCSS = {r['inertia']:,.2f}", f"Seed = {i['seed']}"]]
    if r.get("best_trial") is not None:
        groups[1].append(f"Best trial = {r['best_trial']} ({r['n_iter']} iterations)")
    groups.append([p.shown] + ([] if threshold is None else
                               [f"Mean pixels > {threshold:g} only"]))
    return groups


def _pack_header(groups: list[list[str]], width: float) -> tuple[list[tuple[int, int, str]], int]:
    """Place line groups left to right, wrapping when the panel is too narrow.

    Returns (dx, dy, text) per line and the header's height in pixels."""
    placed, x, y, row_h = [], 0, 0, 0
    for g in groups:
        w = max(text_width(t, HEADER_PX) for t in g)
        if x and x + w > width:
            x, y, row_h = 0, y + row_h, 0
        placed += [(x, y + li * LINE, t) for li, t in enumerate(g)]
        x += int(w) + 110
        row_h = max(row_h, len(g) * LINE)
    return placed, y + row_h


def clusters_png(run: Run, fig: FigureSpec, fits: list[str], k: int, path: Path) -> Drawn:
    """One clusters PNG: a panel per fit (all at this K), side by side."""
    panels = [_panel(run, fig, f, k) for f in fits]
    multi = len(panels) > 1
    shape = run.image_shape
    if shape is None:
        raise DataError(f"{run.path}: figure {fig.name!r} draws images, and the clustered rows "
                        "are not (give the job data.image_shape: [height, width])")
    tiles = Tiles(shape)
    col_w = tiles.column
    sample_h, sample_w = tiles.sample_px
    mean_h, mean_w = tiles.mean_px
    panel_w = k * col_w + (k - 1) * COL_GAP
    headers = [_pack_header(_header_groups(p, fig.threshold), panel_w) for p in panels]
    sub_h = LINE + 16 if multi else 0
    max_rows = max((math.ceil(s.shape[0] / PER_ROW) for p in panels for s in p.samples),
                   default=0)

    y_title = MARGIN
    y_header = y_title + 130
    y_box = y_header + sub_h + max(h for _, h in headers) + 50
    y_mean = y_box + BOX_H + 50
    y_samples = y_mean + mean_h + 60
    height = y_samples + max(max_rows, 1) * (sample_h + GAP) - GAP + MARGIN
    algs = {p.info["algorithm"] for p in panels}
    title = fig.title or (algorithm_title(algs.pop(), run.manifest["data"]["dataset"])
                          if len(algs) == 1 else "K-Means++ on " + DATASET_TITLES.get(
                              run.manifest["data"]["dataset"], run.manifest["data"]["dataset"]))
    width = MARGIN + GUTTER + len(panels) * panel_w + (len(panels) - 1) * PANEL_GAP + MARGIN
    width = max(width, int(text_width(title, TITLE_PX, bold=True)) + 2 * MARGIN)

    canvas = np.zeros((height, width, 3), np.uint8)
    texts: list[tuple[float, float, str, dict]] = []
    means: list[MeanTile] = []
    for pi, (p, (lines, _)) in enumerate(zip(panels, headers, strict=True)):
        x0 = MARGIN + GUTTER + pi * (panel_w + PANEL_GAP)
        if pi:
            xs = x0 - PANEL_GAP // 2
            canvas[y_header:height - MARGIN, xs - 1:xs + 1] = SEPARATOR
        if multi:
            texts.append((x0, y_header, p.fit, dict(fontsize=pt(HEADER_PX), weight="bold",
                                                    color=(1.0, 1.0, 1.0))))
        for dx, dy, line in lines:
            texts.append((x0 + dx, y_header + sub_h + dy, line, dict(fontsize=pt(HEADER_PX))))
        for j in range(p.k):
            xc = x0 + j * (col_w + COL_GAP)
            colour = cluster_colour(j)
            canvas[y_box:y_box + BOX_H, xc:xc + BOX_W] = colour
            lum = (0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]) / 255
            texts.append((xc + BOX_W / 2, y_box + BOX_H / 2 + 2,
                          str(int(p.result["counts"][j])),
                          dict(fontsize=pt(62), weight="bold", ha="center", va="center",
                               color="black" if lum > 0.5 else "white")))
            texts.append((xc + BOX_W + 18, y_box + 8, f"cluster {j}",
                          dict(fontsize=pt(44))))
            if p.majority is not None:
                c, share = p.majority[j]
                texts.append((xc + BOX_W + 18, y_box + 66,
                              f"mostly {run.class_name(c)} ({share:.0%})",
                              dict(fontsize=pt(36), color=(0.68, 0.66, 0.57))))
            rgb = mean_image_rgb(p.centers[j], fig.threshold, shape)
            xm = xc + (col_w - mean_w) // 2
            canvas[y_mean:y_mean + mean_h, xm:xm + mean_w] = upscale(rgb, tiles.mean_scale)
            means.append(MeanTile(p.fit, p.k, j, y_mean, xm, tiles.mean_scale, rgb))
            for si, img in enumerate(p.samples[j]):
                r, c = divmod(si, PER_ROW)
                ys = y_samples + r * (sample_h + GAP)
                xs = xc + c * (sample_w + GAP)
                canvas[ys:ys + sample_h, xs:xs + sample_w] = upscale(
                    sample_image_rgb(img, shape, run.divisor), tiles.sample_scale)

    texts.append((MARGIN, y_title, title, dict(fontsize=pt(TITLE_PX), weight="bold")))
    for y, label, va in ((y_box + BOX_H / 2, "Cluster\ncount", "center"),
                         (y_mean + mean_h / 2, "Cluster\nmean", "center"),
                         (y_samples, "Cluster\nsamples", "top")):
        texts.append((MARGIN, y, label, dict(fontsize=pt(48), va=va, linespacing=1.15)))

    save_canvas(canvas, canvas_figure(canvas), texts, path)

    settings = ", ".join(f"{p.info['iterations']}/{p.info['trials']}" for p in panels)
    caption = (f"K = {k}, {panels[0].info['rows']} rows, iterations/trials {settings}; "
               f"{panels[0].shown[len('Shown = '):]}.")
    return Drawn(path, caption, canvas, means)


def draw_clusters(run: Run, fig: FigureSpec, out: Path) -> list[Drawn]:
    """The original's figure: one PNG, or one per K (``<name><K>.png``) for multi-K fits."""
    ks = sorted({k for f in fig.fits for k in run.ks(f)})
    if len(ks) == 1:
        return [clusters_png(run, fig, list(fig.fits), ks[0], out / f"{fig.name}.png")]
    return [clusters_png(run, fig, [f for f in fig.fits if k in run.ks(f)], k,
                         out / f"{fig.name}{k}.png") for k in ks]


def describe_clusters(fig: FigureSpec) -> str:
    """The page's paragraph for a clusters figure, saying what its samples are."""
    extra = []
    if fig.samples is not None:
        extra.append(f"samples: the first {fig.samples} data rows placed into their clusters in "
                     f"row order, at most {fig.per_cluster} per cluster")
    else:
        extra.append(f"samples: each cluster's first {fig.per_cluster} members")
    if fig.threshold is not None:
        extra.append(f"mean images show only pixels above {fig.threshold:g}")
    return ("One column per cluster, in the order its centre was drawn: the cluster's size in a "
            "box of its colour, its mean image (full grey levels, orange tint), and sample images "
            "of its members, five per row. " + "; ".join(extra).capitalize() + ".")


KIND = FigureKind("clusters", draw_clusters, describe_clusters)
