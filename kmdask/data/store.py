"""Known data sets, IDX parsing and checksums, and opening staged zarr stores.

* :data:`REGISTRY` — the data sets kmdask knows: IDX file names, shapes, and the md5/sha256 of
  the **decompressed** bytes (the gz wrappers in circulation differ, the contents do not).
* :func:`read_idx` / :func:`parse_idx` — IDX (gz or raw) to numpy, validating every header field.
* :func:`open_images` / :func:`open_labels` / :func:`store_info` / :func:`data_fingerprint` —
  read a store written by :func:`kmdask.data.staging.stage_dataset`.

Every bad-data condition raises :class:`~kmdask.errors.DataError` with a one-line message that
names the file.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kmdask.errors import ConfigError, DataError

IMAGE_SIDE = 28
N_FEATURES = IMAGE_SIDE * IMAGE_SIDE
#: value of the ``kmdask_store`` group attribute; bump when the store layout changes
STORE_FORMAT = 1
SPLITS = ("train", "test")

# IDX type codes (third byte of the magic number) -> numpy dtype (IDX is big-endian)
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


@dataclass(frozen=True)
class FileSpec:
    """One IDX file of a data set: name (without .gz), split, kind and expected content."""

    name: str
    split: str  # "train" | "test"
    kind: str  # "images" | "labels"
    shape: tuple[int, ...]
    md5: str
    sha256: str


@dataclass(frozen=True)
class DatasetSpec:
    """A data set: its four IDX files (train/test × images/labels)."""

    name: str
    files: tuple[FileSpec, ...]

    def file(self, split: str, kind: str) -> FileSpec:
        for f in self.files:
            if f.split == split and f.kind == kind:
                return f
        raise KeyError((split, kind))

    def n_rows(self, split: str) -> int:
        return self.file(split, "images").shape[0]


def _idx_files(train: tuple[str, str, str, str], test: tuple[str, str, str, str],
               n_train: int = 60000, n_test: int = 10000) -> tuple[FileSpec, ...]:
    """The four standard MNIST-layout files from (images md5, sha256, labels md5, sha256)."""
    img = (IMAGE_SIDE, IMAGE_SIDE)
    return (
        FileSpec("train-images-idx3-ubyte", "train", "images", (n_train, *img), *train[:2]),
        FileSpec("train-labels-idx1-ubyte", "train", "labels", (n_train,), *train[2:]),
        FileSpec("t10k-images-idx3-ubyte", "test", "images", (n_test, *img), *test[:2]),
        FileSpec("t10k-labels-idx1-ubyte", "test", "labels", (n_test,), *test[2:]),
    )


REGISTRY: dict[str, DatasetSpec] = {
    # ../shared/data/README.md (checked against the published checksums of the raw files)
    "mnist": DatasetSpec("mnist", _idx_files(
        ("6bbc9ace898e44ae57da46a324031adb",
         "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
         "a25bea736e30d166cdddb491f175f624",
         "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"),
        ("2646ac647ad5339dbf082846283269ea",
         "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
         "27ae3e4e09519cfbb04c329615203637",
         "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
    )),
    # computed from Debian's dataset-fashion-mnist (0.0~git20200523), the upstream files
    "fashion-mnist": DatasetSpec("fashion-mnist", _idx_files(
        ("f4a8712d7a061bf5bd6d2ca38dc4d50a",
         "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
         "9018921c3c673c538a1fc5bad174d6f9",
         "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
        ("8181f5470baa50b63fa0f6fddb340f0a",
         "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
         "15d484375f8d13e6eb1aabb0c3f46965",
         "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
    )),
}


def get_spec(dataset: str) -> DatasetSpec:
    """The registry entry for ``dataset``; unknown names are a :class:`ConfigError`."""
    try:
        return REGISTRY[dataset]
    except KeyError:
        known = ", ".join(sorted(REGISTRY))
        raise ConfigError(f"unknown dataset {dataset!r} (known: {known})") from None


# ---------------------------------------------------------------------------------------------
# IDX files


def digests(data: bytes) -> tuple[str, str]:
    """(md5, sha256) hex digests of ``data``."""
    return hashlib.md5(data).hexdigest(), hashlib.sha256(data).hexdigest()


#: Largest decompressed IDX file accepted (a few times MNIST's 47 MB training images).
MAX_IDX_BYTES = 1 << 30


def read_idx_bytes(path: str | Path) -> bytes:
    """The decompressed bytes of an IDX file, gz (detected by its magic bytes) or raw."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return decompress_idx(raw, path)


