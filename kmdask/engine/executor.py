"""The executor: a 2-D array split into row chunks on dask workers, and passes over them.

One executor serves every algorithm (the engine, and the original demo's mode). It knows
nothing of K-Means: a chunk is whatever ``prepare(rows, offset, index)`` makes of its raw
rows, and a pass runs a pure function next to every chunk. Three kinds of pass:

* :meth:`ChunkedRows.map` — ``fn(chunk, *shared, *per_chunk[i])`` on every chunk, results
  gathered on the client in chunk order, so that combining them is deterministic whatever
  the number of workers or threads;
* the same with ``keep=True`` — ``fn`` returns ``(result, state)``: the results come back, each
  chunk's state stays on the worker that made it, as a handle a later pass can take in its
  ``per_chunk`` (no state crosses the network, and a lost one is recomputed from its lineage);
* :meth:`ChunkedRows.fold` — ``carry = fn(chunk, carry, ...)`` through the chunks in row order
  (for sums that must be accumulated in one order to be bit-exact).

Chunks are persisted in worker memory when they fit (``persist``), else streamed: read, used and
dropped in every pass. On a distributed client the chunks are split into contiguous runs, one
per worker thread, and a pass is one task per run: few, large tasks keep dask's per-pass
overhead low and an even spread keeps every core busy; an array already in worker memory stays
where it is, in runs per worker thread, balanced by moving only the excess (small data, which
Lloyd iterations gather on one worker, :mod:`kmdask.engine.local`, is not balanced). A pass may
add its results up where they are made (:class:`Combine`). Without a client, passes run on
dask's local scheduler. Waits never hang (:mod:`kmdask.engine.waits`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import dask
import dask.array as da
import numpy as np
from dask.core import keys_in_tasks
from dask.delayed import Delayed

from kmdask.engine import kernels, local
from kmdask.engine.waits import clear_hints, current_client, hint, wait_for

DEFAULT_CHUNK_ROWS = 10_000
_BUDGET_FRACTION = 0.5  # share of the workers' memory that persisted data may take
# Arguments larger than this are sent to the workers once (scattered) instead of inside each
# task's graph: dask warns about large graphs, and would send such a copy with every task.
_EMBED_MAX = 4 << 20


@dataclass(frozen=True)
class EnginePrep:
    """The engine's chunk preparation (picklable): :func:`kmdask.engine.kernels.prepare_chunk`
    with the data's divisor (255 for uint8 pixels)."""

    divisor: float

    def __call__(self, x: np.ndarray, offset: int, index: int) -> kernels.Chunk:
        return kernels.prepare_chunk(x, self.divisor, offset, index)


def memory_budget() -> int:
    """Bytes of worker memory that persisted data may use on the current scheduler."""
    client = current_client()
    if client is not None:
        workers = client.scheduler_info(n_workers=-1)["workers"].values()
        limits = [w.get("memory_limit") or 0 for w in workers]
        if limits and all(limits):
            return int(_BUDGET_FRACTION * sum(limits))
    import psutil

    return int(_BUDGET_FRACTION * psutil.virtual_memory().available)


