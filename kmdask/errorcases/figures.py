"""Error-case figures: clusters of case vectors, their confusions, and the routing experiment.

* ``cases``: the original's error-case figure. One column per cluster, the reliable cluster (the
  one holding the zeroed cases) first and red, then the others in cluster order with the next
  palette colours: its count box, a 10-bar chart of its mean vector (bar colour = the class's
  palette colour, the digit under each bar, one labelled scale shared by all columns) and the
  images of its first members, five per row.
* ``case_confusion``: per cluster, the general network's confusion matrix on its cases.
* ``experiment``: accuracies of the general network, the routed specialists and the baseline
  with their intervals, and per error cluster on the test cases routed to it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib import colors, patches, ticker

from kmdask.batch.rundir import Run
from kmdask.batch.spec import FigureSpec
from kmdask.errorcases.artefacts import read_cases, read_experiment
from kmdask.errors import DataError
from kmdask.report.style import (
    BOX_H,
    BOX_W,
    CHART_DPI,
    COL_GAP,
    DATASET_TITLES,
    FIT_COLOURS,
    GAP,
    GUTTER,
    HEADER_PX,
    LINE,
    MARGIN,
    PALETTE,
    PER_ROW,
    SAMPLE_SCALE,
    SIDE,
    TEXT_HEX,
    TITLE_PX,
    Drawn,
    algorithm_title,
    canvas_figure,
    chart,
    cluster_colour,
    dark_theme,
    hex_colour,
    pt,
    sample_image_rgb,
    save_canvas,
    save_png,
    text_width,
    upscale,
)

BAR_H = 560  # canvas px of a cluster's mean-vector chart
MUTED = (0.68, 0.66, 0.57)


def _cases_info(run: Run, fit: str) -> dict:
    cases = run.fit_info(fit).get("cases")
    if not cases:
        raise DataError(f"{run.path}: fit {fit!r} did not cluster case vectors")
    return cases


def _order(result: dict, k: int) -> tuple[list[int], int | None]:
    """Display order (the reliable cluster first) and the reliable cluster's index."""
    order = result.get("display_order") or list(range(k))
    return [int(j) for j in order], result.get("reliable_cluster")


def vector_label(cases: dict) -> str:
    """What a case vector's component is, e.g. ``p²`` or ``sign·|target − p|³``."""
    sup = {1: "", 2: "\u00b2", 3: "\u00b3"}[int(cases["power"])]
    if cases["vector"] == "probs":
        return f"p{sup}"
    return "target \u2212 p" if cases["power"] == 1 else f"sign\u00b7|target \u2212 p|{sup}"


def _outputs(run: Run, fit: str) -> tuple[np.ndarray, np.ndarray]:
    """(true class, general network's predicted class) of the fit's clustered rows."""
    rows = int(run.fit_info(fit)["rows"])
    split = run.manifest.get("data", {}).get("split", "train")
    probs = read_cases(run, f"{split}/probs")[:rows]
    return run.truth(rows), np.argmax(probs, axis=1)


# =============================================================================================
# cases: count box, mean-vector bars, member images


