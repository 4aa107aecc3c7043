"""Chunked Lloyd iterations for many models at once: one map/reduce pass per iteration.

Each pass computes, per chunk and per still-running model, the nearest centre of every row, the
per-cluster counts and (raw-unit) sums and the inertia; the client adds the chunk results in
chunk order and updates the centres. Convergence follows scikit-learn: a model stops when the
squared centre shift is <= tol (an unchanged labelling gives a zero shift). A final pass assigns
every row to the final centres, so labels match centres and inertia is exact for them.

Passes go through :mod:`kmdask.engine.incremental`: persisted chunks keep their rows' labels,
integer sums and, once labels settle, distance bounds between passes, so a pass moves only the
rows that changed cluster and computes only the distances the bounds cannot rule out. Sums are
exact integers (uint8 pixels as they are, float rows in the fixed point of
:class:`kmdask.engine.kernels.Fixed`, whose units come from each row set's largest value), so
results are bit-identical with or without that state (streamed chunks, recomputed chunks and
resumed fits have none) and whatever the chunking; the inertia of a pass is computed from the
integer sums.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kmdask.engine import incremental as pruned
from kmdask.engine import kernels
from kmdask.engine.executor import ChunkedRows, Combine

_BOUNDS = "pruned.bounds"  # key of a chunk's labels and distance bounds in its cache
_PARKED = "pruned.parked"  # ... and of those of the models that stopped (for the final pass)
USE_BOUNDS = True  # distance bounds (off: same results, every pass a GEMM pass; for tests)


@dataclass
class ModelState:
    """One model's progress through Lloyd iterations (centres in scaled units, float64)."""

    centres: np.ndarray
    n_iter: int = 0
    active: bool = True
    inertia_history: list[float] = field(default_factory=list)
    shift_history: list[float] = field(default_factory=list)
    n_relocated: int = 0

    @property
    def k(self) -> int:
        return self.centres.shape[0]


def pack_states(states: list[ModelState]) -> tuple[dict[str, np.ndarray], list[dict]]:
    """Model states as (named arrays, JSON-ready records), e.g. for a checkpoint file."""
    records = [{"n_iter": s.n_iter, "active": s.active, "inertia": s.inertia_history,
                "shift": s.shift_history, "relocated": s.n_relocated} for s in states]
    return {f"c{i}": s.centres for i, s in enumerate(states)}, records


def unpack_states(arrays: dict[str, np.ndarray], records: list[dict]) -> list[ModelState]:
    """The inverse of :func:`pack_states`."""
    return [ModelState(centres=np.array(arrays[f"c{i}"]), n_iter=m["n_iter"], active=m["active"],
                       inertia_history=list(m["inertia"]), shift_history=list(m["shift"]),
                       n_relocated=m["relocated"]) for i, m in enumerate(records)]


@dataclass
class ModelResult:
    centres: np.ndarray
    labels: list[np.ndarray]  # per chunk, int32
    inertia: float
    n_iter: int
    inertia_history: list[float]
    shift_history: list[float]


def _stack(states: list[ModelState], dtype: np.dtype):
    starts, stops = kernels.stack_bounds([s.k for s in states])
    return np.concatenate([s.centres for s in states]).astype(dtype), starts, stops


@dataclass(frozen=True)
class Groups:
    """Rows in groups that no model shares: chunk ``i`` holds rows of group ``chunk[i]``, and
    model ``m`` is fitted to the rows of group ``model[m]`` alone. Several data sets (e.g. a fit's
    rows and the gap statistic's reference sets) so share every pass; each model's result is
    bit-identical to fitting its group's rows on their own."""

    chunk: tuple[int, ...]
    model: tuple[int, ...]

    @staticmethod
    def single(n_chunks: int, n_models: int) -> Groups:
        return Groups((0,) * n_chunks, (0,) * n_models)

    def chunks_of(self, g: int) -> list[int]:
        return [i for i, h in enumerate(self.chunk) if h == g]


def _stacks(states: list[ModelState], idx: list[int], groups: Groups, dtype: np.dtype,
            ids: Callable[[int], object] | None = None) -> tuple:
    """Per group (by group number), the stacked centres of its models among ``idx``:
    ``(c, starts, stops, ids, models)``, or None where the group has none."""
    out: list = [None] * (max(groups.chunk + groups.model, default=0) + 1)
    for g in sorted({groups.model[i] for i in idx}):
        mine = [i for i in idx if groups.model[i] == g]
        c, starts, stops = _stack([states[i] for i in mine], dtype)
        out[g] = (c, starts, stops, None if ids is None else tuple(ids(i) for i in mine), mine)
    return tuple(out)


