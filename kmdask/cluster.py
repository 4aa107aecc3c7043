"""The one module that starts or connects to a dask cluster.

Profiles come from ``cluster.yaml`` (see :func:`kmdask.config.load_profile`):

* ``local``: a LocalCluster of worker processes bound to 127.0.0.1 (dashboard on a free port);
* ``address``: an existing scheduler (``tcp://`` or ``tls://``, or a scheduler file);
* ``slurm`` / ``pbs``: dask-jobqueue clusters, scaled to fixed ``scale`` or ``adapt`` bounds.

A profile's ``config`` mapping holds dask's own keys (``distributed.*``, ``jobqueue.*``); it is
deep-merged into dask's configuration for as long as the connection is open.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import time
from collections.abc import Iterator
from typing import Any

import dask

from kmdask.config import deep_merge
from kmdask.errors import ConfigError, KmdaskError


def _say(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def _timeout_seconds(value: Any, default: float) -> float:
    if value is None:
        return default
    try:
        from dask.utils import parse_timedelta

        return float(parse_timedelta(value, default="s"))
    except (TypeError, ValueError):
        raise ConfigError(f"timeout: expected seconds or a duration like '10s', got {value!r}"
                          ) from None


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
    bad = sorted(set(sec) - allowed)
    if bad:
        raise ConfigError(f"{profile['source']}: profiles.{profile['name']}.security.{bad[0]}: "
                          f"unknown key (allowed: {', '.join(sorted(allowed))})")
    return Security(**sec)


@contextlib.contextmanager
def _local(profile: dict, quiet: bool) -> Iterator[Any]:
    from distributed import Client, LocalCluster

    n = int(profile.get("n_workers", 2))
    kwargs = dict(
        n_workers=n,
        threads_per_worker=int(profile.get("threads_per_worker", 1)),
        processes=True,
        memory_limit=_memory_limit(profile.get("memory_limit"), n),
        host=profile.get("host", "127.0.0.1"),
        dashboard_address=profile.get("dashboard_address", "127.0.0.1:0"),
    )
    t0 = time.perf_counter()
    with LocalCluster(**kwargs) as cluster, Client(cluster) as client:
        client.wait_for_workers(n)
        _say(f"kmdask: LocalCluster with {n} worker(s) ready in "
             f"{time.perf_counter() - t0:.1f} s; dashboard {client.dashboard_link}", quiet)
        yield client


@contextlib.contextmanager
def _address(profile: dict, address: str | None, quiet: bool) -> Iterator[Any]:
    from distributed import Client

    timeout = _timeout_seconds(profile.get("timeout"), 10.0)
    target = address or profile.get("address")
    sched_file = None if address else profile.get("scheduler_file")
    if not target and not sched_file:
        raise ConfigError(f"{profile['source']}: profiles.{profile['name']}: give 'address' "
                          "or 'scheduler_file' (or --address)")
    where = target or sched_file
    t0 = time.perf_counter()
    try:
        client = Client(address=target, scheduler_file=sched_file, timeout=timeout,
                        security=_security(profile), set_as_default=True)
    except (OSError, TimeoutError) as exc:
        raise KmdaskError(f"cannot reach the dask scheduler at {where} within {timeout:g} s "
                          f"({exc.__class__.__name__})") from None
    try:
        n = len(client.scheduler_info(n_workers=-1)["workers"])
        _say(f"kmdask: connected to {where} in {time.perf_counter() - t0:.1f} s "
             f"({n} worker(s)); dashboard {client.dashboard_link}", quiet)
        if n == 0:
            client.wait_for_workers(1, timeout=timeout)
        yield client
    finally:
        client.close()


@contextlib.contextmanager
def _jobqueue(profile: dict, quiet: bool) -> Iterator[Any]:
    kind = profile["kind"]
    exe = "sbatch" if kind == "slurm" else "qsub"
    if shutil.which(exe) is None:
        raise KmdaskError(f"profile {profile['name']!r} needs the {kind.upper()} command "
                          f"'{exe}', which is not on PATH")
    try:
        import dask_jobqueue
    except ImportError:
        raise KmdaskError("profile needs dask-jobqueue: pip install 'kmdask[hpc]'") from None
    from distributed import Client

    cls = dask_jobqueue.SLURMCluster if kind == "slurm" else dask_jobqueue.PBSCluster
    t0 = time.perf_counter()
    with cls() as cluster, Client(cluster) as client:
        scale, adapt = profile.get("scale"), profile.get("adapt")
        if adapt:
            cluster.adapt(**adapt)
        else:
            cluster.scale(**(scale or {"jobs": 1}))
        want = int((scale or {}).get("jobs", 1)) if not adapt else int(adapt.get("minimum", 1))
        timeout = _timeout_seconds(profile.get("timeout"), 300.0)
        try:
            client.wait_for_workers(max(want, 1), timeout=timeout)
        except TimeoutError:
            raise KmdaskError(f"no {kind.upper()} worker started within {timeout:g} s; check "
                              f"the queue ({'squeue' if kind == 'slurm' else 'qstat'})") from None
        _say(f"kmdask: {kind.upper()} cluster: first worker after "
             f"{time.perf_counter() - t0:.1f} s; dashboard {client.dashboard_link}", quiet)
        yield client


@contextlib.contextmanager
def connect(profile: dict, *, address: str | None = None, quiet: bool = False) -> Iterator[Any]:
    """Start or connect to the cluster a profile describes; yields a distributed Client.

    The profile's ``config`` is deep-merged into dask's configuration for the duration.
    """
    kind = profile.get("kind")
    if address and kind != "address":
        profile = {**profile, "kind": "address"}
        kind = "address"
    cfg = profile.get("config") or {}
    if not isinstance(cfg, dict):
        raise ConfigError(f"{profile['source']}: profiles.{profile['name']}.config: expected a "
                          "mapping of dask settings")
    merged = deep_merge(dict(dask.config.config), cfg)
    with dask.config.set(merged):
        if kind == "local":
            cm = _local(profile, quiet)
        elif kind == "address":
            cm = _address(profile, address, quiet)
        elif kind in ("slurm", "pbs"):
            cm = _jobqueue(profile, quiet)
        else:  # load_profile already checked; keep a clear message for hand-made dicts
            raise ConfigError(f"unknown cluster kind {kind!r}")
        with cm as client:
            yield client
