"""Arrays a user already has, clustered without restaging: a zarr array (v2 or v3, any
chunking) or a ``.npy`` file, local or on object storage, with an optional labels array.

Rows are cut into row chunks on the fly (a whole number of the array's own row chunks, so that
no stored chunk is decompressed twice per pass). The content is read once to compute a
fingerprint (so that an unchanged array makes a rerun a no-op and a changed one reruns) and a
crc32 per row chunk, checked on every later read as a staged store's are. Both are cached
beside the array (``<array>.kmdask.json``) or, where that location is read-only, in a cache
directory; the cache is keyed by what the file system says of the array (sizes, times or
ETags), so a changed array is read again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kmdask.data.location import Location, location, remote_call, why_missing
from kmdask.errors import DataError

log = logging.getLogger(__name__)

DTYPES = (np.dtype(np.uint8), np.dtype(np.float32), np.dtype(np.float64))
#: a stored chunk larger than this is not re-chunked on the fly: every row chunk read from it
#: would decompress all of it
MAX_STORED_CHUNK = 256 << 20
CACHE_VERSION = 1


@dataclass(frozen=True)
class Reader:
    """Reads rows ``[start, stop)`` of one array (picklable: workers read by themselves)."""

    loc: Location
    kind: str  # "zarr" | "npy"
    shape: tuple[int, ...]
    dtype: str
    offset: int = 0  # npy: bytes before the data

    def read(self, start: int, stop: int) -> np.ndarray:
        try:
            if self.kind == "zarr":
                return np.ascontiguousarray(_zarr(self.loc)[start:stop])
            return self._npy(start, stop)
        except DataError:
            raise
        except Exception as exc:  # IO and codec errors come in many types
            raise DataError(f"{self.loc}: rows {start}:{stop} unreadable ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else 'no detail'})") \
                from None

    def _npy(self, start: int, stop: int) -> np.ndarray:
        dtype = np.dtype(self.dtype)
        row = int(np.prod(self.shape[1:], dtype=np.int64)) * dtype.itemsize
        lo, hi = self.offset + start * row, self.offset + stop * row
        if self.loc.local:
            with open(self.loc.url, "rb") as f:
                f.seek(lo)
                blob = f.read(hi - lo)
        else:
            blob = self.loc.fs().cat_file(self.loc.fs_path(), start=lo, end=hi)
        if len(blob) != hi - lo:
            raise DataError(f"{self.loc}: truncated .npy: rows {start}:{stop} need bytes "
                            f"{lo}:{hi}, the file ends at {lo + len(blob)}")
        return np.frombuffer(blob, dtype).reshape(stop - start, *self.shape[1:]).astype(
            dtype.newbyteorder("="), copy=False)


_ZARR: dict[Location, Any] = {}


def _zarr(loc: Location):
    # opened once per process: a streamed fit reads every chunk on every pass
    if loc not in _ZARR:
        import zarr

        _ZARR[loc] = zarr.open_array(store=loc.zarr_store(), mode="r")
    return _ZARR[loc]


def read_rows(reader: Reader, start: int, stop: int, crc: int | None) -> np.ndarray:
    """Rows ``[start, stop)``, checked against the crc32 computed when the array was first
    fingerprinted; a changed or lost object is a one-line error naming it and the rows."""
    block = reader.read(start, stop)
    if crc is not None:
        got = zlib.crc32(np.ascontiguousarray(block).data)
        if got != crc:
            raise DataError(f"{reader.loc}: rows {start}:{stop} changed since the array was "
                            f"fingerprinted (crc32 {got:08x}, recorded {crc:08x}); if the "
                            "change is meant, remove its .kmdask.json cache to use it")
    return block


def _npy_reader(loc: Location) -> Reader:
    """The .npy header: dtype, shape and where the data starts (checked against the size)."""
    fmt = np.lib.format
    def opened():
        return open(loc.url, "rb") if loc.local else loc.fs().open(loc.fs_path(), "rb")  # noqa: SIM115 - closed by the with below

    try:
        f = remote_call(loc, "open it", opened)
    except FileNotFoundError:
        raise DataError(f"{loc}: {why_missing(loc, 'file')}") from None
    with f:
        try:
            version = fmt.read_magic(f)
            header = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}
            shape, fortran, dtype = header.get(version, fmt.read_array_header_2_0)(f)
        except Exception as exc:  # ValueError for bad magic/header, EOF for short files
            raise DataError(f"{loc}: not a .npy file ({type(exc).__name__}: {exc})") from None
        offset = f.tell()
        size = f.seek(0, 2)
    if fortran and len(shape) > 1:
        raise DataError(f"{loc}: a Fortran-ordered .npy; save it C-ordered "
                        "(np.save(path, np.ascontiguousarray(a)))")
    if dtype.hasobject:
        raise DataError(f"{loc}: a .npy of Python objects is not an array of numbers")
    need = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if size < need:
        raise DataError(f"{loc}: truncated .npy: its header says {shape} {dtype} "
                        f"({need - offset:,} bytes of data), the file holds {size - offset:,}")
    return Reader(loc, "npy", tuple(int(s) for s in shape), dtype.str, offset)


def open_reader(loc: Location) -> tuple[Reader, int]:
    """A reader for the array at ``loc`` and the rows of its stored chunks (1 for .npy)."""
    if loc.url.endswith(".npy"):
        return _npy_reader(loc), 1
    import zarr

    if not loc.exists():  # zarr would say less (and a denied read becomes one line here)
        raise DataError(f"{loc}: {why_missing(loc, 'array')}")
    try:
        node = zarr.open(store=loc.zarr_store(), mode="r")
    except FileNotFoundError:
        raise DataError(f"{loc}: {why_missing(loc, 'array')}") from None
    except Exception as exc:  # zarr raises many types for what is not an array
        raise DataError(f"{loc}: not a zarr array or .npy file ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else 'no detail'})") from None
    if not isinstance(node, zarr.Array):
        hint = ("; it is a kmdask store: use data: {store: ...}"
                if node.attrs.get("kmdask_store") else "; name the array inside the group")
        raise DataError(f"{loc}: a zarr group, not an array{hint}")
    return Reader(loc, "zarr", tuple(int(s) for s in node.shape), node.dtype.str), \
        int(node.chunks[0])


def row_chunks(n: int, stored: int, d: int, itemsize: int, target: int) -> int:
    """Rows per chunk for an array of ``n`` rows stored in chunks of ``stored`` rows: a whole
    number of stored chunks near ``target`` rows (see MAX_STORED_CHUNK)."""
    if stored * d * itemsize > MAX_STORED_CHUNK and stored < n:
        raise DataError(f"stored chunks of {stored:,} rows ({stored * d * itemsize / 2**20:,.0f} "
                        f"MiB each) cannot be re-chunked on the fly: every row chunk read "
                        f"would decompress a whole one; rechunk the array to at most "
                        f"{max(1, MAX_STORED_CHUNK // (d * itemsize)):,} rows per chunk")
    if stored >= target:
        return min(stored, n)
    return min(n, max(1, target // stored) * stored)


def _stamp(loc: Location, kind: str) -> dict:
    """What the file system says of the array: changes whenever its content may have."""
    if loc.local:
        files = [loc.path] if kind == "npy" else [
            Path(r, f) for r, _, fs in os.walk(loc.path) for f in fs
            if not f.endswith(".kmdask.json")]
        stats = [f.stat() for f in files]
        return {"files": len(stats), "bytes": sum(s.st_size for s in stats),
                "mtime_ns": max((s.st_mtime_ns for s in stats), default=0)}
    fs = loc.fs()
    found = fs.find(loc.fs_path(), detail=True) if kind == "zarr" else {
        loc.fs_path(): fs.info(loc.fs_path())}
    tags = sorted((k, str(v.get("ETag") or v.get("etag") or v.get("mtime") or ""),
                   int(v.get("size") or 0)) for k, v in found.items())
    return {"files": len(tags), "digest": hashlib.sha256(json.dumps(tags).encode()).hexdigest()}


def _cache_path(loc: Location, cache_dir: Path | None) -> tuple[Location, Location | None]:
    """Where the fingerprint cache lives: beside the array, and the fallback directory."""
    beside = Location(loc.url.rstrip("/") + ".kmdask.json", loc.options)
    fallback = None
    if cache_dir is not None:
        key = hashlib.sha256(loc.url.encode()).hexdigest()[:16]
        fallback = location(Path(cache_dir) / f"{key}.json")
    return beside, fallback


def _read_cache(where: list[Location], key: dict) -> dict | None:
    for c in where:
        try:
            got = json.loads(c.read_bytes())
        except (OSError, ValueError, DataError):
            continue
        if got.get("key") == key:
            return got
    return None


def _write_cache(where: list[Location], record: dict) -> str:
    blob = json.dumps(record, sort_keys=True).encode()
    for c in where:
        try:
            if c.local:
                Path(c.url).parent.mkdir(parents=True, exist_ok=True)
                tmp = Path(c.url + f".tmp-{os.getpid()}")
                try:
                    tmp.write_bytes(blob)
                    os.replace(tmp, c.url)
                finally:
                    tmp.unlink(missing_ok=True)
            else:
                c.fs().pipe_file(c.fs_path(), blob)
            return str(c)
        except (OSError, DataError):
            continue
    log.warning("could not cache the fingerprint of an array anywhere; it is read again "
                "next time")
    return ""


def _digest(reader: Reader, start: int, stop: int) -> tuple[str, int]:
    block = reader.read(start, stop)
    data = np.ascontiguousarray(block).data
    return hashlib.sha256(data).hexdigest(), zlib.crc32(data)


@dataclass(frozen=True)
class ArraySource:
    """An opened array: rows as a dask array, optional labels, and what identifies them."""

    images: Any  # dask array (n, d)
    labels: Any | None  # dask array (n,) or None
    fingerprint: str  # of the rows (and the labels): content, not location
    location: Location
    chunk_rows: int
    computed: bool = False  # the fingerprint was hashed now: no cache held it


def _verified(reader: Reader, chunk_rows: int, crcs: list[int]):
    import dask
    import dask.array as da

    n = reader.shape[0]
    parts = []
    for i, start in enumerate(range(0, n, chunk_rows)):
        stop = min(start + chunk_rows, n)
        part = dask.delayed(read_rows, pure=True)(reader, start, stop, int(crcs[i]))
        parts.append(da.from_delayed(part, shape=(stop - start, *reader.shape[1:]),
                                     dtype=np.dtype(reader.dtype).newbyteorder("=")))
    return da.concatenate(parts, axis=0)


def fingerprinted(reader: Reader, chunk_rows: int, cache_dir: Path | None,
                  write: bool = True) -> dict:
    """The array's fingerprint and per-chunk crc32s: from the cache, or by reading it once
    (then cached, unless ``write`` is False; the record then says ``"computed": True``)."""
    import dask

    key = {"version": CACHE_VERSION, "url": reader.loc.url, "kind": reader.kind,
           "shape": list(reader.shape), "dtype": reader.dtype, "chunk_rows": chunk_rows,
           "stamp": _stamp(reader.loc, reader.kind)}
    beside, fallback = _cache_path(reader.loc, cache_dir)
    where = [beside] + ([fallback] if fallback else [])
    cached = _read_cache(where, key)
    if cached is not None:
        return cached
    n = reader.shape[0]
    log.info("kmdask: fingerprinting %s (%d rows, read once; %s)", reader.loc, n,
             "cached beside it" if write else "not cached: a dry run writes nothing")
    tasks = [dask.delayed(_digest)(reader, s, min(s + chunk_rows, n))
             for s in range(0, n, chunk_rows)]
    got = dask.compute(*tasks, scheduler="threads")
    whole = hashlib.sha256()
    whole.update(json.dumps([list(reader.shape), np.dtype(reader.dtype).str]).encode())
    for sha, _ in got:
        whole.update(bytes.fromhex(sha))
    record = {"key": key, "fingerprint": whole.hexdigest()[:16], "crc32": [c for _, c in got]}
    if write:
        _write_cache(where, record)
    return {**record, "computed": True}


def open_array(where: str | Path | Location, labels: str | Path | Location | None = None, *,
               storage_options: dict | None = None, cache_dir: Path | None = None,
               chunk_rows: int = 10_000, image_shape: tuple[int, int] | None = None,
               write_cache: bool = True) -> ArraySource:
    """Open an existing zarr array or ``.npy`` file of rows (and labels) for clustering.

    Parameters
    ----------
    where : path or URL
        A zarr array (v2 or v3) or a ``.npy`` file: 2-D, uint8, float32 or float64.
    labels : path or URL, optional
        A 1-D integer array (zarr or .npy) with one label per row.
    storage_options : dict, optional
        fsspec options for object storage.
    cache_dir : path, optional
        Where fingerprints go when the array's own location is read-only.
    chunk_rows : int
        About how many rows per chunk.
    image_shape : (height, width), optional
        When the rows are images: checked against the row length.
    write_cache : bool
        False (a dry run): read a fingerprint cache where there is one, never write one.

    Raises
    ------
    DataError
        Not an array, not 2-D, a wrong dtype, labels of the wrong length, a truncated file,
        rows that are not ``image_shape`` images. All are found before anything is read.
    """
    loc = location(where, storage_options)
    reader, stored = open_reader(loc)
    if len(reader.shape) != 2 or reader.shape[0] < 1 or reader.shape[1] < 1:
        raise DataError(f"{loc}: expected a 2-D array of rows (n, features), got shape "
                        f"{reader.shape}")
    dtype = np.dtype(reader.dtype).newbyteorder("=")
    if dtype not in DTYPES:
        raise DataError(f"{loc}: expected uint8, float32 or float64 rows, got {dtype}")
    n, d = reader.shape
    if image_shape is not None and image_shape[0] * image_shape[1] != d:
        raise DataError(f"{loc}: rows of {d} values are not {image_shape[0]} x "
                        f"{image_shape[1]} images ({image_shape[0] * image_shape[1]} pixels)")
    rows = row_chunks(n, stored, d, dtype.itemsize, chunk_rows)
    lreader = None
    if labels is not None:  # checked before anything is read or cached
        lloc = location(labels, storage_options)
        lreader, _ = open_reader(lloc)
        if len(lreader.shape) != 1 or lreader.shape[0] != n:
            raise DataError(f"{lloc}: expected {n} labels (one per row of {loc}), got shape "
                            f"{lreader.shape}")
        if np.dtype(lreader.dtype).kind not in "iu":
            raise DataError(f"{lloc}: expected integer labels, got {np.dtype(lreader.dtype)}")
    record = fingerprinted(reader, rows, cache_dir, write_cache)
    images = _verified(reader, rows, record["crc32"])
    fp = record["fingerprint"]
    computed = bool(record.get("computed"))
    lab = None
    if lreader is not None:
        lrec = fingerprinted(lreader, rows, cache_dir, write_cache)
        lab = _verified(lreader, rows, lrec["crc32"])
        fp = hashlib.sha256(f"{fp}:{lrec['fingerprint']}".encode()).hexdigest()[:16]
        computed = computed or bool(lrec.get("computed"))
    return ArraySource(images, lab, fp, loc, rows, computed)