def cases_png(run: Run, fig: FigureSpec, fit: str, k: int, path: Path) -> Drawn:
    info, cases = run.fit_info(fit), _cases_info(run, fit)
    model = run.model(fit, k)
    res = model.result
    order, reliable = _order(res, k)
    centers, members, idx = model.centers, model.members, model.members_idx
    cap = min(fig.per_cluster, members.shape[1])
    samples = [members[j][idx[j] >= 0][:cap] for j in order]
    col_w = PER_ROW * SIDE * SAMPLE_SCALE + (PER_ROW - 1) * GAP
    sample_px = SIDE * SAMPLE_SCALE
    max_rows = max((math.ceil(s.shape[0] / PER_ROW) for s in samples), default=0)
    clf = run.manifest.get("classifier", {})
    zero = res.get("zero_out", cases.get("zero_out"))  # chosen on validation rows: the result
    vlabel = vector_label(cases)
    lines = [[f"K = {k}", f"Samples = {info['rows']}", f"Iterations = {info['iterations']}",
              f"Trials = {info['trials']}"],
             [f"ZeroOut = {zero:g}" if zero is not None else "ZeroOut = none",
              f"Vector = {vlabel} ({cases['vector']}, power {cases['power']})",
              f"Zeroed cases = {res.get('n_zeroed', 0)}",
              f"WCSS = {res['inertia']:,.4g}"],
             [f"Network = 784-{'-'.join(map(str, clf.get('settings', {}).get('hidden', [])))}"
              f"-10 MLP", f"Test accuracy = {clf.get('test_accuracy', float('nan')):.2%}"],
             ["Reliable = the cluster of", "the zeroed cases (drawn", "first, in red)"]
             if reliable is not None else ["No case zeroed:", "clusters in index order"]]
    width = MARGIN + GUTTER + k * col_w + (k - 1) * COL_GAP + MARGIN
    head_w = [max(text_width(t, HEADER_PX) for t in g) for g in lines]
    y_title = MARGIN
    y_header = y_title + 130
    per_row = max(1, int((width - MARGIN - GUTTER) // (max(head_w) + 110)))
    header_rows = math.ceil(len(lines) / per_row)
    y_box = y_header + header_rows * 4 * LINE + 40
    y_bars = y_box + BOX_H + 60
    names = None if run.class_noun == "digit" else [run.class_name(c) for c in range(10)]
    # named classes are written upright under the bars: room for the longest name
    y_samples = y_bars + BAR_H + 70 + (int(max(text_width(n, 26) for n in names)) if names
                                       else 0)
    height = y_samples + max(max_rows, 1) * (sample_px + GAP) - GAP + MARGIN
    title = fig.title or (algorithm_title(info["algorithm"], run.manifest["data"]["dataset"])
                          + ": error cases")
    width = max(width, int(text_width(title, TITLE_PX, bold=True)) + 2 * MARGIN)

    canvas = np.zeros((height, width, 3), np.uint8)
    texts: list[tuple[float, float, str, dict]] = []
    for gi, g in enumerate(lines):
        r, c = divmod(gi, per_row)
        x = MARGIN + GUTTER + c * (max(head_w) + 110)
        for li, t in enumerate(g):
            texts.append((x, y_header + r * 4 * LINE + li * LINE, t,
                          dict(fontsize=pt(HEADER_PX))))
    lo, hi = _bar_limits(centers)
    f = canvas_figure(canvas)
    for pos, j in enumerate(order):
        xc = MARGIN + GUTTER + pos * (col_w + COL_GAP)
        colour = cluster_colour(pos)
        canvas[y_box:y_box + BOX_H, xc:xc + BOX_W] = colour
        lum = (0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]) / 255
        texts.append((xc + BOX_W / 2, y_box + BOX_H / 2 + 2, str(int(res["counts"][j])),
                      dict(fontsize=pt(62), weight="bold", ha="center", va="center",
                           color="black" if lum > 0.5 else "white")))
        texts.append((xc + BOX_W + 18, y_box + 8, f"cluster {j}", dict(fontsize=pt(44))))
        texts.append((xc + BOX_W + 18, y_box + 66, "reliable" if j == reliable
                      else _wrap(_top_classes(centers[j], run), col_w - BOX_W - 28, 36),
                      dict(fontsize=pt(36), color=MUTED, va="top", linespacing=1.1)))
        ax = f.add_axes(((xc + 95) / width, 1 - (y_bars + BAR_H - 60) / height,
                         (col_w - 105) / width, (BAR_H - 80) / height))
        _bars(ax, centers[j], lo, hi, names, vlabel if pos == 0 else None,
              "mean \u2248 0\n(holds the zeroed cases)" if j == reliable and
              np.abs(centers[j]).max() < 0.01 * max(hi - lo, 1e-12) else None)
        for si, img in enumerate(samples[pos]):
            r, c = divmod(si, PER_ROW)
            ys = y_samples + r * (sample_px + GAP)
            xs = xc + c * (sample_px + GAP)
            canvas[ys:ys + sample_px, xs:xs + sample_px] = upscale(sample_image_rgb(img),
                                                                    SAMPLE_SCALE)
    texts.append((MARGIN, y_title, title, dict(fontsize=pt(TITLE_PX), weight="bold")))
    for y, label, va in ((y_box + BOX_H / 2, "Cluster\ncount", "center"),
                         (y_bars + BAR_H / 2 - 30, "Cluster\nmean\nvector", "center"),
                         (y_samples, "Cluster\nsamples\n("
                          f"{DATASET_TITLES.get(run.manifest['data']['dataset'], 'images')})",
                          "top")):
        texts.append((MARGIN, y, label, dict(fontsize=pt(48), va=va, linespacing=1.15)))
    save_canvas(canvas, f, texts, path)  # the bar axes and texts over the canvas
    caption = (f"{fit}: K = {k}, {info['rows']} cases, vectors {vlabel}, ZeroOut "
               f"{'none' if zero is None else f'{zero:.6g}'}; "
               + ("the reliable cluster (all zeroed cases; the algorithm's cluster "
                  f"{reliable}) is drawn first in red. " if reliable is not None else "")
               + f"Samples: each cluster's first {cap} members "
               f"({DATASET_TITLES.get(run.manifest['data']['dataset'], 'the')} images)."
               + ("" if names is None else " Bars: the mean of each class's component, "
                  + ", ".join(f"{c} {n}" for c, n in enumerate(names)) + "."))
    return Drawn(path, caption, canvas)


def _bar_limits(centers: np.ndarray) -> tuple[float, float]:
    """One scale for every column: [0, max] for non-negative vectors, symmetric otherwise."""
    top = float(np.abs(centers).max()) if centers.size else 1.0
    top = top * 1.12 if top > 0 else 1.0
    return (-top, top) if centers.min() < 0 else (0.0, top)


def _wrap(text: str, width: float, px: float) -> str:
    """Break ``text`` at its ' / ' separators so that no line is wider than ``width``."""
    lines: list[str] = []
    for part in text.split(" / "):
        if lines and text_width(f"{lines[-1]} / {part}", px) <= width:
            lines[-1] = f"{lines[-1]} / {part}"
        else:
            lines.append(part if not lines else f"/ {part}")
    return "\n".join(lines)


def _top_classes(mean: np.ndarray, run: Run) -> str:
    """The classes carrying most of a mean vector's weight, e.g. '4 / 9 / 7' or
    'Shirt / Coat'."""
    w = np.abs(mean)
    if w.sum() == 0:
        return ""
    order = np.argsort(-w, kind="stable")
    keep = [int(c) for c in order[:3] if w[c] >= 0.1 * w[order[0]]]
    return "mostly " + " / ".join(run.class_name(c) for c in keep)


def _bars(ax, mean: np.ndarray, lo: float, hi: float, names: list[str] | None,
          ylabel: str | None, note: str | None
          ) -> None:
    ax.set_facecolor("#0b0b0b")
    ax.bar(range(10), mean, width=0.78, color=[hex_colour(c) for c in PALETTE],
           edgecolor="#d9d4bd", linewidth=0.8)  # the light edge keeps dark palette bars visible
    ax.set_ylim(lo, hi)
    ax.set_xlim(-0.6, 9.6)
    if names is None:
        ax.set_xticks(range(10), [str(d) for d in range(10)], fontsize=pt(38))
    else:
        ax.set_xticks(range(10), names, fontsize=pt(26), rotation=90)
    ax.yaxis.set_major_locator(ticker.MaxNLocator(4))
    ax.tick_params(axis="y", labelsize=pt(30), colors=TEXT_HEX)
    ax.tick_params(axis="x", colors=TEXT_HEX, length=0, pad=6)
    for s in ax.spines.values():
        s.set_color("#6d6a5c")
    ax.grid(axis="y", color="#2c2b27", linewidth=1)
    ax.set_axisbelow(True)
    if lo < 0:
        ax.axhline(0, color="#8a877a", linewidth=1)
    if names is None:  # named classes say what they are
        ax.set_xlabel("class", fontsize=pt(30), color=TEXT_HEX, labelpad=2)
    if ylabel:
        ax.set_ylabel(f"mean {ylabel}", fontsize=pt(34), color=TEXT_HEX)
    if note:
        ax.text(0.5, 0.6, note, transform=ax.transAxes, ha="center", va="center",
                fontsize=pt(36), color=MUTED)


def draw_cases(run: Run, fig: FigureSpec, out: Path) -> list[Drawn]:
    """One PNG per fit and K: ``<name>.png``, ``<name><K>.png`` or ``<name>_<fit>...``."""
    drawn = []
    for fit in fig.fits:
        base = fig.name if len(fig.fits) == 1 else f"{fig.name}_{fit}"
        ks = run.ks(fit)
        for k in ks:
            name = base if len(ks) == 1 else f"{base}{k}"
            drawn.append(cases_png(run, fig, fit, k, out / f"{name}.png"))
    return drawn


# =============================================================================================
# case_confusion


def draw_case_confusion(run: Run, fig: FigureSpec, out: Path) -> list[Drawn]:
    """Per fit and K: a confusion matrix (true x predicted) of the general network per cluster."""
    drawn = []
    for fit in fig.fits:
        truth, pred = _outputs(run, fit)
        for k in run.ks(fit):
            labels = run.fit_labels(fit, k)
            order, reliable = _order(run.model(fit, k).result, k)
            ncols = min(5, k)
            nrows = math.ceil(k / ncols)
            with dark_theme():
                f = chart(3.5 * ncols + 0.8, 3.6 * nrows + 0.9)
                axes = np.atleast_1d(f.subplots(nrows, ncols, squeeze=False)).ravel()
                im = None
                cms = [np.bincount(truth[labels == j] * 10 + pred[labels == j],
                                   minlength=100).reshape(10, 10) for j in order]
                top = max(2, max(int(c.max()) for c in cms))  # one colour scale for all
                for pos, (j, cm) in enumerate(zip(order, cms, strict=True)):
                    im = _confusion(axes[pos], cm, top, run)
                    acc = np.trace(cm) / max(cm.sum(), 1)
                    axes[pos].set_title(f"cluster {j}{' (reliable)' if j == reliable else ''}"
                                        f"\nn = {cm.sum()}, accuracy {acc:.1%}", fontsize=10,
                                        pad=12)
                    # the cluster's colour as a strip above the panel (dark palette colours
                    # would make unreadable title text)
                    axes[pos].add_patch(patches.Rectangle(
                        (0, 1.01), 1, 0.025, transform=axes[pos].transAxes, clip_on=False,
                        color=hex_colour(cluster_colour(pos))))
                    if pos % ncols == 0:
                        axes[pos].set_ylabel("true class")
                    if pos >= (nrows - 1) * ncols or pos + ncols >= k:
                        axes[pos].set_xlabel("network's class")
                for ax in axes[k:]:
                    ax.set_visible(False)
                if im is not None:
                    cb = f.colorbar(im, ax=list(axes[:k]), shrink=0.6, aspect=30, pad=0.01)
                    cb.set_label("cases (log scale)")
                f.suptitle(fig.title or f"General network's confusions inside each cluster: "
                           f"{fit}, K = {k}", fontsize=13)
                name = fig.name if len(fig.fits) == 1 else f"{fig.name}_{fit}"
                path = out / (f"{name}.png" if len(run.ks(fit)) == 1 else f"{name}{k}.png")
                save_png(f, path, CHART_DPI)
            drawn.append(Drawn(path, f"{fit}, K = {k}: for the training cases of each cluster "
                                     "(titles in the figure's colours), how often the general "
                                     "network answered each class (columns) for each true "
                                     "class (rows); off-diagonal cells are its errors."))
    return drawn


def _confusion(ax, cm: np.ndarray, top: int, run: Run):
    im = ax.imshow(np.where(cm > 0, cm, np.nan), cmap="magma",
                   norm=colors.LogNorm(vmin=1, vmax=top), interpolation="nearest")
    ax.grid(False)
    names = [run.class_name(c) for c in range(10)]
    if run.class_noun == "digit":
        ax.set_xticks(range(10))
        ax.set_yticks(range(10))
    else:
        ax.set_xticks(range(10), names, rotation=90, fontsize=6)
        ax.set_yticks(range(10), names, fontsize=6)
    ax.tick_params(length=0, labelsize=8)
    for t in range(10):
        for p in range(10):
            v = int(cm[t, p])
            if v:
                ax.text(p, t, str(v) if v < 1000 else f"{v / 1000:.0f}k", ha="center",
                        va="center", fontsize=5.5 if v >= 100 else 6.5,
                        color="black" if v > top ** 0.6 else TEXT_HEX)
    return im


# =============================================================================================
# experiment


SYSTEMS = (("general", "(a) general network", "#9a9a9a"),
           ("routed", "(b) routed to specialists", FIT_COLOURS[0]),
           ("baseline", "(c) baseline: general trained longer", FIT_COLOURS[1]))
NEAREST = ("routed_nearest", "(b') routed, reliable centre competing", FIT_COLOURS[3])
MIXTURE = ("routed_mixture", "(d) mixture of specialists by distance", FIT_COLOURS[2])
GATED = ("routed_gated", "(e) specialists where they won on validation", FIT_COLOURS[4])


def draw_experiment(run: Run, fig: FigureSpec, out: Path) -> list[Drawn]:
    """Per fit: overall accuracies with 95% intervals, and accuracy per error cluster."""
    drawn = []
    for fit in fig.fits:
        e, _ = read_experiment(run, fit)
        specs = {s["cluster"]: s for s in e["specialists"]}
        groups = [g for g in e["groups"] if g != "general"]
        with dark_theme():
            f = chart(13 + 0.45 * max(0, len(groups) - 5), 5.4)
            ax, ax2 = f.subplots(1, 2, width_ratios=[1, 1.5])
            rows = SYSTEMS + tuple(r for r in (NEAREST, MIXTURE, GATED)
                                   if f"{r[0]}_accuracy" in e)
            for i, (key, _, col) in enumerate(rows):
                acc, (lo, hi) = e[f"{key}_accuracy"], e[f"{key}_ci"]
                ax.errorbar(acc * 100, i, xerr=[[100 * (acc - lo)], [100 * (hi - acc)]],
                            fmt="o", color=col, ms=9, capsize=6, lw=2)
                ax.text(hi * 100, i - 0.22, f"  {acc:.2%}  [{lo:.2%}, {hi:.2%}]",
                        fontsize=9, va="center")
            ax.set_yticks(range(len(rows)), [s[1] for s in rows])
            ax.set_ylim(len(rows) - 0.4, -0.6)
            span = [100 * e[f"{k}_ci"][j] for k, _, _ in rows for j in (0, 1)]
            pad = (max(span) - min(span)) * 0.9 + 0.05
            ax.set_xlim(min(span) - pad * 0.3, min(max(span) + pad, 100.0))
            ax.xaxis.set_major_locator(ticker.MaxNLocator(4))
            ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:.2f}%"))
            ax.set_xlabel(f"test accuracy, {e['n_test']} cases (95% bootstrap interval)")
            pa = e["mcnemar_general_vs_routed"]["p_value"]
            pc = e["mcnemar_baseline_vs_routed"]["p_value"]
            ax.set_title(f"Overall. McNemar p: (a) vs (b) {pa:.3g}, (c) vs (b) {pc:.3g}",
                         fontsize=10)
            width = 0.26
            x = np.arange(len(groups))
            low = min([100 * e["groups"][g][k] for g in groups for k, _, _ in SYSTEMS] or [0])
            floor = max(0.0, 5 * math.floor((low - 2) / 5))  # zoomed: differences visible
            for i, (key, label, col) in enumerate(SYSTEMS):
                vals = [100 * e["groups"][g][key] for g in groups]
                ax2.bar(x + (i - 1) * width, [v - floor for v in vals], width * 0.95,
                        bottom=floor, color=col, label=label.split(":")[0])
                for xi, v in zip(x + (i - 1) * width, vals, strict=True):
                    ax2.text(xi, v, f"{v:.1f}", ha="center", va="bottom",
                             fontsize=7 if len(groups) <= 4 else 5.5)
            names = [f"cluster {g}\n{_class_list(run, specs.get(int(g), {}).get('classes', []))}"
                     f"\nn = {e['groups'][g]['n']}" for g in groups]
            ax2.set_xticks(x, names, fontsize=8 if len(groups) <= 6 else 7)
            high = max([100 * e["groups"][g][k] for g in groups for k, _, _ in SYSTEMS] or [100])
            top = min(100.0, 5 * math.ceil((high + 1) / 5))  # zoomed above too
            ax2.set_ylim(floor, top + (top - floor) * 0.25)  # headroom for the legend
            ax2.yaxis.set_major_locator(ticker.MaxNLocator(6))
            ax2.set_yticks([t for t in ax2.get_yticks() if floor <= t <= 100])
            ax2.set_ylabel("accuracy on the test cases routed there (%)")
            ax2.set_xlabel("error cluster: the specialist's classes, test cases routed to it",
                           fontsize=9)
            ax2.legend(loc="upper center", fontsize=8, ncols=3)
            ax2.set_title(f"Per error cluster: {e['n_routed']} test cases with top "
                          f"probability < {e['threshold']:g} routed", fontsize=10)
            if not groups:
                ax2.text(0.5, 0.5, "no test case routed", transform=ax2.transAxes,
                         ha="center", va="center")
            f.suptitle(fig.title or f"Specialists vs the general network: {fit}, K = {e['k']}",
                       fontsize=13)
            name = fig.name if len(fig.fits) == 1 else f"{fig.name}_{fit}"
            path = out / f"{name}.png"
            save_png(f, path, CHART_DPI)
        drawn.append(Drawn(path, _experiment_caption(e)))
    return drawn


