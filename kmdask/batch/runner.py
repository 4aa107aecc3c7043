"""Run a job: open its data, connect to a cluster, fit every fit, write the run directory.

A run is identified by its fingerprint = hash(data content fingerprint, chunking, the job spec,
kmdask version, and whatever inputs the job's extensions add). Rerunning a job whose
fingerprint already has a complete run is a no-op; an interrupted run resumes from what its
partial directory holds (finished fits, and the last Lloyd checkpoint of the fit in progress).
A lock per job keeps two reruns from interleaving.

Algorithms are reached through :data:`kmdask.batch.fitkinds.FIT_KINDS`, optional parts of a
job through :mod:`kmdask.batch.extensions`: the runner itself knows neither.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import json
import logging
import os
import platform
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kmdask import __version__
from kmdask.batch import extensions, rundir
from kmdask.batch.checkpoint import FileCheckpoint
from kmdask.batch.fitkinds import FIT_KINDS, FitContext, choosing_k
from kmdask.batch.spec import FitSpec, JobSpec
from kmdask.data.location import Location, location, why_missing
from kmdask.errors import (
    STORAGE_ERRNOS,
    ClusterFailed,
    ClusterStalled,
    ConfigError,
    DataError,
    JobLocked,
    KmdaskError,
    StorageError,
)
from kmdask.log import fields

log = logging.getLogger(__name__)

HEAD_ROWS_DEFAULT = 100


def resolve_store(job: JobSpec, storage_options: dict | None = None, *,
                  stage: bool = True) -> Location:
    """The job's zarr store (a path or an object-storage URL); the default
    ``data/<dataset>.zarr`` is staged when missing (``stage=False``, a dry run: returned
    staged or not)."""
    from kmdask.data.staging import stage_dataset
    from kmdask.data.store import is_store

    if job.store:
        p = location(job.store, storage_options)
        if not is_store(p):
            what = why_missing(p, "store") if not p.exists() else "not a kmdask store"
            raise DataError(f"{p}: {what} (job {job.name}, data.store); stage it with "
                            "'kmdask stage --out ...', or name an existing array with "
                            "data.array")
        return p
    p = location(Path("data") / f"{job.dataset}.zarr")
    if stage and not is_store(p):
        stage_dataset(job.dataset, out=p.url)
    return p


def fingerprint(job: JobSpec, data_fp: str, chunks: tuple[int, ...],
                extra: dict | None = None) -> str:
    """The run's identity. ``extra``: further inputs of the results that extensions name (the
    error-case extension adds the test split's fingerprint, which scores its classifier); left
    out when empty, so that plain jobs keep their fingerprints."""
    spec = {k: v for k, v in job.raw.items() if k != "description"}
    key = {"data": data_fp, "chunks": list(chunks), "spec": spec, "kmdask": __version__,
           **(extra or {})}
    blob = json.dumps(key, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


@contextlib.contextmanager
def job_lock(job_dir: Path, *, wait: bool) -> Iterator[None]:
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
                raise JobLocked(f"another run of job {job_dir.name!r} is in progress "
                                  f"(pid {holder}); not waiting (--no-wait)") from None
            log.info("kmdask: waiting for another run of job %r (pid %s)", job_dir.name, holder)
            fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@dataclass
class RunOutcome:
    """Where a run went: its directory, whether an earlier complete run was reused, its
    duration and fingerprint."""

    path: Path
    reused: bool
    seconds: float
    fingerprint: str


@dataclass
class _Hooks:
    """An extension's :class:`~kmdask.batch.extensions.JobHooks`, with this run's state; the
    optional hooks default to doing nothing."""

    impl: Any
    state: Any = None

    def fingerprint_inputs(self, job: JobSpec, store: Location) -> dict:
        fn = getattr(self.impl, "fingerprint_inputs", None)
        return {} if fn is None else fn(job, store)

    def fit_rows(self, fit: FitSpec, n: int) -> Any:
        fn = getattr(self.impl, "fit_rows", None)
        return None if fn is None else fn(self.state, fit, n)

    def model_result(self, fit: FitSpec, labels: np.ndarray, centres: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray, dict]:
        fn = getattr(self.impl, "model_result", None)
        return (labels, centres, {}) if fn is None else fn(self.state, fit, labels, centres)


@dataclass
class _Data:
    """The job's data, opened lazily (dask arrays) and checked against its fits."""

    store: Location  # a staged store, or the array the rows come from
    images: Any  # (n, d) dask array: uint8 pixels, or float rows
    labels: Any | None  # (n,) dask array of true classes, if any
    fingerprint: str
    image_shape: tuple[int, int] | None  # (height, width) when the rows are images
    divisor: float  # uint8 rows are divided by it (1 for float rows)
    name: str  # the data set's name: a store's, or the array's file name
    is_store: bool = True
    verified: bool | None = None  # a store's files matched known checksums (None: an array)
    fingerprint_computed: bool = False  # an array's, hashed now (its cache had none)

    @property
    def n(self) -> int:
        return int(self.images.shape[0])


