"""The one module that starts or connects to a dask cluster.

Profiles come from ``cluster.yaml`` (see :func:`kmdask.batch.profiles.load_profile`):

* ``local``: a LocalCluster of worker processes bound to 127.0.0.1 (dashboard on a free port);
* ``address``: an existing scheduler (``tcp://`` or ``tls://``, or a scheduler file);
* ``slurm`` / ``pbs``: dask-jobqueue clusters, scaled to fixed ``scale`` or ``adapt`` bounds.

A profile's ``config`` mapping holds dask's own keys (``distributed.*``, ``jobqueue.*``); it is
deep-merged into dask's configuration for as long as the connection is open (see
:func:`merged_dask_config`).

:func:`connect` yields a ``distributed.Client`` with one extra attribute, ``kmdask_cluster``: a
plain dict (JSON-ready, for the run manifest) with the profile name and kind, the scheduler and
dashboard addresses, the worker count and ``time_to_first_worker_s``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import shlex
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dask

from kmdask.errors import ConfigError, KmdaskError

log = logging.getLogger(__name__)

#: attribute of the yielded Client that holds :func:`connect`'s timing and address record
INFO_ATTR = "kmdask_cluster"


def _where(profile: dict, key: str = "") -> str:
    """``file: profiles.NAME.key`` for error messages (hand-made dicts may lack both)."""
    path = f"profiles.{profile.get('name', '?')}" + (f".{key}" if key else "")
    return f"{profile.get('source', '<profile>')}: {path}"


def _timeout_seconds(profile: dict, default: float) -> float:
    value = profile.get("timeout")
    if value is None:
        return default
    from dask.utils import parse_timedelta

    try:
        seconds = float(parse_timedelta(value, default="s"))
    except (TypeError, ValueError, KeyError):
        seconds = -1.0
    if seconds <= 0:
        raise ConfigError(f"{_where(profile, 'timeout')}: expected a positive number of seconds "
                          f"or a duration like '10s', got {value!r}")
    return seconds


def _memory_limit(value: Any, n_workers: int) -> Any:
    if value in (None, "auto"):
        import psutil

        # leave a quarter of the machine to the client and the OS
        return int(0.75 * psutil.virtual_memory().total / max(n_workers, 1))
    return value


def _security(profile: dict):
    sec = profile.get("security")
    if not sec:
        return None
    from distributed.security import Security

    allowed = {"tls_ca_file", "tls_client_cert", "tls_client_key", "require_encryption"}
    if not isinstance(sec, dict):
        raise ConfigError(f"{_where(profile, 'security')}: expected a mapping, got {sec!r}")
    bad = sorted(set(sec) - allowed)
    if bad:
        raise ConfigError(f"{_where(profile, 'security.' + bad[0])}: unknown key (allowed: "
                          f"{', '.join(sorted(allowed))})")
    sec = dict(sec)
    for key in ("tls_ca_file", "tls_client_cert", "tls_client_key"):
        if sec.get(key) is None:
            continue
        sec[key] = str(Path(sec[key]).expanduser())  # cluster.yaml may say ~/.dask/ca.pem
        if not Path(sec[key]).is_file():
            raise ConfigError(f"{_where(profile, 'security.' + key)}: no such file: {sec[key]}")
    return Security(**sec)


# ------------------------------------------------------------------------------------------
# dask configuration


def _expand_dotted(cfg: dict) -> dict:
    """``{"jobqueue.slurm.cores": 1}`` -> ``{"jobqueue": {"slurm": {"cores": 1}}}``, recursively."""
    out: dict = {}
    for key, value in cfg.items():
        parts = str(key).split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        leaf = _expand_dotted(value) if isinstance(value, dict) else value
        if isinstance(leaf, dict) and isinstance(node.get(parts[-1]), dict):
            dask.config.update(node[parts[-1]], leaf)
        else:
            node[parts[-1]] = leaf
    return out


def profile_dask_config(profile: dict) -> dict:
    """The profile's ``config`` mapping, validated and with dotted keys expanded."""
    cfg = profile.get("config") or {}
    if not isinstance(cfg, dict):
        raise ConfigError(f"{_where(profile, 'config')}: expected a mapping of dask settings, "
                          f"got {cfg!r}")
    return _expand_dotted(cfg)


