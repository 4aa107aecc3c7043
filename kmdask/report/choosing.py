"""The choosing-K figure: every criterion of a sweep against K, and the chosen K of each.

One PNG per listed fit, read from the run's manifest only (the fit computed the criteria on
its workers, :mod:`kmdask.engine.criteria`; nothing here refits): the elbow with its knee,
Calinski–Harabasz, Davies–Bouldin, the mean silhouette on the stated sample, the gap statistic
with its s_K error bars, and the per-cluster silhouette plot of the K the silhouette chooses.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import ticker

from kmdask.batch.rundir import Run
from kmdask.batch.spec import FigureSpec
from kmdask.report.kinds import FigureKind
from kmdask.report.style import (
    CHART_DPI,
    TEXT_HEX,
    Drawn,
    chart,
    cluster_colour,
    dark_theme,
    fit_colours,
    fit_label,
    hex_colour,
    save_png,
)

#: (result key, panel title, what the chosen K maximises or minimises)
PANELS = (
    ("inertia", "Elbow: WCSS, knee (kneedle)", "knee"),
    ("calinski_harabasz", "Calinski\u2013Harabasz (higher is better)", "calinski_harabasz"),
    ("davies_bouldin", "Davies\u2013Bouldin (lower is better)", "davies_bouldin"),
    ("silhouette", "Mean silhouette (higher is better)", "silhouette"),
    ("gap", "Gap statistic \u00b1 s_K", "gap"),
)
CHOSEN = "#ffffff"


def _series(run: Run, fit: str, key: str) -> tuple[list[int], np.ndarray]:
    res = run.fit_info(fit)["results"]
    ks = run.ks(fit)
    if key == "inertia":
        return ks, np.array([float(res[str(k)]["inertia"]) for k in ks])
    return ks, np.array([float(res[str(k)].get("criteria", {}).get(key, np.nan)) for k in ks])


def _silhouette_panel(ax, profile: dict, mean: float, k: int) -> None:
    """A silhouette plot from per-cluster quantiles: each cluster a band as tall as its sample
    count, its values sorted from the largest down."""
    y0 = 0.0
    gap = max(sum(profile["counts"]) * 0.01, 1.0)
    for c, (n, q) in enumerate(zip(profile["counts"], profile["quantiles"], strict=True)):
        if not n:
            continue
        vals = np.asarray(q)[::-1]
        ys = y0 + np.linspace(0.0, n, vals.size)
        colour = hex_colour(cluster_colour(c))
        ax.fill_betweenx(ys, 0.0, vals, color=colour, lw=0, zorder=2)
        ax.text(-0.02, y0 + n / 2, str(c), ha="right", va="center", fontsize=8,
                color=TEXT_HEX, transform=ax.get_yaxis_transform())
        y0 += n + gap
    ax.set_axisbelow(True)  # the grid behind the bands
    ax.grid(False, axis="y")
    ax.axvline(mean, color=CHOSEN, ls="--", lw=1.2, zorder=3, label=f"mean {mean:.3f}")
    ax.axvline(0.0, color="#6d6a5c", lw=0.8)
    ax.set_yticks([])
    ax.set_ylim(0, y0)
    ax.set_title(f"Silhouettes per cluster, K={k} (sample)")
    ax.set_xlabel("silhouette value")
    ax.legend(loc="lower right", fontsize=8)


def draw_choosing_k(run: Run, fig: FigureSpec, out: Path) -> list[Drawn]:
    """Per fit: the criteria against K (the chosen K marked on each) and the silhouette plot
    of the K the silhouette chooses."""
    colours = fit_colours(run, fig.fits)
    drawn = []
    for i, fit in enumerate(fig.fits):
        info = run.fit_info(fit)
        crit = info.get("criteria")
        if not crit:  # a run made before the criteria existed, or criteria: false
            continue
        choices = crit["choices"]
        with dark_theme():
            f = chart(15, 8.6)
            axes = f.subplots(2, 3).ravel()
            for ax, (key, title, choice) in zip(axes, PANELS, strict=False):
                ks, y = _series(run, fit, key)
                if np.isnan(y).all():
                    ax.set_title(f"{title}: not computed")
                    continue
                if key == "gap":
                    _, sk = _series(run, fit, "gap_sk")
                    ax.errorbar(ks, y, yerr=sk, fmt="o-", color=colours[i], lw=2, ms=5,
                                capsize=4, ecolor=TEXT_HEX)
                else:
                    ax.plot(ks, y, "o-", color=colours[i], lw=2, ms=5)
                chosen = choices.get(choice)
                if chosen in ks:
                    ax.axvline(chosen, color=CHOSEN, ls="--", lw=1.2, alpha=0.8)
                    ax.plot([chosen], [y[ks.index(chosen)]], "o", ms=12, mfc="none",
                            mec=CHOSEN, mew=2, label=f"chosen K = {chosen}")
                    ax.legend(loc="best", fontsize=9)
                ax.set_title(title)
                ax.set_xlabel("K (clusters)")
                ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
                if key == "inertia":
                    ax.yaxis.set_major_formatter(ticker.EngFormatter(sep=""))
            k = choices.get("silhouette")
            res = info["results"].get(str(k), {})
            if res.get("silhouette_profile"):
                _silhouette_panel(axes[5], res["silhouette_profile"],
                                  float(res["criteria"]["silhouette"]), int(k))
            else:
                axes[5].set_axis_off()
            f.suptitle(fig.title or f"Choosing K: {fit_label(run, fit)}")
            path = out / (f"{fig.name}.png" if len(fig.fits) == 1 else f"{fig.name}_{fit}.png")
            save_png(f, path, CHART_DPI)
        n = crit.get("silhouette_sample")
        refs = crit.get("gap_references")
        drawn.append(Drawn(path, f"{fit}: criteria for choosing K, the chosen K of each "
                                 f"circled: knee of the elbow (kneedle), Calinski\u2013Harabasz "
                                 f"(max), Davies\u2013Bouldin (min) on all rows; silhouette "
                                 f"(max) on a seeded sample of {n} rows; gap statistic with "
                                 f"{refs} uniform reference sets (smallest K with Gap(K) \u2265 "
                                 f"Gap(K+1) \u2212 s_(K+1)). Last panel: per-cluster "
                                 f"silhouettes of the silhouette's K."))
    return drawn


def _describe(fig: FigureSpec) -> str:
    return ("Which K do internal criteria suggest? Each is computed by the fit on its workers "
            "from the final models and stored in every model's result.")


KIND = FigureKind("choosing_k", draw_choosing_k, _describe)
