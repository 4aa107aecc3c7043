"""Row-chunked data on dask workers: persisted in worker memory, or streamed every pass.

A *pass* maps one pure function over every chunk (as a dask task next to the chunk's data)
and gathers the small per-chunk results on the client, in chunk order, so that combining
them is deterministic whatever the number of workers or threads.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import dask
import dask.array as da
import numpy as np

from kmdask import kernels

_BUDGET_FRACTION = 0.5  # share of the workers' memory that persisted data may take


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
        need = X.nbytes + 8 * X.shape[0]
        if persist == "auto":
            persist = need <= memory_budget()
        self.persisted = bool(persist)
        self.passes = 0
        self._client = _current_client()
        self._groups: dict[tuple[str, int], list[int]] = {}
        if self.persisted:
            parts = [
                dask.delayed(_prepared, pure=True)(b, self.divisor, int(o), i)
                for i, (b, o) in enumerate(zip(self._blocks, self.offsets, strict=True))
            ]
            if self._client is not None:
                self._persist_balanced(parts)
            else:
                self._parts = list(dask.persist(*parts))

    @property
    def n_chunks(self) -> int:
        return len(self.row_chunks)

    def _persist_balanced(self, parts: list) -> None:
        """Hold the chunks as futures, in contiguous runs spread evenly over worker threads.

        A pass is then one task per worker thread over its run of chunks: few, large tasks
        keep dask's per-pass overhead low, and an even spread keeps every core busy.
        """
        from distributed import wait

        client = self._client
        info = client.scheduler_info(n_workers=-1)["workers"]
        slots = [(w, t) for w in sorted(info) for t in range(int(info[w].get("nthreads", 1)))]
        if not slots:  # no workers yet: let the scheduler place them
            self._parts = client.compute(parts)
            wait(self._parts)
            self._groups = {("", 0): list(range(len(parts)))}
            return
        n = len(parts)
        owner = [slots[i * len(slots) // n] for i in range(n)]
        self._parts = [client.compute(p, workers=[w], allow_other_workers=True)
                       for p, (w, _) in zip(parts, owner, strict=True)]
        wait(self._parts)
        groups: dict[tuple[str, int], list[int]] = {}
        for i, slot in enumerate(owner):
            groups.setdefault(slot, []).append(i)
        self._groups = groups

    def _map_futures(self, fn: Callable, shared: tuple, per_chunk: list[tuple] | None) -> list:
        client = self._client
        futs = []
        for (worker, _), idx in self._groups.items():
            extras = [per_chunk[i] if per_chunk is not None else () for i in idx]
            futs.append(client.submit(
                _run_group, fn, [self._parts[i] for i in idx], shared, extras,
                workers=[worker] if worker else None, allow_other_workers=True, pure=False,
            ))
        out: list = [None] * self.n_chunks
        for idx, res in zip(self._groups.values(), client.gather(futs), strict=True):
            for i, r in zip(idx, res, strict=True):
                out[i] = r
        return out

    def map(self, fn: Callable, *shared: Any, per_chunk: list[tuple] | None = None) -> list:
        """Run ``fn(chunk, *shared, *per_chunk[i])`` on every chunk; results in chunk order.

        ``shared`` values (e.g. centre matrices) are put in the graph once, not once per task.
        """
        self.passes += 1
        if self.persisted and self._client is not None:
            return self._map_futures(fn, shared, per_chunk)
        shared_d = [dask.delayed(s, traverse=False) if isinstance(s, np.ndarray) else s
                    for s in shared]
        tasks = []
        for i in range(self.n_chunks):
            extra = per_chunk[i] if per_chunk is not None else ()
            if self.persisted:
                t = dask.delayed(fn, pure=True)(self._parts[i], *shared_d, *extra)
            else:
                t = dask.delayed(_call_streamed, pure=True)(
                    fn, self._blocks[i], self.divisor, int(self.offsets[i]), i, *shared_d, *extra
                )
            tasks.append(t)
        return list(dask.compute(*tasks, optimize_graph=False))

    def rows(self, index: np.ndarray) -> np.ndarray:
        """The raw rows at the given global indices (in the order given)."""
        index = np.asarray(index, dtype=np.int64)
        if index.size == 0:
            return np.empty((0, self.shape[1]), dtype=self.dtype)
        which = np.searchsorted(self.offsets, index, side="right") - 1
        per_chunk = [(index[which == i] - self.offsets[i],) for i in range(self.n_chunks)]
        wanted = [i for i in range(self.n_chunks) if per_chunk[i][0].size]
        got = self._map_some(_take_rows, wanted, [per_chunk[i] for i in wanted])
        out = np.empty((index.size, self.shape[1]), dtype=self.dtype)
        for i, rows in zip(wanted, got, strict=True):
            out[np.nonzero(which == i)[0]] = rows
        return out

    def _map_some(self, fn: Callable, which: list[int], extras: list[tuple]) -> list:
        if self.persisted and self._client is not None:
            futs = [self._client.submit(fn, self._parts[i], *e, pure=False)
                    for i, e in zip(which, extras, strict=True)]
            return self._client.gather(futs)
        tasks = []
        for i, extra in zip(which, extras, strict=True):
            if self.persisted:
                tasks.append(dask.delayed(fn, pure=True)(self._parts[i], *extra))
            else:
                tasks.append(dask.delayed(_call_streamed, pure=True)(
                    fn, self._blocks[i], self.divisor, int(self.offsets[i]), i, *extra))
        return list(dask.compute(*tasks, optimize_graph=False))

    def release(self) -> None:
        """Drop persisted chunks from worker memory."""
        self._parts = []


def _current_client():
    try:
        from distributed import get_client

        return get_client()
    except (ImportError, ValueError):
        return None


def _run_group(fn: Callable, chunks: list, shared: tuple, extras: list[tuple]) -> list:
    return [fn(c, *shared, *e) for c, e in zip(chunks, extras, strict=True)]


def _take_rows(chunk: kernels.Chunk, local_idx: np.ndarray) -> np.ndarray:
    return chunk.x[local_idx]
