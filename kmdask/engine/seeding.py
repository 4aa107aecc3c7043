"""Initial centres as passes over chunked data: k-means|| (Bahmani et al. 2012) and k-means++.

Every function seeds many models at once (each a ``(k, seed)`` pair): they share each pass over
the data. Random draws are keyed by (model seed, purpose, round, chunk) — never by worker.
Centres are returned in scaled units (uint8 pixels / 255) as float64.
"""

from __future__ import annotations

import numpy as np

from kmdask.engine import kernels
from kmdask.engine.executor import ChunkedRows
from kmdask.rng import keyed_rng

# Purposes of keyed random streams.
_FIRST, _ROUND, _LOCAL, _PAD, _PLUSPLUS = 0, 1, 2, 3, 4
LOCAL_RESTARTS = 8  # reductions of the k-means|| candidates, the best kept


def _scaled(data: ChunkedRows, raw: np.ndarray) -> np.ndarray:
    return kernels.to_compute(raw, data.divisor).astype(np.float64)


def _stack(data: ChunkedRows, cands: list[np.ndarray]):
    starts, stops = kernels.stack_bounds([c.shape[0] for c in cands])
    cdt = kernels.compute_dtype(data.dtype)
    return np.concatenate(cands).astype(cdt), starts, stops


def _update_chunk(chunk: kernels.Chunk, new, starts, stops, live, state):
    """Fold the newest candidates into each row's nearest-candidate state.

    ``state`` is None (first round) or (d2, best): per model, every row's squared distance to
    its nearest candidate so far and that candidate's index. Only the models in ``live`` got
    new candidates (``new``, stacked, numbered from ``offsets``); a candidate only replaces the
    current nearest when strictly closer, so ties keep the earliest, as a full argmin would.
    """
    n = chunk.x.shape[0]
    n_models = len(live[0]) if state is None else state[0].shape[0]
    if state is None:
        d2 = np.full((n_models, n), np.inf)
        best = np.zeros((n_models, n), dtype=np.int32)
    else:
        d2, best = state[0].copy(), state[1].copy()
    models, offsets = live
    if len(models):
        a = kernels.assign(chunk, new, starts, stops, kernels.MODE_ASSIGN)
        for j, (m, off) in enumerate(zip(models, offsets, strict=True)):
            closer = a.mind[j] < d2[m]
            d2[m] = np.where(closer, a.mind[j], d2[m])
            best[m] = np.where(closer, a.labels[j] + off, best[m])
    return d2, best


def _round_chunk(chunk: kernels.Chunk, new, starts, stops, live, seeds, ells, rnd: int,
                 cap: int | None, state, phis=None):
    """One k-means|| round on one chunk, for every model; returns (per-model picks, state).

    A row is sampled with probability min(1, l·d²/phi), i.e. when t = l·d²/u > phi with u
    uniform. The global phi is not known yet, but phi >= this chunk's share, so rows with
    t > (chunk's share) are a superset of the rows finally kept: return those (largest t first,
    at most ``cap``) and let the client apply the global threshold.
    """
    state = _update_chunk(chunk, new, starts, stops, live, state)
    out = []
    n = chunk.x.shape[0]
    for m in range(state[0].shape[0]):
        d2 = state[0][m]
        phi_c = float(d2.sum())
        u = keyed_rng(int(seeds[m]), _ROUND, rnd, chunk.index).random(n)
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(d2 > 0, ells[m] * d2 / u, 0.0)
        thresh = phi_c if phis is None else phis[m]
        idx = np.nonzero(t > thresh)[0]
        truncated = None
        if cap is not None and idx.size > cap:
            keep = np.argsort(-t[idx], kind="stable")[:cap]
            truncated = float(t[idx[keep[-1]]])
            idx = np.sort(idx[keep])
        out.append((phi_c, t[idx], idx + chunk.offset, chunk.x[idx], truncated))
    return out, state