def _open_data(job: JobSpec, profile: dict, runs_dir: Path, *,
               dry_run: bool = False) -> _Data | None:
    """The job's data, checked against its fits. ``dry_run``: stage nothing and write no
    fingerprint cache; None when the job's default store is not staged yet."""
    from kmdask.data import arrays, store

    opts = profile.get("storage_options")
    if job.array:
        src = arrays.open_array(job.array, job.labels, storage_options=opts,
                                cache_dir=runs_dir / "_fingerprints",
                                image_shape=job.image_shape, write_cache=not dry_run)
        x = src.images
        side = int(round(np.sqrt(x.shape[1])))
        shape = job.image_shape or ((side, side) if side * side == x.shape[1] else None)
        divisor = job.divisor or (255.0 if x.dtype == np.uint8 else 1.0)
        data = _Data(src.location, x, src.labels, src.fingerprint, shape, divisor,
                     src.location.name, False, fingerprint_computed=src.computed)
    else:
        loc = resolve_store(job, opts, stage=not dry_run)
        if dry_run and not job.store and not store.is_store(loc):
            return None  # a real run stages it first
        info = store.store_info(loc)
        shape = job.image_shape or store.image_shape(info)
        data = _Data(loc, store.open_images(loc, job.split), store.open_labels(loc, job.split),
                     store.data_fingerprint(loc, job.split), shape, 255.0, info["dataset"],
                     verified=bool(info.get("verified", True)))
        if not data.verified:
            log.warning("%s holds %s, staged without known checksums (unverified)",
                        loc, info["dataset"])
    d = int(data.images.shape[1])
    if data.image_shape is not None and data.image_shape[0] * data.image_shape[1] != d:
        h, w = data.image_shape
        raise ConfigError(f"{job.source}: data.image_shape: {h}x{w} = {h * w} pixels, but a "
                          f"row of {data.store} has {d} values")
    if job.divisor is not None and data.images.dtype != np.uint8:
        raise ConfigError(f"{job.source}: data.divisor: scales uint8 rows; {data.store} holds "
                          f"{data.images.dtype} rows, used as they are")
    for f in job.fits:
        if f.rows is not None and f.rows > data.n:
            what = f"{data.store} {job.split}" if data.is_store else str(data.store)
            raise KmdaskError(f"{job.source}: fit {f.name!r}: rows={f.rows} but {what} has "
                              f"only {data.n} rows")
        if max(f.ks) > (f.rows or data.n):
            raise KmdaskError(f"{job.source}: fit {f.name!r}: K={max(f.ks)} is larger than "
                              f"rows={f.rows or data.n}")
    return data


