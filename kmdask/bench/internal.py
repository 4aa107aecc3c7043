"""kmdask's own figures: ``python -m kmdask.bench internal`` (not part of ``make bench``).

Same process, same data (MNIST-60k train scaled to [0, 1]), same 2-worker x 1-thread
LocalCluster for the dask-based fits. Each figure is repeated; min and median are reported with
the ratio kmdask / peer. Inertia is always recomputed here from labels and centres (dask-ml's
``inertia_`` is a sum of unsquared distances). Writes bench/internal.json and bench/internal.md
(``make bench`` compares the peers, each in its own process: :mod:`kmdask.bench.peers`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

import numpy as np

from kmdask.bench import summary


def _inertia(xf: np.ndarray, centres: np.ndarray, labels: np.ndarray) -> float:
    total = 0.0
    for s in range(0, xf.shape[0], 10_000):
        d = xf[s : s + 10_000].astype(np.float64) - centres[labels[s : s + 10_000]]
        total += float(np.einsum("ij,ij->", d, d))
    return total


class _PeakRSS:
    """Polls the workers' resident memory while a fit runs."""

    def __init__(self, client, every: float = 0.25):
        self.client, self.every, self.peak = client, every, 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        import psutil

        while not self._stop.is_set():
            try:
                rss = self.client.run(lambda: psutil.Process().memory_info().rss)
                self.peak = max(self.peak, max(rss.values()))
            except Exception:  # a worker restarting: keep polling
                pass
            self._stop.wait(self.every)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def bench_end_to_end(X, xf, seeds) -> dict:
    """kmdask vs dask-ml, K=10, k-means||, n_init=1: fit time and (true) inertia."""
    from dask_ml.cluster import KMeans as DMKMeans

    from kmdask import KMeans

    ours_t, ours_i, theirs_t, theirs_i = [], [], [], []
    Xf = X.map_blocks(lambda b: b.astype(np.float32) / np.float32(255), dtype=np.float32)
    Xf = Xf.persist()
    for seed in seeds:
        t = time.perf_counter()
        km = KMeans(10, random_state=seed).fit(X)
        ours_t.append(time.perf_counter() - t)
        ours_i.append(_inertia(xf, km.cluster_centers_, km.labels_.compute()))
        t = time.perf_counter()
        dm = DMKMeans(n_clusters=10, init="k-means||", random_state=seed).fit(Xf)
        theirs_t.append(time.perf_counter() - t)
        theirs_i.append(_inertia(xf, dm.cluster_centers_.astype(np.float64),
                                 np.asarray(dm.labels_)))
        print(f"  seed {seed}: kmdask {ours_t[-1]:.2f} s (inertia {ours_i[-1]:.6g}), "
              f"dask-ml {theirs_t[-1]:.2f} s (inertia {theirs_i[-1]:.6g})", flush=True)
    return {"kmdask_s": summary(ours_t), "dask_ml_s": summary(theirs_t),
            "kmdask_inertia_median": statistics.median(ours_i),
            "dask_ml_inertia_median": statistics.median(theirs_i),
            "ratio_median": statistics.median(ours_t) / statistics.median(theirs_t)}


def _per_iteration(fit) -> list[float]:
    secs: list[float] = []
    fit(lambda p: secs.append(p["seconds"]))
    return secs


def bench_per_iteration(X, Xz, xf, iters: int, reps: int) -> dict:
    """Lloyd seconds per iteration: kmdask persisted / streamed vs scikit-learn in memory.

    The three are interleaved in every repetition and compared pair by pair (median of the
    per-repetition ratios), so the machine's drift does not favour whichever ran first.
    """
    from sklearn.cluster import KMeans as SKKMeans
    from threadpoolctl import threadpool_limits

    from kmdask.engine.estimator import fit_models

    init = xf[np.random.default_rng(0).choice(xf.shape[0], 10, replace=False)].astype(np.float64)

    def ours(data, persist) -> float:
        per = _per_iteration(lambda cb: fit_models(
            data, [10], init=init, max_iter=iters, tol=0.0, persist=persist, progress=cb))
        return statistics.median(per)

    pers, stream, sk = [], [], []
    for _ in range(reps):
        pers.append(ours(X, True))
        stream.append(ours(Xz, False))
        with threadpool_limits(2):
            t = time.perf_counter()
            m = SKKMeans(10, init=init.astype(np.float32), n_init=1, max_iter=iters,
                         tol=0.0).fit(xf)
            sk.append((time.perf_counter() - t) / m.n_iter_)
    return {
        "kmdask_persisted_s": summary(pers), "kmdask_streamed_s": summary(stream),
        "sklearn_s": summary(sk),
        "ratio_persisted_vs_sklearn": statistics.median(p / q for p, q in zip(pers, sk,
                                                                              strict=True)),
        "ratio_streamed_vs_persisted": statistics.median(p / q for p, q in zip(stream, pers,
                                                                               strict=True)),
    }


