"""IDX files (the format of MNIST and its relatives): gz or raw bytes to numpy, every header
field validated, and numpy back to IDX bytes. Every bad-file condition is a one-line
:class:`~kmdask.errors.DataError` that names the file."""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import zlib
from pathlib import Path

import numpy as np

from kmdask.errors import DataError

IMAGE_SIDE = 28  # MNIST-layout images are 28 x 28

# IDX type codes (third byte of the magic number) -> numpy dtype (IDX is big-endian)
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}



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
                labels_name: str | Path,
                shape: tuple[int, int] | None = (IMAGE_SIDE, IMAGE_SIDE)) -> None:
    """Check one split's images (n, height, width) uint8 and labels (n,) uint8 agree;
    ``shape`` is the (height, width) required, None for any."""
    if images.dtype != np.uint8 or images.ndim != 3:
        want = "n, height, width" if shape is None else f"n, {shape[0]}, {shape[1]}"
        raise DataError(f"{images_name}: expected uint8 images ({want}), got {images.dtype} "
                        f"{images.shape}")
    if shape is not None and images.shape[1:] != tuple(shape):
        h, w = images.shape[1:]
        raise DataError(f"{images_name}: wrong image dimensions {h}x{w} "
                        f"(expected {shape[0]}x{shape[1]})")
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DataError(f"{labels_name}: expected uint8 labels (n,), "
                        f"got {labels.dtype} {labels.shape}")
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{labels_name}: {labels.shape[0]} labels but {images_name} has "
                        f"{images.shape[0]} images (count mismatch)")