def merged_dask_config(profile: dict) -> dict:
    """dask's whole current configuration with the profile's ``config`` deep-merged into it.

    dask-jobqueue reads every key of ``jobqueue.<name>`` and fails (KeyError) or drops keys when
    a section is replaced by a partial one, so sections are merged key by key; ``dask.config.
    update`` also maps ``job_extra_directives`` onto the existing ``job-extra-directives``.
    """
    if profile.get("kind") in ("slurm", "pbs"):
        # import first: dask_jobqueue registers its defaults on import, and a section merged in
        # before that would be removed again when dask.config.set restores the old config
        with contextlib.suppress(ImportError):
            import dask_jobqueue  # noqa: F401
    merged = copy.deepcopy(dask.config.config)
    dask.config.update(merged, profile_dask_config(profile))
    return merged


# ------------------------------------------------------------------------------------------
# cluster kinds


def _record(client: Any, profile: dict, t0: float, **extra: Any) -> dict:
    """Attach the connection record to ``client`` (see the module docstring) and return it."""
    info = {
        "profile": profile.get("name"),
        "kind": profile.get("kind"),
        "scheduler": client.scheduler.address,
        "dashboard": client.dashboard_link,
        "n_workers": len(client.scheduler_info(n_workers=-1)["workers"]),
        "time_to_first_worker_s": round(time.perf_counter() - t0, 3),
        **extra,
    }
    setattr(client, INFO_ATTR, info)
    return info


# Under dask's default MALLOC_TRIM_THRESHOLD_ (64 KiB) glibc hands freed memory straight back
# to the OS, and setting any such variable also pins the mmap threshold at 128 KiB: every
# multi-MB buffer (a chunk read from zarr, a pass's sums) is a fresh mmap whose pages fault in
# again, which made a streamed chunk read 2x slower in a worker than in a plain process. 32 MiB
# keeps a chunk's buffers in the heap, at the price of ~50 MB more resident memory per worker:
# worth it for workers of 2 GiB and more, not for small ones (out-of-core runs on 400 MB).
_MALLOC_ENV = {"MALLOC_TRIM_THRESHOLD_": 32 << 20, "MALLOC_MMAP_THRESHOLD_": 32 << 20}
_MALLOC_MIN_LIMIT = 2 << 30
# numpy asks the kernel for transparent huge pages on every array of 4 MiB or more (madvise),
# and where THP "defrag" is "madvise" (a common default, and this machine's) a page fault in
# such an array stalls for direct compaction while free memory is fragmented. Measured in fresh
# LocalCluster workers, 60k float32 MNIST rows: the first fit's first pass (which faults in
# 47 MB of row code) took 77-84 ms with them and 59 without; pixel fits at 60k and 1.02M rows
# took the same either way. Set for every worker, small ones too.
_NUMPY_ENV = {"NUMPY_MADVISE_HUGEPAGE": 0}


def _worker_env(limit: float | None) -> dict[str, str]:
    """The environment kmdask gives a worker of ``limit`` bytes (None: unlimited)."""
    big = not (limit and limit < _MALLOC_MIN_LIMIT)
    return {k: str(v) for k, v in {**_NUMPY_ENV, **(_MALLOC_ENV if big else {})}.items()}


@contextlib.contextmanager
def worker_environment(memory_limit: Any = None) -> Iterator[None]:
    """Environment for the worker processes of a LocalCluster started inside this block.

    ``memory_limit`` is the per-worker limit (bytes or a dask size string; None: unlimited).
    """
    import distributed  # noqa: F401 - registers the defaults this extends
    from dask.utils import parse_bytes

    ours = _worker_env(parse_bytes(memory_limit) if isinstance(memory_limit, str)
                       else memory_limit)
    # A nanny copies its pre-spawn settings into os.environ again whenever it restarts a
    # worker, so a big cluster of this process may have left its malloc values there: small
    # workers would inherit them (and dask prefers os.environ to its config). Not while they
    # start.
    leaked = {k: None for k, v in _MALLOC_ENV.items()
              if k not in ours and os.environ.get(k) == str(v)}
    env = {**dask.config.get("distributed.nanny.pre-spawn-environ", {}), **ours}
    # A nanny copies its settings into this process's os.environ before spawning, and values
    # found there beat the config: set ours there too, and put back what was there after.
    with _environ({**leaked, **ours}), \
            dask.config.set({"distributed.nanny.pre-spawn-environ": env}):
        yield