def _count_chunk(chunk: kernels.Chunk, new, starts, stops, live, state, n_cands):
    """Candidate weights: rows nearest to each candidate (after the last round's picks)."""
    _, best = _update_chunk(chunk, new, starts, stops, live, state)
    return [np.bincount(best[m], minlength=n_cands[m]) for m in range(best.shape[0])]


def _new_block(data: ChunkedRows, cands: list[np.ndarray], seen: list[int]):
    """Stack the candidates each model gained since ``seen``: (matrix, starts, stops, live)."""
    models = [m for m in range(len(cands)) if cands[m].shape[0] > seen[m]]
    blocks = [cands[m][seen[m]:] for m in models]
    cdt = kernels.compute_dtype(data.dtype)
    if not blocks:
        return np.zeros((0, data.shape[1]), cdt), np.zeros(0, np.int64), np.zeros(0, np.int64), \
            (np.zeros(0, np.int64), np.zeros(0, np.int64))
    starts, stops = kernels.stack_bounds([b.shape[0] for b in blocks])
    live = (np.array(models, dtype=np.int64), np.array([seen[m] for m in models], np.int64))
    return np.concatenate(blocks).astype(cdt), starts, stops, live


def kmeans_parallel(data: ChunkedRows, models: list[tuple[int, int]], oversampling: float = 2.0,
                    rounds: int = 5, local_iter: int = 50) -> list[np.ndarray]:
    """k-means|| seeding for every ``(k, seed)`` model; ``rounds + 1`` passes in all.

    1. first centre: a row drawn uniformly with the model's seed;
    2. ``rounds`` passes, each sampling every row independently with probability
       min(1, l·d²(x)/phi), l = oversampling·k; a pass computes distances to the candidates
       added by the previous round only, and carries every row's nearest distance forward;
    3. one pass weighting every candidate by the number of rows nearest to it;
    4. weighted k-means++ and weighted Lloyd steps on the candidates, on the client, the best
       of ``LOCAL_RESTARTS`` such reductions kept.
    """
    n = data.shape[0]
    seeds = np.array([s for _, s in models], dtype=np.int64)
    ells = np.array([oversampling * k for k, _ in models], dtype=np.float64)
    first = [int(keyed_rng(int(s), _FIRST).integers(n)) for s in seeds]
    first_rows = data.rows(np.array(first))
    cands = [_scaled(data, first_rows[i : i + 1]) for i in range(len(models))]
    cand_idx = [[first[i]] for i in range(len(models))]
    seen = [0] * len(models)
    states: list = [None] * data.n_chunks
    for rnd in range(1, rounds + 1):
        new, starts, stops, live = _new_block(data, cands, seen)
        seen = [c.shape[0] for c in cands]
        cap = int(4 * ells.max() + 64)
        # each chunk's nearest-candidate state stays on its worker (``keep``)
        parts, handles = data.map(_round_chunk, new, starts, stops, live, seeds, ells, rnd, cap,
                                  per_chunk=[(st,) for st in states], keep=True)
        phis = np.array([sum(p[m][0] for p in parts) for m in range(len(models))])
        redo = [i for i, p in enumerate(parts)
                if any(p[m][4] is not None and p[m][4] > phis[m] for m in range(len(models)))]
        if redo:  # a chunk returned too few rows: select again with the global phi known
            again = data.map_some(_round_chunk, redo,
                                  [(new, starts, stops, live, seeds, ells, rnd, None,
                                    states[i], phis) for i in redo])
            for i, g in zip(redo, again, strict=True):
                parts[i] = g[0]
        states = handles
        for m in range(len(models)):
            if phis[m] <= 0.0:
                continue
            for p in parts:
                _, t, gidx, rows, _ = p[m]
                sel = t > phis[m]
                if sel.any():
                    cands[m] = np.vstack([cands[m], _scaled(data, rows[sel])])
                    cand_idx[m].extend(int(g) for g in gidx[sel])
    # Too few distinct candidates (tiny or degenerate data): pad with uniformly drawn rows.
    for m, (k, seed) in enumerate(models):
        if len(cand_idx[m]) < k:
            pool = np.setdiff1d(np.arange(n), cand_idx[m])
            extra = keyed_rng(int(seed), _PAD).choice(pool, k - len(cand_idx[m]), replace=False)
            cands[m] = np.vstack([cands[m], _scaled(data, data.rows(np.sort(extra)))])
            cand_idx[m].extend(int(e) for e in np.sort(extra))
    new, starts, stops, live = _new_block(data, cands, seen)
    n_cands = [c.shape[0] for c in cands]
    per = data.map(_count_chunk, new, starts, stops, live, per_chunk=[(st, n_cands)
                                                                      for st in states])
    centres = []
    for m, (k, seed) in enumerate(models):
        w = np.sum([p[m] for p in per], axis=0).astype(np.float64)
        pts = cands[m]
        if (w > 0).sum() >= k:  # candidates nobody is nearest to carry no information
            pts, w = pts[w > 0], w[w > 0]
        else:
            w = np.maximum(w, 1e-12)
        centres.append(_reduce(pts, w, k, int(seed), local_iter))
    return centres