def decompress_idx(raw: bytes, name: str | Path) -> bytes:
    """``raw`` gunzipped when it starts with the gzip magic bytes, else unchanged."""
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        # Read at most MAX_IDX_BYTES + 1: a tiny hostile .gz must not inflate into all memory.
        with gzip.GzipFile(fileobj=io.BytesIO(raw)) as f:
            data = f.read(MAX_IDX_BYTES + 1)
        if len(data) > MAX_IDX_BYTES:
            raise DataError(f"{name}: decompresses to more than {MAX_IDX_BYTES:,} bytes; "
                            "not an IDX file of a supported size")
        return data
    except EOFError:
        raise DataError(f"{name}: truncated gzip stream (file ends before the end marker)") \
            from None
    except (OSError, zlib.error) as exc:
        raise DataError(f"{name}: corrupt gzip data ({exc})") from None


def parse_idx(data: bytes, name: str | Path) -> np.ndarray:
    """Parse IDX bytes into an array (a read-only view for uint8 data).

    ``name`` is used only in error messages. Checks the magic number (two zero bytes, a known
    type code, 1-3 dimensions), that every dimension is positive, and that the payload has
    exactly the size the header announces.
    """
    if len(data) < 4:
        raise DataError(f"{name}: too short for an IDX header ({len(data)} bytes)")
    zero, code, ndim = data[:2], data[2], data[3]
    if zero != b"\x00\x00" or not 1 <= ndim <= 3:
        raise DataError(f"{name}: not an IDX file (magic number 0x{data[:4].hex()})")
    if code not in IDX_DTYPES:
        raise DataError(f"{name}: unknown IDX data type code 0x{code:02x} "
                        f"(magic number 0x{data[:4].hex()})")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{name}: truncated IDX header ({len(data)} bytes, need {header})")
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    if any(d == 0 for d in dims):
        raise DataError(f"{name}: IDX header has a zero dimension {dims}")
    dtype = IDX_DTYPES[code]
    need = header + math.prod(dims) * dtype.itemsize  # exact: a hostile header cannot overflow
    if len(data) < need:
        raise DataError(f"{name}: truncated data: {len(data)} bytes, header {dims} needs {need}")
    if len(data) > need:
        raise DataError(f"{name}: {len(data) - need} unexpected trailing bytes after the data "
                        f"announced by header {dims}")
    arr = np.frombuffer(data, dtype, offset=header).reshape(dims)
    return arr if dtype == np.uint8 else arr.astype(dtype.newbyteorder("="))


def idx_bytes(arr: np.ndarray) -> bytes:
    """Serialise ``arr`` (1-3 dimensions, an IDX dtype) as IDX bytes (header + big-endian data)."""
    codes = {np.dtype(v).newbyteorder("="): k for k, v in IDX_DTYPES.items()}
    code = codes.get(arr.dtype.newbyteorder("="))
    if code is None or not 1 <= arr.ndim <= 3:
        raise ValueError(f"cannot write {arr.dtype} {arr.shape} as IDX")
    header = bytes([0, 0, code, arr.ndim]) + np.asarray(arr.shape, ">u4").tobytes()
    return header + np.ascontiguousarray(arr, IDX_DTYPES[code]).tobytes()


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (gz or raw) into a numpy array, validating it; errors name the file."""
    return parse_idx(read_idx_bytes(path), path)


def check_split(images: np.ndarray, labels: np.ndarray, images_name: str | Path,
                labels_name: str | Path) -> None:
    """Check one split's images (n, 28, 28) uint8 and labels (n,) uint8 agree."""
    if images.dtype != np.uint8 or images.ndim != 3:
        raise DataError(f"{images_name}: expected uint8 images (n, {IMAGE_SIDE}, {IMAGE_SIDE}), "
                        f"got {images.dtype} {images.shape}")
    if images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        h, w = images.shape[1:]
        raise DataError(f"{images_name}: wrong image dimensions {h}x{w} "
                        f"(expected {IMAGE_SIDE}x{IMAGE_SIDE})")
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DataError(f"{labels_name}: expected uint8 labels (n,), "
                        f"got {labels.dtype} {labels.shape}")
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{labels_name}: {labels.shape[0]} labels but {images_name} has "
                        f"{images.shape[0]} images (count mismatch)")


# ---------------------------------------------------------------------------------------------
# staged stores


