"""Readers of the files the error-case extension adds to a run directory (numpy and zarr)."""

from __future__ import annotations

import json

import numpy as np

from kmdask.batch.rundir import Run
from kmdask.errors import DataError


def read_cases(run: Run, name: str) -> np.ndarray:
    """An array of the run's ``cases.zarr`` (e.g. ``train/probs``, ``vectors/<fit>/train``)."""
    import zarr

    try:
        return np.asarray(zarr.open_array(store=str(run.path / "cases.zarr"), path=name,
                                          mode="r")[...])
    except Exception as exc:  # zarr raises several types for missing/damaged nodes
        raise DataError(f"{run.path / 'cases.zarr'}: cannot read {name} "
                        f"({type(exc).__name__})") from None


def read_experiment(run: Run, fit: str) -> tuple[dict, dict[str, np.ndarray]]:
    """A fit's experiment.json and its predictions."""
    d = run.path / "experiments" / fit
    try:
        info = json.loads((d / "experiment.json").read_text())
        with np.load(d / "predictions.npz", allow_pickle=False) as z:
            preds = {k: z[k] for k in z.files}
    except (OSError, ValueError) as exc:
        raise DataError(f"{d}: unreadable experiment ({exc})") from None
    return info, preds