@contextlib.contextmanager
def _environ(values: dict[str, str | None]) -> Iterator[None]:
    """``os.environ`` with ``values`` set (None: unset) inside the block, as it was
    afterwards."""
    saved = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_FORKSERVER_ENV: dict[str, str] | None = None  # what this process's forkserver started with


@contextlib.contextmanager
def _warm_forkserver() -> Iterator[None]:
    """Start the LocalCluster's worker processes from a forkserver that has imported and warmed
    kmdask's engine (:mod:`kmdask.batch.preload`), so that a fit on fresh workers does not pay
    about a second per worker to load its compiled kernels before its first pass: the server
    pays it once, while the nannies start.

    A forked worker keeps the environment the server started with, and numpy sizes its BLAS
    threads at import: the server is started with the nannies' pre-spawn environment (one BLAS
    thread, malloc settings) already in ``os.environ``. A server already running with another
    environment (another LocalCluster of this process) is not reused: workers are spawned.
    """
    global _FORKSERVER_ENV
    import multiprocessing
    from multiprocessing import forkserver

    import distributed.utils

    env = {k: str(v) for k, v in
           dask.config.get("distributed.nanny.pre-spawn-environ", {}).items()}
    running = getattr(forkserver._forkserver, "_forkserver_pid", None) is not None
    if running and env != _FORKSERVER_ENV:
        # spawn, as dask does by default; said explicitly, since another LocalCluster of this
        # process may hold the forkserver setting for its own lifetime
        with dask.config.set({"distributed.worker.multiprocessing-method": "spawn"}):
            yield
        return
    if not running:
        # distributed.utils.get_mp_context() builds its own preload list by importing, in
        # this process, every optional package it knows (pandas and more: ~0.4 s of a job's
        # start), and it is replaced here anyway: mark distributed's list as set
        if hasattr(distributed.utils, "_forkserver_preload_set"):
            distributed.utils._forkserver_preload_set = True
        with _environ(env):
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(["distributed", "kmdask.batch.preload"])
            forkserver.ensure_running()
            _FORKSERVER_ENV = env
    with dask.config.set({"distributed.worker.multiprocessing-method": "forkserver"}):
        yield


def prestart(profile: dict, *, address: str | None = None) -> None:
    """Start warming a ``local`` profile's worker server now (see :func:`_warm_forkserver`):
    it imports and warms the engine in its own process while the caller does other work
    (opening the data, an extension's preparation), and :func:`connect` forks the workers from
    it, warm. Returns at once; does nothing for other kinds or with ``address``."""
    if address or profile.get("kind") != "local":
        return
    n = int(profile.get("n_workers", 2))
    with worker_environment(_memory_limit(profile.get("memory_limit"), n)), \
            _warm_forkserver():
        pass


@contextlib.contextmanager
def local_cluster(**kwargs: Any) -> Iterator[Any]:
    """A ``distributed.LocalCluster`` of worker processes forked warm (see
    :func:`_warm_forkserver`), with kmdask's worker environment (:func:`worker_environment`).

    Parameters
    ----------
    **kwargs
        ``LocalCluster``'s own; ``processes`` is always true.

    Yields
    ------
    distributed.LocalCluster
        Started; closed when the block ends.
    """
    from distributed import LocalCluster

    limit = kwargs.get("memory_limit")
    with contextlib.ExitStack() as stack:
        # the environment only while the workers start (their nannies keep a copy for
        # restarts): other clusters and child processes started later get their own; the
        # forkserver setting lasts, so that a lost worker is forked again, warm
        with worker_environment(None if limit == "auto" else limit):
            stack.enter_context(_warm_forkserver())
            cluster = stack.enter_context(LocalCluster(**{**kwargs, "processes": True}))
        yield cluster