class ChunkedRows:
    """A 2-D array of rows split into row chunks, ready for per-chunk passes.

    Parameters
    ----------
    X : dask array or numpy array, (n, d)
        A dask array chunked along rows (its chunks are kept), or an in-memory array, cut into
        ``chunk_rows``-row chunks that are sent to the workers once (never embedded in graphs).
    persist : True, False or "auto"
        Hold prepared chunks in worker memory, stream them from the source every pass, or
        persist when data + norms fit half the workers' memory. In-memory arrays always persist.
    prepare : callable, optional
        ``prepare(rows, offset, index) -> chunk`` (picklable); default :class:`EnginePrep`.
    chunk_rows : int
        Rows per chunk of an in-memory ``X``.
    divisor : float, optional
        uint8 rows are divided by it (default 255: pixels in [0, 1]); float rows use 1.
    also : sequence of numpy arrays
        More rows (of ``X``'s width and dtype) after ``X``'s, one chunk per array, sent to the
        workers once; spread over the workers as a segment of their own (so that ``X``'s
        chunks stay evenly spread). :meth:`head` is ``X`` alone.
    """

    def __init__(self, X: Any, persist: bool | str = "auto", prepare: Callable | None = None,
                 chunk_rows: int = DEFAULT_CHUNK_ROWS, divisor: float | None = None,
                 also: Sequence[np.ndarray] = ()):
        memory = not isinstance(X, da.Array)
        if memory:
            X = np.ascontiguousarray(X)
            starts = range(0, X.shape[0], chunk_rows)
            blocks: list = [X[s : s + chunk_rows] for s in starts]
            self.row_chunks = tuple(b.shape[0] for b in blocks)
            persist = True
        else:
            if X.numblocks[1] != 1:
                X = X.rechunk({1: -1})
            blocks = list(X.to_delayed().ravel())
            self.row_chunks = X.chunks[0]
        # ``also``: in-memory row sets after X's rows, a chunk each (e.g. the gap statistic's
        # reference sets, fitted in the same passes as X); placed as a segment of their own
        self.segments = (len(blocks),) + ((len(also),) if len(also) else ())
        self._memory = [memory] * len(blocks) + [True] * len(also)
        for a in also:
            if a.ndim != 2 or a.shape[1] != X.shape[1] or a.dtype != X.dtype:
                raise ValueError(f"an extra row set must be ({X.shape[1]} columns, {X.dtype}), "
                                 f"got {a.shape} {a.dtype}")
        blocks += [np.ascontiguousarray(a) for a in also]
        self.row_chunks = tuple(self.row_chunks) + tuple(a.shape[0] for a in also)
        self.shape = (int(sum(self.row_chunks)), X.shape[1])
        self.dtype = X.dtype
        self.divisor = (float(divisor) if divisor and X.dtype == np.uint8
                        else kernels.scale_for(X.dtype))
        self.prepare = prepare or EnginePrep(self.divisor)
        self.offsets = np.concatenate([[0], np.cumsum(self.row_chunks)[:-1]]).astype(int)
        need = X.nbytes + sum(a.nbytes for a in also) + 16 * self.shape[0]  # rows, norms
        budget = memory_budget() if persist in ("auto", True) else 0
        if persist == "auto":
            persist = need <= budget
        self.persisted = bool(persist)
        # what persisted data leaves of the budget, for derived per-row values (e.g. bounds)
        self.spare_bytes = max(budget - need, 0) if self.persisted else 0
        self.passes = 0
        self._client = current_client()
        self._groups: dict[tuple[str, int], list[int]] = {}
        self._items: list = []  # per chunk: a future (persisted), a block graph (streamed)
        if self._client is not None:
            self._place(blocks, X if not memory else None)
        elif self.persisted:
            self._items = [self.prepare(np.asarray(b if m else b.compute()), int(o), i)
                           for i, (b, o, m) in enumerate(zip(blocks, self.offsets,
                                                             self._memory, strict=True))]
        else:
            self._items = blocks

    @property
    def n_chunks(self) -> int:
        return len(self.row_chunks)

    def _place(self, blocks: list, X: da.Array | None) -> None:
        """Put the chunks where the passes will run them (see the class docstring)."""
        client = self._client
        owner = self._owners(self._located(blocks, X))
        targets = [w for w, _ in owner]
        memory = self._memory
        # in-memory blocks are sent once, to the worker that will use them
        blocks = [client.scatter(b, workers=[w] if w else None, hash=False) if m else b
                  for b, w, m in zip(blocks, targets, memory, strict=True)]
        if not self.persisted:  # a pass reads (or takes) and prepares each chunk
            # chunks already in worker memory (a persisted array, or one computed from it) are
            # taken from there: their graph refers to futures, which only the cluster resolves
            held = {f.key: f for f in client.futures_of(X)} if X is not None else {}
            self._items = [b if m else held[b.key] if b.key in held else _block_graph(b, held)
                           for b, m in zip(blocks, memory, strict=True)]
            return

        def place(i: int, worker: str | None) -> Any:
            if memory[i]:
                return client.submit(self.prepare, blocks[i], int(self.offsets[i]), i,
                                     pure=False, **hint(worker))
            # The hint goes on the chunk's own task only, not on the source tasks it reads,
            # and a resubmission needs a new key: the old one keeps its old restriction.
            with dask.annotate(**hint(worker)):
                part = dask.delayed(self.prepare, pure=bool(worker))(
                    blocks[i], int(self.offsets[i]), i)
            return client.compute(part)

        self._items = [place(i, w) for i, w in enumerate(targets)]
        wait_for(client, self._items, targets, lambda i: place(i, None))
        clear_hints(client, self._items)  # the hint only spread the chunks (see waits)

    def _located(self, blocks: list, X: da.Array | None) -> list[set]:
        """Per block, the workers already holding it (a persisted dask array's chunks)."""
        where = [set() for _ in blocks]
        if X is None or not self._client.futures_of(X):
            return where
        who = self._client.who_has(X)
        for i, b in enumerate(blocks[: self.segments[0]]):
            where[i] = set(who.get(getattr(b, "key", None), ()))
        return where

    def _owners(self, located: list[set]) -> list[tuple[str, int]]:
        """The (worker, thread slot) owning each chunk: contiguous runs, evenly spread, each
        run on the worker that already holds most of its chunks; chunks of an array already
        in worker memory then stay where they are (:meth:`_stay`), since preparing a chunk
        elsewhere first copies it there (0.1 s for 60k float32 rows)."""
        info = self._client.scheduler_info(n_workers=-1)["workers"]
        slots = [(w, t) for w in sorted(info) for t in range(int(info[w].get("nthreads", 1)))]
        slots = slots or [("", 0)]  # no workers yet: let the scheduler place the runs
        owner: list[tuple[str, int]] = []
        for n in self.segments:  # each segment spread over every slot (X, then extra sets)
            base = len(owner)
            runs = [i * len(slots) // n for i in range(n)]  # chunk -> run (slot index)
            score = {}
            for i, r in enumerate(runs):
                for w in located[base + i] if base + i < len(located) else ():
                    for s, (sw, _) in enumerate(slots):
                        if sw == w:
                            score[r, s] = score.get((r, s), 0) + 1
            slot_of: dict[int, int] = {}  # greedy: the best-matched runs take their slots
            for (r, s), _ in sorted(score.items(), key=lambda kv: -kv[1]):
                if r not in slot_of and s not in slot_of.values():
                    slot_of[r] = s
            free = iter(s for s in range(len(slots)) if s not in slot_of.values())
            for r in sorted(set(runs)):
                if r not in slot_of:
                    slot_of[r] = next(free)
            owner += [slots[slot_of[r]] for r in runs]
        if any(located):  # an array already in worker memory, persisted or streamed from there
            owner = self._stay(located, owner, slots, balance=not (
                self.persisted and local.small(self, info.values())))
        for i, slot in enumerate(owner):
            self._groups.setdefault(slot, []).append(i)
        return owner

    @staticmethod
    def _stay(located: list[set], owner: list[tuple[str, int]],
              slots: list[tuple[str, int]], balance: bool) -> list[tuple[str, int]]:
        """Persisted chunks stay on a worker already holding them, split over its threads in
        runs of consecutive chunks (runs need not be consecutive with each other).

        Small data (see :mod:`kmdask.engine.local`) stays as it is: its Lloyd iterations
        gather every chunk on one worker anyway, so spreading them evenly first moved chunks
        twice (a 60k-row float32 fit, shared init, 20 iterations: 0.94 s against 0.57 s
        median once chunks stayed). Larger data is ``balance``d: each worker keeps its share
        of the chunks (by threads) and only the excess moves. dask persists an array's chunks
        round robin, so contiguous runs per worker moved about half of them (1.02M pixel
        rows: 400 MB and 0.4-0.6 s before a fit's first pass). Chunks held nowhere (not
        persisted, extra row sets) keep ``owner``'s slot."""
        threads: dict[str, list[tuple[str, int]]] = {}
        for slot in slots:
            threads.setdefault(slot[0], []).append(slot)
        where: list[str | None] = [None] * len(located)
        load = dict.fromkeys(threads, 0)
        held = [i for i, w in enumerate(located) if w & threads.keys()]
        share = dict.fromkeys(threads, 0)
        for j in range(len(held)):  # chunk j of the held ones goes to the j-th slot's worker
            share[slots[j * len(slots) // len(held)][0]] += 1
        for i in sorted(held, key=lambda i: len(located[i] & threads.keys())):
            # a chunk held twice goes where it is most needed (single holders decided first)
            w = min(sorted(located[i] & threads.keys()), key=lambda w: load[w] - share[w])
            where[i] = w
            load[w] += 1
        if balance:  # only the excess moves: the last chunks of a worker over its share
            short = [w for w in sorted(threads) for _ in range(max(share[w] - load[w], 0))]
            for w in sorted(threads):
                extra = load[w] - share[w]
                if extra > 0:
                    for i in [i for i in held if where[i] == w][-extra:]:
                        where[i] = short.pop(0)
        out = list(owner)
        for w, mine in threads.items():
            idx = [i for i, h in enumerate(where) if h == w]
            for j, i in enumerate(idx):
                out[i] = mine[j * len(mine) // len(idx)]
        return out

    def _runs(self) -> list[list[int]]:
        """The chunks in row order, cut where the slot running them changes."""
        slot_of = {i: slot for slot, idx in self._groups.items() for i in idx}
        runs: list[list[int]] = []
        for i in sorted(slot_of):
            if runs and slot_of[runs[-1][-1]] == slot_of[i] and runs[-1][-1] == i - 1:
                runs[-1].append(i)
            else:
                runs.append([i])
        return runs

    # -- passes ---------------------------------------------------------------------------

    def map(self, fn: Callable, *shared: Any, per_chunk: list[tuple] | None = None,
            keep: bool = False, combine: Combine | None = None
            ) -> list | tuple[list, list] | dict:
        """Run ``fn(chunk, *shared, *per_chunk[i])`` on every chunk; results in chunk order.

        With ``keep``, ``fn`` returns ``(result, state)``: returns ``(results, handles)``, a
        handle per chunk standing for its state, to be passed in a later ``per_chunk``.

        With ``combine`` (see :class:`Combine`), results are added up per key where they are
        made, a run of chunks at a time, and then across runs: returns ``{key: total}``.
        """
        self.passes += 1
        extras = {i: (per_chunk[i] if per_chunk is not None else ())
                  for i in range(self.n_chunks)}
        if combine is not None:
            if keep:
                raise ValueError("map: keep and combine do not go together")
            return self._run(fn, shared, extras, False, combine)[0]
        got, handles = self._run(fn, shared, extras, keep)
        results = [got[i] for i in range(self.n_chunks)]
        return (results, [handles[i] for i in range(self.n_chunks)]) if keep else results

    def fold(self, fn: Callable, carry: Any, *shared: Any,
             per_chunk: list[tuple] | None = None) -> Any:
        """``carry = fn(chunk, carry, *shared, *per_chunk[i])`` for every chunk in row order;
        returns the last carry. One task per run of chunks, each handed the previous carry."""
        if len(self.segments) > 1:  # runs are in row order within a segment only
            raise ValueError("fold needs rows without extra row sets")
        extras = [per_chunk[i] if per_chunk is not None else () for i in range(self.n_chunks)]
        if self._client is None:
            for i in range(self.n_chunks):
                carry = fn(self._chunk(i), carry, *shared, *extras[i])
            return carry
        client = self._client
        shared = self._lift(shared, broadcast=True)
        fut: Any = carry
        for idx in self._runs():  # row order (a worker's chunks need not be consecutive)
            # no placement hint: the run goes where its chunks are, and may be recomputed
            fut = client.submit(_fold_run, fn, [self._items[i] for i in idx], self._meta(idx),
                                self.prepare, self.persisted, shared,
                                [self._lift(extras[i]) for i in idx], fut, pure=False)
        return wait_for(client, [fut], [""], lambda i: fut, gather=True)[0]

    def _chunk(self, i: int) -> Any:
        """Chunk ``i`` in this process (no client)."""
        if self.persisted:
            return self._items[i]
        raw = self._items[i] if self._memory[i] else self._items[i].compute()
        return self.prepare(np.asarray(raw), int(self.offsets[i]), i)

    def _meta(self, idx: list[int]) -> list[tuple[int, int]]:
        return [(int(self.offsets[i]), i) for i in idx]

    def _lift(self, args: tuple, broadcast: bool = False) -> tuple:
        """``args`` with every large array (also inside tuples) sent to the cluster once (see
        _EMBED_MAX); shared ones to every worker."""
        def lift(a: Any) -> Any:
            if isinstance(a, tuple):
                return tuple(lift(v) for v in a)
            if isinstance(a, np.ndarray) and a.nbytes > _EMBED_MAX:
                return self._client.scatter(a, broadcast=broadcast, hash=False)
            return a

        return lift(tuple(args))

    def _run(self, fn: Callable, shared: tuple, extras: dict[int, tuple], keep: bool,
             combine: Combine | None = None) -> tuple[dict, dict]:
        """``fn`` on the chunks in ``extras``: ({chunk: result}, {chunk: state handle}); with
        ``combine``, ({key: total}, {})."""
        if self._client is None:
            got, handles = self._run_local(fn, shared, extras, keep)
            if combine is not None:
                return combine.over([got[i] for i in sorted(got)], sorted(got)), {}
            return got, handles
        client = self._client
        shared = self._lift(shared, broadcast=True)
        order, args, targets = [], [], []
        for (worker, _), idx in self._groups.items():
            idx = [i for i in idx if i in extras]
            if idx:
                order.append(idx)
                targets.append(worker)
                args.append((fn, [self._items[i] for i in idx], self._meta(idx), self.prepare,
                             self.persisted, shared, [self._lift(extras[i]) for i in idx]))
        runs: list = [None] * len(order)

        def submit(j: int, worker: str | None) -> Any:
            if combine is not None:
                runs[j] = client.submit(_run_combined, combine, order[j], *args[j], pure=False,
                                        **hint(worker))
                return runs[j]
            runs[j] = client.submit(_run_group, *args[j], pure=False, **hint(worker))
            return client.submit(_results, runs[j], pure=False) if keep else runs[j]

        futs = [submit(j, w) for j, w in enumerate(targets)]
        got = wait_for(client, futs, targets, lambda j: submit(j, None), gather=True)
        if combine is not None:
            return combine.merge(got), {}
        results, handles = {}, {}
        for idx, res in zip(order, got, strict=True):
            results.update(zip(idx, res, strict=True))
        if keep:
            # the states outlive the pass: once placed, a run may be recomputed anywhere
            clear_hints(client, runs)
            for j, idx in enumerate(order):
                # one task per run, not per chunk (dask queues many tiny tasks one scheduler
                # round trip at a time); a handle names the run's states and a position
                states = client.submit(_states, runs[j], pure=False)
                handles.update((i, (_KEPT, states, p)) for p, i in enumerate(idx))
        return results, handles

    def _run_local(self, fn: Callable, shared: tuple, extras: dict[int, tuple], keep: bool
                   ) -> tuple[dict, dict]:
        # No distributed client: one dask task per chunk on the default scheduler. Values go
        # in untraversed: a persisted chunk must stay the same object (it keeps a cache).
        def arg(v: Any) -> Any:
            return v if isinstance(v, Delayed) else dask.delayed(v, traverse=False)

        tasks = [dask.delayed(_call, pure=True)(fn, arg(self._items[i]), self.prepare,
                                                 self.persisted, int(self.offsets[i]), i,
                                                 *map(arg, shared), *map(arg, extra))
                 for i, extra in extras.items()]
        got = dict(zip(extras, dask.compute(*tasks, optimize_graph=False), strict=True))
        if not keep:
            return got, {}
        return {i: g[0] for i, g in got.items()}, {i: g[1] for i, g in got.items()}

    def rows(self, index: np.ndarray) -> np.ndarray:
        """The raw rows at the given global indices (in the order given)."""
        index = np.asarray(index, dtype=np.int64)
        if index.size == 0:
            return np.empty((0, self.shape[1]), dtype=self.dtype)
        which = np.searchsorted(self.offsets, index, side="right") - 1
        wanted = [i for i in range(self.n_chunks) if (which == i).any()]
        got = self.map_some(_take_rows, wanted,
                            [(index[which == i] - self.offsets[i],) for i in wanted])
        out = np.empty((index.size, self.shape[1]), dtype=self.dtype)
        for i, rows in zip(wanted, got, strict=True):
            out[np.nonzero(which == i)[0]] = rows
        return out

    def map_some(self, fn: Callable, which: list[int], extras: list[tuple]) -> list:
        """Run ``fn(chunk, *extras[j])`` on chunks ``which[j]`` only (not counted as a pass)."""
        got, _ = self._run(fn, (), dict(zip(which, extras, strict=True)), False)
        return [got[i] for i in which]

    def head(self, n_chunks: int) -> ChunkedRows:
        """The first ``n_chunks`` chunks alone (e.g. X without the extra row sets), sharing
        their placement and state: passes over it run on those chunks only."""
        view = copy.copy(self)
        view.row_chunks = self.row_chunks[:n_chunks]
        view.offsets = self.offsets[:n_chunks]
        view.shape = (int(sum(view.row_chunks)), self.shape[1])
        view.segments = (n_chunks,)
        view._groups = {slot: kept for slot, idx in self._groups.items()
                        if (kept := [i for i in idx if i < n_chunks])}
        return view

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

    def compute(self, inputs: dict | None = None) -> np.ndarray:
        """The block, from ``inputs`` (values of keys the graph refers to but does not hold:
        chunks of a persisted array it is computed from)."""
        from dask.local import get_sync

        return get_sync({**self.graph, **(inputs or {})}, self.key)


#: first element of a streamed chunk that needs chunks already in worker memory:
#: ``(_WITH_INPUTS, block graph, {key: future})`` (a plain tuple and dict, so that dask
#: resolves the futures to their values before the task runs)
_WITH_INPUTS = "kmdask-block-with-inputs"


def _block_graph(block, held: dict | None = None) -> Any:
    g = block.__dask_graph__()
    g = g.cull({block.key}) if hasattr(g, "cull") else g
    graph = dict(g)
    # held.keys(): a set-like view, so each lookup is O(1) (a list made it O(chunks))
    needs = keys_in_tasks(held.keys(), list(graph.values())) if held else []
    if needs:
        return (_WITH_INPUTS, _BlockGraph(graph, block.key), {k: held[k] for k in needs})
    return _BlockGraph(graph, block.key)


def _get(item: Any, prepare: Callable, persisted: bool, offset: int, index: int) -> Any:
    """A chunk in a task: persisted as it is, streamed read and prepared here (so at most one
    raw chunk per thread is in memory)."""
    if persisted:
        return item
    if isinstance(item, _BlockGraph):
        raw = item.compute()
    elif isinstance(item, tuple) and len(item) == 3 and item[0] == _WITH_INPUTS:
        raw = item[1].compute(item[2])
    else:  # local, or a persisted chunk: already read
        raw = item
    return prepare(np.asarray(raw), offset, index)


def _call(fn, item, prepare, persisted, offset, index, *args):
    return fn(_get(item, prepare, persisted, offset, index), *args)


#: first element of a state handle: ``(_KEPT, states of a run, position in the run)`` (a plain
#: tuple, so that dask resolves the future inside it)
_KEPT = "kmdask-kept-state"


def _unwrap(extra: tuple) -> tuple:
    """Per-chunk arguments with every state handle replaced by its state."""
    return tuple(e[1][e[2]] if isinstance(e, tuple) and len(e) == 3 and e[0] == _KEPT else e
                 for e in extra)


def _run_group(fn: Callable, items: list, meta: list[tuple[int, int]], prepare: Callable,
               persisted: bool, shared: tuple, extras: list[tuple]) -> list:
    """One worker thread's run of chunks."""
    return [fn(_get(item, prepare, persisted, o, i), *shared, *_unwrap(extra))
            for item, (o, i), extra in zip(items, meta, extras, strict=True)]


@dataclass(frozen=True)
class Combine:
    """How :meth:`ChunkedRows.map` adds chunk results up where they are made: chunk ``i``'s
    result goes to ``keys[i]``'s total, ``add(a, b)`` adds two results (it may update and
    return ``a``), and a chunk whose result is None adds nothing.

    ``add`` must give the same total whatever the grouping, e.g. exact integer sums: a run of
    chunks is added up on its worker in chunk order, then the runs in the order of their
    first chunks. A pass then gathers a result per run instead of one per chunk (1.02M pixel
    rows in 102 chunks, K=10: 3.2 MB of per-cluster sums a worker, 20 ms of each pass)."""

    keys: tuple
    add: Callable[[Any, Any], Any]

    def over(self, results: list, index: list[int]) -> dict:
        """The totals per key of ``results`` (those of chunks ``index``, in that order)."""
        return self._totals((self.keys[i], r) for i, r in zip(index, results, strict=True)
                            if r is not None)

    def merge(self, parts: list[dict]) -> dict:
        """Per-key totals of several runs, added in the order given."""
        return self._totals(kr for part in parts for kr in part.items())

    def _totals(self, pairs) -> dict:
        out: dict = {}
        for k, r in pairs:
            out[k] = r if k not in out else self.add(out[k], r)
        return out


def _run_combined(combine: Combine, index: list[int], fn: Callable, items: list,
                  meta: list[tuple[int, int]], prepare: Callable, persisted: bool,
                  shared: tuple, extras: list[tuple]) -> dict:
    """One worker thread's run of chunks, added up per key (see :class:`Combine`)."""
    return combine.over(_run_group(fn, items, meta, prepare, persisted, shared, extras), index)


def _fold_run(fn: Callable, items: list, meta: list[tuple[int, int]], prepare: Callable,
              persisted: bool, shared: tuple, extras: list[tuple], carry: Any) -> Any:
    for item, (o, i), extra in zip(items, meta, extras, strict=True):
        carry = fn(_get(item, prepare, persisted, o, i), carry, *shared, *_unwrap(extra))
    return carry


def _results(run: list) -> list:
    return [r for r, _ in run]


def _states(run: list) -> list:
    return [s for _, s in run]


def _take_rows(chunk: Any, local_idx: np.ndarray) -> np.ndarray:
    return chunk.x[local_idx]
