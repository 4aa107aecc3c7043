"""Chunked Lloyd iterations for many models at once: one map/reduce pass per iteration.

Each pass computes, per chunk and per still-running model, the nearest centre of every row, the
per-cluster counts and (raw-unit) sums and the inertia; the client adds the chunk results in
chunk order and updates the centres. Convergence follows scikit-learn: a model stops when the
squared centre shift is <= tol (an unchanged labelling gives a zero shift). A final pass assigns
every row to the final centres, so labels match centres and inertia is exact for them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from kmdask import kernels
from kmdask.chunked import ChunkedRows


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


def _lloyd_chunk(chunk: kernels.Chunk, c, starts, stops):
    a = kernels.assign(chunk, c, starts, stops, kernels.MODE_SUMS, keep_rows=False)
    return a.sums, a.counts, a.inertia


def _farthest_chunk(chunk: kernels.Chunk, c, starts, stops, n_far):
    """Per model, the ``n_far[m]`` rows farthest from their centre: (dist, gidx, label, row)."""
    a = kernels.assign(chunk, c, starts, stops, kernels.MODE_ASSIGN)
    out = []
    for m in range(starts.shape[0]):
        k = min(int(n_far[m]), a.mind.shape[1])
        idx = np.argsort(-a.mind[m], kind="stable")[:k]
        out.append((a.mind[m, idx], idx + chunk.offset, a.labels[m, idx], chunk.x[idx]))
    return out


def _relocate_empty(data: ChunkedRows, states: list[ModelState], c, starts, stops, sums, counts):
    """Move each empty cluster onto one of the rows farthest from their centre (as scikit-learn
    does), taking that row out of its old cluster. Deterministic: ties go to the lowest row."""
    n_far = [int((counts[starts[m] : stops[m]] == 0).sum()) for m in range(len(states))]
    parts = data.map(_farthest_chunk, c, starts, stops, np.array(n_far))
    for m, st in enumerate(states):
        if n_far[m] == 0:
            continue
        dist = np.concatenate([p[m][0] for p in parts])
        gidx = np.concatenate([p[m][1] for p in parts])
        lab = np.concatenate([p[m][2] for p in parts])
        rows = np.concatenate([p[m][3] for p in parts])
        order = np.lexsort((gidx, -dist))[: n_far[m]]
        empty = np.nonzero(counts[starts[m] : stops[m]] == 0)[0]
        for j, r in zip(empty, order, strict=False):
            old = starts[m] + lab[r]
            sums[old] -= rows[r]
            counts[old] -= 1
            sums[starts[m] + j] = rows[r]
            counts[starts[m] + j] = 1
        st.n_relocated += len(empty)


def lloyd(data: ChunkedRows, states: list[ModelState], max_iter: int, tol: float,
          progress: Callable[[dict], None] | None = None,
          on_iteration: Callable[[list[ModelState]], None] | None = None) -> list[ModelResult]:
    """Run Lloyd iterations on every model until each converges or hits ``max_iter``.

    ``tol`` is absolute (scikit-learn's relative tol times the mean feature variance).
    ``progress`` receives a dict per iteration (iteration, active models, best inertia, max
    shift, seconds); ``on_iteration`` gets every model's state after each iteration (for
    checkpoints: restarting from those states continues bit-identically).
    """
    cdt = kernels.compute_dtype(data.dtype)
    divisor = data.divisor
    it = max(s.n_iter for s in states) if states else 0
    while it < max_iter:
        live = [s for s in states if s.active and s.n_iter < max_iter]
        if not live:
            break
        t0 = time.perf_counter()
        c, starts, stops = _stack(live, cdt)
        parts = data.map(_lloyd_chunk, c, starts, stops)
        sums = parts[0][0].copy()
        counts = parts[0][1].copy()
        inertia = parts[0][2].copy()
        for s_, n_, i_ in parts[1:]:
            sums += s_
            counts += n_
            inertia += i_
        if (counts == 0).any():
            _relocate_empty(data, live, c, starts, stops, sums, counts)
        for m, st in enumerate(live):
            a, b = starts[m], stops[m]
            new = sums[a:b] / divisor / counts[a:b, None]
            shift = float(((new - st.centres) ** 2).sum())
            st.centres = new
            st.n_iter += 1
            st.inertia_history.append(float(inertia[m]))
            st.shift_history.append(shift)
            if shift <= tol:
                st.active = False
        it += 1
        if on_iteration is not None:
            on_iteration(states)
        if progress is not None:
            progress({
                "iteration": it,
                "models": len(live),
                "inertia": float(min(inertia)),
                "shift": float(max(s.shift_history[-1] for s in live)),
                "seconds": time.perf_counter() - t0,
            })
    return final_assignment(data, states)


def _final_chunk(chunk: kernels.Chunk, c, starts, stops):
    a = kernels.assign(chunk, c, starts, stops, kernels.MODE_ASSIGN)
    return a.labels, a.inertia


def final_assignment(data: ChunkedRows, states: list[ModelState]) -> list[ModelResult]:
    """One pass: labels and inertia of every model for its final centres."""
    c, starts, stops = _stack(states, kernels.compute_dtype(data.dtype))
    parts = data.map(_final_chunk, c, starts, stops)
    inertia = np.zeros(len(states))
    for _, i_ in parts:
        inertia += i_
    return [
        ModelResult(
            centres=st.centres,
            labels=[p[0][m] for p in parts],
            inertia=float(inertia[m]),
            n_iter=st.n_iter,
            # inertia at the initial centres, after each iteration, and (last) at the final
            # centres: n_iter + 1 values, ending with ``inertia``
            inertia_history=[*st.inertia_history, float(inertia[m])],
            shift_history=st.shift_history,
        )
        for m, st in enumerate(states)
    ]
