"""Where the data lives: ``python -m kmdask.bench_storage`` (``make bench-storage``).

Stages MNIST (and an augmented copy) into a local store and into an S3 bucket served on
127.0.0.1 by moto's server, then times, interleaved and repeated (min and median):

- staging into each;
- a streamed Lloyd pass (K=10 from shared initial centres, fixed iterations, nothing
  persisted: every pass reads every chunk) on a 2-worker x 1-thread LocalCluster;
- one read of every chunk through each store layer zarr could use for S3: ``FsspecStore`` over
  s3fs with its defaults, with ``max_concurrency=1`` (kmdask's default: no HEAD before each
  GET), and ``ObjectStore`` over obstore (when installed).

moto is an in-process Python emulation of S3 on loopback: no network latency, its own CPU
cost. These figures compare store layers and show what the object-store path costs beyond
the engine; they say nothing of real S3. Needs the bench extra (moto[server], s3fs, obstore).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

OPTIONS = {"key": "bench", "secret": "bench"}


def _stat(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "n": len(values)}


def _moto() -> tuple[object, str]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


def _rm(where: str, options: dict) -> None:
    from kmdask.data.location import location

    loc = location(where, options)
    if loc.local:
        shutil.rmtree(loc.url, ignore_errors=True)
    elif loc.exists():
        loc.fs().rm(loc.fs_path(), recursive=True)


def bench_staging(source: Path | None, targets: dict[str, str], options: dict,
                  reps: int) -> dict:
    from kmdask.data.staging import stage_dataset

    out: dict[str, list[float]] = {k: [] for k in targets}
    for _ in range(reps):
        for name, where in targets.items():  # interleaved
            _rm(where, options)
            t = time.perf_counter()
            stage_dataset("mnist", out=where, source=source, storage_options=options)
            out[name].append(time.perf_counter() - t)
    return {k: _stat(v) for k, v in out.items()}


def bench_passes(stores: dict[str, str], options: dict, iters: int, reps: int) -> dict:
    """Seconds per streamed Lloyd pass, per store."""
    from distributed import Client, LocalCluster

    from kmdask.data.store import open_images
    from kmdask.engine.estimator import fit_models

    out: dict[str, list[float]] = {k: [] for k in stores}
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster, Client(cluster):
        arrays = {k: open_images(v, "train", storage_options=options)
                  for k, v in stores.items()}
        x0 = np.asarray(next(iter(arrays.values()))[:10].compute(), np.float64) / 255
        for _ in range(reps):
            for name, X in arrays.items():
                secs: list[float] = []
                fit_models(X, [10], init=x0, max_iter=iters, tol=0.0, persist=False,
                           progress=lambda p, s=secs: s.append(p["seconds"]))
                out[name].append(statistics.median(secs[1:] or secs))
    return {k: _stat(v) for k, v in out.items()}


def bench_layers(url: str, endpoint: str, reps: int) -> dict:
    """Seconds to read every chunk of train/images once (2 threads), per store layer."""
    import zarr
    from zarr.storage import FsspecStore

    bucket, prefix = url.split("://", 1)[1].split("/", 1)
    opts = {**OPTIONS, "endpoint_url": endpoint}
    layers = {
        "fsspec (s3fs defaults)": lambda: FsspecStore.from_url(
            url, storage_options=opts, read_only=True),
        "fsspec, max_concurrency=1 (kmdask)": lambda: FsspecStore.from_url(
            url, storage_options={**opts, "max_concurrency": 1}, read_only=True),
    }
    try:
        from obstore.store import S3Store
        from zarr.storage import ObjectStore

        layers["obstore"] = lambda: ObjectStore(S3Store(
            bucket, prefix=prefix, endpoint=endpoint, region="us-east-1",
            access_key_id=OPTIONS["key"], secret_access_key=OPTIONS["secret"],
            client_options={"allow_http": True}), read_only=True)
    except ImportError:
        pass
    out: dict[str, list[float]] = {k: [] for k in layers}
    for _ in range(reps):
        for name, make in layers.items():
            arr = zarr.open_array(store=make(), path="train/images", mode="r")
            rows = arr.chunks[0]

            def read(i, arr=arr, rows=rows):
                return int(arr[i * rows:(i + 1) * rows].sum(dtype=np.int64))

            t = time.perf_counter()
            with ThreadPoolExecutor(2) as ex:
                list(ex.map(read, range(-(-arr.shape[0] // rows))))
            out[name].append(time.perf_counter() - t)
    return {k: _stat(v) for k, v in out.items()}


def _table(r: dict) -> str:
    lines = ["| what | local store | moto S3 store | moto / local |", "|---|---|---|---|"]
    for key, label in (("staging", "stage MNIST (s)"), ("pass_60k", "Lloyd pass, 60k (s)"),
                       ("pass_big", f"Lloyd pass, {r.get('big_rows', 0):,} rows (s)")):
        if key in r:
            lo, s3 = r[key]["local"], r[key]["s3"]
            lines.append(f"| {label} | {lo['min']:.3f} / {lo['median']:.3f} | "
                         f"{s3['min']:.3f} / {s3['median']:.3f} | "
                         f"{s3['median'] / lo['median']:.2f} |")
    lines += ["", "| store layer (read all 60k-row chunks once) | min | median |", "|---|---|---|"]
    lines += [f"| {k} | {v['min']:.3f} | {v['median']:.3f} |" for k, v in r["layers"].items()]
    return "\n".join(lines) + "\n\n(min / median over the repeats; moto is not S3)\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kmdask.bench_storage", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", type=Path, default=None,
                    help="directory of the MNIST IDX files (default: kmdask's search)")
    ap.add_argument("--augment", type=int, default=4,
                    help="also time passes over MNIST + N warped copies (default 4; 0: none)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("bench"))
    args = ap.parse_args(argv)

    server, endpoint = _moto()
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    options = {**OPTIONS, "endpoint_url": endpoint}
    import s3fs

    s3fs.S3FileSystem(**options).mkdir("bench")
    tmp = Path(tempfile.mkdtemp(prefix="kmdask-bench-"))
    try:
        r: dict = {"note": "moto (in-process S3 emulation on loopback) is not S3"}
        targets = {"local": str(tmp / "mnist.zarr"), "s3": "s3://bench/mnist.zarr"}
        r["staging"] = bench_staging(args.source, targets, options, args.reps)
        r["pass_60k"] = bench_passes(targets, options, args.iters, args.reps)
        r["layers"] = bench_layers(targets["s3"], endpoint, args.reps)
        if args.augment:
            from kmdask.data.staging import stage_dataset

            big = {"local": str(tmp / "aug.zarr"), "s3": "s3://bench/aug.zarr"}
            for where in big.values():
                stage_dataset("mnist", out=where, source=args.source, augment=args.augment,
                              storage_options=options)
            r["big_rows"] = 60_000 * (args.augment + 1)
            r["pass_big"] = bench_passes(big, options, args.iters, args.reps)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        server.stop()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "storage.json").write_text(json.dumps(r, indent=2))
    table = _table(r)
    (args.out / "storage.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
