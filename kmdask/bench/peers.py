"""kmdask against its peers, side by side in one run: ``python -m kmdask.bench`` (``make bench``).

Peers: scikit-learn (lloyd and elkan), scikit-learn-intelex, faiss-cpu, dask-ml and Spark MLlib.
Each fit runs in a fresh interpreter (``python -m kmdask.bench.peers _worker SPEC``), the
libraries interleaved across repetitions (A B C ... A B C ...), so that no library gets a warm
process and the machine's drift spreads over all of them. A worker times its import, its
session or cluster start, its data loading (and persisting or caching) and its fit separately;
only the fit is compared. Inertia is recomputed here in float64 from each result's centres
(labels by nearest centre), never taken from the library.

Regimes:

- ``shared``: the same k-means++ initial centres (fixed seed, one .npy every worker loads),
  tol = 0 and a fixed iteration count: the time of the passes themselves; inertias are
  checked equal to ~7 digits;
- ``defaults``: each library's own defaults to convergence, one fit per seed;
- ``n_init10``: n_init = 10 with each library's own seeding (kmdask fuses the trials).

Threads: 2 for everyone (OMP/OpenBLAS/MKL_NUM_THREADS=2, OMP_WAIT_POLICY=PASSIVE and
threadpoolctl for the in-process libraries, faiss.omp_set_num_threads(2), Spark local[2], and
kmdask/dask-ml on a 2-worker x 1-thread LocalCluster). Writes bench/results.json (every raw
number) and bench/results.md.
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
THREADS = 2
LOCAL_PROFILE = {"kind": "local", "n_workers": 2, "threads_per_worker": 1,
                 "memory_limit": "4GiB", "name": "bench"}

LIBS = ["kmdask", "kmdask-f32", "sklearn-lloyd", "sklearn-elkan", "sklearnex", "faiss", "dask-ml",
        "spark"]
# kmdask on the same rows as float32 (x / 255): the float path against the pixel path, in the
# shared regime only (issue 12: a float32 iteration <= 1.2x a uint8 one)
FLOAT_LIBS = ["kmdask-f32"]
LABELS = {"kmdask": "kmdask", "kmdask-f32": "kmdask, float32 rows",
          "sklearn-lloyd": "scikit-learn (lloyd)",
          "sklearn-elkan": "scikit-learn (elkan)", "sklearnex": "scikit-learn-intelex",
          "faiss": "faiss-cpu", "dask-ml": "dask-ml", "spark": "Spark MLlib"}
# which module a library needs; a worker that cannot import it reports why
MODULES = {"kmdask": "kmdask", "kmdask-f32": "kmdask", "sklearn-lloyd": "sklearn",
           "sklearn-elkan": "sklearn", "sklearnex": "sklearnex", "faiss": "faiss",
           "dask-ml": "dask_ml", "spark": "pyspark"}
# faiss (nredo=10) is left out: 10 x 25 iterations, minutes per fit here
N_INIT_LIBS = ["kmdask", "sklearn-lloyd", "sklearnex"]

# What each library's "defaults" are (stated in the output).
DEFAULTS_NOTE = {
    "kmdask": "KMeans(10, random_state=seed): k-means||, max_iter=300, tol=1e-4",
    "sklearn-lloyd": "KMeans(10, random_state=seed): k-means++, n_init='auto' (1), tol=1e-4",
    "sklearn-elkan": "KMeans(10, algorithm='elkan', random_state=seed)",
    "sklearnex": "sklearnex.cluster.KMeans(10, random_state=seed)",
    "faiss": "faiss.Kmeans(d, 10, seed=seed, max_points_per_centroid=10**7): random rows, "
             "niter=25 (faiss has no tolerance)",
    "dask-ml": "dask_ml.cluster.KMeans(10, random_state=seed): k-means||, tol=1e-4",
    "spark": "pyspark.ml.clustering.KMeans(k=10, seed=seed): k-means|| (2 steps), maxIter=20, "
             "tol=1e-4",
}
SHARED_NOTE = {
    "spark": "the DataFrame API has no initial-model parameter: k-means|| with seed 0, "
             "maxIter=iters, tol=0 (its inertia is not expected to match)",
}

# issue 12's targets: (regime, size, peer, what, bound)
TARGETS = [
    ("shared", "60k", "sklearnex", "time", 1.0),
    ("defaults", "60k", "sklearnex", "time", 1.0),
    ("defaults", "60k", "sklearnex", "inertia", 1.0),
    ("shared", "1.02M", "sklearnex", "time", 0.6),
    ("shared", "1.02M", "faiss", "time", 0.5),
    ("n_init10", "60k", "sklearnex", "time", 0.4),
    ("shared", "60k", "kmdask-f32", "iteration", 1.2),  # kmdask-f32 / kmdask, this one
]


# --------------------------------------------------------------------------------------------
# worker: one fit in a fresh interpreter


def _limit_threads():
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(THREADS)


def _load_float32(store: str) -> np.ndarray:
    from kmdask.data.store import open_images

    x8 = open_images(store, "train").compute()
    return np.ascontiguousarray(x8.astype(np.float32) / np.float32(255))


def _fit_sklearn(spec: dict, rec: dict, t: float):
    from threadpoolctl import threadpool_limits

    if spec["lib"] == "sklearnex":
        import logging

        from sklearnex.cluster import KMeans as Est

        msgs: list[str] = []

        class _Keep(logging.Handler):
            def emit(self, r):
                msgs.append(r.getMessage())

        lg = logging.getLogger("sklearnex")
        lg.setLevel(logging.INFO)
        lg.addHandler(_Keep())
        rec["_msgs"] = msgs
        algo = {}
    else:
        from sklearn.cluster import KMeans as Est

        algo = {"algorithm": spec["lib"].split("-")[1]}
    rec["import_s"] = time.perf_counter() - t
    t = time.perf_counter()
    xf = _load_float32(spec["store"])
    rec["load_s"] = time.perf_counter() - t
    if spec["regime"] == "shared":
        init = np.load(spec["init"]).astype(np.float32)
        kw = dict(init=init, n_init=1, max_iter=spec["iters"], tol=0.0)
    elif spec["regime"] == "n_init10":
        kw = dict(n_init=10, random_state=spec["seed"])
    else:
        kw = dict(random_state=spec["seed"])
    with threadpool_limits(THREADS):
        t = time.perf_counter()
        m = Est(K, **kw, **algo).fit(xf)
        rec["fit_s"] = time.perf_counter() - t
    if spec["lib"] == "sklearnex":
        rec["dispatch"] = [s for s in rec.pop("_msgs") if "fit" in s.lower()][-3:]
    return m.cluster_centers_, int(m.n_iter_), float(m.inertia_)


def _fit_faiss(spec: dict, rec: dict, t: float):
    import faiss

    faiss.omp_set_num_threads(THREADS)
    rec["import_s"] = time.perf_counter() - t
    t = time.perf_counter()
    xf = _load_float32(spec["store"])
    rec["load_s"] = time.perf_counter() - t
    d = xf.shape[1]
    kw: dict = {}
    if spec["regime"] == "shared":
        km = faiss.Kmeans(d, K, niter=spec["iters"], max_points_per_centroid=10**7, seed=0)
        kw["init_centroids"] = np.ascontiguousarray(np.load(spec["init"]).astype(np.float32))
    elif spec["regime"] == "n_init10":
        km = faiss.Kmeans(d, K, nredo=10, max_points_per_centroid=10**7, seed=spec["seed"])
    else:
        km = faiss.Kmeans(d, K, max_points_per_centroid=10**7, seed=spec["seed"])
    t = time.perf_counter()
    km.train(xf, **kw)
    rec["fit_s"] = time.perf_counter() - t
    return km.centroids, int(km.cp.niter), float(km.obj[-1])


def _fit_dask(spec: dict, rec: dict, t: float):
    from distributed import wait

    from kmdask.batch.cluster import connect
    from kmdask.data.store import open_images

    if spec["lib"] == "dask-ml":
        from dask_ml.cluster import KMeans as DMKMeans
    else:
        from kmdask import KMeans
        from kmdask.engine.estimator import fit_models
    rec["import_s"] = time.perf_counter() - t
    t = time.perf_counter()
    with connect(LOCAL_PROFILE) as client:
        client.wait_for_workers(LOCAL_PROFILE["n_workers"])
        rec["setup_s"] = time.perf_counter() - t
        t = time.perf_counter()
        X = open_images(spec["store"], "train")
        if spec["lib"] in ("dask-ml", "kmdask-f32"):  # kmdask scales uint8 itself
            X = X.map_blocks(lambda b: b.astype(np.float32) / np.float32(255),
                             dtype=np.float32)
        X = X.persist()
        wait(X)
        rec["load_s"] = time.perf_counter() - t
        shared = spec["regime"] == "shared"
        init = np.load(spec["init"]) if shared else None
        t = time.perf_counter()
        if spec["lib"] == "dask-ml":
            if shared:
                m = DMKMeans(n_clusters=K, init=init.astype(np.float32),
                             max_iter=spec["iters"], tol=0.0).fit(X)
            else:
                m = DMKMeans(n_clusters=K, random_state=spec["seed"]).fit(X)
            rec["fit_s"] = time.perf_counter() - t
            return m.cluster_centers_, int(m.n_iter_), None
        if shared:
            secs: list[float] = []
            res = fit_models(X, [K], init=init.astype(np.float64), max_iter=spec["iters"],
                             tol=0.0, persist=True, progress=lambda p: secs.append(p["seconds"]))
            rec["fit_s"] = time.perf_counter() - t
            rec["kmdask_timings"] = res.timings
            rec["iteration_s"] = statistics.mean(secs)  # the Lloyd iterations alone
            r = res.results[0]
            return r.centres, int(r.n_iter), float(r.inertia)
        n_init = 10 if spec["regime"] == "n_init10" else 1
        m = KMeans(K, n_init=n_init, random_state=spec["seed"]).fit(X)
        rec["fit_s"] = time.perf_counter() - t
        return m.cluster_centers_, int(m.n_iter_), float(m.inertia_)


def _fit_spark(spec: dict, rec: dict, t: float):
    from pyspark.ml.clustering import KMeans as SKM
    from pyspark.ml.functions import array_to_vector
    from pyspark.sql import SparkSession

    rec["import_s"] = time.perf_counter() - t
    t = time.perf_counter()
    spark = (SparkSession.builder.master(f"local[{THREADS}]").appName("kmdask-bench")
             .config("spark.driver.memory", "6g").config("spark.ui.enabled", "false")
             .config("spark.sql.shuffle.partitions", str(THREADS)).getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    rec["setup_s"] = time.perf_counter() - t
    try:
        t = time.perf_counter()
        df = spark.read.parquet(spec["parquet"]).select(
            array_to_vector("features").alias("features")).cache()
        rec["rows"] = df.count()
        rec["load_s"] = time.perf_counter() - t
        if spec["regime"] == "shared":
            est = SKM(k=K, maxIter=spec["iters"], tol=0.0, seed=0)
        else:
            est = SKM(k=K, seed=spec["seed"])
        t = time.perf_counter()
        m = est.fit(df)
        rec["fit_s"] = time.perf_counter() - t
        centres = np.array([np.asarray(c) for c in m.clusterCenters()])
        return centres, int(m.summary.numIter), float(m.summary.trainingCost)
    finally:
        spark.stop()


def worker(spec: dict) -> None:
    t = time.perf_counter()
    rec: dict = {"lib": spec["lib"], "regime": spec["regime"], "seed": spec.get("seed")}
    lib = spec["lib"]
    if lib in ("sklearn-lloyd", "sklearn-elkan", "sklearnex"):
        fit = _fit_sklearn
    elif lib == "faiss":
        fit = _fit_faiss
    elif lib in ("kmdask", "kmdask-f32", "dask-ml"):
        fit = _fit_dask
    else:
        fit = _fit_spark
    try:
        centres, n_iter, own = fit(spec, rec, t)
    except ImportError as exc:
        rec["error"] = f"cannot import: {exc}"
    except Exception as exc:  # reported, never fatal for the bench
        rec["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    else:
        np.save(spec["centres_out"], np.asarray(centres, dtype=np.float64))
        rec.update(n_iter=n_iter, own_inertia=own)
    Path(spec["result_out"]).write_text(json.dumps(rec))


# --------------------------------------------------------------------------------------------
# driver


def inertia64(x8: np.ndarray, centres: np.ndarray, block: int = 20_000) -> float:
    """Sum of squared distances to the nearest centre, in float64, of x8 / 255."""
    c = np.asarray(centres, dtype=np.float64)
    cn = np.einsum("ij,ij->i", c, c)
    total = 0.0
    for s in range(0, x8.shape[0], block):
        x = x8[s : s + block].astype(np.float64) / 255.0
        lab = np.argmin(cn[None, :] - 2.0 * (x @ c.T), axis=1)
        d = x - c[lab]
        total += float(np.einsum("ij,ij->", d, d))
    return total


class Runner:
    def __init__(self, work: Path, timeout: float, log):
        self.work, self.timeout, self.log = work, timeout, log
        self.broken: dict[str, str] = {}  # lib -> why it is left out
        self.n = 0

    def run(self, spec: dict, timeout: float | None = None) -> dict:
        self.n += 1
        spec = {**spec, "centres_out": str(self.work / f"c{self.n}.npy"),
                "result_out": str(self.work / f"r{self.n}.json")}
        env = {**os.environ, "OMP_NUM_THREADS": str(THREADS),
               "OPENBLAS_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS),
               "OMP_WAIT_POLICY": "PASSIVE", "PYTHONWARNINGS": "ignore"}
        t = time.perf_counter()
        try:
            p = subprocess.run([sys.executable, "-m", "kmdask.bench.peers", "_worker",
                                json.dumps(spec)], env=env, capture_output=True, text=True,
                               timeout=timeout or self.timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout or self.timeout:.0f} s",
                    "timeout": True}
        wall = time.perf_counter() - t
        out = Path(spec["result_out"])
        if not out.exists():
            tail = (p.stderr or p.stdout or "").strip().splitlines()[-1:] or ["no output"]
            return {"error": f"worker exited {p.returncode}: {tail[0][:300]}"}
        rec = json.loads(out.read_text())
        rec["process_wall_s"] = wall
        if "error" not in rec:
            rec["centres"] = np.load(spec["centres_out"])
        return rec


def _init_centres(x8: np.ndarray, seed: int, path: Path, sample: int | None = None):
    """scikit-learn's k-means++ (fixed seed) on the rows, or on a seeded sample of them."""
    from sklearn.cluster import kmeans_plusplus
    from threadpoolctl import threadpool_limits

    if sample is not None and sample < x8.shape[0]:
        rows = np.sort(np.random.default_rng(seed).choice(x8.shape[0], sample, replace=False))
        x8 = x8[rows]
    with threadpool_limits(THREADS):
        xf = x8.astype(np.float32) / np.float32(255)
        c, _ = kmeans_plusplus(xf, K, random_state=seed)
    np.save(path, c.astype(np.float32))
    return c


