"""The figure suite, one function per figure kind; matplotlib's Agg canvas only (no pyplot).

Each ``draw_<kind>(run, fig, out_dir) -> list[Drawn]`` reads one complete run directory
(:class:`kmdask.rundir.Run`) and writes PNG(s) into ``out_dir``. The clusters figure is composed
as one pixel-exact RGB canvas (every 28x28 image scaled by an integer factor, nearest neighbour,
placed 1:1 in the PNG) with matplotlib drawing only the text on top; the charts are ordinary
matplotlib axes in a dark theme matching it.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # harmless when already set; the report never opens a window

import numpy as np  # noqa: E402
from matplotlib import patches, ticker, transforms  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from kmdask.config import FigureSpec  # noqa: E402
from kmdask.errors import DataError  # noqa: E402
from kmdask.rundir import Run  # noqa: E402

# -- the original's look ----------------------------------------------------------------------
PALETTE = [(255, 0, 0), (128, 192, 0), (64, 0, 255), (161, 195, 255), (0, 255, 0),
           (255, 0, 255), (75, 0, 130), (0, 128, 128), (128, 128, 0), (255, 255, 0)]
TEXT = (205, 199, 168)
TINT = np.array([255.0, 180.0, 0.0])  # a pixel of grey level v is drawn as (255v, 180v, 0)
SIDE = 28  # MNIST images are 28 x 28

DPI = 128  # a power of two: figure sizes in inches are exact, so the canvas lands 1:1 in the PNG
SAMPLE_SCALE = 4  # screen pixels per image pixel for the sample images
MEAN_SCALE = 16  # ... and for the mean images
PER_ROW = 5  # sample images per row in a cluster's column
GAP = 6  # between sample images
COL_GAP = 56  # between cluster columns
PANEL_GAP = 140  # between the panels of a multi-fit figure
MARGIN = 60
GUTTER = 300  # left column holding the row labels
BOX_W, BOX_H = 45 * 6, 20 * 6  # the count box: the original's 45 x 20, scaled
TITLE_PX = 84  # text heights (px)
HEADER_PX = 54
LINE = 68  # header line height (px)
SEPARATOR = (70, 68, 60)

# -- charts ------------------------------------------------------------------------------------
CHART_DPI = 150
FIT_COLOURS = ["#ffb400", "#3fc1ff", "#ff5c8a", "#9be564", "#c792ea", "#ff8c42", "#6be3d1",
               "#f4f1bb", "#e06cff", "#b0b0b0"]


def _hex(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


TEXT_HEX = _hex(TEXT)
DARK = {
    "figure.facecolor": "#000000", "savefig.facecolor": "#000000",
    "axes.facecolor": "#0b0b0b", "axes.edgecolor": "#6d6a5c", "axes.labelcolor": TEXT_HEX,
    "axes.titlecolor": TEXT_HEX, "axes.grid": True, "grid.color": "#2c2b27",
    "grid.linewidth": 0.8, "xtick.color": TEXT_HEX, "ytick.color": TEXT_HEX,
    "text.color": TEXT_HEX, "legend.facecolor": "#111111", "legend.edgecolor": "#444444",
    "legend.labelcolor": TEXT_HEX, "font.size": 11, "axes.titlesize": 12,
    "axes.prop_cycle": matplotlib.cycler(color=FIT_COLOURS),
}


@dataclass
class MeanTile:
    """Where one cluster's mean image sits on a clusters canvas, and the 28x28 RGB drawn."""

    fit: str
    k: int
    cluster: int
    y: int
    x: int
    scale: int
    rgb: np.ndarray  # (28, 28, 3) uint8


@dataclass
class Drawn:
    """One PNG written: its file, a short caption, and (clusters) the canvas drawn."""

    path: Path
    caption: str = ""
    canvas: np.ndarray | None = None
    means: list[MeanTile] = field(default_factory=list)