@contextlib.contextmanager
def _local(profile: dict) -> Iterator[Any]:
    from distributed import Client

    n = int(profile.get("n_workers", 2))
    kwargs = dict(
        n_workers=n,
        threads_per_worker=int(profile.get("threads_per_worker", 1)),
        memory_limit=_memory_limit(profile.get("memory_limit"), n),
        # loopback unless cluster.yaml says otherwise: nothing listens on the network by default
        host=profile.get("host", "127.0.0.1"),
        dashboard_address=profile.get("dashboard_address", "127.0.0.1:0"),
        # workers log a failed task with its traceback at ERROR; kmdask reports the failure
        # itself, in one line, so the embedded cluster's own log stays quiet
        silence_logs=logging.CRITICAL,
    )
    t0 = time.perf_counter()
    with local_cluster(**kwargs) as cluster, Client(cluster) as client:
        client.wait_for_workers(1)
        info = _record(client, profile, t0)
        client.wait_for_workers(n)
        info["n_workers"] = n
        log.info("kmdask: LocalCluster: first worker after %.1f s, %d worker(s); dashboard %s",
                 info["time_to_first_worker_s"], n, client.dashboard_link)
        yield client


@contextlib.contextmanager
def _address(profile: dict, address: str | None) -> Iterator[Any]:
    from distributed import Client

    timeout = _timeout_seconds(profile, 10.0)
    target = address or profile.get("address")
    sched_file = None if address else profile.get("scheduler_file")
    if not target and not sched_file:
        raise ConfigError(f"{_where(profile)}: give 'address' or 'scheduler_file' "
                          "(or --address)")
    security = _security(profile)
    if target and security is not None and security.require_encryption and \
            not str(target).startswith("tls://"):
        raise ConfigError(f"{_where(profile, 'security.require_encryption')}: is true but the "
                          f"address {target} is not tls://")
    where = target or sched_file
    t0 = time.perf_counter()
    try:
        client = Client(address=target, scheduler_file=sched_file, timeout=timeout,
                        security=security, set_as_default=True)
    except (OSError, TimeoutError) as exc:
        # one line: the class and the first line of the cause (TLS errors say what failed)
        why = str(exc).splitlines()[0][:160] if str(exc) else ""
        raise KmdaskError(f"cannot reach the dask scheduler at {where} within {timeout:g} s "
                          f"({exc.__class__.__name__}{': ' + why if why else ''})") from None
    except ValueError as exc:
        raise ConfigError(f"{_where(profile)}: bad scheduler address {where!r}: "
                          f"{str(exc).splitlines()[0]}") from None
    try:
        try:
            client.wait_for_workers(1, timeout=timeout)
        except TimeoutError:
            raise KmdaskError(f"the dask scheduler at {where} has no workers after "
                              f"{timeout:g} s") from None
        info = _record(client, profile, t0)
        log.info(f"kmdask: connected to {client.scheduler.address} in "
                 f"{info['time_to_first_worker_s']:.1f} s ({info['n_workers']} worker(s)); "
                 f"dashboard {client.dashboard_link}")
        yield client
    finally:
        _close_quietly(client)


def scheduler_lost(client: Any) -> bool:
    """Whether ``client`` has lost its scheduler: the client says so, or nothing listens at
    the scheduler's address any more (asked right after a failure, before the client notices).
    """
    import socket
    from urllib.parse import urlsplit

    if client.status != "running":
        return True
    try:
        where = urlsplit(client.scheduler.address)
        with socket.create_connection((where.hostname, where.port), timeout=2):
            return False
    except (OSError, ValueError, TypeError):
        return True


def _close_quietly(client: Any) -> None:
    """Close ``client``. Closing one whose scheduler is gone cancels its reconnect loop, which
    distributed logs at ERROR with a traceback: noise once kmdask has said, in one line, that
    the scheduler was lost (exit 3), so logging is off while it closes."""
    logging.disable(logging.CRITICAL)
    try:
        client.close()
    finally:
        logging.disable(logging.NOTSET)


