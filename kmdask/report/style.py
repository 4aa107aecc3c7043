"""The look shared by every figure: the original's palette and text colour, the canvas layout
constants, the dark chart theme and small drawing helpers (matplotlib Agg only, no pyplot).
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # harmless when already set; the report never opens a window

import numpy as np  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from kmdask.batch.rundir import Run  # noqa: E402

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


def hex_colour(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


TEXT_HEX = hex_colour(TEXT)
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


def mean_image_rgb(center: np.ndarray, threshold: float | None = None,
                   shape: tuple[int, int] = (SIDE, SIDE)) -> np.ndarray:
    """The (height, width, 3) uint8 image drawn for a cluster mean (pixel scale [0, 1])."""
    return tinted(np.asarray(center).reshape(shape), threshold)


def sample_image_rgb(image: np.ndarray, shape: tuple[int, int] = (SIDE, SIDE),
                     divisor: float = 255.0) -> np.ndarray:
    """The (height, width, 3) uint8 image drawn for one data row, full grey levels (uint8
    rows divided by ``divisor``; float rows as they are, clipped to [0, 1])."""
    v = np.asarray(image).reshape(shape).astype(np.float32)
    return tinted(v / np.float32(divisor) if np.asarray(image).dtype == np.uint8 else v)


@dataclass(frozen=True)
class Tiles:
    """How big images are drawn: scales that keep a sample about 112 px and a mean about 448
    px on its longer side whatever the image size (4 and 16 times for 28 x 28)."""

    shape: tuple[int, int]

    @property
    def sample_scale(self) -> int:
        return max(1, round(SAMPLE_SCALE * SIDE / max(self.shape)))

    @property
    def mean_scale(self) -> int:
        return max(1, round(MEAN_SCALE * SIDE / max(self.shape)))

    @property
    def sample_px(self) -> tuple[int, int]:
        """(height, width) of a drawn sample."""
        return self.shape[0] * self.sample_scale, self.shape[1] * self.sample_scale

    @property
    def mean_px(self) -> tuple[int, int]:
        return self.shape[0] * self.mean_scale, self.shape[1] * self.mean_scale

    @property
    def column(self) -> int:
        """Width of a cluster's column: PER_ROW samples and the gaps between them."""
        return max(PER_ROW * self.sample_px[1] + (PER_ROW - 1) * GAP, BOX_W + 200)


def upscale(rgb: np.ndarray, s: int) -> np.ndarray:
    """Each pixel drawn as an ``s`` x ``s`` square."""
    return rgb.repeat(s, axis=0).repeat(s, axis=1)


def pt(px: float) -> float:
    """A font size given in canvas pixels, in points at DPI."""
    return px * 72.0 / DPI


def save_png(fig: Figure, path: Path, dpi: int) -> None:
    """Render ``fig`` with the Agg canvas and write it to ``path``."""
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=dpi, facecolor=fig.get_facecolor())


ALGORITHM_TITLES = {"mccaffrey": "McCaffrey K-Means++", "scalable": "kmdask K-Means++ (k-means||)"}
DATASET_TITLES = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST"}