def bench_n_init(X, xf, reps: int) -> dict:
    """K=10, n_init=10: kmdask (trials fused) vs scikit-learn (trials in turn)."""
    from sklearn.cluster import KMeans as SKKMeans
    from threadpoolctl import threadpool_limits

    from kmdask import KMeans

    ours_t, ours_i, sk_t, sk_i = [], [], [], []
    for seed in range(reps):
        t = time.perf_counter()
        km = KMeans(10, n_init=10, random_state=seed).fit(X)
        ours_t.append(time.perf_counter() - t)
        ours_i.append(km.inertia_)
        with threadpool_limits(2):
            t = time.perf_counter()
            sk = SKKMeans(10, n_init=10, random_state=seed).fit(xf)
            sk_t.append(time.perf_counter() - t)
        sk_i.append(sk.inertia_)
        print(f"  seed {seed}: kmdask {ours_t[-1]:.2f} s ({ours_i[-1]:.6g}), "
              f"scikit-learn {sk_t[-1]:.2f} s ({sk_i[-1]:.6g})", flush=True)
    return {"kmdask_s": summary(ours_t), "sklearn_s": summary(sk_t),
            "kmdask_inertia_median": statistics.median(ours_i),
            "sklearn_inertia_median": statistics.median(sk_i),
            "ratio_median": statistics.median(ours_t) / statistics.median(sk_t)}


def bench_sweep(X, iters: int, reps: int) -> dict:
    """Seconds per pass with K=2..10 x 3 trials fused vs one K=10 model."""
    from kmdask.engine.estimator import fit_models

    rng = np.random.default_rng(1)
    n = X.shape[0]
    single, sweep = [], []
    for _ in range(reps):
        init = rng.choice(n, 10, replace=False)
        x0 = X[np.sort(init)].compute().astype(np.float64) / 255
        single += _per_iteration(lambda cb, x0=x0: fit_models(
            X, [10], init=x0, max_iter=iters, tol=0.0, persist=True, progress=cb))
        # tol=0: all 27 models stay in the pass unless a labelling stops changing
        sweep += _per_iteration(lambda cb: fit_models(
            X, list(range(2, 11)), n_init=3, random_state=0, max_iter=iters, tol=0.0,
            persist=True, progress=cb))
    return {"single_k10_s": summary(single), "sweep_27_models_s": summary(sweep),
            "ratio_median": statistics.median(sweep) / statistics.median(single)}


def bench_out_of_core(store: Path, client, max_iter: int) -> dict:
    from kmdask import KMeans
    from kmdask.data.store import open_images

    X = open_images(store, "train")
    with _PeakRSS(client) as peak:
        t = time.perf_counter()
        km = KMeans(10, random_state=0, max_iter=max_iter, persist=False).fit(X)
        secs = time.perf_counter() - t
    rows_per_s = X.shape[0] * km.n_passes_ / secs
    return {"rows": int(X.shape[0]), "passes": km.n_passes_, "seconds": secs,
            "rows_per_s": rows_per_s, "peak_worker_rss_mb": peak.peak / 2**20,
            "persisted": km.persisted_}


# the figures main() can run (--only), in the order it runs them
_STEPS = ("per_iteration", "sweep", "end_to_end", "n_init", "mccaffrey", "out_of_core")


def bench_mccaffrey(X, reps: int) -> dict:
    """The seed mode's published main row (60,000 rows, K=10, 20 iterations, 20 trials) on the
    cluster; its time used to be a pass/fail bound in the tests (60 s)."""
    from kmdask.mccaffrey.fit import fit_mccaffrey

    times = []
    for _ in range(reps):
        t = time.perf_counter()
        res = fit_mccaffrey(X, 10, 20, 20)
        times.append(time.perf_counter() - t)
    return {"seconds": summary(times), "phases": res.timings, "counts": res.counts.tolist()}


