"""Scaling with workers: ``python -m kmdask.bench scaling`` (``make bench-scaling``).

The 1.02M-row fit of ``make bench`` (``kmdask stage --augment 16``; staged here when missing)
on LocalClusters of 1, 2, 4, ... workers of one thread each: K=10, the same initial centres for
every run (K rows drawn with a fixed seed), tol 0 and a fixed iteration count, the rows persisted
in the workers. Each fit runs in a fresh interpreter, the worker counts interleaved across
repetitions (1 2 4 ... 1 2 4 ...) so that the machine's drift spreads over all of them. A run
times its cluster start, its loading (read and persist) and its fit apart; the Lloyd
iterations are timed alone too (the per-iteration seconds kmdask reports).

Parallel efficiency of ``w`` workers: ``T(1) / (w T(w))`` on the median Lloyd time (1.0: perfect
speed-up). Worker counts above the machine's cores are run but marked oversubscribed. Every
run's inertia must be the same to the last bit (a fit is bit-identical across worker counts):
the table says so. Writes bench/scaling.json and bench/scaling.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from kmdask.bench import summary

K = 10


def _max_rss_kib() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def one_run(store: Path, workers: int, init: Path, iters: int) -> dict:
    """One fit on a fresh LocalCluster of ``workers`` x 1 thread (in this interpreter)."""
    from distributed import wait

    from kmdask.batch.cluster import connect
    from kmdask.data.store import open_images
    from kmdask.engine.estimator import fit_models

    rec: dict = {"workers": workers}
    profile = {"kind": "local", "n_workers": workers, "threads_per_worker": 1,
               "memory_limit": "auto", "name": "scaling"}
    t = time.perf_counter()
    with connect(profile) as client:
        client.wait_for_workers(workers)
        rec["setup_s"] = time.perf_counter() - t
        t = time.perf_counter()
        X = open_images(store, "train").persist()
        wait(X)
        rec["load_s"] = time.perf_counter() - t
        secs: list[float] = []
        t = time.perf_counter()
        res = fit_models(X, [K], init=np.load(init), max_iter=iters, tol=0.0, persist=True,
                         progress=lambda p: secs.append(p["seconds"]))
        rec["fit_s"] = time.perf_counter() - t
        # each worker's own peak (the kernel's account, KiB on Linux): no polling during the fit
        peak = max(client.run(_max_rss_kib).values())
        rec.update(lloyd_s=res.timings["lloyd"], prepare_s=res.timings["prepare"],
                   iteration_s=statistics.mean(secs), n_iter=int(res.results[0].n_iter),
                   inertia=float(res.results[0].inertia), peak_worker_rss_mb=peak / 1024)
    return rec


def render(res: dict) -> str:
    """bench/scaling.md from the results (``render(json.load(open("bench/scaling.json")))``)."""
    cores = res["machine"]["cpus"]
    lines = ["# Scaling with workers", "",
             f"{res['rows']:,} rows x {res['cols']} uint8, persisted; K={K}, the same initial "
             f"centres (K rows, seed 0), tol 0, {res['iters']} iterations; LocalCluster of w "
             f"workers x 1 thread; {res['reps']} repetitions, interleaved; this machine: "
             f"{cores} cores ({res['machine']['platform']}).", "",
             "| workers | Lloyd min / median (s) | a Lloyd iteration (ms, median) | speed-up | "
             "parallel efficiency | fit (s, median) | load (s) | peak worker RSS (MiB) |",
             "|---|---|---|---|---|---|---|---|"]
    base = res["runs"].get("1")
    for w, r in sorted(res["runs"].items(), key=lambda kv: int(kv[0])):
        lm = r["lloyd_s"]["median"]
        speed = eff = "n/a"
        if base is not None:
            s = base["lloyd_s"]["median"] / lm
            speed, eff = f"{s:.2f}x", f"{s / int(w):.2f}"
        over = " (oversubscribed)" if int(w) > cores else ""
        lines.append(f"| {w}{over} | {r['lloyd_s']['min']:.2f} / {lm:.2f} | "
                     f"{r['iteration_s']['median'] * 1e3:.0f} | {speed} | {eff} | "
                     f"{r['fit_s']['median']:.2f} | {r['load_s']['median']:.2f} | "
                     f"{max(r['peak_worker_rss_mb']):.0f} |")
    inertias = {v for r in res["runs"].values() for v in r["inertia"]}
    lines += ["", ("Inertia the same in every run, to the last bit: "
                   f"{next(iter(inertias)):,.6f}." if len(inertias) == 1 else
                   f"**Inertia differs between runs**: {sorted(inertias)}"), ""]
    if res.get("failed"):
        lines += ["Runs that failed: " + "; ".join(res["failed"]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kmdask.bench scaling", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, default=Path("data/mnist-aug16.zarr"),
                    help="the rows (default: the 1.02M-row store of make bench)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per run")
    ap.add_argument("--out", type=Path, default=Path("bench"))
    ap.add_argument("--one", nargs=3, metavar=("WORKERS", "INIT", "RESULT"),
                    help=argparse.SUPPRESS)  # a single run, in the interpreter it starts
    args = ap.parse_args(argv)
    if args.one:
        w, init, out = args.one
        Path(out).write_text(json.dumps(one_run(args.store, int(w), Path(init), args.iters)))
        return 0
    if any(w < 1 for w in args.workers):
        ap.error(f"--workers must be positive, got {args.workers}")

    from kmdask.data.store import open_images

    if not args.store.exists():
        print(f"== staging {args.store} (kmdask stage --augment 16)", flush=True)
        if subprocess.run([sys.executable, "-m", "kmdask", "stage", "--dataset", "mnist",
                           "--augment", "16", "--out", str(args.store), "-q"]).returncode:
            print(f"kmdask.bench scaling: could not stage {args.store} (see above)",
                  file=sys.stderr)
            return 2
    X = open_images(args.store, "train")
    res: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                 "rows": int(X.shape[0]), "cols": int(X.shape[1]), "iters": args.iters,
                 "reps": args.reps, "runs": {}, "failed": []}
    raw: dict[int, list[dict]] = {w: [] for w in args.workers}
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kmdask-scaling-") as tmp:
        init = Path(tmp) / "init.npy"
        rows = np.sort(np.random.default_rng(0).choice(X.shape[0], K, replace=False))
        np.save(init, X[rows].compute().astype(np.float64) / 255.0)
        for rep in range(args.reps):
            for w in args.workers:
                out = Path(tmp) / f"run-{w}-{rep}.json"
                cmd = [sys.executable, "-m", "kmdask.bench", "scaling", "--store",
                       str(args.store), "--iters", str(args.iters), "--one", str(w), str(init),
                       str(out)]
                try:
                    subprocess.run(cmd, check=True, timeout=args.timeout,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
                    why = getattr(exc, "stderr", b"") or b""
                    last = why.decode(errors="replace").strip().splitlines()[-1:] or [str(exc)]
                    res["failed"].append(f"{w} workers, repetition {rep + 1}: {last[0]}")
                    print(f"  [{rep + 1}/{args.reps}] {w:>2} workers: failed: {last[0]}",
                          flush=True)
                    continue
                r = json.loads(out.read_text())
                raw[w].append(r)
                print(f"  [{rep + 1}/{args.reps}] {w:>2} workers: Lloyd {r['lloyd_s']:.2f} s "
                      f"({r['iteration_s'] * 1e3:.0f} ms an iteration), fit {r['fit_s']:.2f} s,"
                      f" load {r['load_s']:.2f} s", flush=True)
    for w, recs in raw.items():
        if recs:
            res["runs"][str(w)] = {
                **{k: summary([r[k] for r in recs])
                   for k in ("lloyd_s", "iteration_s", "fit_s", "load_s", "setup_s")},
                "inertia": [r["inertia"] for r in recs],
                "peak_worker_rss_mb": [r["peak_worker_rss_mb"] for r in recs]}
    res["total_s"] = time.perf_counter() - t_all
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scaling.json").write_text(json.dumps(res, indent=2, default=float))
    md = render(res)
    (args.out / "scaling.md").write_text(md)
    print("\n" + md, flush=True)
    return 0 if not res["failed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