def save_canvas(canvas: np.ndarray, fig: Figure, texts: list, path: Path) -> None:
    """Write ``canvas`` ((H, W, 3) uint8, placed 1:1) with ``texts`` and whatever artists
    ``fig`` already holds (e.g. bar axes) drawn over it.

    ``fig`` must be transparent and the canvas' size at :data:`DPI`. The artists are rendered
    once and blended over the canvas (Agg's buffer holds straight alpha): matplotlib's image
    pipeline never sees the canvas, which for a figure thousands of pixels wide cost seconds
    (resampling, masked arrays) to copy it unchanged. ``texts`` are ``(x, y, text, kwargs)`` in
    canvas pixels from the top left, drawn in :data:`TEXT` unless a colour is given.
    """
    h, w = canvas.shape[:2]
    for x, y, s, kw in texts:
        kw = {"va": "top", "ha": "left", **kw}
        kw["color"] = kw.get("color") or tuple(c / 255 for c in TEXT)
        fig.text(x / w, 1 - y / h, s, family="DejaVu Sans", **kw)
    agg = FigureCanvasAgg(fig)
    agg.draw()
    rgba = np.asarray(agg.buffer_rgba())
    if rgba.shape[:2] != (h, w):
        raise ValueError(f"figure renders {rgba.shape[1]}x{rgba.shape[0]} px, the canvas is "
                         f"{w}x{h}")
    # blend only the pixels the artists touch (text is a few percent of a canvas of tens of
    # millions of pixels), in integers: (c (255 - a) + t a) / 255, rounded
    ys, xs = np.nonzero(rgba[..., 3])
    out = canvas.copy()
    a = rgba[ys, xs, 3:4].astype(np.uint16)
    out[ys, xs] = ((canvas[ys, xs].astype(np.uint16) * (255 - a)
                    + rgba[ys, xs, :3].astype(np.uint16) * a + 127) // 255).astype(np.uint8)
    write_png(out, path)


def write_png(rgb: np.ndarray, path: Path) -> None:
    """Write an (H, W, 3) uint8 image as PNG at zlib level 4: on these mostly flat canvases it
    is faster than the default 6 and no bigger (levels 1-3 make files 40% bigger)."""
    from PIL import Image  # matplotlib's own PNG writer

    Image.fromarray(rgb).save(path, format="PNG", compress_level=4)


def canvas_figure(canvas: np.ndarray) -> Figure:
    """A transparent figure of the canvas' size, for :func:`save_canvas`."""
    h, w = canvas.shape[:2]
    return Figure(figsize=(w / DPI, h / DPI), dpi=DPI, facecolor=(0, 0, 0, 0))


def algorithm_title(alg: str, dataset: str) -> str:
    """A figure title naming the algorithm and the data set."""
    return (f"{ALGORITHM_TITLES.get(alg, f'K-Means++ ({alg})')} on "
            f"{DATASET_TITLES.get(dataset, dataset)}")


def composition(labels: np.ndarray, truth: np.ndarray, k: int, classes: int | None = None
                ) -> np.ndarray:
    """(k, classes) counts: rows of cluster j whose true class is c (classes: at least 10,
    more when the labels have more)."""
    if classes is None:
        classes = max(10, int(truth.max()) + 1 if truth.size else 10)
    flat = labels.astype(np.int64) * classes + truth.astype(np.int64)
    return np.bincount(flat, minlength=k * classes)[: k * classes].reshape(k, classes)


def fit_label(run: Run, fit: str) -> str:
    """A fit as a legend names it: algorithm, iterations x trials, rows."""
    i = run.fit_info(fit)
    return (f"{fit} ({i['algorithm']}, {i['iterations']} it \u00d7 {i['trials']} trials, "
            f"{i['rows']} rows)")


def text_width(text: str, px: float, bold: bool = False) -> float:
    """Width in canvas pixels of ``text`` drawn at ``px`` pixels (DejaVu Sans)."""
    from matplotlib.backends.backend_agg import RendererAgg
    from matplotlib.font_manager import FontProperties

    fp = FontProperties(family="DejaVu Sans", size=pt(px), weight="bold" if bold else "normal")
    return RendererAgg(8, 8, DPI).get_text_width_height_descent(text, fp, ismath=False)[0]


# =============================================================================================
# charts: ordinary matplotlib axes in a dark theme matching the canvas figures


def chart(width_in: float, height_in: float) -> Figure:
    """A chart figure of that size in inches (constrained layout)."""
    return Figure(figsize=(width_in, height_in), dpi=CHART_DPI, layout="constrained")


def dark_theme():
    """The chart theme, as a context manager for drawing inside."""
    return matplotlib.rc_context(DARK)


def fit_colour(i: int) -> str:
    """The i-th line colour."""
    return FIT_COLOURS[i % len(FIT_COLOURS)]


ALG_COLOURS = {"mccaffrey": FIT_COLOURS[0], "scalable": FIT_COLOURS[1]}


def fit_colours(run: Run, fits) -> list[str]:
    """A line colour per fit: by algorithm when each fit has its own, else by position."""
    algs = [run.fit_info(f)["algorithm"] for f in fits]
    if len(set(algs)) == len(algs):
        return [ALG_COLOURS.get(a, fit_colour(i + 2)) for i, a in enumerate(algs)]
    return [fit_colour(i) for i in range(len(fits))]