def _state_room(data: Any, n_models: int, n_centres: int) -> tuple[bool, bool]:
    """Whether a pass keeps labels (``keep``) and distance bounds next to the chunks: only
    persisted ones, and only as far as the memory budget has room (labels take 4 bytes per row
    and model; bounds 4 per row and centre more, and float rows' code a byte per value)."""
    labels_b = data.shape[0] * 4 * n_models
    keep = data.persisted and data.spare_bytes >= labels_b
    code_b = 0 if np.dtype(data.dtype) == np.uint8 else data.shape[0] * (data.shape[1] + 40)
    bounds = getattr(data, "use_bounds", USE_BOUNDS) and \
        data.spare_bytes >= labels_b + data.shape[0] * 4 * (n_centres + n_models) + code_b
    return keep, bounds


def _lloyd_chunk(chunk: kernels.Chunk, stacks, keep, bounds, g: int,
                 fixed: kernels.Fixed | None):
    """Exact integer sums (in ``fixed`` units for float rows). Persisted chunks keep labels
    (and bounds) between passes so that later passes do less (same results either way);
    streamed ones use the plain kernel, the one seeding uses too (one compiled kernel less in
    a memory-tight worker), its dot products taken the fastest way (only decisions count)."""
    if stacks[g] is None:  # every model of this chunk's group has stopped
        return None
    c, starts, stops, ids, _ = stacks[g]
    if not keep:
        a = kernels.assign(chunk, c, starts, stops, kernels.MODE_SUMS, keep_rows=False,
                           fixed=fixed, decide_only=True)
        return a.sums, a.counts, a.sq, a.counts.size * chunk.x.shape[0]
    # taken out first: a failed pass leaves nothing stale
    prev = chunk.cache.pop(_BOUNDS, None)
    parked = chunk.cache.pop(_PARKED, None)
    gone = () if prev is None else tuple(i for i in prev.ids if i not in set(ids))
    if gone:  # models that stopped: their labels and sums wait for the final pass, which
        # then moves only the rows that change instead of adding every row again
        parked = pruned.join(parked, pruned.select(prev, gone, with_bounds=False))
    res, state = pruned.lloyd_pass(chunk, c, starts, stops, ids, prev, keep, bounds, fixed)
    chunk.cache[_BOUNDS] = state
    if parked is not None:
        chunk.cache[_PARKED] = parked
    return res.sums, res.counts, res.sq, res.computed


def _farthest_chunk(chunk: kernels.Chunk, c, starts, stops, n_far):
    """Per model, the ``n_far[m]`` rows farthest from their centre: (dist, gidx, label, row)."""
    a = kernels.assign(chunk, c, starts, stops, kernels.MODE_ASSIGN)
    out = []
    for m in range(starts.shape[0]):
        k = min(int(n_far[m]), a.mind.shape[1])
        idx = np.argsort(-a.mind[m], kind="stable")[:k]
        out.append((a.mind[m, idx], idx + chunk.offset, a.labels[m, idx], chunk.x[idx]))
    return out


def _add(parts: list[np.ndarray]) -> np.ndarray:
    """Chunk results added in chunk order (deterministic)."""
    out = parts[0].copy()
    for p in parts[1:]:
        out += p
    return out


def _add_parts(a: tuple, b: tuple) -> tuple:
    """Two chunks' (sums, counts, squared norms, distances computed) of a Lloyd pass, added:
    exact integers, so the total is the same in any grouping."""
    return tuple(x + y for x, y in zip(a, b, strict=True))


def _relocate_empty(data: ChunkedRows, chunks: list[int], states: list[ModelState], c, starts,
                    stops, sums, counts, fixed: kernels.Fixed | None):
    """Move each empty cluster onto one of the rows farthest from their centre (as scikit-learn
    does), taking that row out of its old cluster. Deterministic: ties go to the lowest row.
    ``states`` are the models of one group, ``chunks`` that group's chunks; ``sums`` are in
    the integer units of ``fixed`` (raw for uint8 rows)."""
    n_far = [int((counts[starts[m] : stops[m]] == 0).sum()) for m in range(len(states))]
    data.passes += 1
    parts = data.map_some(_farthest_chunk, chunks, [(c, starts, stops, np.array(n_far))] *
                          len(chunks))
    for m, st in enumerate(states):
        if n_far[m] == 0:
            continue
        dist = np.concatenate([p[m][0] for p in parts])
        gidx = np.concatenate([p[m][1] for p in parts])
        lab = np.concatenate([p[m][2] for p in parts])
        rows = kernels.to_sum_units(np.concatenate([p[m][3] for p in parts]), fixed)
        order = np.lexsort((gidx, -dist))[: n_far[m]]
        empty = np.nonzero(counts[starts[m] : stops[m]] == 0)[0]
        for j, r in zip(empty, order, strict=False):
            old = starts[m] + lab[r]
            sums[old] -= rows[r]
            counts[old] -= 1
            sums[starts[m] + j] = rows[r]
            counts[starts[m] + j] = 1
        st.n_relocated += len(empty)


