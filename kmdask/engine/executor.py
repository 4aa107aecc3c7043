"""Row-chunked data on dask workers: persisted in worker memory, or streamed every pass.

A *pass* maps one pure function over every chunk (as a dask task next to the chunk's data)
and gathers the small per-chunk results on the client, in chunk order, so that combining
them is deterministic whatever the number of workers or threads.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import dask
import dask.array as da
import numpy as np

from kmdask.engine import kernels
from kmdask.errors import ClusterStalled

_BUDGET_FRACTION = 0.5  # share of the workers' memory that persisted data may take
# A worker that dask paused for memory runs no task until its memory falls, which memory held by
# libraries (not data it could spill) never does: a pass would wait forever. Give up after this
# long with every worker paused (dask config key ``kmdask.paused-timeout``, seconds).
_PAUSED_TIMEOUT = 120.0


def _prepared(x: np.ndarray, divisor: float, offset: int, index: int) -> kernels.Chunk:
    return kernels.prepare_chunk(x, divisor, offset, index)


def _call_streamed(fn: Callable, x: np.ndarray, divisor: float, offset: int, index: int,
                   *args: Any) -> Any:
    # Streaming: read, prepare and use the chunk in one task, so it never lingers in memory.
    return fn(kernels.prepare_chunk(x, divisor, offset, index), *args)


def memory_budget() -> int:
    """Bytes of worker memory that persisted data may use on the current scheduler."""
    client = _current_client()
    if client is not None:
        workers = client.scheduler_info(n_workers=-1)["workers"].values()
        limits = [w.get("memory_limit") or 0 for w in workers]
        if limits and all(limits):
            return int(_BUDGET_FRACTION * sum(limits))
    import psutil

    return int(_BUDGET_FRACTION * psutil.virtual_memory().available)


class ChunkedRows:
    """A 2-D array of rows split into row chunks, ready for per-chunk kernel passes.

    Parameters
    ----------
    X : dask array (n, d) of uint8/float32/float64, chunked along rows only.
    persist : True (hold prepared chunks in worker memory), False (stream from the source
        every pass) or "auto" (persist when data + norms fit half the workers' memory).

    On a distributed client the chunks are split into contiguous runs, one per worker thread,
    and a pass is one task per run: few, large tasks keep dask's per-pass overhead low and an
    even spread keeps every core busy. Persisted runs stay in their worker's memory; streamed
    runs read their chunks (evaluating each chunk's small source graph inside the task, so no
    chunk crosses the network) and drop them after use.
    """

    def __init__(self, X: da.Array, persist: bool | str = "auto"):
        if X.numblocks[1] != 1:
            X = X.rechunk({1: -1})
        self.shape = X.shape
        self.dtype = X.dtype
        self.divisor = kernels.scale_for(X.dtype)
        self.row_chunks = X.chunks[0]
        self.offsets = np.concatenate([[0], np.cumsum(self.row_chunks)[:-1]]).astype(int)
        self._blocks = list(X.to_delayed().ravel())
        need = X.nbytes + 16 * X.shape[0]  # rows, their norms
        budget = memory_budget() if persist in ("auto", True) else 0
        if persist == "auto":
            persist = need <= budget
        self.persisted = bool(persist)
        # what persisted data leaves of the budget, for derived per-row values (e.g. bounds)
        self.spare_bytes = max(budget - need, 0) if self.persisted else 0
        self.passes = 0
        self._client = _current_client()
        self._groups: dict[tuple[str, int], list[int]] = {}
        self._items: list = []  # per chunk: a future (persisted) or (graph, key) (streamed)
        if self._client is not None:
            owner = self._owners()
            if self.persisted:
                targets = [w for w, _ in owner]

                def place(i: int, worker: str | None) -> Any:
                    # The hint goes on the chunk's own task only, not on the source tasks it
                    # reads (see below why no restriction may outlive the placement).
                    # a resubmission needs a new key: the old one keeps its old restriction
                    with dask.annotate(**_hint(worker)):
                        part = dask.delayed(_prepared, pure=bool(worker))(
                            self._blocks[i], self.divisor, int(self.offsets[i]), i)
                    return self._client.compute(part)

                self._items = [place(i, w) for i, w in enumerate(targets)]
                _wait_for(self._client, self._items, targets, lambda i: place(i, None))
                # The placement was only a hint for spreading the chunks. Left in place, a
                # chunk lost with its worker and recomputed while no worker is up would wait
                # for that worker's address forever (dask schedules a "no-worker" task only
                # on a worker that its restrictions name, loose or not).
                self._client.sync(self._client.scheduler.set_restrictions,
                                  worker={f.key: None for f in self._items})
            else:
                self._items = [_block_graph(b) for b in self._blocks]
        elif self.persisted:
            parts = [dask.delayed(_prepared, pure=True)(b, self.divisor, int(o), i)
                     for i, (b, o) in enumerate(zip(self._blocks, self.offsets, strict=True))]
            self._items = list(dask.persist(*parts))

    @property
    def n_chunks(self) -> int:
        return len(self.row_chunks)

    def _owners(self) -> list[tuple[str, int]]:
        """The (worker, thread slot) owning each chunk: contiguous runs, evenly spread."""
        info = self._client.scheduler_info(n_workers=-1)["workers"]
        slots = [(w, t) for w in sorted(info) for t in range(int(info[w].get("nthreads", 1)))]
        slots = slots or [("", 0)]  # no workers yet: let the scheduler place the runs
        n = self.n_chunks
        owner = [slots[i * len(slots) // n] for i in range(n)]
        for i, slot in enumerate(owner):
            self._groups.setdefault(slot, []).append(i)
        return owner

    def _run_groups(self, fn: Callable, shared: tuple, extras: dict[int, tuple]) -> dict:
        """One task per run, restricted to the chunks in ``extras``; {chunk: result}."""
        client = self._client
        targets, order, args = [], [], []
        for (worker, _), idx in self._groups.items():
            idx = [i for i in idx if i in extras]
            if not idx:
                continue
            meta = [(int(self.offsets[i]), i) for i in idx]
            targets.append(worker)
            order.append(idx)
            args.append((fn, [self._items[i] for i in idx], meta, self.divisor, self.persisted,
                         shared, [extras[i] for i in idx]))

        def submit(j: int, worker: str | None) -> Any:
            return client.submit(_run_group, *args[j], pure=False, **_hint(worker))

        futs = [submit(j, w) for j, w in enumerate(targets)]
        got = _wait_for(client, futs, targets, lambda j: submit(j, None), gather=True)
        out = {}
        for idx, res in zip(order, got, strict=True):
            out.update(zip(idx, res, strict=True))
        return out

    def map(self, fn: Callable, *shared: Any, per_chunk: list[tuple] | None = None) -> list:
        """Run ``fn(chunk, *shared, *per_chunk[i])`` on every chunk; results in chunk order."""
        self.passes += 1
        extras = {i: (per_chunk[i] if per_chunk is not None else ())
                  for i in range(self.n_chunks)}
        if self._client is not None:
            got = self._run_groups(fn, shared, extras)
            return [got[i] for i in range(self.n_chunks)]
        return self._compute_local(fn, shared, extras)

    def _compute_local(self, fn: Callable, shared: tuple, extras: dict[int, tuple]) -> list:
        # No distributed client: one dask task per chunk on the default scheduler.
        shared_d = [dask.delayed(s, traverse=False) if isinstance(s, np.ndarray) else s
                    for s in shared]
        tasks = []
        for i, extra in extras.items():
            if self.persisted:
                t = dask.delayed(fn, pure=True)(self._items[i], *shared_d, *extra)
            else:
                t = dask.delayed(_call_streamed, pure=True)(
                    fn, self._blocks[i], self.divisor, int(self.offsets[i]), i, *shared_d, *extra)
            tasks.append(t)
        return list(dask.compute(*tasks, optimize_graph=False))

    def rows(self, index: np.ndarray) -> np.ndarray:
        """The raw rows at the given global indices (in the order given)."""
        index = np.asarray(index, dtype=np.int64)
        if index.size == 0:
            return np.empty((0, self.shape[1]), dtype=self.dtype)
        which = np.searchsorted(self.offsets, index, side="right") - 1
        wanted = [i for i in range(self.n_chunks) if (which == i).any()]
        got = self._map_some(_take_rows, wanted,
                             [(index[which == i] - self.offsets[i],) for i in wanted])
        out = np.empty((index.size, self.shape[1]), dtype=self.dtype)
        for i, rows in zip(wanted, got, strict=True):
            out[np.nonzero(which == i)[0]] = rows
        return out

    def _map_some(self, fn: Callable, which: list[int], extras: list[tuple]) -> list:
        """Run ``fn(chunk, *extras[j])`` on chunks ``which[j]`` only (not counted as a pass)."""
        ex = dict(zip(which, extras, strict=True))
        if self._client is not None:
            got = self._run_groups(fn, (), ex)
            return [got[i] for i in which]
        return self._compute_local(fn, (), ex)

    def release(self) -> None:
        """Drop persisted chunks from worker memory."""
        self._items = []


@dataclass(frozen=True)
class _BlockGraph:
    """The small graph that produces one block (e.g. a zarr read and a slice), and its key.

    An opaque object, so that dask passes it to the task as it is instead of reading the
    graph's tasks as arguments to resolve."""

    graph: dict
    key: Any

    def compute(self) -> np.ndarray:
        from dask.local import get_sync

        return get_sync(self.graph, self.key)


def _block_graph(block) -> _BlockGraph:
    g = block.__dask_graph__()
    g = g.cull({block.key}) if hasattr(g, "cull") else g
    return _BlockGraph(dict(g), block.key)


def _hint(worker: str | None) -> dict:
    """Task options that place a task on ``worker`` when it can (none: anywhere)."""
    return {"workers": [worker], "allow_other_workers": True} if worker else {}


async def _gather_async(client, futs: list) -> list:
    return await client.gather(futs, asynchronous=True)


def _wait_for(client, futs: list, targets: list[str], resubmit: Callable[[int], Any],
              gather: bool = False) -> list | None:
    """Wait for ``futs`` (each submitted to worker ``targets[i]`` as a loose hint) and, with
    ``gather``, return their results.

    Two ways a pass could otherwise wait forever:

    * Every worker is paused by dask for memory that is not data it could spill: raise
      ClusterStalled after ``kmdask.paused-timeout`` seconds.
    * A task whose hinted worker is gone and that is not running anywhere: dask sends a
      "no-worker" task only to a worker its restrictions name, loose or not, so a task that
      found no worker up (all of them lost at once) waits for the old address forever, while
      the replacement workers have new ones. It is cancelled and ``resubmit(i)`` (no hint)
      replaces ``futs[i]`` in place. Tasks are pure, so a rerun gives the same result.
      The same holds for a finished result lost with its worker before it was gathered: dask
      recomputes it under the old hint, so gathering is given up and checked the same way.
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


def _current_client():
    try:
        from distributed import get_client

        return get_client()
    except (ImportError, ValueError):
        return None


def _run_group(fn: Callable, items: list, meta: list[tuple[int, int]], divisor: float,
               persisted: bool, shared: tuple, extras: list[tuple]) -> list:
    """One worker thread's run of chunks: persisted ones as they are, streamed ones read here
    one at a time (so at most one raw chunk per thread is in memory)."""
    out = []
    for item, (offset, index), extra in zip(items, meta, extras, strict=True):
        chunk = (item if persisted
                 else kernels.prepare_chunk(item.compute(), divisor, offset, index))
        out.append(fn(chunk, *shared, *extra))
    return out


def _take_rows(chunk: kernels.Chunk, local_idx: np.ndarray) -> np.ndarray:
    return chunk.x[local_idx]