def _write_parquet(x8: np.ndarray, path: Path) -> float:
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = time.perf_counter()
    xf = (x8.astype(np.float32) / np.float32(255)).ravel()
    arr = pa.FixedSizeListArray.from_arrays(pa.array(xf), x8.shape[1])
    tbl = pa.table({"features": arr.cast(pa.list_(pa.float32()))})
    pq.write_table(tbl, path, row_group_size=10_000)
    return time.perf_counter() - t


def run_regime(runner: Runner, name: str, size: str, libs: list[str], base: dict,
               rounds: list[dict], x8: np.ndarray, log, skipped: dict,
               caps: dict | None = None) -> dict:
    """Every library once per round (interleaved); returns the regime's raw and summary.

    ``caps``: library -> most rounds it takes part in (a very slow peer, stated).
    """
    recs: dict[str, list[dict]] = {lib: [] for lib in libs}
    caps = {lib: c for lib, c in (caps or {}).items() if lib in libs and c < len(rounds)}
    for i, extra in enumerate(rounds):
        for lib in libs:
            if lib in runner.broken or lib in skipped or i >= caps.get(lib, len(rounds)):
                continue
            rec = runner.run({**base, **extra, "lib": lib})
            if "error" in rec:
                log(f"  {LABELS[lib]}: {rec['error']}")
                if rec.get("timeout"):
                    skipped[lib] = f"{rec['error']} (round {i + 1}); left out of this regime"
                elif "import" in rec["error"] or i == 0:
                    runner.broken[lib] = rec["error"]
                continue
            rec["inertia"] = inertia64(x8, rec.pop("centres"))
            recs[lib].append(rec)
            log(f"  [{name} {size} {i + 1}/{len(rounds)}] {LABELS[lib]:22s} fit "
                f"{rec['fit_s']:7.2f} s  ({rec['n_iter']} it, inertia {rec['inertia']:.10g}; "
                f"load {rec.get('load_s', 0):.2f} s, setup {rec.get('setup_s', 0):.2f} s)")
    out: dict = {"regime": name, "size": size, "libs": {}}
    for lib, rs in recs.items():
        if not rs:
            continue
        out["libs"][lib] = {
            "fit_s": summary([r["fit_s"] for r in rs]),
            "load_s": summary([r.get("load_s", 0.0) for r in rs]),
            "setup_s": summary([r.get("setup_s", 0.0) for r in rs]),
            "import_s": summary([r.get("import_s", 0.0) for r in rs]),
            "process_wall_s": summary([r["process_wall_s"] for r in rs]),
            "inertia": summary([r["inertia"] for r in rs]),
            "n_iter": [r["n_iter"] for r in rs],
            "runs": rs,
        }
        if all("iteration_s" in r for r in rs):
            out["libs"][lib]["iteration_s"] = summary([r["iteration_s"] for r in rs])
    ours = out["libs"].get("kmdask")
    for lib, s in out["libs"].items():
        if ours is not None and lib != "kmdask":
            s["ratio_median"] = ours["fit_s"]["median"] / s["fit_s"]["median"]
            s["ratio_min"] = ours["fit_s"]["min"] / s["fit_s"]["min"]
            s["inertia_ratio_median"] = ours["inertia"]["median"] / s["inertia"]["median"]
        if ours is not None and lib in FLOAT_LIBS and "iteration_s" in ours:
            # the other way round: the float path's Lloyd iteration over the pixel path's
            s["iteration_ratio_median"] = (s["iteration_s"]["median"]
                                           / ours["iteration_s"]["median"])
            s["iteration_ratio_min"] = s["iteration_s"]["min"] / ours["iteration_s"]["min"]
    if name == "shared" and "sklearn-lloyd" in out["libs"]:
        ref = out["libs"]["sklearn-lloyd"]["inertia"]["median"]
        for s in out["libs"].values():
            rel = max(abs(v - ref) for v in s["inertia"]["values"]) / ref
            s["inertia_rel_diff_vs_sklearn"] = rel
            s["inertia_matches"] = bool(rel < 5e-7)  # equal to ~7 significant digits
    out["skipped"] = dict(skipped)
    out["fewer_rounds"] = {lib: f"{c} of {len(rounds)} rounds (very slow)"
                           for lib, c in caps.items()}
    return out


