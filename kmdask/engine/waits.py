"""Waiting for tasks on a dask cluster without waiting forever.

Two situations in which dask alone would wait for ever, and what :func:`wait_for` does:

* Every worker is paused by dask for memory that is not data it could spill (memory held by
  libraries): such a worker never resumes. After ``kmdask.paused-timeout`` seconds (dask config,
  default 120) the wait raises :class:`~kmdask.errors.ClusterStalled`.
* A task submitted with a placement hint (``workers=[w], allow_other_workers=True``) whose
  worker is gone, and that is not running anywhere: dask sends a "no-worker" task only to a
  worker its restrictions name, loose or not, so when every worker is lost at once the task
  waits for the old address while the replacement workers have new ones. It is cancelled and
  resubmitted without the hint. The same holds for a finished result lost with its worker
  before it was gathered: dask recomputes it under the old hint, so gathering is bounded and
  checked the same way.

Tasks whose results outlive a pass (persisted chunks, per-chunk state) must not keep a hint at
all once placed: :func:`clear_hints` removes it, so that dask can recompute them anywhere.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import dask

from kmdask.errors import ClusterStalled

_PAUSED_TIMEOUT = 120.0


def current_client():
    """The distributed client in use (``get_client``), or None without one."""
    try:
        from distributed import get_client

        return get_client()
    except (ImportError, ValueError):
        return None


def hint(worker: str | None) -> dict:
    """Task options that place a task on ``worker`` when it can (none: anywhere)."""
    return {"workers": [worker], "allow_other_workers": True} if worker else {}


def clear_hints(client, futures: list) -> None:
    """Drop the placement restrictions of ``futures`` (see the module docstring)."""
    if futures:
        client.sync(client.scheduler.set_restrictions, worker={f.key: None for f in futures})


async def _gather_async(client, futs: list) -> list:
    return await client.gather(futs, asynchronous=True)


def wait_for(client, futs: list, targets: list[str], resubmit: Callable[[int], Any],
             gather: bool = False) -> list | None:
    """Wait for ``futs`` (``futs[i]`` submitted to worker ``targets[i]`` as a loose hint, ``""``
    for none) and, with ``gather``, return their results.

    ``resubmit(i)`` submits task ``i`` again without a hint; it replaces ``futs[i]`` in place
    (tasks are pure, so a rerun gives the same result).
    """
    from distributed import wait

    limit = float(dask.config.get("kmdask.paused-timeout", _PAUSED_TIMEOUT))
    every = min(5.0, max(limit / 4, 0.1))
    targets = list(targets)
    paused_since = None
    while True:
        try:
            wait(futs, timeout=every)
            if not gather:
                return None
            return client.sync(_gather_async, client, futs, callback_timeout=every)
        except TimeoutError:
            if gather and all(f.done() for f in futs):
                return client.gather(futs)  # a slow transfer, nothing lost: let it finish
        workers = client.scheduler_info(n_workers=-1)["workers"]
        lost = [i for i, (f, w) in enumerate(zip(futs, targets, strict=True))
                if w and w not in workers and not f.done()]
        if lost:
            running = {k for keys in client.processing().values() for k in keys}
            for i in lost:
                if futs[i].key not in running:
                    client.cancel(futs[i])
                    futs[i] = resubmit(i)
                    targets[i] = ""
        status = [w.get("status") for w in workers.values()]
        if not status or any(s != "paused" for s in status):
            paused_since = None  # working, or waiting for workers to join (a batch queue)
            continue
        now = time.monotonic()
        paused_since = paused_since if paused_since is not None else now
        if now - paused_since >= limit:
            client.cancel(futs)
            raise ClusterStalled(
                f"all {len(status)} worker(s) paused by dask for memory for {limit:.0f} s "
                "(not data they could spill): give each worker more memory (memory_limit in "
                "cluster.yaml)")