def _class_list(run: Run, classes: list[int]) -> str:
    """A specialist's classes under its bars: '3/5/8' for digits, names one per line (at most
    four, then '+N') for named classes."""
    if run.class_noun == "digit":
        return "/".join(map(str, classes))
    names = [run.class_name(c) for c in classes]
    return "\n".join(names[:4] + ([f"+{len(names) - 4}"] if len(names) > 4 else []))


def _experiment_caption(e: dict) -> str:
    d = e["routed_minus_general_ci"]
    mix = ""
    if "routed_mixture_accuracy" in e:
        m = e["routed_mixture_minus_general_ci"]
        mix = (f" (d) mixture: the same routed cases answered by every specialist, weighted by "
               f"1 / squared distance to its centre: {e['routed_mixture_accuracy']:.2%}, (d) - "
               f"(a) [{m[0] * 100:+.2f}, {m[1] * 100:+.2f}] points.")
    return (f"Test accuracy: (a) general {e['general_accuracy']:.2%}, (b) routed "
            f"{e['routed_accuracy']:.2%}, (c) baseline {e['baseline_accuracy']:.2%}; (b) - (a) "
            f"95% interval [{d[0] * 100:+.2f}, {d[1] * 100:+.2f}] points. {e['n_routed']} of "
            f"{e['n_test']} test cases (top probability < {e['threshold']:g}) went to the "
            f"specialist of their nearest error-cluster centre; the rest kept the general "
            f"answer. Each specialist: the general network fine-tuned on its cluster's classes "
            f"plus its own cases; the baseline saw as many extra examples "
            f"({e['extra_examples']:,}) from the whole training set." + mix + _gated(e))


def _gated(e: dict) -> str:
    if "routed_gated_accuracy" not in e:
        return ""
    used = [s["cluster"] for s in e["specialists"] if s.get("gate", {}).get("used")]
    g = e["routed_gated_minus_general_ci"]
    return (f" (e) gated: a specialist answers only if it beat the general network on the "
            f"validation cases routed to it ({len(used)} of {len(e['specialists'])} did"
            + (f": clusters {', '.join(map(str, used))}" if used else "") + "): "
            f"{e['routed_gated_accuracy']:.2%}, (e) - (a) [{g[0] * 100:+.2f}, "
            f"{g[1] * 100:+.2f}] points.")