def _read_group_meta(path: Path) -> dict[str, Any] | None:
    """The zarr.json of ``path`` when it is a zarr v3 group, else None."""
    try:
        meta = json.loads((path / "zarr.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("node_type") != "group":
        return None
    return meta


def is_store(path: str | Path) -> bool:
    """Whether ``path`` holds a kmdask store (a zarr v3 group with kmdask attributes)."""
    meta = _read_group_meta(Path(path))
    return meta is not None and meta.get("attributes", {}).get("kmdask_store") == STORE_FORMAT


def store_info(path: str | Path) -> dict[str, Any]:
    """The group attributes of a kmdask store (dataset, source, files, chunk_rows, ...)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such store (stage it with `kmdask stage --out {path}`)")
    meta = _read_group_meta(path)
    if meta is None:
        raise DataError(f"{path}: not a kmdask store (no zarr v3 group metadata)")
    attrs = meta.get("attributes", {})
    if attrs.get("kmdask_store") != STORE_FORMAT:
        raise DataError(f"{path}: not a kmdask store (zarr group without kmdask attributes)")
    return dict(attrs)


def _open_array(path: str | Path, split: str, kind: str):
    import zarr

    path = Path(path)
    info = store_info(path)
    if split not in info.get("splits", {}):
        have = ", ".join(info.get("splits", {})) or "none"
        raise DataError(f"{path}: no split {split!r} in store (has: {have})")
    try:
        return zarr.open_array(store=str(path), path=f"{split}/{kind}", mode="r")
    except Exception as exc:  # zarr raises several types for missing/damaged nodes
        raise DataError(f"{path}: cannot open {split}/{kind} ({type(exc).__name__}: {exc})") \
            from None


@functools.lru_cache(maxsize=64)
def _open_cached(path: str, node: str):
    # opening re-reads metadata (~0.5 ms); a streamed fit reads every chunk on every pass
    import zarr

    return zarr.open_array(store=path, path=node, mode="r")


def read_chunk(path: str, split: str, kind: str, i: int, rows: int,
               crc: int | None) -> np.ndarray:
    """Chunk ``i`` of ``split/kind``, checked against the crc32 recorded at staging.

    A chunk deleted from disk (zarr would silently return zeros) or damaged (a codec error
    deep inside zarr) becomes a one-line DataError naming the store and the chunk.
    """
    where = f"{path}/{split}/{kind}"
    try:
        arr = _open_cached(path, f"{split}/{kind}")
        block = np.ascontiguousarray(arr[i * rows : (i + 1) * rows])
    except Exception as exc:  # codec/IO errors surface as many different types
        raise DataError(f"{where}: chunk {i} unreadable ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else 'no detail'})") from None
    if crc is not None:
        got = zlib.crc32(block.data)
        if got != crc:
            raise DataError(f"{where}: chunk {i} is corrupt or missing on disk (crc32 "
                            f"{got:08x}, recorded at staging {crc:08x}); re-stage the store")
    return block


def _open_verified(path: str | Path, split: str, kind: str):
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
            dask.delayed(read_chunk, pure=True)(str(path), split, kind, i, rows, int(crcs[i])),
            shape=(min(rows, n - i * rows), *tail), dtype=arr.dtype)
        for i in range(n_chunks)
    ]
    return da.concatenate(blocks, axis=0)


def open_images(path: str | Path, split: str = "train"):
    """``split`` images as a dask array (n, 784) uint8 whose chunks are the zarr chunks.

    Every chunk read is verified against its staging checksum (see :func:`read_chunk`).
    """
    return _open_verified(path, split, "images")


def open_labels(path: str | Path, split: str = "train"):
    """``split`` labels as a dask array (n,) uint8 whose chunks are the zarr chunks."""
    return _open_verified(path, split, "labels")


def data_fingerprint(path: str | Path, split: str = "train") -> str:
    """A short stable hex id of a split's content: its source checksums and augment params.

    Independent of chunking, codec and where the bytes came from, so two stores of the same
    data share it.
    """
    info = store_info(path)
    if split not in info.get("splits", {}):
        raise DataError(f"{path}: no split {split!r} in store")
    files = {n: f["sha256"] for n, f in info["files"].items() if f["split"] == split}
    key = {
        "dataset": info["dataset"],
        "files": files,
        "augment": info["augment"] if split == "train" else None,
    }
    blob = json.dumps(key, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def verify_store(path: str | Path) -> None:
    """Re-read every chunk and compare its crc32 with the one recorded at staging time."""
    path = Path(path)
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
