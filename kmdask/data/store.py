"""Staged zarr stores, local or on object storage: recognising them, opening their splits as
dask arrays whose every chunk read is checked against the crc32 recorded at staging, and
content fingerprints.

A store is written by :func:`kmdask.data.staging.stage_dataset`. Every function takes a path,
a URL (``s3://bucket/name.zarr``) or a :class:`~kmdask.data.location.Location`, and
``storage_options`` for fsspec. Every bad-store condition is a one-line
:class:`~kmdask.errors.DataError` that names the store (and the chunk).
"""

from __future__ import annotations

import functools
import hashlib
import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from kmdask.data.location import Location, location, retrying
from kmdask.errors import DataError, StorageError

#: value of the ``kmdask_store`` group attribute; bump when the store layout changes
STORE_FORMAT = 1


Where = str | Path | Location


def _read_group_meta(loc: Location) -> dict[str, Any] | None:
    """The zarr.json of ``loc`` when it is a zarr v3 group, else None."""
    try:
        meta = json.loads(loc.join("zarr.json").read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("node_type") != "group":
        return None
    return meta


def is_store(where: Where, storage_options: dict | None = None) -> bool:
    """Whether ``where`` holds a kmdask store (a zarr v3 group with kmdask attributes)."""
    meta = _read_group_meta(location(where, storage_options))
    return meta is not None and meta.get("attributes", {}).get("kmdask_store") == STORE_FORMAT


def store_info(where: Where, storage_options: dict | None = None) -> dict[str, Any]:
    """The group attributes of a kmdask store (dataset, source, files, chunk_rows, ...)."""
    path = location(where, storage_options)
    if not path.exists():
        raise DataError(f"{path}: no such store (stage it with `kmdask stage --out {path}`)")
    meta = _read_group_meta(path)
    if meta is None:
        raise DataError(f"{path}: not a kmdask store (no zarr v3 group metadata)")
    attrs = meta.get("attributes", {})
    if attrs.get("kmdask_store") != STORE_FORMAT:
        raise DataError(f"{path}: not a kmdask store (zarr group without kmdask attributes)")
    return dict(attrs)


def image_shape(info: dict[str, Any]) -> tuple[int, int]:
    """(height, width) of a store's images (stores staged before it was recorded: 28 x 28)."""
    h, w = info.get("image_shape") or (28, 28)
    return int(h), int(w)


def _open_array(path: Location, split: str, kind: str):
    import zarr

    info = store_info(path)
    if split not in info.get("splits", {}):
        have = ", ".join(info.get("splits", {})) or "none"
        raise DataError(f"{path}: no split {split!r} in store (has: {have})")
    try:
        return zarr.open_array(store=path.zarr_store(), path=f"{split}/{kind}", mode="r")
    except Exception as exc:  # zarr raises several types for missing/damaged nodes
        raise DataError(f"{path}: cannot open {split}/{kind} ({type(exc).__name__}: {exc})") \
            from None


@functools.lru_cache(maxsize=64)
def _open_cached(path: Location, node: str):
    # opening re-reads metadata (~0.5 ms locally, a request remotely); a streamed fit reads
    # every chunk on every pass
    import zarr

    return zarr.open_array(store=path.zarr_store(), path=node, mode="r")


def read_chunk(path: Location, split: str, kind: str, i: int, rows: int,
               crc: int | None) -> np.ndarray:
    """Chunk ``i`` of ``split/kind``, checked against the crc32 recorded at staging.

    A chunk deleted (zarr would silently return zeros for a missing one) or damaged (a codec
    error deep inside zarr) becomes a one-line DataError naming the store and the chunk.
    """
    where = f"{path}/{split}/{kind}"

    def read() -> np.ndarray:
        arr = _open_cached(path, f"{split}/{kind}")
        return np.ascontiguousarray(arr[i * rows : (i + 1) * rows])

    try:
        block = retrying(path, f"read {split}/{kind} chunk {i}", read)
    except StorageError:
        raise
    except Exception as exc:  # codec/IO errors surface as many different types
        raise DataError(f"{where}: chunk {i} unreadable ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else 'no detail'})") from None
    if crc is not None:
        got = zlib.crc32(block.data)
        if got != crc:
            raise DataError(f"{where}: chunk {i} is corrupt or missing on disk (crc32 "
                            f"{got:08x}, recorded at staging {crc:08x}); re-stage the store")
    return block


def _open_verified(path: Location, split: str, kind: str):
    import dask
    import dask.array as da

    arr = _open_array(path, split, kind)
    want_ndim = 2 if kind == "images" else 1
    if arr.dtype != np.uint8 or arr.ndim != want_ndim or arr.shape[0] == 0:
        raise DataError(f"{path}/{split}/{kind}: expected a non-empty {want_ndim}-D uint8 "
                        f"array, found {arr.dtype} with shape {arr.shape}")
    rows = arr.chunks[0]
    crcs = arr.attrs.get("chunk_crc32")
    n = arr.shape[0]
    n_chunks = -(-n // rows)
    if not isinstance(crcs, list) or len(crcs) != n_chunks:
        raise DataError(f"{path}/{split}/{kind}: missing or wrong chunk checksums (re-stage)")
    tail = arr.shape[1:]
    blocks = [
        da.from_delayed(
            dask.delayed(read_chunk, pure=True)(path, split, kind, i, rows, int(crcs[i])),
            shape=(min(rows, n - i * rows), *tail), dtype=arr.dtype)
        for i in range(n_chunks)
    ]
    return da.concatenate(blocks, axis=0)


def open_images(where: Where, split: str = "train", storage_options: dict | None = None):
    """``split`` images as a dask array (n, height * width) uint8 whose chunks are the zarr
    chunks; a remote store is read by the workers themselves.

    Every chunk read is verified against its staging checksum (see :func:`read_chunk`).
    """
    return _open_verified(location(where, storage_options), split, "images")


def open_labels(where: Where, split: str = "train", storage_options: dict | None = None):
    """``split`` labels as a dask array (n,) uint8 whose chunks are the zarr chunks."""
    return _open_verified(location(where, storage_options), split, "labels")


def data_fingerprint(where: Where, split: str = "train",
                     storage_options: dict | None = None) -> str:
    """A short stable hex id of a split's content: its source checksums and augment params.

    Independent of chunking, codec and where the bytes came from, so two stores of the same
    data share it.
    """
    info = store_info(where, storage_options)
    if split not in info.get("splits", {}):
        raise DataError(f"{where}: no split {split!r} in store")
    files = {n: f["sha256"] for n, f in info["files"].items() if f["split"] == split}
    key = {
        "dataset": info["dataset"],
        "files": files,
        "augment": info["augment"] if split == "train" else None,
    }
    blob = json.dumps(key, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def verify_store(where: Where, storage_options: dict | None = None) -> None:
    """Re-read every chunk and compare its crc32 with the one recorded at staging time."""
    path = location(where, storage_options)
    info = store_info(path)
    rows = info["chunk_rows"]
    for split in info["splits"]:
        for kind in ("images", "labels"):
            arr = _open_array(path, split, kind)
            want = arr.attrs.get("chunk_crc32")
            n_chunks = -(-arr.shape[0] // rows)
            if not isinstance(want, list) or len(want) != n_chunks:
                raise DataError(f"{path}/{split}/{kind}: missing or wrong chunk checksums")
            for i in range(n_chunks):
                try:
                    block = arr[i * rows:(i + 1) * rows]
                except Exception as exc:
                    raise DataError(f"{path}/{split}/{kind}: chunk {i} unreadable ({exc})") \
                        from None
                got = zlib.crc32(np.ascontiguousarray(block).data)
                if got != want[i]:
                    raise DataError(f"{path}/{split}/{kind}: chunk {i} is corrupt "
                                    f"(crc32 {got:08x}, recorded {want[i]:08x})")