def _job_classes(kind: str) -> tuple[type, type]:
    import dask_jobqueue

    if kind == "slurm":
        return dask_jobqueue.SLURMCluster, dask_jobqueue.slurm.SLURMJob
    from dask_jobqueue.pbs import PBSJob

    class _PBSJob(PBSJob):
        """Submits from the log directory: SLURM's qsub wrapper (slurm-wlm-torque) overrides
        ``#PBS -o/-e`` with ``-o <script>.o<id>`` in the working directory, and dask-jobqueue's
        scripts are temporary files, so logs would land in whatever directory kmdask runs in."""

        async def _submit_job(self, script_filename: str) -> str:
            cwd = self.log_directory or None
            return await self._call(shlex.split(self.submit_command) + [script_filename],
                                    cwd=cwd)

    return dask_jobqueue.PBSCluster, _PBSJob


def _worker_prologue(profile: dict, kind: str) -> list[str]:
    """Job-script lines that hand the workers, which run in other processes (other hosts),
    what they would otherwise never see: the profile's ``distributed.*`` settings, and the
    environment LocalCluster workers get (:func:`worker_environment`; the nanny of a batch
    job keeps a value exported before it starts over dask's pre-spawn default)."""
    from dask.utils import parse_bytes
    from distributed.deploy.local import nprocesses_nthreads

    section = f"jobqueue.{kind}"
    existing = dask.config.get(f"{section}.job-script-prologue", None) or []
    memory = dask.config.get(f"{section}.memory", None)
    processes = dask.config.get(f"{section}.processes", None) or nprocesses_nthreads(
        int(dask.config.get(f"{section}.cores", None) or 1))[0]
    limit = parse_bytes(memory) / processes if memory else None  # as dask-jobqueue splits it
    env = _worker_env(limit)
    lines = [*existing, *(f"export {k}={shlex.quote(v)}" for k, v in env.items())]
    # a job inherits this process's environment, where a big LocalCluster's nanny may have
    # left kmdask's malloc values (see worker_environment): small workers drop them
    lines += [f'[ "${{{k}-}}" != {v} ] || unset {k}' for k, v in _MALLOC_ENV.items()
              if k not in env]
    dist = profile_dask_config(profile).get("distributed")
    if dist:
        blob = dask.config.serialize({"distributed": dist})
        lines.append(f"export DASK_INTERNAL_INHERIT_CONFIG={shlex.quote(blob)}")
    return lines


_SCALE_KEYS = {"n", "jobs", "memory", "cores"}
_ADAPT_KEYS = {"minimum", "maximum", "minimum_jobs", "maximum_jobs", "minimum_cores",
               "maximum_cores", "minimum_memory", "maximum_memory", "interval", "wait_count",
               "target_duration"}


def _scaling(profile: dict) -> tuple[str, dict]:
    """("scale" or "adapt", its keyword arguments), checked: dask-jobqueue silently ignores
    unknown adapt keys, and an adaptive minimum of 0 would leave kmdask waiting for a worker."""
    adapt = profile.get("adapt")
    key, allowed = ("adapt", _ADAPT_KEYS) if adapt else ("scale", _SCALE_KEYS)
    value = adapt if adapt else (profile.get("scale") or {"jobs": 1})
    if not isinstance(value, dict):
        raise ConfigError(f"{_where(profile, key)}: expected a mapping, got {value!r}")
    bad = sorted(str(k) for k in value if k not in allowed)
    if bad:
        raise ConfigError(f"{_where(profile, key + '.' + bad[0])}: unknown key (allowed: "
                          f"{', '.join(sorted(allowed))})")
    if adapt and not any((value.get(k) or 0) >= 1 for k in
                         ("minimum", "minimum_jobs", "minimum_cores", "minimum_memory")):
        raise ConfigError(f"{_where(profile, 'adapt')}: set minimum_jobs (or minimum) >= 1; "
                          "kmdask waits for a first worker before it starts")
    return key, value