def _table(results: dict) -> str:
    e, p, ni, sw = (results.get(k, {}) for k in ("end_to_end", "per_iteration", "n_init",
                                                 "sweep"))
    rows = ["| benchmark | kmdask (min / median) | peer (min / median) | ratio (median) | target |",
            "|---|---|---|---|---|"]

    def mm(s, scale=1.0, unit="s"):
        return f"{s['min'] * scale:.3g} / {s['median'] * scale:.3g} {unit}"

    if e:
        rows.append(f"| K=10 fit, k-means\\|\\| vs dask-ml | {mm(e['kmdask_s'])} | "
                    f"{mm(e['dask_ml_s'])} | {e['ratio_median']:.3f} | <= 0.25 |")
        rows.append(f"| ... inertia (median) | {e['kmdask_inertia_median']:.7g} | "
                    f"{e['dask_ml_inertia_median']:.7g} | "
                    f"{e['kmdask_inertia_median'] / e['dask_ml_inertia_median']:.4f} | <= 1 |")
    if p:
        rows.append(f"| Lloyd iteration, persisted vs scikit-learn | "
                    f"{mm(p['kmdask_persisted_s'], 1e3, 'ms')} | {mm(p['sklearn_s'], 1e3, 'ms')}"
                    f" | {p['ratio_persisted_vs_sklearn']:.3f} | <= 1.5 |")
        rows.append(f"| Lloyd iteration, streamed from zarr vs persisted | "
                    f"{mm(p['kmdask_streamed_s'], 1e3, 'ms')} | "
                    f"{mm(p['kmdask_persisted_s'], 1e3, 'ms')} | "
                    f"{p['ratio_streamed_vs_persisted']:.3f} | <= 2 |")
    if ni:
        rows.append(f"| K=10 n_init=10 vs scikit-learn | {mm(ni['kmdask_s'])} | "
                    f"{mm(ni['sklearn_s'])} | {ni['ratio_median']:.3f} | <= 0.5 |")
        rows.append(f"| ... inertia (median) | {ni['kmdask_inertia_median']:.7g} | "
                    f"{ni['sklearn_inertia_median']:.7g} | "
                    f"{ni['kmdask_inertia_median'] / ni['sklearn_inertia_median']:.5f} | "
                    "<= 1.001 |")
    if sw:
        rows.append(f"| sweep K=2..10 x 3 (27 models) per pass vs one K=10 | "
                    f"{mm(sw['sweep_27_models_s'], 1e3, 'ms')} | "
                    f"{mm(sw['single_k10_s'], 1e3, 'ms')} | {sw['ratio_median']:.3f} | <= 4 |")
    mc = results.get("mccaffrey")
    if mc:
        rows.append(f"| seed mode main row: 60,000 rows, K=10, 20 iterations x 20 trials | "
                    f"{mm(mc['seconds'])} | | | <= 60 s |")
    o = results.get("out_of_core")
    if o:
        rows.append(f"| out-of-core: {o['rows']:,} rows streamed, {o['passes']} passes | "
                    f"{o['rows_per_s'] / 1e6:.2f} M rows/s | peak worker RSS "
                    f"{o['peak_worker_rss_mb']:.0f} MB | | |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kmdask.bench internal", description=__doc__)
    ap.add_argument("--store", type=Path, default=Path("data/mnist.zarr"))
    ap.add_argument("--big-store", type=Path, default=None,
                    help="a >= 1M-row store (kmdask stage --augment 16) for the out-of-core row")
    ap.add_argument("--seeds", type=int, default=5,
                    help="seeds for the end-to-end and n_init rows (medians over them)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--only", nargs="*", default=None, choices=_STEPS)
    ap.add_argument("--out", type=Path, default=Path("bench"))
    args = ap.parse_args(argv)

    import dask.array as da
    from distributed import Client, LocalCluster

    from kmdask.batch.cluster import worker_environment
    from kmdask.data.staging import stage_dataset
    from kmdask.data.store import open_images

    if not args.store.exists():
        stage_dataset("mnist", out=args.store)
    Xz = open_images(args.store, "train")
    x8 = Xz.compute()
    xf = x8.astype(np.float32) / np.float32(255)
    only = set(args.only or _STEPS)
    results: dict = {"machine": {"cpus": __import__("os").cpu_count()}, "rows": int(x8.shape[0])}
    with worker_environment("4GiB"), \
            LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                         dashboard_address="127.0.0.1:0", memory_limit="4GiB") as cluster, \
            Client(cluster) as client:
        X = da.from_array(x8, chunks=Xz.chunks)
        steps = [
            ("per_iteration", lambda: bench_per_iteration(X, Xz, xf, 30, 2 * args.reps)),
            ("sweep", lambda: bench_sweep(X, 10, args.reps)),
            ("end_to_end", lambda: bench_end_to_end(X, xf, range(args.seeds))),
            ("n_init", lambda: bench_n_init(X, xf, args.seeds)),
            ("mccaffrey", lambda: bench_mccaffrey(X, args.reps)),
        ]
        for name, fn in steps:
            if name in only:
                print(f"== {name}", flush=True)
                results[name] = fn()
    if "out_of_core" in only and args.big_store is not None:
        print("== out_of_core", flush=True)
        with worker_environment("400MB"), \
                LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                             host="127.0.0.1", dashboard_address="127.0.0.1:0",
                             memory_limit="400MB") as cluster, \
                Client(cluster) as client:
            results["out_of_core"] = bench_out_of_core(args.big_store, client, 10)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "internal.json").write_text(json.dumps(results, indent=2))
    table = _table(results)
    (args.out / "internal.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