def cluster_colour(j: int) -> tuple[int, int, int]:
    """The original's palette by cluster index; beyond 10, hues spaced by the golden angle."""
    if j < len(PALETTE):
        return PALETTE[j]
    h = (0.13 + (j - len(PALETTE)) * 0.618034) % 1.0
    r, g, b = colorsys.hsv_to_rgb(h, 0.7, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def tinted(values: np.ndarray, threshold: float | None = None) -> np.ndarray:
    """Grey levels in [0, 1] -> uint8 RGB (255v, 180v, 0); pixels <= threshold drawn black."""
    v = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
    if threshold is not None:
        v = np.where(v > threshold, v, 0.0)
    return np.rint(v[..., None] * TINT).astype(np.uint8)


def mean_image_rgb(center: np.ndarray, threshold: float | None = None) -> np.ndarray:
    """The (28, 28, 3) uint8 image drawn for a cluster mean (pixel scale [0, 1])."""
    return tinted(np.asarray(center).reshape(SIDE, SIDE), threshold)


def sample_image_rgb(image: np.ndarray) -> np.ndarray:
    """The (28, 28, 3) uint8 image drawn for one uint8 data row, full grey levels."""
    v = np.asarray(image).reshape(SIDE, SIDE).astype(np.float32) / np.float32(255)
    return tinted(v)


def _upscale(rgb: np.ndarray, s: int) -> np.ndarray:
    return rgb.repeat(s, axis=0).repeat(s, axis=1)


def _pt(px: float) -> float:
    """A font size given in canvas pixels, in points at DPI."""
    return px * 72.0 / DPI


def _save(fig: Figure, path: Path, dpi: int) -> None:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=dpi, facecolor=fig.get_facecolor())


def _algorithm_title(alg: str, dataset: str) -> str:
    name = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST"}.get(dataset, dataset)
    if alg == "mccaffrey":
        return f"McCaffrey K-Means++ on {name}"
    return f"kmdask K-Means++ (k-means||) on {name}"


def _fit_info(run: Run, fit: str) -> dict:
    info = run.manifest["fits"].get(fit)
    if info is None:
        raise DataError(f"{run.path}: run has no fit named {fit!r}")
    return info


def _ks(run: Run, fit: str) -> list[int]:
    return sorted(int(k) for k in _fit_info(run, fit)["results"])


def _labels(run: Run, fit: str, k: int) -> np.ndarray:
    rows = int(_fit_info(run, fit)["rows"])
    labels = run.model(fit, k).labels
    if labels.shape != (rows,):
        raise DataError(f"{run.path}: fits/{fit}/k{k}/labels.npy holds {labels.shape[0]} labels "
                        f"for a {rows}-row fit (damaged run)")
    return labels


def _truth(run: Run, rows: int) -> np.ndarray:
    t = run.true_labels
    if t.shape[0] < rows:
        raise DataError(f"{run.path}: data/true_labels.npy holds {t.shape[0]} labels, the fits "
                        f"need {rows} (damaged run)")
    return t[:rows]


def composition(labels: np.ndarray, truth: np.ndarray, k: int, classes: int = 10
                ) -> np.ndarray:
    """(k, classes) counts: rows of cluster j whose true class is c."""
    flat = labels.astype(np.int64) * classes + truth.astype(np.int64)
    return np.bincount(flat, minlength=k * classes)[: k * classes].reshape(k, classes)


def fit_label(run: Run, fit: str) -> str:
    i = _fit_info(run, fit)
    return (f"{fit} ({i['algorithm']}, {i['iterations']} it \u00d7 {i['trials']} trials, "
            f"{i['rows']} rows)")


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
    majority: list[tuple[int, float]]  # per cluster: (digit, share) of its true classes
    shown: str


def _panel(run: Run, fig: FigureSpec, fit: str, k: int) -> _Panel:
    info = _fit_info(run, fit)
    model = run.model(fit, k)
    centers = model.centers
    if centers.shape[0] != k:
        raise DataError(f"{model.path / 'centers.npy'}: {centers.shape[0]} centres for K={k}")
    labels = _labels(run, fit, k)
    comp = composition(labels, _truth(run, labels.shape[0]), k)
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