@contextlib.contextmanager
def _jobqueue(profile: dict) -> Iterator[Any]:
    kind = profile["kind"]
    exe = "sbatch" if kind == "slurm" else "qsub"
    if shutil.which(exe) is None:
        raise KmdaskError(f"profile {profile.get('name')!r} needs the {kind.upper()} command "
                          f"'{exe}', which is not on PATH")
    try:
        cls, job_cls = _job_classes(kind)
    except ImportError:
        raise KmdaskError("profile needs dask-jobqueue: pip install 'kmdask[hpc]'") from None
    from distributed import Client

    sched = dict(dask.config.get(f"jobqueue.{kind}.scheduler-options", None) or {})
    if profile.get("dashboard_address"):
        sched["dashboard_address"] = profile["dashboard_address"]
    # dask-jobqueue's default dashboard is ":8787" on every interface; keep it on loopback
    # unless the profile binds it elsewhere explicitly (reach it with `ssh -L`)
    sched.setdefault("dashboard_address", "127.0.0.1:0")
    kwargs: dict[str, Any] = dict(scheduler_options=sched, job_cls=job_cls,
                                  job_script_prologue=_worker_prologue(profile, kind))
    log_dir = dask.config.get(f"jobqueue.{kind}.log-directory", None)
    if log_dir:
        # absolute: batch systems resolve relative paths against the job's own directory
        kwargs["log_directory"] = str(Path(log_dir).expanduser().resolve())
    security = _security(profile)
    if security is not None:
        kwargs["security"] = security
    how, scaling = _scaling(profile)
    timeout = _timeout_seconds(profile, 300.0)
    t0 = time.perf_counter()
    try:
        cluster = cls(**kwargs)
    except (ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"{_where(profile, 'config.jobqueue.' + kind)}: dask-jobqueue "
                          f"rejected the settings: {str(exc).splitlines()[0]}") from None
    with cluster, Client(cluster) as client:
        try:
            getattr(cluster, how)(**scaling)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{_where(profile, how)}: {str(exc).splitlines()[0]}") from None
        except RuntimeError as exc:  # the submit command failed; keep its first message line
            lines = [ln for ln in str(exc).splitlines() if "error" in ln.lower()]
            raise KmdaskError(f"{exe} refused the worker job: "
                              f"{(lines or [str(exc)])[0].strip()}") from None
        try:
            client.wait_for_workers(1, timeout=timeout)
        except TimeoutError:
            raise KmdaskError(f"no {kind.upper()} worker started within {timeout:g} s; check "
                              f"the queue ({'squeue' if kind == 'slurm' else 'qstat'})") from None
        job_ids = sorted({str(j.job_id) for j in cluster.workers.values()
                          if getattr(j, "job_id", None)})
        info = _record(client, profile, t0, job_ids=job_ids)
        log.info(f"kmdask: {kind.upper()} cluster: first worker after "
                 f"{info['time_to_first_worker_s']:.1f} s (jobs {', '.join(job_ids) or '?'}); "
                 f"dashboard {client.dashboard_link}")
        yield client


@contextlib.contextmanager
def connect(profile: dict, *, address: str | None = None) -> Iterator[Any]:
    """Start or connect to the cluster a profile describes; yields a distributed Client.

    Parameters
    ----------
    profile : dict
        A profile from :func:`kmdask.batch.profiles.load_profile`.
    address : str, optional
        ``--address``: connect to this scheduler instead, whatever the profile's kind.
    quiet : bool
        Do not print the connection line (time to first worker, dashboard) to stderr.

    The profile's ``config`` is deep-merged into dask's configuration for the duration; the
    client carries :data:`INFO_ATTR` (``client.kmdask_cluster``), a dict for the manifest.
    """
    kind = profile.get("kind")
    if address and kind != "address":
        profile = {**profile, "kind": "address"}
        kind = "address"
    merged = merged_dask_config(profile)
    with dask.config.set({k: v for k, v in merged.items()
                          if dask.config.config.get(k, object()) != v}):
        if kind == "local":
            cm = _local(profile)
        elif kind == "address":
            cm = _address(profile, address)
        elif kind in ("slurm", "pbs"):
            cm = _jobqueue(profile)
        else:  # load_profile already checked; keep a clear message for hand-made dicts
            raise ConfigError(f"{_where(profile, 'kind')}: unknown cluster kind {kind!r}")
        with cm as client:
            yield client