def lloyd(data: ChunkedRows, states: list[ModelState], max_iter: int,
          tol: float | Sequence[float], progress: Callable[[dict], None] | None = None,
          on_iteration: Callable[[list[ModelState]], None] | None = None,
          groups: Groups | None = None,
          fixed: Sequence[kernels.Fixed] | None = None) -> list[ModelResult]:
    """Run Lloyd iterations on every model until each converges or hits ``max_iter``.

    ``tol`` is absolute (scikit-learn's relative tol times the mean feature variance), one for
    all models or one per model. ``progress`` receives a dict per iteration (iteration, active
    models, best inertia, max shift, seconds); ``on_iteration`` gets every model's state after
    each iteration (for checkpoints: restarting from those states continues bit-identically).
    ``groups``: which rows each model is fitted to (default: all rows, every model); progress
    reports the models of group 0. ``fixed``: per group, the integer units of float rows'
    sums (:func:`kmdask.engine.kernels.fixed_for` of the group's chunk stats); where not given,
    one pass computes them. Small persisted data runs its iterations in
    rounds on one worker (:mod:`kmdask.engine.local`), with the same results.
    """
    from kmdask.engine import local

    groups = groups or Groups.single(data.n_chunks, len(states))
    if fixed is None:
        fixed = group_units(data, groups)
    tols = [float(tol)] * len(states) if np.isscalar(tol) else [float(t) for t in tol]
    token = uuid.uuid4().hex  # model ids for the bounds kept next to the chunks
    threads = local.eligible(data)
    if threads:
        return local.lloyd_rounds(data, states, max_iter, tols, groups, fixed, threads,
                                  progress, on_iteration, token)
    lloyd_iterations(data, states, max_iter, tols, progress, on_iteration, groups, token,
                     fixed=fixed)
    return final_assignment(data, states, groups, fixed, token)


def group_units(data: Any, groups: Groups, stats: list | None = None) -> list[kernels.Fixed]:
    """Per group, the fixed-point units of its rows' sums (:class:`kmdask.engine.kernels.Fixed`),
    from the groups' chunk stats (:func:`kmdask.engine.kernels.chunk_stats`; one pass when not
    given)."""
    n_groups = max(groups.chunk + groups.model, default=0) + 1
    if stats is None:
        stats = data.map(kernels.chunk_stats)
    return [kernels.fixed_for([stats[i] for i in groups.chunks_of(g)]) for g in range(n_groups)]


def lloyd_iterations(data: Any, states: list[ModelState], max_iter: int, tols: list[float],
                     progress: Callable[[dict], None] | None = None,
                     on_iteration: Callable[[list[ModelState]], None] | None = None,
                     groups: Groups | None = None, token: str = "",
                     until: float | None = None, *, fixed: Sequence[kernels.Fixed]) -> None:
    """The iterations of :func:`lloyd` over ``data`` (a ChunkedRows, or any object with its
    pass interface), updating ``states`` in place; with ``until`` (a ``time.perf_counter``
    value), stop after the iteration that passes it. ``fixed`` as for :func:`lloyd`."""
    cdt = kernels.compute_dtype(data.dtype)
    groups = groups or Groups.single(data.n_chunks, len(states))
    per_chunk = [(g, fixed[g]) for g in groups.chunk]
    it = max(s.n_iter for s in states) if states else 0
    while it < max_iter:
        live_idx = [i for i, s in enumerate(states) if s.active and s.n_iter < max_iter]
        if not live_idx:
            break
        t0 = time.perf_counter()
        stacks = _stacks(states, live_idx, groups, cdt, lambda i: (token, i))
        n_centres = sum(states[i].k for i in live_idx)
        keep, bounds = _state_room(data, len(live_idx), n_centres)
        # exact integer sums: added up per group where they are made (see Combine)
        totals = data.map(_lloyd_chunk, stacks, keep, bounds, per_chunk=per_chunk,
                          combine=Combine(groups.chunk, _add_parts))
        computed = sum(t[3] for t in totals.values())
        shown: list[tuple[float, float]] = []  # group 0's (inertia, shift) per model
        for g, st in enumerate(stacks):
            if st is None:
                continue
            c, starts, stops, _, mine = st
            chunks = groups.chunks_of(g)
            sums, counts, sq, _ = totals[g]
            sdiv = kernels.sum_divisors(data.dtype, data.divisor, fixed[g])
            # from exact integer sums: independent of chunking and of the skipped rows
            inertia = pruned.inertia(sums, counts, sq, c, starts, stops, sdiv)
            live = [states[i] for i in mine]
            if (counts == 0).any():
                _relocate_empty(data, chunks, live, c, starts, stops, sums, counts, fixed[g])
            for m, (i, s) in enumerate(zip(mine, live, strict=True)):
                a, b = starts[m], stops[m]
                new = sums[a:b] / sdiv[0] / counts[a:b, None]
                shift = float(((new - s.centres) ** 2).sum())
                s.centres = new
                s.n_iter += 1
                s.inertia_history.append(float(inertia[m]))
                s.shift_history.append(shift)
                if shift <= tols[i]:
                    s.active = False
                if g == 0:
                    shown.append((float(inertia[m]), shift))
        it += 1
        if on_iteration is not None:
            on_iteration(states)
        if progress is not None and shown:
            progress({
                "iteration": it,
                "models": len(shown),
                "inertia": min(v for v, _ in shown),
                "shift": max(v for _, v in shown),
                "seconds": time.perf_counter() - t0,
                # share of the row x centre distances this pass computed (bounds skip the rest)
                "computed": computed / max(sum(data.row_chunks[i] * stacks[groups.chunk[i]][0]
                                                   .shape[0] for i in range(data.n_chunks)
                                                   if stacks[groups.chunk[i]] is not None), 1),
            })
        if until is not None and time.perf_counter() >= until:
            return