def _text_width(text: str, px: float, bold: bool = False) -> float:
    """Width in canvas pixels of ``text`` drawn at ``px`` pixels (DejaVu Sans)."""
    from matplotlib.backends.backend_agg import RendererAgg
    from matplotlib.font_manager import FontProperties

    fp = FontProperties(family="DejaVu Sans", size=_pt(px), weight="bold" if bold else "normal")
    return RendererAgg(8, 8, DPI).get_text_width_height_descent(text, fp, ismath=False)[0]


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
        w = max(_text_width(t, HEADER_PX) for t in g)
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
    col_w = PER_ROW * SIDE * SAMPLE_SCALE + (PER_ROW - 1) * GAP
    sample_px = SIDE * SAMPLE_SCALE
    mean_px = SIDE * MEAN_SCALE
    panel_w = k * col_w + (k - 1) * COL_GAP
    headers = [_pack_header(_header_groups(p, fig.threshold), panel_w) for p in panels]
    sub_h = LINE + 16 if multi else 0
    max_rows = max((math.ceil(s.shape[0] / PER_ROW) for p in panels for s in p.samples),
                   default=0)

    y_title = MARGIN
    y_header = y_title + 130
    y_box = y_header + sub_h + max(h for _, h in headers) + 50
    y_mean = y_box + BOX_H + 50
    y_samples = y_mean + mean_px + 60
    height = y_samples + max(max_rows, 1) * (sample_px + GAP) - GAP + MARGIN
    algs = {p.info["algorithm"] for p in panels}
    title = fig.title or (_algorithm_title(algs.pop(), run.manifest["data"]["dataset"])
                          if len(algs) == 1 else "K-Means++ on MNIST")
    width = MARGIN + GUTTER + len(panels) * panel_w + (len(panels) - 1) * PANEL_GAP + MARGIN
    width = max(width, int(_text_width(title, TITLE_PX, bold=True)) + 2 * MARGIN)

    canvas = np.zeros((height, width, 3), np.uint8)
    texts: list[tuple[float, float, str, dict]] = []
    means: list[MeanTile] = []
    for pi, (p, (lines, _)) in enumerate(zip(panels, headers, strict=True)):
        x0 = MARGIN + GUTTER + pi * (panel_w + PANEL_GAP)
        if pi:
            xs = x0 - PANEL_GAP // 2
            canvas[y_header:height - MARGIN, xs - 1:xs + 1] = SEPARATOR
        if multi:
            texts.append((x0, y_header, p.fit, dict(fontsize=_pt(HEADER_PX), weight="bold",
                                                    color=(1.0, 1.0, 1.0))))
        for dx, dy, line in lines:
            texts.append((x0 + dx, y_header + sub_h + dy, line, dict(fontsize=_pt(HEADER_PX))))
        for j in range(p.k):
            xc = x0 + j * (col_w + COL_GAP)
            colour = cluster_colour(j)
            canvas[y_box:y_box + BOX_H, xc:xc + BOX_W] = colour
            lum = (0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]) / 255
            texts.append((xc + BOX_W / 2, y_box + BOX_H / 2 + 2,
                          str(int(p.result["counts"][j])),
                          dict(fontsize=_pt(62), weight="bold", ha="center", va="center",
                               color="black" if lum > 0.5 else "white")))
            digit, share = p.majority[j]
            texts.append((xc + BOX_W + 18, y_box + 8, f"cluster {j}",
                          dict(fontsize=_pt(44))))
            texts.append((xc + BOX_W + 18, y_box + 66, f"mostly {digit} ({share:.0%})",
                          dict(fontsize=_pt(36), color=(0.68, 0.66, 0.57))))
            rgb = mean_image_rgb(p.centers[j], fig.threshold)
            xm = xc + (col_w - mean_px) // 2
            canvas[y_mean:y_mean + mean_px, xm:xm + mean_px] = _upscale(rgb, MEAN_SCALE)
            means.append(MeanTile(p.fit, p.k, j, y_mean, xm, MEAN_SCALE, rgb))
            for si, img in enumerate(p.samples[j]):
                r, c = divmod(si, PER_ROW)
                ys = y_samples + r * (sample_px + GAP)
                xs = xc + c * (sample_px + GAP)
                canvas[ys:ys + sample_px, xs:xs + sample_px] = _upscale(
                    sample_image_rgb(img), SAMPLE_SCALE)

    texts.append((MARGIN, y_title, title, dict(fontsize=_pt(TITLE_PX), weight="bold")))
    for y, label, va in ((y_box + BOX_H / 2, "Cluster\ncount", "center"),
                         (y_mean + mean_px / 2, "Cluster\nmean", "center"),
                         (y_samples, "Cluster\nsamples", "top")):
        texts.append((MARGIN, y, label, dict(fontsize=_pt(48), va=va, linespacing=1.15)))

    f = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, facecolor="black")
    f.figimage(canvas, xo=0, yo=0, origin="upper")
    for x, y, s, kw in texts:
        kw = {"va": "top", "ha": "left", **kw}
        kw["color"] = kw.get("color") or tuple(c / 255 for c in TEXT)
        f.text(x / width, 1 - y / height, s, family="DejaVu Sans", **kw)
    _save(f, path, DPI)

    settings = ", ".join(f"{p.info['iterations']}/{p.info['trials']}" for p in panels)
    caption = (f"K = {k}, {panels[0].info['rows']} rows, iterations/trials {settings}; "
               f"{panels[0].shown[len('Shown = '):]}.")
    return Drawn(path, caption, canvas, means)


