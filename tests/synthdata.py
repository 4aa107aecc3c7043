"""Synthetic MNIST-layout data sets for the staging/sources tests."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from kmdask.data.idx import digests, idx_bytes
from kmdask.data.registry import DatasetSpec, FileSpec


def synth_arrays(n_train: int = 250, n_test: int = 50, seed: int = 0) -> dict[str, np.ndarray]:
    """Four MNIST-layout arrays with a blob per image, so warps have something to move."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        img = rng.integers(0, 40, size=(n, 28, 28), dtype=np.uint8)
        r = rng.integers(8, 20, size=n)
        for i in range(n):  # a bright square at a random place
            img[i, r[i]:r[i] + 6, r[i] - 2:r[i] + 5] = 250
        out[f"{split}-images-idx3-ubyte"] = img
        out[f"{split}-labels-idx1-ubyte"] = rng.integers(0, 10, size=n, dtype=np.uint8)
    return out


def synth_spec(name: str, arrays: dict[str, np.ndarray]) -> DatasetSpec:
    """A registry entry whose checksums are those of ``arrays`` serialised as IDX."""
    files = []
    for fname, arr in arrays.items():
        split = "train" if fname.startswith("train") else "test"
        kind = "images" if "images" in fname else "labels"
        files.append(FileSpec(fname, split, kind, arr.shape, *digests(idx_bytes(arr))))
    return DatasetSpec(name, tuple(files))


def write_idx_dir(directory: Path, arrays: dict[str, np.ndarray], gz: bool = True) -> Path:
    """Write ``arrays`` as IDX files (gz or raw) into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    for fname, arr in arrays.items():
        data = idx_bytes(arr)
        if gz:
            (directory / (fname + ".gz")).write_bytes(gzip.compress(data, compresslevel=1))
        else:
            (directory / fname).write_bytes(data)
    return directory