def _final_chunk(chunk: kernels.Chunk, stacks, keep, g: int,
                 fixed: kernels.Fixed | None):
    """One more Lloyd pass, keeping the labels and dropping the chunk's state (the fit is
    over): labels per model, integer sums, counts and squared norms."""
    c, starts, stops, ids, _ = stacks[g]
    prev = pruned.join(chunk.cache.pop(_BOUNDS, None), chunk.cache.pop(_PARKED, None))
    if not keep:
        a = kernels.assign(chunk, c, starts, stops, kernels.MODE_SUMS, fixed=fixed,
                           decide_only=True)
        return a.labels, a.sums, a.counts, a.sq
    # Bounds left by the iterations make this pass as cheap as theirs (1.02M rows, K=10: a
    # bounded pass 130-200 ms a worker against 420-450 for the GEMM). Models that stopped
    # early were parked without theirs, and then every row gets the GEMM (see pruned.join),
    # which builds no bounds for a pass that is the last; the labels still save adding every
    # row again.
    bounded = pruned.bounds_usable(prev)
    res, state = pruned.lloyd_pass(chunk, c, starts, stops, ids, prev, True, bounded, fixed)
    return np.ascontiguousarray(state.labels.T), res.sums, res.counts, res.sq


def final_assignment(data: ChunkedRows, states: list[ModelState], groups: Groups,
                     fixed: Sequence[kernels.Fixed], token: str = "") -> list[ModelResult]:
    """One pass: labels and inertia of every model for its final centres (labels: one array
    per chunk of the model's group). It is a Lloyd pass like the others (reusing the state the
    iterations left next to persisted chunks), so the inertia comes from exact integer sums
    too: the same whatever the chunking. ``fixed`` as for :func:`lloyd`; ``token``: the model
    ids' prefix the iterations used, so that their state is found."""
    stacks = _stacks(states, list(range(len(states))), groups,
                     kernels.compute_dtype(data.dtype), lambda i: (token, i))
    keep, _ = _state_room(data, len(states), sum(s.k for s in states))
    parts = data.map(_final_chunk, stacks, keep,
                     per_chunk=[(g, fixed[g]) for g in groups.chunk])
    out: list = [None] * len(states)
    for g, st in enumerate(stacks):
        if st is None:
            continue
        c, starts, stops, _, mine = st
        mine_parts = [parts[i] for i in groups.chunks_of(g)]
        sums, counts, sq = (_add([p[k] for p in mine_parts]) for k in (1, 2, 3))
        inertia = pruned.inertia(sums, counts, sq, c, starts, stops,
                                 kernels.sum_divisors(data.dtype, data.divisor, fixed[g]))
        for m, i in enumerate(mine):
            s = states[i]
            out[i] = ModelResult(
                centres=s.centres,
                labels=[p[0][m] for p in mine_parts],
                inertia=float(inertia[m]),
                n_iter=s.n_iter,
                # inertia at the initial centres, after each iteration, and (last) at the final
                # centres: n_iter + 1 values, ending with ``inertia``
                inertia_history=[*s.inertia_history, float(inertia[m])],
                shift_history=s.shift_history,
            )
    return out
