"""Permutation-free clustering scores from a contingency table (numpy only)."""

from __future__ import annotations

import numpy as np


def contingency(truth: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Counts of (true class, cluster) pairs, shape (n_classes, n_clusters)."""
    t = np.unique(truth, return_inverse=True)[1].ravel()
    c = np.unique(labels, return_inverse=True)[1].ravel()
    table = np.zeros((t.max() + 1, c.max() + 1), dtype=np.int64)
    np.add.at(table, (t, c), 1)  # once per model, on small tables: not a hot path
    return table


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def nmi(truth: np.ndarray, labels: np.ndarray) -> float:
    """Normalised mutual information (arithmetic mean normalisation, as scikit-learn)."""
    table = contingency(truth, labels)
    n = table.sum()
    pij = table / n
    pi, pj = pij.sum(1, keepdims=True), pij.sum(0, keepdims=True)
    nz = pij > 0
    mi = float((pij[nz] * np.log(pij[nz] / (pi @ pj)[nz])).sum())
    h = (_entropy(table.sum(1)) + _entropy(table.sum(0))) / 2
    return 1.0 if h == 0 else max(mi / h, 0.0)


def ari(truth: np.ndarray, labels: np.ndarray) -> float:
    """Adjusted Rand index."""
    table = contingency(truth, labels)
    n = table.sum()

    def comb2(x):
        return x * (x - 1) / 2.0

    sum_ij = comb2(table).sum()
    sum_a, sum_b = comb2(table.sum(1)).sum(), comb2(table.sum(0)).sum()
    expected = sum_a * sum_b / comb2(n) if n > 1 else 0.0
    top = (sum_a + sum_b) / 2
    return 1.0 if top == expected else float((sum_ij - expected) / (top - expected))
