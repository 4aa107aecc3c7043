"""The chart figures of the suite: elbow, scores, composition, convergence, timing.

Each ``draw_<kind>(run, fig, out_dir) -> list[Drawn]`` reads one complete run directory and
writes PNG(s) into ``out_dir``; ordinary matplotlib axes in the dark theme of
:mod:`kmdask.report.style`.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
from matplotlib import patches, ticker, transforms

from kmdask.batch.rundir import Run
from kmdask.batch.spec import FigureSpec
from kmdask.report.kinds import FigureKind, text
from kmdask.report.style import (
    ALG_COLOURS,
    CHART_DPI,
    TEXT_HEX,
    Drawn,
    chart,
    cluster_colour,
    composition,
    dark_theme,
    fit_colour,
    fit_colours,
    fit_label,
    hex_colour,
    save_png,
)

EXTRA_COLOURS = ("#7a5c2e", "#2e5c7a", "#5c2e7a", "#2e7a5c")


def _per_k(run: Run, fit: str, key: str) -> tuple[list[int], list[float]]:
    res = run.fit_info(fit)["results"]
    ks = run.ks(fit)
    return ks, [float(res[str(k)][key]) for k in ks]


def draw_elbow(run: Run, fig: FigureSpec, out: Path) -> list[Drawn]:
    """WCSS against K for every listed fit on one axes (per row when the fits' rows differ)."""
    rows = {int(run.fit_info(f)["rows"]) for f in fig.fits}
    per_row = len(rows) > 1
    series = {f: _per_k(run, f, "inertia") for f in fig.fits}
    shared = sorted(set.intersection(*(set(ks) for ks, _ in series.values())))
    compare = len(fig.fits) > 1 and len(shared) > 1
    colours = fit_colours(run, fig.fits)
    with dark_theme():
        f = chart(8.5, 7.2 if compare else 5.0)
        if compare:
            ax, ax2 = f.subplots(2, 1, sharex=True, height_ratios=[2.2, 1])
        else:
            ax, ax2 = f.subplots(), None
        for i, (name, (ks, w)) in enumerate(series.items()):
            n = int(run.fit_info(name)["rows"])
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
        save_png(f, path, CHART_DPI)
    return [Drawn(path, "WCSS for each K; lower is tighter clusters. The bend (elbow) suggests "
                        "where more clusters stop paying off." +
                  (" Lower panel: each fit's WCSS relative to the best fit at that K."
                   if compare else ""))]


def draw_scores(run: Run, fig: FigureSpec, out: Path) -> list[Drawn]:
    """NMI and ARI of the clustering against the true classes, against K, per fit."""
    colours = fit_colours(run, fig.fits)
    with dark_theme():
        f = chart(11, 4.6)
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
        axes[0].set_ylabel(f"score against the true {run.class_noun}s (1 = perfect)")
        axes[1].legend(loc="lower right", fontsize=9)
        if fig.title:
            f.suptitle(fig.title)
        path = out / f"{fig.name}.png"
        save_png(f, path, CHART_DPI)
    return [Drawn(path, f"Agreement of the clusters with the true {run.class_noun} classes "
                        "(which the clustering never sees): NMI and ARI, 0 = chance, "
                        "1 = identical.")]


def draw_composition(run: Run, fig: FigureSpec, out: Path) -> list[Drawn]:
    """Per fit: a cluster x true-class heatmap for every K (row-normalised, counts on the axis)."""
    drawn = []
    for fit in fig.fits:
        ks = run.ks(fit)
        rows = int(run.fit_info(fit)["rows"])
        truth = run.truth(rows)
        ncols = min(3, len(ks))
        grid = [ks[i:i + ncols] for i in range(0, len(ks), ncols)]
        heights = [max(g) + 2.2 for g in grid]
        with dark_theme():
            f = chart(5.4 * ncols, 0.34 * sum(heights) + 0.8)
            gs = f.add_gridspec(len(grid), ncols, height_ratios=heights)
            im, used = None, []
            for r, row in enumerate(grid):
                for c, k in enumerate(row):
                    ax = f.add_subplot(gs[r, c])
                    used.append(ax)
                    comp = composition(run.fit_labels(fit, k), truth, k)
                    share = comp / np.maximum(comp.sum(axis=1, keepdims=True), 1)
                    im = _heatmap(ax, share, comp, k, run)
                    res = run.fit_info(fit)["results"][str(k)]
                    ax.set_title(f"K = {k}   NMI {res['nmi']:.2f}   ARI {res['ari']:.2f}")
            if im is not None:
                cb = f.colorbar(im, ax=used, shrink=0.5, aspect=40, pad=0.01)
                cb.set_label("share of the cluster's rows")
                cb.ax.yaxis.set_major_formatter(ticker.PercentFormatter(1.0))
            f.suptitle(fig.title or f"Cluster composition by true {run.class_noun}: "
                                    f"{fit_label(run, fit)}",
                       fontsize=13)
            name = fig.name if len(fig.fits) == 1 else f"{fig.name}_{fit}"
            path = out / f"{name}.png"
            save_png(f, path, CHART_DPI)
        noun = run.class_noun
        drawn.append(Drawn(path, f"{fit}: each row is a cluster (its colour and size at the "
                                 f"left), each column a true {noun}; cells give the share of "
                                 f"the cluster's rows that are that {noun}. A pure cluster is "
                                 "one bright cell."))
    return drawn


def _heatmap(ax, share: np.ndarray, counts: np.ndarray, k: int, run: Run):
    im = ax.imshow(share, cmap="magma", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    ax.grid(False)
    if run.class_noun == "digit":
        ax.set_xticks(range(10))
    else:  # garment names: slanted, so ten fit under one heatmap
        ax.set_xticks(range(10), [run.class_name(c) for c in range(10)], rotation=40,
                      ha="right", fontsize=7)
    ax.set_xlabel(f"true {run.class_noun}")
    ax.set_yticks(range(k))
    ax.set_yticklabels([f"{j}  n={int(counts[j].sum())}" for j in range(k)], fontsize=8)
    ax.tick_params(length=0)
    ax.tick_params(axis="y", pad=13)
    strip = transforms.blended_transform_factory(ax.transAxes, ax.transData)
    for j in range(k):
        ax.add_patch(patches.Rectangle(
            (-0.032, j - 0.5), 0.026, 1, color=hex_colour(cluster_colour(j)), clip_on=False,
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
    per_fit = [(i, f, run.ks(f)) for i, f in enumerate(fits)]
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
    colours = fit_colours(run, fig.fits)
    with dark_theme():
        f = chart(3.9 * ncols, 3.1 * nrows + 0.5)
        axes = np.atleast_1d(f.subplots(nrows, ncols, squeeze=False)).ravel()
        for ax, (i, fit, k) in zip(axes, panels, strict=False):
            res = run.fit_info(fit)["results"][str(k)]
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
        save_png(f, path, CHART_DPI)
    return [Drawn(path, "WCSS after each Lloyd iteration. Grey lines: every trial; bold: the "
                        "trial kept (lowest final WCSS). The y axis is cut just above the "
                        "second point so that the tails stay visible.")]


def draw_timing(run: Run, fig: FigureSpec, out: Path) -> list[Drawn]:
    """Seconds per fit, and the run's total split into connect, fits and the rest."""
    names = list(fig.fits)
    secs = [float(run.fit_info(n).get("seconds") or 0.0) for n in names]
    t = run.manifest.get("timings", {})
    total, connect = float(t.get("total") or 0.0), float(t.get("connect") or 0.0)
    all_fits = sum(float(i.get("seconds") or 0.0) for i in run.manifest["fits"].values())
    with dark_theme():
        f = chart(9.5, 0.55 * (len(names) + 2) + 1.6)
        ax = f.subplots()
        y = np.arange(len(names))
        algs = [run.fit_info(n)["algorithm"] for n in names]
        alg_colour = {a: ALG_COLOURS.get(a, fit_colour(i + 2))
                      for i, a in enumerate(dict.fromkeys(algs))}
        for a, c in alg_colour.items():
            sel = [i for i, x in enumerate(algs) if x == a]
            ax.barh(y[sel], [secs[i] for i in sel], color=c, height=0.65, label=a)
        for yi, s in zip(y, secs, strict=True):
            ax.text(s, yi, f"  {s:.1f} s", va="center", fontsize=9)
        labels = []
        for n in names:
            i = run.fit_info(n)
            ks = run.ks(n)
            kdesc = f"K={ks[0]}" if len(ks) == 1 else f"K={ks[0]}..{ks[-1]}"
            labels.append(f"{n}\n{kdesc}, {i['rows']} rows,\n{i['iterations']} it \u00d7 "
                          f"{i['trials']} trials")
        yt = len(names) + 0.4
        parts = [("run: connect", connect, "#8a877a"), ("run: all fits", all_fits, "#5a5848")]
        # what job extensions timed (e.g. a classifier and its experiments)
        extra = [k for k in t if k not in ("connect", "total") and t[k]]
        for key, colour in zip(extra, itertools.cycle(EXTRA_COLOURS), strict=False):
            parts.append((f"run: {key.replace('_and_', ' + ').replace('_', ' ')}",
                          float(t[key]), colour))
        parts.append(("run: other (data, writing)",
                      max(total - sum(p[1] for p in parts), 0.0), "#2f2e29"))
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
        save_png(f, path, CHART_DPI)
    return [Drawn(path, "Wall-clock seconds of each fit (a multi-K fit's K values share one "
                        "time: they are fitted together), and the whole run split into "
                        "cluster start-up, fitting, and the rest (data reading, writing the "
                        "run directory).")]




KINDS = (
    FigureKind("elbow", draw_elbow, text("Within-cluster sum of squares against K.")),
    FigureKind("composition", draw_composition,
               text("Which true classes (digits, garments) make up each cluster.")),
    FigureKind("scores", draw_scores, text("Cluster quality against the true class labels.")),
    FigureKind("convergence", draw_convergence,
               text("How each trial's WCSS fell, iteration by iteration.")),
    FigureKind("timing", draw_timing, text("Where the run's time went.")),
)
