"""Per-iteration checkpoints of a fit, so that an interrupted run resumes where it stopped.

A checkpoint is what the engine hands over after each iteration (see the ``Checkpoint``
protocol of :func:`kmdask.engine.estimator.fit_models`): named arrays and a JSON-ready list of
per-model records. This module only stores them, atomically.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np


class FileCheckpoint:
    """A fit's checkpoint in one ``.npz`` (arrays, plus the records as JSON under ``meta``),
    replaced atomically by every save."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def load(self) -> tuple[dict[str, np.ndarray], list[dict]] | None:
        """The saved (arrays, records), or None when there is no checkpoint."""
        if not self.path.exists():
            return None
        with np.load(self.path, allow_pickle=False) as z:
            return ({k: z[k].copy() for k in z.files if k != "meta"},
                    json.loads(str(z["meta"])))

    def save(self, arrays: dict[str, np.ndarray], records: list[dict]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp.npz")
        np.savez(tmp, meta=np.array(json.dumps(records)), **arrays)
        os.replace(tmp, self.path)

    @property
    def iteration(self) -> int:
        """The Lloyd iteration the saved models reached (0 without a checkpoint)."""
        saved = self.load()
        return max((r.get("n_iter", 0) for r in saved[1]), default=0) if saved else 0