def _reduce(pts: np.ndarray, w: np.ndarray, k: int, seed: int, local_iter: int) -> np.ndarray:
    """k centres from the weighted candidates: the best (lowest weighted cost) of
    ``LOCAL_RESTARTS`` weighted k-means++ + Lloyd runs. The candidates are a few hundred points
    on the client, so restarts cost no pass over the data, and they make a poor local minimum
    from one unlucky reduction rarer."""
    best, best_cost = None, np.inf
    for r in range(LOCAL_RESTARTS):
        rng = keyed_rng(seed, _LOCAL) if r == 0 else keyed_rng(seed, _LOCAL, r)
        chosen = kernels.weighted_kmeanspp(pts, w, k, rng)
        c = kernels.weighted_lloyd(pts, w, pts[chosen], max_iter=local_iter)
        cost = float((w * kernels.sq_dists(pts, c).min(axis=1)).sum())
        if cost < best_cost:
            best, best_cost = c, cost
    return best


def _d2sum_chunk(chunk: kernels.Chunk, cents, starts, stops):
    return kernels.assign(chunk, cents, starts, stops, kernels.MODE_ASSIGN).mind.sum(axis=1)


def _pick_chunk(chunk: kernels.Chunk, cents, starts, stops, m: int, target: float):
    d2 = kernels.assign(chunk, cents, starts, stops, kernels.MODE_ASSIGN).mind[m]
    i = int(np.searchsorted(np.cumsum(d2), target, side="right"))
    i = min(i, d2.size - 1)
    return i + chunk.offset, chunk.x[i]


def kmeans_plusplus(data: ChunkedRows, models: list[tuple[int, int]]) -> list[np.ndarray]:
    """Exact D² sampling (k-means++), one pass per centre, fused over models."""
    n = data.shape[0]
    rngs = [keyed_rng(int(s), _PLUSPLUS) for _, s in models]
    first = [int(r.integers(n)) for r in rngs]
    rows = data.rows(np.array(first))
    cents = [_scaled(data, rows[i : i + 1]) for i in range(len(models))]
    for j in range(1, max(k for k, _ in models)):
        live = [m for m, (k, _) in enumerate(models) if k > j]
        c, starts, stops = _stack(data, [cents[m] for m in live])
        sums = np.array(data.map(_d2sum_chunk, c, starts, stops))  # (chunks, live)
        for li, m in enumerate(live):
            cum = np.cumsum(sums[:, li])
            target = rngs[m].random() * cum[-1]
            ci = int(min(np.searchsorted(cum, target, side="right"), data.n_chunks - 1))
            before = cum[ci - 1] if ci > 0 else 0.0
            (_, row), = data.map_some(_pick_chunk, [ci], [(c, starts, stops, li, target - before)])
            cents[m] = np.vstack([cents[m], _scaled(data, row[None, :])])
    return cents
