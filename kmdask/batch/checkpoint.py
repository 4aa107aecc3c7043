"""Per-iteration checkpoints of a fit, so that an interrupted run resumes where it stopped.

A checkpoint is what the engine hands over after each iteration (see the ``Checkpoint``
protocol of :func:`kmdask.engine.estimator.fit_models`): named arrays and a JSON-ready list of
per-model records. This module only stores them, atomically, with a checksum of their contents,
and keeps the one before so that a damaged checkpoint costs one iteration, not the fit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

_DIGEST = "sha256"  # the entry holding the checksum of the others


def _digest(meta: str, arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256(meta.encode())
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"\0{name}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.tobytes())
    return h.hexdigest()


class FileCheckpoint:
    """A fit's checkpoint in one ``.npz`` (arrays, the records as JSON under ``meta`` and their
    sha256 under ``sha256``), replaced atomically by every save; the previous one is kept as
    ``<name>.prev.npz``.

    :meth:`load` checks the checksum: a truncated or altered checkpoint is named in a warning
    and the previous one is used instead (the resume repeats one iteration and ends the same,
    the fit being deterministic); with neither intact the fit starts again from seeding.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.previous = self.path.with_name(self.path.name.removesuffix(".npz") + ".prev.npz")
        self._warned: set[Path] = set()

    def load(self) -> tuple[dict[str, np.ndarray], list[dict]] | None:
        """The saved (arrays, records) of the newest intact checkpoint, or None."""
        for p, fallback in ((self.path, "using the checkpoint before it"),
                            (self.previous, "starting the fit again from seeding")):
            if not p.exists():
                continue
            got, why = _read(p)
            if got is not None:
                return got
            if p not in self._warned:
                self._warned.add(p)
                log.warning("%s is damaged (%s): %s", p, why, fallback)
        return None

    def save(self, arrays: dict[str, np.ndarray], records: list[dict]) -> None:
        meta = json.dumps(records)
        tmp = self.path.with_name(self.path.name + ".tmp.npz")
        np.savez(tmp, meta=np.array(meta), **{_DIGEST: np.array(_digest(meta, arrays))},
                 **arrays)
        if self.path.exists():
            os.replace(self.path, self.previous)
        os.replace(tmp, self.path)

    def remove(self) -> None:
        """Delete the checkpoint and the one before it (the fit is finished)."""
        self.path.unlink(missing_ok=True)
        self.previous.unlink(missing_ok=True)

    @property
    def iteration(self) -> int:
        """The Lloyd iteration the saved models reached (0 without an intact checkpoint)."""
        saved = self.load()
        return max((r.get("n_iter", 0) for r in saved[1]), default=0) if saved else 0


def _read(path: Path) -> tuple[tuple[dict[str, np.ndarray], list[dict]] | None, str]:
    """((arrays, records), "") from an intact checkpoint file; (None, why) otherwise."""
    try:
        with np.load(path, allow_pickle=False) as z:
            entries = {k: z[k].copy() for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        return None, f"unreadable: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    if "meta" not in entries or _DIGEST not in entries:
        return None, "no records or checksum in it"
    meta, digest = str(entries.pop("meta")), str(entries.pop(_DIGEST))
    if _digest(meta, entries) != digest:
        return None, "its contents do not match its checksum"
    try:
        return (entries, json.loads(meta)), ""
    except json.JSONDecodeError:
        return None, "its records are not valid JSON"
