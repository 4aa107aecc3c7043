"""Run a job: open its data, connect to a cluster, fit every fit, write the run directory.

A run is identified by its fingerprint = hash(data content fingerprint, chunking, the job spec,
kmdask version). Rerunning a job whose fingerprint already has a complete run is a no-op; an
interrupted run resumes from what its partial directory holds (finished fits, and the last
Lloyd checkpoint of the fit in progress). A lock per job keeps two reruns from interleaving.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kmdask import __version__
from kmdask.batch import rundir
from kmdask.batch.spec import FitSpec, JobSpec
from kmdask.engine import metrics
from kmdask.engine.lloyd import ModelState
from kmdask.errorcases.vectors import case_order
from kmdask.errors import ClusterStalled, DataError, KmdaskError

HEAD_ROWS_DEFAULT = 100


def say(msg: str, quiet: bool = False) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def resolve_store(job: JobSpec, *, quiet: bool = False) -> Path:
    """The job's zarr store; the default ``data/<dataset>.zarr`` is staged when missing."""
    from kmdask.data.staging import stage_dataset
    from kmdask.data.store import is_store

    if job.store:
        p = Path(job.store)
        if not is_store(p):
            raise DataError(f"{p}: not a kmdask store (job {job.name}, data.store); stage it "
                            "with 'kmdask stage --out ...'")
        return p
    p = Path("data") / f"{job.dataset}.zarr"
    if not is_store(p):
        stage_dataset(job.dataset, out=p, quiet=quiet)
    return p


