"""The error-case extension's part of the report: its figure kinds, and its section of each
run's entry on the page (the general network and the experiments' table)."""

from __future__ import annotations

from kmdask.batch.rundir import Run
from kmdask.report.html import esc, kv_table, pct
from kmdask.report.kinds import FigureKind, ReportPart, text


def _ci(v: list[float]) -> str:
    return f"[{pct(v[0])}, {pct(v[1])}]"


def index_section(run: Run) -> str:
    """The general network, and each experiment's table (empty for image-only runs)."""
    m = run.manifest
    clf = m.get("classifier")
    if not clf:
        return ""
    st = clf.get("settings", {})
    parts = ["<h3>General network</h3>", kv_table([
        ("network", esc(f"784-{'-'.join(map(str, st.get('hidden', [])))}-10 MLP (numpy), "
                       f"{st.get('epochs')} epochs, shifts ≤ {st.get('shift')} px, "
                       f"seed {st.get('seed')}")),
        ("test accuracy", f"<b>{pct(clf['test_accuracy'])}</b> (train "
                          f"{pct(clf['train_accuracy'])}"
                          + (f", validation {pct(clf['validation_accuracy'])} on training rows "
                             f"{clf['validation_rows'][0]}–{clf['validation_rows'][1] - 1}, "
                             "held out of every training" if "validation_accuracy" in clf
                             else "") + ")"),
        ("training", esc(f"{clf['train_seconds']:.1f} s on {clf['train_rows']} rows"
                        + ("; this run reused the cached model" if clf.get("reused") else ""))),
        ("fingerprint", f"<code>{esc(clf['fingerprint'][:16])}</code> (cached under "
                        "<code>runs/_models/</code>)")])]
    head = ("<tr><th>experiment (fit)</th><th>K</th><th>routed test cases</th><th>(a) general"
            "</th><th>(b) routed</th><th>(c) baseline</th><th>(b)−(a)</th>"
            "<th>(b′) reliable centre competing</th><th>(d) mixture by distance</th>"
            "<th>(e) gated on validation</th>"
            "<th>McNemar p (a) vs (b)</th><th>McNemar p (c) vs (b)</th></tr>")
    rows = []
    for fit, e in m.get("experiments", {}).items():
        d = e["routed_minus_general_ci"]
        rows.append(
            f"<tr><td><b>{esc(fit)}</b></td><td class=n>{e['k']}</td><td class=n>"
            f"{e['n_routed']} of {e['n_test']} (top p &lt; {e['threshold']:.6g}"
            + (f", chosen on validation: ≤ {pct(e['threshold_rule']['validation_error'])} "
               "errors above it" if e.get("threshold_rule") else "") + ")</td>"
            + "".join(f"<td class=n>{pct(e[f'{s}_accuracy'])} {_ci(e[f'{s}_ci'])}</td>"
                      for s in ("general", "routed", "baseline"))
            + f"<td class=n>[{100 * d[0]:+.2f}, {100 * d[1]:+.2f}] pts</td>"
            + (f"<td class=n>{pct(e['routed_nearest_accuracy'])} "
               f"{_ci(e['routed_nearest_ci'])}, {e['n_routed_nearest']} routed</td>"
               if e.get("routed_nearest_ci") else "<td></td>")
            + (f"<td class=n>{pct(e['routed_mixture_accuracy'])} "
               f"{_ci(e['routed_mixture_ci'])}</td>" if e.get("routed_mixture_ci")
               else "<td></td>")
            + (f"<td class=n>{pct(e['routed_gated_accuracy'])} "
               f"{_ci(e['routed_gated_ci'])}</td>" if e.get("routed_gated_ci")
               else "<td></td>")
            + f"<td class=n>{e['p_general_vs_routed']:.3g}</td>"
            f"<td class=n>{e['p_baseline_vs_routed']:.3g}</td></tr>")
    if rows:
        parts.append("<h3>Specialist experiments</h3><p class=muted>Test accuracy with 95% "
                     "bootstrap intervals; details in each run's "
                     "<code>experiment.json</code>.</p>"
                     f"<table>{head}{''.join(rows)}</table>")
    return "\n".join(parts)


def _kinds() -> tuple[FigureKind, ...]:
    from kmdask.errorcases import figures

    return (
        FigureKind("cases", figures.draw_cases, text(
            "The original's error-case figure: the general network's outputs for every training "
            "image (case vectors) clustered. Per cluster: its size, a bar chart of its mean "
            "vector (bar colour = class colour, class under each bar, one scale for all "
            "clusters) and images of its members. Cases whose top probability reaches ZeroOut "
            "are zeroed: they form the reliable cluster, drawn first in red (the cluster "
            "holding the zeroed cases; its index in the algorithm's order is shown above its "
            "bars).")),
        FigureKind("case_confusion", figures.draw_case_confusion, text(
            "The general network's confusion matrix restricted to each cluster's cases: which "
            "classes it mixes up where.")),
        FigureKind("experiment", figures.draw_experiment, text(
            "Do per-cluster specialists beat the general network? Test accuracy of the general "
            "network, of the system that routes uncertain test cases to the specialist of their "
            "nearest error cluster, and of a baseline given the same extra training.")),
    )


REPORT = ReportPart(kinds=_kinds(), html=index_section)