def _members(images: Any, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of each cluster's first members and their rows."""
    idx = rundir.first_members(labels, k)
    members = np.zeros((k, idx.shape[1], images.shape[1]), dtype=images.dtype)
    flat = idx[idx >= 0]
    if flat.size:
        wanted = np.sort(flat)
        rows = np.asarray(images[wanted].compute())
        pos = np.searchsorted(wanted, idx)
        members[idx >= 0] = rows[pos[idx >= 0]]
    return idx, members


def _run_fit(run: Path, fit: FitSpec, X: Any, images: Any, truth: np.ndarray | None,
             hooks: list[_Hooks], divisor: float) -> dict:
    """Fit one entry of the job (all its K x trials); returns its manifest section.

    ``X`` are the rows clustered, ``images`` the images kept as each cluster's members (the
    same rows, unless an extension clusters something else)."""
    from kmdask.engine import metrics

    kind = FIT_KINDS[fit.algorithm]
    fdir = run / "fits" / fit.name
    done = fdir / "done.json"
    if done.exists():
        problems = rundir.damaged(fdir, (done.name,))
        if not problems:
            log.info("  %s: already done in this partial run, skipping", fit.name)
            return json.loads(done.read_text())
        log.warning("%s: fit %r is computed again", rundir.describe_damage(problems),
                    fit.name)
        shutil.rmtree(fdir)
    started_before = fdir.exists()  # a previous attempt got this far
    fdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ck = FileCheckpoint(fdir / "checkpoint.npz") if kind.resumes else None
    if ck is not None and ck.load() is not None:
        log.info("  %s: resuming at iteration %d", fit.name, ck.iteration)
    elif ck is not None and started_before:
        log.info("  %s: no checkpoint to resume from (stopped during seeding, or damaged): "
                 "seeding again", fit.name)

    def show(p: dict) -> None:
        extra = f", shift {p['shift']:.3g}" if "shift" in p else ""
        extra += f" ({p['computed']:.0%} of distances)" if "computed" in p else ""
        log.info("  %s it %3d: %3d model(s), inertia %.6g%s, %.0f ms", fit.name, p["iteration"],
                 p["models"], p["inertia"], extra, p["seconds"] * 1e3,
                 **fields(fit=fit.name, **{k: p[k] for k in ("iteration", "models", "inertia",
                                                              "seconds")}))

    ctx = FitContext(checkpoint=ck, progress=show, divisor=divisor)
    records = kind.fit(X, fit, ctx)
    crit = choosing_k(X, records, fit, ctx)  # on the final models, before they are written
    results: dict[str, dict] = {}
    for rec in records:
        labels, centres, extra = rec.labels, rec.centres, {}
        for h in hooks:
            labels, centres, more = h.model_result(fit, labels, centres)
            extra.update(more)
        idx, members = _members(images, labels, rec.k)
        counts = np.bincount(labels, minlength=rec.k)
        scores = {} if truth is None else {"nmi": metrics.nmi(truth, labels),
                                           "ari": metrics.ari(truth, labels)}
        result = {"k": rec.k, "counts": counts.tolist(), **scores, **rec.result, **extra}
        if crit is not None:
            result["criteria"] = crit["per_k"][rec.k]
            result["silhouette_profile"] = crit["profiles"][rec.k]
        rundir.write_model(run, fit.name, rec.k, centres, labels, idx, members, result)
        results[str(rec.k)] = result
        log.info("  %s K=%d: inertia %.6g, counts %s (%.1f s)", fit.name, rec.k,
                 result["inertia"], ", ".join(map(str, result["counts"])), result["seconds"],
                 **fields(fit=fit.name, k=rec.k, inertia=result["inertia"]))
    if ck is not None:
        ck.remove()
    section = {"algorithm": fit.algorithm, "rows": int(X.shape[0]), "ks": list(fit.ks),
               **{k: _plain(v) for k, v in fit.extras.items()},
               "iterations": fit.iterations, "trials": fit.trials, "seed": fit.seed,
               "init": fit.init, "tol": fit.tol, "seconds": time.perf_counter() - t0,
               "results": results}
    if crit is not None:
        section["criteria"] = {"choices": crit["choices"], **crit["settings"],
                               "seconds": crit["seconds"], "timings": crit["timings"]}
    rundir.write_json(done, section)
    rundir.seal(fdir)  # a resume reuses this fit only while its files match
    return section


def _plain(value: Any) -> Any:
    """A spec value as the manifest records it (dataclasses as mappings)."""
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def _versions() -> dict:
    import dask
    import distributed
    import zarr

    return {"kmdask": __version__, "python": platform.python_version(),
            "numpy": np.__version__, "dask": dask.__version__,
            "distributed": distributed.__version__, "zarr": zarr.__version__}


def run_job(job: JobSpec, profile: dict, *, runs_dir: Path = Path("runs"),
            address: str | None = None, wait: bool = True) -> RunOutcome:
    """Run ``job`` on the cluster ``profile`` describes; returns where its run directory is.

    Parameters
    ----------
    job : JobSpec
    profile : dict
        A cluster profile (:func:`kmdask.batch.profiles.load_profile`).
    runs_dir : Path
        Where run directories go (``<runs_dir>/<job>/<run id>``).
    address : str, optional
        Connect to this scheduler instead of what the profile says.
    wait : bool
        Wait for another run of the same job to finish (False: raise at once).
    """
    from kmdask.batch.cluster import prestart

    t0 = time.perf_counter()
    prestart(profile, address=address)  # the workers' warm-up overlaps what comes before them
    data = _open_data(job, profile, runs_dir)
    hooks = [_Hooks(e.hooks()) for e in extensions.used_by(job)]
    extra_fp = {}
    for h in hooks:
        extra_fp.update(h.fingerprint_inputs(job, data.store))
    fp = fingerprint(job, data.fingerprint, data.images.chunks[0], extra_fp)
    run_id = fp[:16]
    job_dir = runs_dir / job.name
    final = job_dir / run_id
    with job_lock(job_dir, wait=wait):
        partial = job_dir / f".{run_id}.partial"
        problems = rundir.damaged(final, (rundir.MANIFEST,)) \
            if (final / rundir.MANIFEST).exists() else None
        if problems:
            _reopen_damaged(final, partial, problems)
        elif problems == []:
            log.info("kmdask: job %r unchanged (fingerprint %s); complete run at %s, nothing "
                     "to do", job.name, run_id, final, **fields(job=job.name, run=run_id))
            _point_latest(job_dir, run_id)
            return RunOutcome(final, True, time.perf_counter() - t0, fp)
        if partial.exists():
            done = sorted(p.parent.name for p in partial.glob("fits/*/done.json"))
            log.info("kmdask: resuming interrupted run %s (%d of %d fit(s) already done%s)",
                     run_id, len(done), len(job.fits), ": " + ", ".join(done) if done else "")
        partial.mkdir(parents=True, exist_ok=True)
        log.info("kmdask: job %r: %d fit(s) on %s%s, run %s", job.name, len(job.fits),
                 data.store, f" ({job.split})" if data.is_store else "", run_id,
                 **fields(job=job.name, run=run_id))
        for h in hooks:  # before connecting: a batch cluster's workers would wait idle
            h.state = h.impl.prepare(partial, job, data.store, runs_dir)
        fits, cluster_info, t_conn = _run_fits(partial, job, data, hooks, profile, address)
        extra, timings = {}, {"connect": t_conn}
        for h in hooks:
            more, secs = h.impl.finish(partial, job, h.state)
            extra.update(more)
            timings.update(secs)
        manifest = _manifest(job, data, profile, cluster_info, fits, fp, extra,
                             {**timings, "total": time.perf_counter() - t0})
        rundir.write_json(partial / rundir.MANIFEST, manifest)
        rundir.seal(partial)
        if final.exists():  # a damaged leftover without manifest: replace it
            shutil.rmtree(final)
        os.replace(partial, final)
        _point_latest(job_dir, run_id)
    log.info("kmdask: job %r complete in %.1f s: %s", job.name, time.perf_counter() - t0,
             final, **fields(job=job.name, run=run_id))
    return RunOutcome(final, False, time.perf_counter() - t0, fp)


def _reopen_damaged(final: Path, partial: Path, problems: list[tuple[Path, str]]) -> None:
    """Turn a complete run whose files do not match their checksums back into a partial run
    that keeps only what still matches: fits and experiments keep their own seals, so the
    resume recomputes the damaged ones; the inputs and the extensions' other files are
    written again by every attempt anyway."""
    log.warning("%s: recomputing what it affects", rundir.describe_damage(problems))
    if partial.exists():
        shutil.rmtree(partial)
    os.replace(final, partial)
    for name in (rundir.MANIFEST, rundir.SUMS):
        (partial / name).unlink(missing_ok=True)
    for path, _ in problems:
        rel = path.relative_to(final).parts if path.is_relative_to(final) else ()
        if len(rel) > 2 and rel[0] in ("fits", "experiments"):
            continue  # its fit's (experiment's) own seal decides
        if len(rel) > 0 and rel[0] not in ("fits", "experiments"):
            (partial.joinpath(*rel)).unlink(missing_ok=True)


def _write_inputs(partial: Path, job: JobSpec, data: _Data) -> np.ndarray | None:
    """The true labels (where the data has them) and the first rows the fits use; returns
    the labels."""
    max_rows = max((f.rows or data.n) for f in job.fits)
    head = max([HEAD_ROWS_DEFAULT] + [g.samples or 0 for g in job.figures])
    truth = None
    if data.labels is not None:
        truth = np.asarray(data.labels[:max_rows].compute())
        rundir.write_npy(partial / "data" / "true_labels.npy", truth)
    rundir.write_npy(partial / "data" / "head_images.npy",
                     np.asarray(data.images[: min(head, max_rows)].compute()))
    return truth


def _run_fits(partial: Path, job: JobSpec, data: _Data, hooks: list[_Hooks], profile: dict,
              address: str | None) -> tuple[dict, dict, float]:
    """Connect, write the run's inputs, then every fit in turn: (manifest sections, cluster
    record, connect time). The workers read the data (the driver may share no file system
    with them)."""
    from kmdask.batch.cluster import connect, scheduler_lost

    t0 = time.perf_counter()
    fits: dict[str, dict] = {}
    current = job.fits[0].name
    lost = False  # the failure came with the scheduler connection gone
    try:
        # as_current: the engine finds its client with get_client(), which would otherwise
        # prefer any client the calling program has entered as current
        with connect(profile, address=address) as client, client.as_current():
            t_conn = time.perf_counter() - t0
            cluster_info = dict(getattr(client, "kmdask_cluster", {}) or {})
            try:
                truth = _write_inputs(partial, job, data)
                for i, f in enumerate(job.fits, 1):
                    current = f.name
                    rows = f.rows or data.n
                    log.info("[%d/%d] %s: %s, K=%s, rows=%d, iterations=%d, trials=%d", i,
                             len(job.fits), f.name, f.algorithm, list(f.ks), rows,
                             f.iterations, f.trials, **fields(job=job.name, fit=f.name))
                    X = images = data.images[:rows]
                    for h in hooks:
                        got = h.fit_rows(f, rows)
                        X = X if got is None else got
                    fits[f.name] = _run_fit(partial, f, X, images,
                                            None if truth is None else truth[:rows], hooks,
                                            data.divisor)
            except _cluster_failures():
                # which error surfaces depends on what was in flight (cancelled futures, a
                # closed stream, ...): ask whether the scheduler itself is gone
                lost = scheduler_lost(client)
                raise
    except StorageError as exc:  # an object store that stayed down (exit 5)
        raise StorageError(_interrupted(job, current, partial, exc)) from None
    except _cluster_failures() as exc:
        # Lost workers (KilledWorker), a vanished scheduler (its futures cancelled), ...: what
        # finished is on disk, so say how to resume rather than dumping dask's traceback.
        # Anything else is a bug and keeps its traceback.
        if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
            raise  # a full or read-only disk is not the cluster's fault (exit 5)
        raise ClusterFailed(_interrupted(job, current, partial, exc, lost)) from None
    return fits, cluster_info, t_conn


def _manifest(job: JobSpec, data: _Data, profile: dict, cluster_info: dict, fits: dict,
              fp: str, extra: dict, timings: dict) -> dict:
    from kmdask.data.registry import class_names
    from kmdask.data.sources import describe  # paths under $HOME are written as ~/...

    return {
        **extra,
        "status": "complete", "job": job.name, "job_file": describe(job.source),
        "fingerprint": fp, "run_id": fp[:16], "versions": _versions(),
        "data": {"dataset": data.name,
                 ("store" if data.is_store else "array"): describe(data.store.url),
                 "split": job.split if data.is_store else None,
                 "fingerprint": data.fingerprint, "rows": data.n,
                 "chunks": list(data.images.chunks[0]), "dtype": str(data.images.dtype),
                 "image_shape": None if data.image_shape is None else list(data.image_shape),
                 "divisor": data.divisor, "labels": data.labels is not None,
                 # what the figures call class i (a known data set's names; else the digit)
                 "class_names": class_names(data.name) if data.labels is not None else None,
                 **({} if data.verified is None else {"verified": data.verified})},
        "profile": {"name": profile.get("name"), "kind": profile.get("kind")},
        "cluster": {k: v for k, v in cluster_info.items() if k != "dashboard"},
        "spec": _public_spec(job.raw, describe), "fits": fits, "timings": timings,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


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
    import concurrent.futures

    from distributed import KilledWorker
    from distributed.comm.core import CommClosedError

    kinds: list[type[BaseException]] = [KilledWorker, CommClosedError, OSError, TimeoutError,
                                         asyncio.CancelledError, ClusterStalled,
                                         # distributed's Future(s)CancelledError, e.g. when
                                         # the scheduler connection is lost
                                         concurrent.futures.CancelledError]
    return tuple(kinds)


def _interrupted(job: JobSpec, fit: str, partial: Path, exc: Exception,
                 scheduler_lost: bool = False) -> str:
    ck = FileCheckpoint(partial / "fits" / fit / "checkpoint.npz")
    where = f"iteration {ck.iteration}" if ck.path.exists() else "its start"
    detail = str(exc).splitlines()[0] if str(exc) else ""
    what = detail if isinstance(exc, StorageError) else \
        type(exc).__name__ + (": " + detail[:200] if detail else "")
    if scheduler_lost or "scheduler-connection-lost" in str(exc):
        what = "lost the connection to the dask scheduler"
    return (f"job {job.name!r} stopped in fit {fit!r}: {what}; progress is saved in {partial} "
            f"(fit {fit!r} resumes at {where}): rerun the same command to continue")


def _point_latest(job_dir: Path, run_id: str) -> None:
    """Switch ``latest`` to ``run_id`` atomically (a new symlink renamed over the old one)."""
    tmp = job_dir / f".latest.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    os.symlink(run_id, tmp)
    os.replace(tmp, job_dir / "latest")