def draw_clusters(run: Run, fig: FigureSpec, out: Path) -> list[Drawn]:
    """The original's figure: one PNG, or one per K (``<name><K>.png``) for multi-K fits."""
    ks = sorted({k for f in fig.fits for k in _ks(run, f)})
    if len(ks) == 1:
        return [clusters_png(run, fig, list(fig.fits), ks[0], out / f"{fig.name}.png")]
    return [clusters_png(run, fig, [f for f in fig.fits if k in _ks(run, f)], k,
                         out / f"{fig.name}{k}.png") for k in ks]


# =============================================================================================
# charts


def _chart(width_in: float, height_in: float) -> Figure:
    return Figure(figsize=(width_in, height_in), dpi=CHART_DPI, layout="constrained")


def _style():
    return matplotlib.rc_context(DARK)


def _fit_colour(i: int) -> str:
    return FIT_COLOURS[i % len(FIT_COLOURS)]


ALG_COLOURS = {"mccaffrey": FIT_COLOURS[0], "scalable": FIT_COLOURS[1]}


def _colours(run: Run, fits) -> list[str]:
    """A line colour per fit: by algorithm when each fit has its own, else by position."""
    algs = [_fit_info(run, f)["algorithm"] for f in fits]
    if len(set(algs)) == len(algs):
        return [ALG_COLOURS.get(a, _fit_colour(i + 2)) for i, a in enumerate(algs)]
    return [_fit_colour(i) for i in range(len(fits))]


def _per_k(run: Run, fit: str, key: str) -> tuple[list[int], list[float]]:
    res = _fit_info(run, fit)["results"]
    ks = _ks(run, fit)
    return ks, [float(res[str(k)][key]) for k in ks]