def fingerprint(job: JobSpec, data_fp: str, chunks: tuple[int, ...],
                extra_data: str | None = None) -> str:
    """``extra_data``: the test split's fingerprint, for jobs whose classifier is scored on it
    (left out otherwise, so that image-only jobs keep their fingerprints)."""
    spec = {k: v for k, v in job.raw.items() if k != "description"}
    key = {"data": data_fp, "chunks": list(chunks), "spec": spec, "kmdask": __version__}
    if extra_data is not None:
        key["test_data"] = extra_data
    blob = json.dumps(key, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


@contextlib.contextmanager
def job_lock(job_dir: Path, *, wait: bool, quiet: bool) -> Iterator[None]:
    """An exclusive lock per job (flock: released by the OS if the holder dies)."""
    job_dir.mkdir(parents=True, exist_ok=True)
    path = job_dir / ".lock"
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            if not wait:
                raise KmdaskError(f"another run of job {job_dir.name!r} is in progress "
                                  f"(pid {holder}); not waiting (--no-wait)") from None
            say(f"kmdask: waiting for another run of job {job_dir.name!r} (pid {holder})",
                quiet)
            fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class FileCheckpoint:
    """Lloyd model states in one .npz, replaced atomically after every iteration."""

    def __init__(self, path: Path):
        self.path = path

    def load(self) -> list[ModelState] | None:
        if not self.path.exists():
            return None
        with np.load(self.path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            states = []
            for i, m in enumerate(meta):
                states.append(ModelState(centres=z[f"c{i}"].copy(), n_iter=m["n_iter"],
                                         active=m["active"], inertia_history=m["inertia"],
                                         shift_history=m["shift"], n_relocated=m["relocated"]))
        return states

    def save(self, states: list[ModelState]) -> None:
        meta = [{"n_iter": s.n_iter, "active": s.active, "inertia": s.inertia_history,
                 "shift": s.shift_history, "relocated": s.n_relocated} for s in states]
        arrays = {f"c{i}": s.centres for i, s in enumerate(states)}
        tmp = self.path.with_name(self.path.name + ".tmp.npz")
        np.savez(tmp, meta=np.array(json.dumps(meta)), **arrays)
        os.replace(tmp, self.path)

    @property
    def iteration(self) -> int:
        s = self.load()
        return max(st.n_iter for st in s) if s else 0


@dataclass
class RunOutcome:
    path: Path
    reused: bool
    seconds: float
    fingerprint: str


def _write_model(run: Path, fit: FitSpec, k: int, centres, labels, x_rows, truth, extra: dict
                 ) -> dict:
    """``x_rows``: the images (uint8 rows) whose first members are kept, also for fits that
    cluster case vectors."""
    d = rundir.fit_dir(run, fit.name, k)
    labels = np.asarray(labels, dtype=np.int32)
    idx = rundir.first_members(labels, k)
    flat = idx[idx >= 0]
    members = np.zeros((k, idx.shape[1], x_rows.shape[1]), dtype=np.uint8)
    if flat.size:
        wanted = np.sort(flat)
        rows = np.asarray(x_rows[wanted].compute())
        lookup = dict(zip(wanted.tolist(), range(wanted.size), strict=True))
        for j in range(k):
            for p, r in enumerate(idx[j][idx[j] >= 0]):
                members[j, p] = rows[lookup[int(r)]]
    rundir.write_npy(d / "centers.npy", np.asarray(centres, dtype=np.float64))
    rundir.write_npy(d / "labels.npy", labels)
    rundir.write_npy(d / "members.npy", members)
    rundir.write_npy(d / "members_idx.npy", idx)
    counts = np.bincount(labels, minlength=k)
    result = {"k": k, "counts": counts.tolist(),
              "nmi": metrics.nmi(truth, labels), "ari": metrics.ari(truth, labels), **extra}
    rundir.write_json(d / "result.json", result)
    return result


def _run_fit(run: Path, fit: FitSpec, X, truth, client, quiet: bool, images=None,
             zeroed: np.ndarray | None = None) -> dict:
    """Fit one entry of the job (all its K x trials); returns its manifest section.

    A cases fit clusters case vectors ``X``; ``images`` are then the matching MNIST rows (the
    members kept for the figures) and ``zeroed`` marks its reliable cases."""
    from kmdask.engine.estimator import fit_models

    images = X if images is None else images
    fdir = run / "fits" / fit.name
    done = fdir / "done.json"
    if done.exists():
        say(f"  {fit.name}: already done in this partial run, skipping", quiet)
        return json.loads(done.read_text())
    started_before = fdir.exists()  # a previous attempt got this far
    fdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results: dict[str, dict] = {}
    if fit.algorithm == "scalable":
        ck = FileCheckpoint(fdir / "checkpoint.npz")
        if ck.path.exists():
            say(f"  {fit.name}: resuming at iteration {ck.iteration}", quiet)
        elif started_before:
            say(f"  {fit.name}: no checkpoint yet (stopped during seeding): seeding again",
                quiet)

        def show(p: dict) -> None:
            say(f"  {fit.name} it {p['iteration']:3d}: {p['models']:3d} model(s), "
                f"inertia {p['inertia']:.6g}, shift {p['shift']:.3g}, "
                f"{p['seconds'] * 1e3:.0f} ms ({p['computed']:.0%} of distances)", quiet)

        res = fit_models(X, fit.ks, n_init=fit.trials, init=fit.init, max_iter=fit.iterations,
                         tol=fit.tol, random_state=fit.seed,
                         oversampling_factor=fit.oversampling_factor,
                         init_rounds=fit.init_rounds, persist=fit.persist, progress=show,
                         checkpoint=ck)
        for k in fit.ks:
            trial, best = res.best(k)
            trials = [r for (kk, _), r in zip(res.models, res.results, strict=True) if kk == k]
            extra = {"inertia": best.inertia, "n_iter": best.n_iter, "best_trial": trial,
                     "inertia_history": best.inertia_history,
                     "shift_history": best.shift_history,
                     "trial_inertia": [r.inertia for r in trials],
                     "trial_history": [r.inertia_history for r in trials],
                     "seconds": res.timings["total"]}
            labels, centres, order = case_order(fit.algorithm, np.concatenate(best.labels),
                                                np.asarray(best.centres), zeroed)
            results[str(k)] = _write_model(run, fit, k, centres, labels, images, truth,
                                           {**extra, **order})
        ck.path.unlink(missing_ok=True)
    else:
        from kmdask.mccaffrey.fit import fit_mccaffrey

        for k in fit.ks:
            t1 = time.perf_counter()
            r = fit_mccaffrey(X, k, fit.iterations, fit.trials, fit.seed, client=client)
            extra = {"inertia": r.wcss, "n_iter": int(r.trial_n_iter[r.best_trial]),
                     "best_trial": r.best_trial, "trial_inertia": list(r.trial_wcss),
                     "trial_n_iter": list(r.trial_n_iter),
                     "trial_history": [list(h) for h in r.trial_history],
                     "inertia_history": list(r.trial_history[r.best_trial]),
                     "seconds": time.perf_counter() - t1}
            labels, centres, order = case_order(fit.algorithm, r.labels, r.centers, zeroed)
            results[str(k)] = _write_model(run, fit, k, centres, labels, images, truth,
                                           {**extra, **order})
            say(f"  {fit.name} K={k}: WCSS {r.wcss:.6g}, counts "
                f"{', '.join(map(str, results[str(k)]['counts']))} "
                f"({extra['seconds']:.1f} s)", quiet)
    section = {"algorithm": fit.algorithm, "rows": int(X.shape[0]), "ks": list(fit.ks),
               "cases": None if fit.cases is None else vars(fit.cases).copy(),
               "iterations": fit.iterations, "trials": fit.trials, "seed": fit.seed,
               "init": fit.init, "tol": fit.tol, "seconds": time.perf_counter() - t0,
               "results": results}
    rundir.write_json(done, section)
    return section


def _versions() -> dict:
    import dask
    import distributed
    import zarr

    return {"kmdask": __version__, "python": platform.python_version(),
            "numpy": np.__version__, "dask": dask.__version__,
            "distributed": distributed.__version__, "zarr": zarr.__version__}


def run_job(job: JobSpec, profile: dict, *, runs_dir: Path = Path("runs"),
            address: str | None = None, wait: bool = True, quiet: bool = False) -> RunOutcome:
    """Run ``job`` on the cluster ``profile`` describes; returns where its run directory is."""
    from kmdask.batch.cluster import connect
    from kmdask.data.sources import describe  # paths under $HOME are written as ~/...
    from kmdask.data.store import data_fingerprint, open_images, open_labels

    t0 = time.perf_counter()
    store = resolve_store(job, quiet=quiet)
    images = open_images(store, job.split)
    labels_all = open_labels(store, job.split)
    n_total = images.shape[0]
    for f in job.fits:
        if f.rows is not None and f.rows > n_total:
            raise KmdaskError(f"{job.source}: fit {f.name!r}: rows={f.rows} but {store} "
                              f"{job.split} has only {n_total} rows")
        rows = f.rows or n_total
        if max(f.ks) > rows:
            raise KmdaskError(f"{job.source}: fit {f.name!r}: K={max(f.ks)} is larger than "
                              f"rows={rows}")
    fp = fingerprint(job, data_fingerprint(store, job.split), images.chunks[0],
                     data_fingerprint(store, "test") if job.uses_cases else None)
    run_id = fp[:16]
    job_dir = runs_dir / job.name
    final = job_dir / run_id
    with job_lock(job_dir, wait=wait, quiet=quiet):
        if (final / rundir.MANIFEST).exists():
            say(f"kmdask: job {job.name!r} unchanged (fingerprint {run_id}); complete run at "
                f"{final}, nothing to do", quiet)
            _point_latest(job_dir, run_id)
            return RunOutcome(final, True, time.perf_counter() - t0, fp)
        partial = job_dir / f".{run_id}.partial"
        if partial.exists():
            done = sorted(p.parent.name for p in partial.glob("fits/*/done.json"))
            say(f"kmdask: resuming interrupted run {run_id} ({len(done)} of {len(job.fits)} "
                f"fit(s) already done{': ' + ', '.join(done) if done else ''})", quiet)
        partial.mkdir(parents=True, exist_ok=True)
        max_rows = max((f.rows or n_total) for f in job.fits)
        head = max([HEAD_ROWS_DEFAULT] + [g.samples or 0 for g in job.figures])
        truth_all = np.asarray(labels_all[:max_rows].compute())
        rundir.write_npy(partial / "data" / "true_labels.npy", truth_all)
        rundir.write_npy(partial / "data" / "head_images.npy",
                         np.asarray(images[: min(head, max_rows)].compute()))
        say(f"kmdask: job {job.name!r}: {len(job.fits)} fit(s) on {store} ({job.split}), "
            f"run {run_id}", quiet)
        cases = None
        if job.uses_cases:
            from kmdask.errorcases.vectors import prepare_cases

            cases = prepare_cases(partial, job, store, runs_dir, quiet=quiet)
        fits: dict[str, dict] = {}
        t_cases = time.perf_counter() - t0
        with connect(profile, address=address, quiet=quiet) as client:
            t_conn = time.perf_counter() - t0 - t_cases
            cluster_info = dict(getattr(client, "kmdask_cluster", {}) or {})
            for i, f in enumerate(job.fits, 1):
                rows = f.rows or n_total
                say(f"[{i}/{len(job.fits)}] {f.name}: {f.algorithm}, K={list(f.ks)}, "
                    f"rows={rows}, iterations={f.iterations}, trials={f.trials}", quiet)
                try:
                    if f.cases is not None:
                        fits[f.name] = _run_fit(partial, f, cases.vectors(f.name, job.split)
                                                [:rows], truth_all[:rows], client, quiet,
                                                images=images[:rows], zeroed=cases.zeroed[f.name])
                    else:
                        fits[f.name] = _run_fit(partial, f, images[:rows], truth_all[:rows],
                                                client, quiet)
                except _cluster_failures() as exc:
                    # Lost workers (KilledWorker), a vanished scheduler, ...: what finished is
                    # on disk, so say how to resume rather than dumping dask's traceback.
                    # Anything else is a bug and keeps its traceback.
                    raise KmdaskError(_interrupted(job, f.name, partial, exc)) from None
        extra: dict = {}
        timings = {"connect": t_conn}
        if cases is not None:
            timings["classifier_and_cases"] = t_cases
            extra["classifier"] = {k: v for k, v in cases.info.items() if k != "epoch_loss"}
        if job.experiments:
            from kmdask.errorcases.experiment import run_experiments

            t_exp = time.perf_counter()
            extra["experiments"] = run_experiments(partial, job, cases, quiet=quiet)
            timings["experiments"] = time.perf_counter() - t_exp
        manifest = {
            **extra,
            "status": "complete", "job": job.name, "job_file": describe(job.source),
            "fingerprint": fp, "run_id": run_id, "versions": _versions(),
            "data": {"dataset": job.dataset, "store": describe(store), "split": job.split,
                     "fingerprint": data_fingerprint(store, job.split), "rows": int(n_total),
                     "chunks": list(images.chunks[0])},
            "profile": {"name": profile.get("name"), "kind": profile.get("kind")},
            "cluster": {k: v for k, v in cluster_info.items() if k != "dashboard"},
            "spec": _public_spec(job.raw, describe), "fits": fits,
            "timings": {**timings, "total": time.perf_counter() - t0},
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        rundir.write_json(partial / rundir.MANIFEST, manifest)
        if final.exists():  # a damaged leftover without manifest: replace it
            shutil.rmtree(final)
        os.replace(partial, final)
        _point_latest(job_dir, run_id)
    say(f"kmdask: job {job.name!r} complete in {time.perf_counter() - t0:.1f} s: {final}",
        quiet)
    return RunOutcome(final, False, time.perf_counter() - t0, fp)


def _public_spec(raw: dict, describe) -> dict:
    """The job spec as written into the manifest: a store path under $HOME becomes ~/..."""
    spec = json.loads(json.dumps(raw, default=str))
    if isinstance(spec.get("data"), dict) and spec["data"].get("store"):
        spec["data"]["store"] = describe(spec["data"]["store"])
    return spec


@functools.cache
def _cluster_failures() -> tuple[type[BaseException], ...]:
    """The exceptions that mean the cluster failed (not a bug); built on first failure, so that
    importing the runner does not import distributed."""
    import asyncio

    from distributed import KilledWorker
    from distributed.comm.core import CommClosedError

    kinds: list[type[BaseException]] = [KilledWorker, CommClosedError, OSError, TimeoutError,
                                         asyncio.CancelledError, ClusterStalled]
    try:  # the name of distributed's "your future was cancelled" error varies by version
        from distributed.client import FutureCancelledError
        kinds.append(FutureCancelledError)
    except ImportError:
        pass
    return tuple(kinds)


def _interrupted(job: JobSpec, fit: str, partial: Path, exc: Exception) -> str:
    ck = FileCheckpoint(partial / "fits" / fit / "checkpoint.npz")
    where = f"iteration {ck.iteration}" if ck.path.exists() else "its start"
    detail = str(exc).splitlines()[0] if str(exc) else ""
    return (f"job {job.name!r} stopped in fit {fit!r}: {type(exc).__name__}"
            f"{': ' + detail[:200] if detail else ''}; progress is saved in {partial} "
            f"(fit {fit!r} resumes at {where}): rerun the same command to continue")


def _point_latest(job_dir: Path, run_id: str) -> None:
    """Switch ``latest`` to ``run_id`` atomically (a new symlink renamed over the old one)."""
    tmp = job_dir / f".latest.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    os.symlink(run_id, tmp)
    os.replace(tmp, job_dir / "latest")


def list_runs(runs_dir: Path = Path("runs")) -> list[dict]:
    """Every run under ``runs_dir``: complete ones and interrupted partial ones."""
    out = []
    if not runs_dir.is_dir():
        return out
    for job_dir in sorted(p for p in runs_dir.iterdir()
                          if p.is_dir() and not p.name.startswith(".")):
        latest = job_dir / "latest"
        latest_id = os.readlink(latest) if latest.is_symlink() else None
        if job_dir.name == "_models":  # the classifier cache (kmdask.errorcases.vectors), not a job
            continue
        for d in sorted(job_dir.iterdir()):
            if not d.is_dir() or d.is_symlink() or d.name == "submit":
                continue
            partial = d.name.endswith(".partial")
            row = {"job": job_dir.name, "run_id": d.name.strip(".").removesuffix(".partial"),
                   "status": "partial" if partial else "complete", "path": str(d),
                   "latest": d.name == latest_id}
            mf = d / rundir.MANIFEST
            if not partial and mf.exists():
                m = json.loads(mf.read_text())
                row.update(fingerprint=m["fingerprint"], finished=m.get("finished"),
                           seconds=round(m["timings"]["total"], 2), headline=_headline(m))
            elif not partial:
                row["status"] = "damaged"
            out.append(row)
    return out


def _headline(manifest: dict) -> str:
    parts = []
    for name, f in manifest.get("fits", {}).items():
        for k, r in f.get("results", {}).items():
            parts.append((name, k, r.get("inertia")))
    if not parts:
        return ""
    name, k, inertia = parts[0]
    return f"{name} K={k} inertia {inertia:.6g}" + (f" (+{len(parts) - 1} more)"
                                                     if len(parts) > 1 else "")
