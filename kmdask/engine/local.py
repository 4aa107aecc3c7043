"""Small data: several Lloyd iterations per round trip, in one task on one worker.

At 60,000 rows a bounded Lloyd pass computes a few milliseconds of distances, while a pass of
the executor (:class:`~kmdask.engine.executor.ChunkedRows`) costs 10-15 ms of dask round trips
(submit, run, report, gather) whatever it computes. When the persisted chunks together are
small (``kmdask.small-data-bytes``, dask config, default 256 MiB) and every worker runs on one
host, :func:`lloyd_rounds` gathers them on one worker and runs the very same
:func:`kmdask.engine.lloyd.lloyd_iterations` there, over :class:`LocalRows`: the same per-chunk
kernels, on a pool of threads (as many as the cluster has), with results combined in chunk
order as before. So a fit is bit-identical either way (tested); only the round trips go.

A task runs iterations for about ``kmdask.small-data-round`` seconds (default 0.5) and returns
the models' states and each iteration's progress record; the client then checkpoints and
shows progress, and submits the next round, so an interrupted fit resumes as before and
progress lines stay live. The chunks keep their state (labels, distance bounds) on that worker
between rounds, since every round's task runs where the chunks are.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import dask
import numpy as np

SMALL_BYTES = 256 << 20
ROUND_SECONDS = 0.5


class LocalRows:
    """Chunks in this process, with the pass interface of
    :class:`~kmdask.engine.executor.ChunkedRows` that Lloyd iterations use (``map``,
    ``map_some``, ``passes``, the shape and budget fields)."""

    def __init__(self, chunks: list, like: dict, threads: int):
        self.chunks = chunks
        self.row_chunks = tuple(c.x.shape[0] for c in chunks)
        self.shape, self.dtype = like["shape"], like["dtype"]
        self.divisor, self.persisted = like["divisor"], True
        self.spare_bytes = like["spare_bytes"]
        self.use_bounds = like["use_bounds"]  # the client's setting, not this process's
        self.passes = 0
        self._threads = max(1, min(threads, len(chunks)))
        self._pool = ThreadPoolExecutor(self._threads) if self._threads > 1 else None

    @property
    def n_chunks(self) -> int:
        return len(self.chunks)

    def _run(self, fn: Callable, which: list[int], args: list[tuple]) -> list:
        def run(idx: list[int]) -> list:
            return [fn(self.chunks[which[j]], *args[j]) for j in idx]

        # contiguous runs of chunks, one per thread (few, large units, as the executor does)
        pos = list(range(len(which)))
        n = self._threads
        runs = [pos[i * len(pos) // n:(i + 1) * len(pos) // n] for i in range(n)]
        if self._pool is None:
            return run(pos)
        out: list = []
        for part in self._pool.map(run, [r for r in runs if r]):
            out += part
        return out

    def map(self, fn: Callable, *shared: Any, per_chunk: list[tuple] | None = None,
            keep: bool = False, combine: Any = None) -> list | dict:
        if keep:
            raise ValueError("LocalRows keeps chunk state in the chunks' caches only")
        self.passes += 1
        extras = per_chunk if per_chunk is not None else [()] * self.n_chunks
        which = list(range(self.n_chunks))
        got = self._run(fn, which, [(*shared, *e) for e in extras])
        return got if combine is None else combine.over(got, which)

    def map_some(self, fn: Callable, which: list[int], extras: list[tuple]) -> list:
        return self._run(fn, list(which), list(extras))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()


def _round(chunks: list, like: dict, threads: int, states: list, max_iter: int,
           tols: list[float], groups: Any, fixed: list, token: str, seconds: float) -> tuple:
    """One round on a worker: iterations until done or ``seconds`` spent; (states, records,
    passes, final results or None). The round that ends the fit also makes its final
    assignment pass, saving a round trip."""
    from kmdask.engine.lloyd import final_assignment, lloyd_iterations

    rows = LocalRows(chunks, like, threads)
    records: list[dict] = []
    final = None
    try:
        lloyd_iterations(rows, states, max_iter, tols, records.append, None, groups, token,
                         until=time.perf_counter() + seconds, fixed=fixed)
        if not any(s.active and s.n_iter < max_iter for s in states):
            final = final_assignment(rows, states, groups, fixed, token)
    finally:
        rows.close()
    return states, records, rows.passes, final


def _nbytes(data: Any) -> int:
    """Bytes of ``data``'s persisted chunks: rows and their norms."""
    return data.shape[0] * (data.shape[1] * np.dtype(data.dtype).itemsize + 16)


def small(data: Any, workers: Iterable[dict]) -> bool:
    """Whether ``data`` (a ChunkedRows, persisted), on ``workers`` (the scheduler's worker
    records), is small enough for the small-data path: its chunks then end up on one worker."""
    limit = int(dask.config.get("kmdask.small-data-bytes", SMALL_BYTES))
    return data.shape[0] > 0 and _nbytes(data) <= limit \
        and len({w.get("host") for w in workers}) == 1


def eligible(data: Any) -> int:
    """Threads for the small-data path on ``data`` (a ChunkedRows), or 0 where it does not
    apply: no distributed client, streamed or large data, or workers on several hosts."""
    client = data._client
    if client is None or not data.persisted:
        return 0
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    if not small(data, workers):
        return 0
    return max(1, sum(int(w.get("nthreads", 1)) for w in workers))


def lloyd_rounds(data: Any, states: list, max_iter: int, tols: Sequence[float], groups: Any,
                 fixed: list, threads: int, progress: Callable[[dict], None] | None,
                 on_iteration: Callable[[list], None] | None, token: str) -> list | None:
    """Lloyd iterations of ``states`` (updated in place) over ``data``'s persisted chunks in
    rounds of tasks on one worker (see the module docstring); returns the final assignment's
    results (:func:`kmdask.engine.lloyd.final_assignment`), made by the last round."""
    from kmdask.engine import lloyd
    from kmdask.engine.waits import wait_for

    client = data._client
    seconds = float(dask.config.get("kmdask.small-data-round", ROUND_SECONDS))
    # every chunk and all its state end up on one worker: the smallest one's budget applies
    limits = [w.get("memory_limit") or 0 for w in
              client.scheduler_info(n_workers=-1)["workers"].values()]
    spare = data.spare_bytes
    if limits and all(limits):
        spare = min(spare, max(int(0.5 * min(limits)) - _nbytes(data), 0))
    like = {"shape": data.shape, "dtype": data.dtype, "divisor": data.divisor,
            "spare_bytes": spare, "use_bounds": lloyd.USE_BOUNDS}
    chunks = list(data._items)
    # dask runs each round where most of the chunks' bytes are: after the first round, on the
    # worker that then holds them all (the others' chunks move there once)
    final = None
    while final is None:
        def submit(_: int = 0, now: list = states) -> Any:
            return client.submit(_round, chunks, like, threads, now, max_iter, list(tols),
                                 groups, list(fixed), token, seconds, pure=False)

        got, records, passes, final = wait_for(client, [submit()], [""], submit,
                                               gather=True)[0]
        states[:] = got
        data.passes += passes
        for r in records:
            if progress is not None:
                progress(r)
        if on_iteration is not None:
            on_iteration(states)
    return final