def draw_elbow(run: Run, fig: FigureSpec, out: Path) -> list[Drawn]:
    """WCSS against K for every listed fit on one axes (per row when the fits' rows differ)."""
    rows = {int(_fit_info(run, f)["rows"]) for f in fig.fits}
    per_row = len(rows) > 1
    series = {f: _per_k(run, f, "inertia") for f in fig.fits}
    shared = sorted(set.intersection(*(set(ks) for ks, _ in series.values())))
    compare = len(fig.fits) > 1 and len(shared) > 1
    colours = _colours(run, fig.fits)
    with _style():
        f = _chart(8.5, 7.2 if compare else 5.0)
        if compare:
            ax, ax2 = f.subplots(2, 1, sharex=True, height_ratios=[2.2, 1])
        else:
            ax, ax2 = f.subplots(), None
        for i, (name, (ks, w)) in enumerate(series.items()):
            n = int(_fit_info(run, name)["rows"])
            y = np.array(w) / n if per_row else np.array(w)
            ax.plot(ks, y, "o-", color=colours[i], lw=2, ms=6, label=fit_label(run, name))
        ax.set_ylabel("WCSS per row" if per_row else "WCSS (within-cluster sum of squares)")
        ax.set_title(fig.title or "Elbow: WCSS against K")
        ax.legend(loc="upper right", fontsize=9)
        if not per_row:
            ax.yaxis.set_major_formatter(ticker.EngFormatter(sep=""))
        if ax2 is not None:
            best = {k: min(dict(zip(ks, w, strict=True))[k] for ks, w in series.values())
                    for k in shared}
            for i, (ks, w) in enumerate(series.values()):
                d = dict(zip(ks, w, strict=True))
                ax2.plot(shared, [100 * (d[k] / best[k] - 1) for k in shared], "o-",
                         color=colours[i], lw=1.8, ms=5)
            ax2.set_ylabel("% above the lowest")
            ax2.set_xlabel("K (clusters)")
            ax2.set_ylim(bottom=min(0, ax2.get_ylim()[0]))
        else:
            ax.set_xlabel("K (clusters)")
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        path = out / f"{fig.name}.png"
        _save(f, path, CHART_DPI)
    return [Drawn(path, "WCSS for each K; lower is tighter clusters. The bend (elbow) suggests "
                        "where more clusters stop paying off." +
                  (" Lower panel: each fit's WCSS relative to the best fit at that K."
                   if compare else ""))]


def draw_scores(run: Run, fig: FigureSpec, out: Path) -> list[Drawn]:
    """NMI and ARI of the clustering against the true digits, against K, per fit."""
    colours = _colours(run, fig.fits)
    with _style():
        f = _chart(11, 4.6)
        axes = f.subplots(1, 2, sharex=True)
        for ax, key, name in zip(axes, ("nmi", "ari"),
                                 ("NMI (normalised mutual information)",
                                  "ARI (adjusted Rand index)"), strict=True):
            top = 0.0
            for i, fit in enumerate(fig.fits):
                ks, v = _per_k(run, fit, key)
                top = max(top, *v)
                ax.plot(ks, v, "o-", color=colours[i], lw=2, ms=6,
                        label=fit_label(run, fit))
            ax.set_title(name)
            ax.set_xlabel("K (clusters)")
            ax.set_ylim(0, min(1.0, top * 1.15 + 0.02))
            ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        axes[0].set_ylabel("score against the true digits (1 = perfect)")
        axes[1].legend(loc="lower right", fontsize=9)
        if fig.title:
            f.suptitle(fig.title)
        path = out / f"{fig.name}.png"
        _save(f, path, CHART_DPI)
    return [Drawn(path, "Agreement of the clusters with the true digit classes (which the "
                        "clustering never sees): NMI and ARI, 0 = chance, 1 = identical.")]


def draw_composition(run: Run, fig: FigureSpec, out: Path) -> list[Drawn]:
    """Per fit: a cluster x true-digit heatmap for every K (row-normalised, counts on the axis)."""
    drawn = []
    for fit in fig.fits:
        ks = _ks(run, fit)
        rows = int(_fit_info(run, fit)["rows"])
        truth = _truth(run, rows)
        ncols = min(3, len(ks))
        grid = [ks[i:i + ncols] for i in range(0, len(ks), ncols)]
        heights = [max(g) + 2.2 for g in grid]
        with _style():
            f = _chart(5.4 * ncols, 0.34 * sum(heights) + 0.8)
            gs = f.add_gridspec(len(grid), ncols, height_ratios=heights)
            im, used = None, []
            for r, row in enumerate(grid):
                for c, k in enumerate(row):
                    ax = f.add_subplot(gs[r, c])
                    used.append(ax)
                    comp = composition(_labels(run, fit, k), truth, k)
                    share = comp / np.maximum(comp.sum(axis=1, keepdims=True), 1)
                    im = _heatmap(ax, share, comp, k)
                    res = _fit_info(run, fit)["results"][str(k)]
                    ax.set_title(f"K = {k}   NMI {res['nmi']:.2f}   ARI {res['ari']:.2f}")
            if im is not None:
                cb = f.colorbar(im, ax=used, shrink=0.5, aspect=40, pad=0.01)
                cb.set_label("share of the cluster's rows")
                cb.ax.yaxis.set_major_formatter(ticker.PercentFormatter(1.0))
            f.suptitle(fig.title or f"Cluster composition by true digit: {fit_label(run, fit)}",
                       fontsize=13)
            name = fig.name if len(fig.fits) == 1 else f"{fig.name}_{fit}"
            path = out / f"{name}.png"
            _save(f, path, CHART_DPI)
        drawn.append(Drawn(path, f"{fit}: each row is a cluster (its colour and size at the "
                                 "left), each column a true digit; cells give the share of the "
                                 "cluster's rows that are that digit. A pure cluster is one "
                                 "bright cell."))
    return drawn