def _table(res: dict) -> str:
    lines: list[str] = []
    for key, reg in res["regimes"].items():
        lines.append(f"### {key}: {reg['title']}")
        lines.append("")
        lines.append("| library | fit min / median (s) | load (s) | setup (s) | iterations | "
                     "inertia (median, float64) | kmdask / peer (median; min) | "
                     "inertia check |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for lib, s in reg["libs"].items():
            f = s["fit_s"]
            its = sorted(set(s["n_iter"]))
            it = str(its[0]) if len(its) == 1 else f"{min(its)}-{max(its)}"
            ratio = (f"{s['ratio_median']:.3f}; {s['ratio_min']:.3f}" if "ratio_median" in s
                     else "")
            chk = ""
            if "inertia_matches" in s:
                chk = (("= " if s["inertia_matches"] else "differs ")
                       + f"({s['inertia_rel_diff_vs_sklearn']:.1e})")
            elif "inertia_ratio_median" in s:
                chk = f"kmdask/peer {s['inertia_ratio_median']:.5f}"
            if "iteration_ratio_median" in s:
                chk += (f"; a Lloyd iteration {s['iteration_s']['median'] * 1e3:.1f} ms, "
                        f"{s['iteration_ratio_median']:.2f}x kmdask's (min "
                        f"{s['iteration_ratio_min']:.2f}x)")
            lines.append(f"| {LABELS[lib]} | {f['min']:.3f} / {f['median']:.3f} | "
                         f"{s['load_s']['median']:.2f} | {s['setup_s']['median']:.2f} | {it} | "
                         f"{s['inertia']['median']:,.1f} | {ratio} | {chk} |")
        for lib, why in reg.get("fewer_rounds", {}).items():
            lines.append(f"| {LABELS[lib]} | (ran {why}) | | | | | | |")
        for lib, why in reg.get("skipped", {}).items():
            lines.append(f"| {LABELS[lib]} | left out: {why} | | | | | | |")
        lines.append("")
    if res.get("unavailable"):
        lines.append("Unavailable: " + "; ".join(f"{LABELS[k]}: {v}"
                                                 for k, v in res["unavailable"].items()))
        lines.append("")
    lines.append("### issue 12 targets")
    lines.append("")
    lines.append("| regime | peer | measure | kmdask / peer (median) | target | met |")
    lines.append("|---|---|---|---|---|---|")
    for t in res.get("targets", []):
        prec = 5 if t["what"] == "inertia" else 3
        v = "n/a" if t["value"] is None else f"{t['value']:.{prec}f}"
        met = "" if t["met"] is None else ("yes" if t["met"] else "no")
        lines.append(f"| {t['regime']} | {LABELS[t['peer']]} | {t['what']} | {v} | "
                     f"<= {t['bound']} | {met} |")
    return "\n".join(lines)


def _targets(regimes: dict) -> list[dict]:
    out = []
    for regime, size, peer, what, bound in TARGETS:
        reg = regimes.get(f"{regime}-{size}")
        s = (reg or {}).get("libs", {}).get(peer, {})
        v = s.get({"time": "ratio_median", "inertia": "inertia_ratio_median",
                   "iteration": "iteration_ratio_median"}[what])
        out.append({"regime": f"{regime} {size}", "peer": peer, "what": what, "bound": bound,
                    "value": v, "met": None if v is None else bool(v <= bound)})
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_worker"]:
        _limit_threads()
        worker(json.loads(argv[1]))
        return 0
    ap = argparse.ArgumentParser(prog="python -m kmdask.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, default=Path("data/mnist.zarr"))
    ap.add_argument("--big-store", type=Path, default=None,
                    help="the 1.02M-row store (kmdask stage --augment 16), shared regime only")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of the shared regime")
    ap.add_argument("--big-reps", type=int, default=2,
                    help="repetitions of the shared regime at 1.02M rows")
    ap.add_argument("--slow-rounds", type=int, default=1,
                    help="rounds Spark takes part in at 60k (about 80 s a process here)")
    ap.add_argument("--seeds", type=int, default=5, help="seeds of the defaults regime")
    ap.add_argument("--n-init-reps", type=int, default=2,
                    help="repetitions of the n_init=10 regime (0: leave it out)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--init-seed", type=int, default=0)
    ap.add_argument("--libs", nargs="*", default=LIBS, choices=LIBS)
    ap.add_argument("--big-libs", nargs="*",
                    default=["kmdask", "sklearn-lloyd", "sklearn-elkan", "sklearnex", "faiss"],
                    choices=LIBS, help="libraries at 1.02M rows (dask-ml and Spark are left "
                    "out by default: minutes per fit at this size)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per worker process")
    ap.add_argument("--regimes", nargs="*", default=["shared", "defaults", "n_init10", "big"],
                    choices=["shared", "defaults", "n_init10", "big"])
    ap.add_argument("--out", type=Path, default=Path("bench"))
    args = ap.parse_args(argv)

    from kmdask.data.store import open_images

    def log(msg: str) -> None:
        print(msg, flush=True)

    t_all = time.perf_counter()
    if not args.store.exists():
        from kmdask.data.staging import stage_dataset

        stage_dataset("mnist", out=args.store)
    args.out.mkdir(parents=True, exist_ok=True)
    res: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                             "python": platform.python_version()},
                 "threads": f"{THREADS} per library: OMP/OPENBLAS/MKL_NUM_THREADS={THREADS}, "
                            "OMP_WAIT_POLICY=PASSIVE (a spinning OpenMP team loses badly on a "
                            "loaded machine: faiss took 2.4x as long without it here), "
                            f"threadpoolctl({THREADS}), faiss.omp_set_num_threads({THREADS}), "
                            f"Spark local[{THREADS}], kmdask and dask-ml on a 2-worker x "
                            "1-thread LocalCluster",
                 "k": K, "iters": args.iters, "defaults": DEFAULTS_NOTE,
                 "shared_notes": SHARED_NOTE, "regimes": {}, "versions": {}}
    for lib in args.libs:
        try:
            from importlib.metadata import version

            dist = {"kmdask": "kmdask", "kmdask-f32": "kmdask", "sklearn-lloyd": "scikit-learn",
                    "sklearn-elkan": "scikit-learn", "sklearnex": "scikit-learn-intelex",
                    "faiss": "faiss-cpu", "dask-ml": "dask-ml", "spark": "pyspark"}[lib]
            res["versions"][dist] = version(dist)
        except Exception as exc:
            res["versions"][lib] = f"not installed ({type(exc).__name__})"
    log(f"threads: {res['threads']}")
    with tempfile.TemporaryDirectory(prefix="kmdask-bench-") as tmp:
        work = Path(tmp)
        runner = Runner(work, args.timeout, log)
        x8 = np.ascontiguousarray(open_images(args.store, "train").compute())
        t = time.perf_counter()
        init60 = work / "init-60k.npy"
        _init_centres(x8, args.init_seed, init60)
        res["init_60k_s"] = time.perf_counter() - t
        parquet = work / "mnist60k.parquet"
        if "spark" in args.libs:
            res["parquet_write_s"] = _write_parquet(x8, parquet)
        size = f"{x8.shape[0] // 1000}k"
        base = {"store": str(args.store), "init": str(init60), "iters": args.iters,
                "parquet": str(parquet)}
        plans = []
        if "shared" in args.regimes:
            plans.append(("shared", f"shared init (k-means++, seed {args.init_seed}), tol=0, "
                          f"{args.iters} iterations, {x8.shape[0]:,} rows, "
                          f"{args.reps} repetitions", args.libs,
                          [{"regime": "shared", "seed": 0}] * args.reps))
        if "defaults" in args.regimes:
            plans.append(("defaults", f"each library's defaults to convergence, "
                          f"{x8.shape[0]:,} rows, seeds 0..{args.seeds - 1}",
                          [lib for lib in args.libs if lib not in FLOAT_LIBS],
                          [{"regime": "defaults", "seed": s} for s in range(args.seeds)]))
        if "n_init10" in args.regimes and args.n_init_reps > 0:
            plans.append(("n_init10", f"n_init=10, each library's own seeding, "
                          f"{x8.shape[0]:,} rows, seeds 0..{args.n_init_reps - 1}",
                          [lib for lib in N_INIT_LIBS if lib in args.libs],
                          [{"regime": "n_init10", "seed": s} for s in range(args.n_init_reps)]))
        for name, title, libs, rounds in plans:
            log(f"== {name} {size}: {title}")
            reg = run_regime(runner, name, size, libs, base, rounds, x8, log, {},
                             caps={"spark": args.slow_rounds})
            reg["title"] = title
            res["regimes"][f"{name}-{size}"] = reg
        if "big" in args.regimes and args.big_store is not None:
            if not args.big_store.exists():
                log(f"== shared 1.02M: {args.big_store} missing "
                    "(kmdask stage --augment 16); left out")
            else:
                del x8
                xb = np.ascontiguousarray(open_images(args.big_store, "train").compute())
                bsize = f"{xb.shape[0] / 1e6:.2f}M"
                t = time.perf_counter()
                initb = work / "init-big.npy"
                # k-means++ on all 1.02M rows took 100 s here: a seeded 102,000-row sample
                _init_centres(xb, args.init_seed, initb, sample=xb.shape[0] // 10)
                res["init_big_s"] = time.perf_counter() - t
                skipped = {lib: "minutes per fit at this size (not run; --big-libs adds it)"
                           for lib in args.libs
                           if lib not in args.big_libs and lib not in FLOAT_LIBS}
                title = (f"shared init (k-means++, seed {args.init_seed}, on a seeded "
                         f"{xb.shape[0] // 10:,}-row sample), tol=0, "
                         f"{args.iters} iterations, {xb.shape[0]:,} rows, "
                         f"{args.big_reps} repetitions")
                log(f"== shared {bsize}: {title}")
                bbase = {**base, "store": str(args.big_store), "init": str(initb)}
                reg = run_regime(runner, "shared", bsize,
                                 [lib for lib in args.libs if lib in args.big_libs], bbase,
                                 [{"regime": "shared", "seed": 0}] * args.big_reps, xb, log,
                                 skipped)
                reg["title"] = title
                res["regimes"][f"shared-{bsize}"] = reg
        res["unavailable"] = dict(runner.broken)
    res["targets"] = _targets(res["regimes"])
    res["total_s"] = time.perf_counter() - t_all
    md = render(res)
    (args.out / "results.json").write_text(json.dumps(res, indent=2, default=float))
    (args.out / "results.md").write_text(md)
    print("\n" + md, flush=True)
    return 0


def render(res: dict) -> str:
    """bench/results.md from the results (``render(json.load(open("bench/results.json")))``)."""
    notes = ["Fit times only: import, session/cluster start (setup) and data loading/"
             "persisting/caching (load) are timed apart. Each fit in a fresh interpreter, "
             "libraries interleaved per repetition. Inertia recomputed in float64 from each "
             "result's centres (labels by nearest centre). Threads: " + res["threads"] + ".",
             "Shared init: " + "; ".join(f"{LABELS[k]}: {v}" for k, v in SHARED_NOTE.items())
             + ". faiss: max_points_per_centroid=10**7 (every row used), init_centroids "
             "given to train.",
             "Defaults: " + "; ".join(f"{LABELS[k]}: {v}" for k, v in DEFAULTS_NOTE.items())
             + "."]
    return "\n\n".join(notes) + "\n\n" + _table(res) + f"\n\nTotal: {res['total_s']:.0f} s\n"


if __name__ == "__main__":
    raise SystemExit(main())