def _heatmap(ax, share: np.ndarray, counts: np.ndarray, k: int):
    im = ax.imshow(share, cmap="magma", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    ax.grid(False)
    ax.set_xticks(range(10))
    ax.set_xlabel("true digit")
    ax.set_yticks(range(k))
    ax.set_yticklabels([f"{j}  n={int(counts[j].sum())}" for j in range(k)], fontsize=8)
    ax.tick_params(length=0)
    ax.tick_params(axis="y", pad=13)
    strip = transforms.blended_transform_factory(ax.transAxes, ax.transData)
    for j in range(k):
        ax.add_patch(patches.Rectangle(
            (-0.032, j - 0.5), 0.026, 1, color=_hex(cluster_colour(j)), clip_on=False,
            transform=strip))
    ax.set_xlim(-0.5, 9.5)
    for j in range(k):
        for c in range(10):
            v = share[j, c]
            if v >= 0.01:
                ax.text(c, j, f"{v * 100:.0f}", ha="center", va="center", fontsize=7,
                        color="black" if v > 0.6 else TEXT_HEX)
    return im


def _convergence_panels(run: Run, fits: tuple[str, ...], limit: int = 12
                        ) -> list[tuple[int, str, int]]:
    """(fit index, fit, K) panels: every K, or an even subset when there are too many."""
    per_fit = [(i, f, _ks(run, f)) for i, f in enumerate(fits)]
    budget = max(1, limit // max(len(fits), 1))
    out = []
    for i, f, ks in per_fit:
        total = sum(len(k) for _, _, k in per_fit)
        if total > limit and len(ks) > budget:
            pick = np.unique(np.linspace(0, len(ks) - 1, budget).round().astype(int))
            ks = [ks[p] for p in pick]
        out += [(i, f, k) for k in ks]
    return out


def draw_convergence(run: Run, fig: FigureSpec, out: Path) -> list[Drawn]:
    """WCSS per iteration: every trial faint, the best trial bold; one panel per fit and K."""
    panels = _convergence_panels(run, fig.fits)
    ncols = min(4, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    colours = _colours(run, fig.fits)
    with _style():
        f = _chart(3.9 * ncols, 3.1 * nrows + 0.5)
        axes = np.atleast_1d(f.subplots(nrows, ncols, squeeze=False)).ravel()
        for ax, (i, fit, k) in zip(axes, panels, strict=False):
            res = _fit_info(run, fit)["results"][str(k)]
            hist = res.get("trial_history") or [res.get("inertia_history", [])]
            best = res.get("best_trial", 0) or 0
            for t, h in enumerate(hist):
                if t != best and h:
                    ax.plot(range(len(h)), h, color="#8a877a", lw=0.8, alpha=0.45)
            bh = res.get("inertia_history") or (hist[best] if hist else [])
            ax.plot(range(len(bh)), bh, color=colours[i], lw=2.4,
                    label=f"best of {len(hist)}")
            ends = [h[-1] for h in hist if h]
            if len(bh) > 1 and ends:
                lo = min(min(bh), min(ends))
                hi = max(bh[1], max(h[min(1, len(h) - 1)] for h in hist if h))
                ax.set_ylim(lo - 0.03 * (hi - lo), hi + 0.05 * (hi - lo))
            ax.set_title(f"{fit}, K = {k}", fontsize=11)
            ax.text(0.97, 0.95, f"{len(hist)} trials, best #{best}\n{res['n_iter']} iterations"
                    f"\nWCSS {res['inertia']:,.0f}", transform=ax.transAxes, ha="right",
                    va="top", fontsize=8, bbox=dict(fc="#000000", ec="none", alpha=0.6))
            ax.yaxis.set_major_formatter(ticker.EngFormatter(sep=""))
            ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        for ax in axes[len(panels):]:
            ax.set_visible(False)
        f.supxlabel("Lloyd iteration")
        f.supylabel("WCSS")
        f.suptitle(fig.title or "Convergence: WCSS per Lloyd iteration (every trial faint, "
                   "the best bold)", fontsize=13)
        path = out / f"{fig.name}.png"
        _save(f, path, CHART_DPI)
    return [Drawn(path, "WCSS after each Lloyd iteration. Grey lines: every trial; bold: the "
                        "trial kept (lowest final WCSS). The y axis is cut just above the "
                        "second point so that the tails stay visible.")]


def draw_timing(run: Run, fig: FigureSpec, out: Path) -> list[Drawn]:
    """Seconds per fit, and the run's total split into connect, fits and the rest."""
    names = list(fig.fits)
    secs = [float(_fit_info(run, n).get("seconds") or 0.0) for n in names]
    t = run.manifest.get("timings", {})
    total, connect = float(t.get("total") or 0.0), float(t.get("connect") or 0.0)
    all_fits = sum(float(i.get("seconds") or 0.0) for i in run.manifest["fits"].values())
    with _style():
        f = _chart(9.5, 0.55 * (len(names) + 2) + 1.6)
        ax = f.subplots()
        y = np.arange(len(names))
        algs = [_fit_info(run, n)["algorithm"] for n in names]
        alg_colour = {a: ALG_COLOURS.get(a, _fit_colour(i + 2))
                      for i, a in enumerate(dict.fromkeys(algs))}
        for a, c in alg_colour.items():
            sel = [i for i, x in enumerate(algs) if x == a]
            ax.barh(y[sel], [secs[i] for i in sel], color=c, height=0.65, label=a)
        for yi, s in zip(y, secs, strict=True):
            ax.text(s, yi, f"  {s:.1f} s", va="center", fontsize=9)
        labels = []
        for n in names:
            i = _fit_info(run, n)
            ks = _ks(run, n)
            kdesc = f"K={ks[0]}" if len(ks) == 1 else f"K={ks[0]}..{ks[-1]}"
            labels.append(f"{n}\n{kdesc}, {i['rows']} rows,\n{i['iterations']} it \u00d7 "
                          f"{i['trials']} trials")
        yt = len(names) + 0.4
        parts = [("run: connect", connect, "#8a877a"), ("run: all fits", all_fits, "#5a5848"),
                 ("run: other (data, writing)", max(total - connect - all_fits, 0.0),
                  "#2f2e29")]
        left = 0.0
        for label, v, c in parts:
            ax.barh(yt, v, left=left, color=c, height=0.65, label=label)
            left += v
        ax.text(total, yt, f"  {total:.1f} s", va="center", fontsize=9, weight="bold")
        ax.set_yticks(list(y) + [yt], labels + ["whole run"], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("seconds (wall clock)")
        ax.set_xlim(0, max(secs + [total]) * 1.15)
        ax.grid(axis="y", visible=False)
        ax.set_axisbelow(True)
        ax.legend(loc="upper right", fontsize=8, ncols=2)
        ax.set_title(fig.title or f"Timing: run total {total:.1f} s "
                     f"(connect {connect:.1f} s, profile {run.manifest['profile'].get('name')})")
        path = out / f"{fig.name}.png"
        _save(f, path, CHART_DPI)
    return [Drawn(path, "Wall-clock seconds of each fit (a multi-K fit's K values share one "
                        "time: they are fitted together), and the whole run split into "
                        "cluster start-up, fitting, and the rest (data reading, writing the "
                        "run directory).")]


DRAW = {"clusters": draw_clusters, "elbow": draw_elbow, "composition": draw_composition,
        "scores": draw_scores, "convergence": draw_convergence, "timing": draw_timing}
