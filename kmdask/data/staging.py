"""Stage a data set into a chunked zarr v3 store, atomically and idempotently.

The store (default ``data/<dataset>.zarr``) holds ``train/images`` (n, 784) uint8,
``train/labels`` (n,) uint8 and the same under ``test/``, chunked by rows, with provenance in
the group attributes and a crc32 per chunk in each array's attributes.

* Atomic: written under ``.<name>.tmp-<pid>-<rand>`` beside ``out`` and renamed into place
  only when complete, so ``out`` is either absent or whole. Temporaries of dead processes are
  removed by the next stage into the same directory.
* Idempotent: a valid store with the same dataset, checksums, chunking, codec and augment
  parameters is reused; a store with other parameters is never overwritten silently.
* ``augment=N`` appends N shifted (±2 px) / rotated (±10°) copies of the training set, made
  chunk by chunk so memory stays bounded by a few chunks whatever N is. The draws for source
  rows ``[b*10000, (b+1)*10000)`` of copy ``c`` come from ``keyed_rng(seed, c, b)``, so the
  augmented data does not depend on ``chunk_rows``.
"""

from __future__ import annotations

import collections
import logging
import os
import secrets
import shutil
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numba import njit

from kmdask.data.idx import IMAGE_SIDE, parse_idx
from kmdask.data.registry import N_FEATURES, SPLITS, DatasetSpec, get_spec
from kmdask.data.store import STORE_FORMAT, is_store, store_info
from kmdask.errors import ConfigError, DataError
from kmdask.rng import keyed_rng

log = logging.getLogger(__name__)

CODECS = ("lz4", "zstd", "none")
AUG_BLOCK = 10_000  # source rows per keyed random stream
AUG_MAX_SHIFT = 2.0  # pixels
AUG_MAX_ROTATE = 10.0  # degrees
AUG_METHOD = "shift-rotate-bilinear/1"  # bump when the warp changes: stores are then restaged
_PROGRESS_EVERY = 2.0  # seconds between progress lines


@dataclass(frozen=True)
class StageResult:
    """Outcome of :func:`stage_dataset`."""

    path: Path
    reused: bool
    seconds: float
    nbytes: int  # bytes on disk


# ---------------------------------------------------------------------------------------------
# augmentation


def augment_params(copies: int, seed: int) -> dict[str, Any]:
    """The augment attributes recorded in (and compared against) a store."""
    if copies == 0:
        return {"copies": 0}
    return {"copies": copies, "seed": seed, "method": AUG_METHOD, "block_rows": AUG_BLOCK,
            "max_shift_px": AUG_MAX_SHIFT, "max_rotate_deg": AUG_MAX_ROTATE}


def augment_draws(seed: int, copy: int, block: int) -> tuple[np.ndarray, ...]:
    """(dx, dy, theta in radians) for the AUG_BLOCK source rows of ``block`` in ``copy``."""
    u = keyed_rng(seed, copy, block).uniform(-1.0, 1.0, size=(3, AUG_BLOCK))
    return u[0] * AUG_MAX_SHIFT, u[1] * AUG_MAX_SHIFT, np.deg2rad(u[2] * AUG_MAX_ROTATE)


_PAD = IMAGE_SIDE + 2  # one pixel of zero padding on each side: out-of-range taps read 0


@njit(cache=True, nogil=True)
def _warp(images, cos, sin, dx, dy, out):  # pragma: no cover - compiled
    # Every step in float32, in the order of the vectorised numpy form this replaced (the
    # augmented stores are bit-identical to it; tests/test_staging.py checks on real MNIST).
    # Two loops per image: the coordinates (no image reads, so it runs in SIMD lanes), then
    # the four taps and the blend.
    half = (IMAGE_SIDE - 1) / 2.0
    c = np.float32(half)
    lo = np.float32(-1.0)
    hi = np.float32(IMAGE_SIDE)
    s, p, npx = IMAGE_SIDE, _PAD, IMAGE_SIDE * IMAGE_SIDE
    pad = np.zeros(p * p, np.float32)
    u = np.empty(npx, np.float32)
    v = np.empty(npx, np.float32)
    for gy in range(s):
        for gx in range(s):
            u[gy * s + gx] = np.float32(gx - half)
            v[gy * s + gx] = np.float32(gy - half)
    fxs = np.empty(npx, np.float32)
    fys = np.empty(npx, np.float32)
    i00 = np.empty(npx, np.int32)
    sxs = np.empty(npx, np.int32)
    sys_ = np.empty(npx, np.int32)
    for r in range(images.shape[0]):
        for yy in range(s):
            for xx in range(s):
                pad[(yy + 1) * p + xx + 1] = np.float32(images[r, yy * s + xx])
        cr, sr, dxr, dyr = cos[r], sin[r], dx[r], dy[r]
        for q in range(npx):
            qx = u[q] - dxr
            qy = v[q] - dyr
            # inverse map: output pixel -> source coordinates
            px = (cr * qx + sr * qy) + c
            py = (cr * qy - sr * qx) + c
            x0 = np.floor(px)
            y0 = np.floor(py)
            fxs[q] = px - x0
            fys[q] = py - y0
            xi = np.int32(min(max(x0, lo), hi)) + 1  # padded column of the left tap
            yi = np.int32(min(max(y0, lo), hi)) + 1
            sxs[q] = min(xi + 1, p - 1) - xi  # 0 when clamped: both taps in the zero border
            sys_[q] = (min(yi + 1, p - 1) - yi) * p
            i00[q] = yi * p + xi
        for q in range(npx):
            k, sx, sy, fx, fy = i00[q], sxs[q], sys_[q], fxs[q], fys[q]
            a, b = pad[k], pad[k + sx]
            cc, d = pad[k + sy], pad[k + sy + sx]
            top = a + fx * (b - a)
            o = np.rint(top + fy * (cc + fx * (d - cc) - top))
            out[r, q] = np.uint8(min(max(o, np.float32(0.0)), np.float32(255.0)))


def warp_images(images: np.ndarray, dx: np.ndarray, dy: np.ndarray,
                theta: np.ndarray) -> np.ndarray:
    """Rotate each (n, 784) uint8 image by ``theta`` about its centre, then shift it by
    (``dx``, ``dy``) pixels; bilinear interpolation in float32, zeros outside."""
    out = np.empty((images.shape[0], N_FEATURES), np.uint8)
    _warp(np.ascontiguousarray(images), np.cos(theta).astype(np.float32),
          np.sin(theta).astype(np.float32), dx.astype(np.float32), dy.astype(np.float32), out)
    return out


def train_rows(images: np.ndarray, labels: np.ndarray, start: int, stop: int,
               seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``[start, stop)`` of the augmented training set (originals first, then copies)."""
    n = images.shape[0]
    out = np.empty((stop - start, N_FEATURES), np.uint8)
    r = start
    while r < stop:
        copy, src = divmod(r, n)
        if copy == 0:
            end = min(stop, n)
            out[r - start:end - start] = images[src:src + end - r]
        else:
            block = src // AUG_BLOCK
            end = min(stop, copy * n + min(n, (block + 1) * AUG_BLOCK))
            s0 = r - copy * n
            off = s0 - block * AUG_BLOCK
            dx, dy, th = (v[off:off + end - r] for v in augment_draws(seed, copy, block))
            out[r - start:end - start] = warp_images(images[s0:s0 + end - r], dx, dy, th)
        r = end
    return out, labels[np.arange(start, stop) % n]


# ---------------------------------------------------------------------------------------------
# output path handling


def _check_out_parent(parent: Path) -> None:
    """Fail early (before any download) when ``parent`` cannot be created or written."""
    p = parent
    while not p.exists() and p.parent != p:
        p = p.parent
    if not p.is_dir():
        raise DataError(f"cannot create output directory {parent}: {p} is not a directory")
    if not os.access(p, os.W_OK | os.X_OK):
        raise DataError(f"output directory {parent} is not writable ({p})")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale(parent: Path, name: str) -> None:
    """Remove ``.<name>.tmp-<pid>-*`` left by stages whose process is gone."""
    for tmp in parent.glob(f".{name}.tmp-*"):
        try:
            pid = int(tmp.name[len(name) + 6:].split("-")[0])
        except ValueError:
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            log.info(f"kmdask: removing stale temporary {tmp}")
            shutil.rmtree(tmp, ignore_errors=True)


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _wanted(spec: DatasetSpec, chunk_rows: int, compressor: str,
            augment: dict[str, Any]) -> dict[str, Any]:
    """The attributes that decide whether an existing store can be reused."""
    files = {f.name: {"split": f.split, "kind": f.kind, "md5": f.md5, "sha256": f.sha256}
             for f in spec.files}
    return {"dataset": spec.name, "files": files, "chunk_rows": chunk_rows,
            "compressor": compressor, "augment": augment}


def _check_existing(out: Path, wanted: dict[str, Any], n_rows: dict[str, int]) -> None:
    """Return when ``out`` is a reusable store, else raise a DataError saying how to fix it."""
    if not is_store(out):
        raise DataError(f"{out}: exists and is not a kmdask store; remove it or choose "
                        "another --out")
    info = store_info(out)
    info["files"] = _strip(info.get("files"))
    diff = [k for k, v in wanted.items() if info.get(k) != v]
    if diff:
        what = ", ".join(f"{k} {info.get(k)!r} (wanted {wanted[k]!r})" if k != "files"
                         else "files (different checksums)" for k in diff)
        raise DataError(f"{out}: is a kmdask store with different parameters: {what}; remove "
                        "it or choose another --out")
    import zarr

    try:
        for split, n in n_rows.items():
            for kind, shape in (("images", (n, N_FEATURES)), ("labels", (n,))):
                arr = zarr.open_array(store=str(out), path=f"{split}/{kind}", mode="r")
                if arr.shape != shape or arr.dtype != np.uint8 \
                        or arr.chunks[0] != wanted["chunk_rows"]:
                    raise ValueError(f"{split}/{kind} is {arr.dtype} {arr.shape}")
    except Exception as exc:
        raise DataError(f"{out}: kmdask store is damaged ({type(exc).__name__}: {exc}); "
                        "remove it and stage again") from None


def _strip(files: Any) -> Any:
    """Recorded file entries without nbytes, for comparison with the registry."""
    if not isinstance(files, dict):
        return files
    return {n: {k: v for k, v in f.items() if k != "nbytes"} if isinstance(f, dict) else f
            for n, f in files.items()}


# ---------------------------------------------------------------------------------------------
# writing


def _compressors(name: str) -> Any:
    from zarr.codecs import BloscCodec

    if name == "none":
        return None
    # typesize 1 makes byte shuffle a no-op; bitshuffle costs speed for little gain on MNIST
    return [BloscCodec(cname=name, clevel=5 if name == "lz4" else 3, shuffle="noshuffle",
                       typesize=1)]


def _blocks(split: str, images: np.ndarray, labels: np.ndarray, n: int, chunk_rows: int,
            seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The split's row chunks in order, each (rows, labels). Augmented chunks are made by a
    pool of threads a few chunks ahead (the warp releases the GIL), so staging keeps every core
    busy while the order, and so the store, stays the same."""
    starts = range(0, n, chunk_rows)
    if split != "train":
        for start in starts:
            yield images[start:start + chunk_rows], labels[start:start + chunk_rows]
        return
    workers = os.cpu_count() or 1
    todo = iter(starts)
    with ThreadPoolExecutor(workers) as pool:
        pending: collections.deque = collections.deque()

        def more() -> None:
            start = next(todo, None)
            if start is not None:
                pending.append(pool.submit(train_rows, images, labels, start,
                                           min(start + chunk_rows, n), seed))

        for _ in range(2 * workers):  # at most this many chunks in memory
            more()
        while pending:
            block = pending.popleft().result()
            more()
            yield block


def _write_store(tmp: Path, spec: DatasetSpec, files: dict[str, bytes],
                 attrs: dict[str, Any]) -> None:
    import zarr

    chunk_rows, copies = attrs["chunk_rows"], attrs["augment"]["copies"]
    seed = attrs["augment"].get("seed", 0)
    root = zarr.open_group(str(tmp), mode="w-", zarr_format=3)
    for split in SPLITS:
        img_f, lab_f = spec.file(split, "images"), spec.file(split, "labels")
        images = parse_idx(files[img_f.name], img_f.name).reshape(-1, N_FEATURES)
        labels = parse_idx(files[lab_f.name], lab_f.name)
        n = images.shape[0] * (copies + 1 if split == "train" else 1)
        group = root.create_group(split)
        # write_empty_chunks: every chunk exists on disk, so a missing file means damage
        opts: dict[str, Any] = {"dtype": "uint8", "fill_value": 0,
                                "compressors": _compressors(attrs["compressor"]),
                                "config": {"write_empty_chunks": True}}
        img_arr = group.create_array("images", shape=(n, N_FEATURES),
                                     chunks=(chunk_rows, N_FEATURES),
                                     dimension_names=("row", "pixel"), **opts)
        lab_arr = group.create_array("labels", shape=(n,), chunks=(chunk_rows,),
                                     dimension_names=("row",), **opts)
        crc_img: list[int] = []
        crc_lab: list[int] = []
        t0 = last = time.perf_counter()
        for i, (block, block_labels) in enumerate(_blocks(split, images, labels, n, chunk_rows,
                                                          seed)):
            start, stop = i * chunk_rows, i * chunk_rows + block.shape[0]
            img_arr[start:stop] = block
            lab_arr[start:stop] = block_labels
            crc_img.append(zlib.crc32(np.ascontiguousarray(block).data))
            crc_lab.append(zlib.crc32(np.ascontiguousarray(block_labels).data))
            now = time.perf_counter()
            if now - last >= _PROGRESS_EVERY:
                last = now
                log.info("kmdask: %s: %d/%d rows (%s rows/s)", split, stop, n,
                         f"{stop / (now - t0):,.0f}")
        img_arr.attrs["chunk_crc32"] = crc_img
        lab_arr.attrs["chunk_crc32"] = crc_lab
        log.info("kmdask: %s: wrote %d rows in %.2f s", split, n, time.perf_counter() - t0)
    # written last: a store without these attributes is never taken for a kmdask store
    root.attrs.update(attrs)


def stage_dataset(dataset: str, out: str | Path | None = None,
                  source: str | Path | None = None, chunk_rows: int = 10_000,
                  compressor: str = "lz4", augment: int = 0, seed: int = 0) -> StageResult:
    """Find verified IDX files for ``dataset`` and write them to a zarr store at ``out``.

    Parameters
    ----------
    dataset : registry name ("mnist", "fashion-mnist").
    out : store path; default ``data/<dataset>.zarr`` (``data/<dataset>-aug<N>.zarr`` with
        augment), relative to the working directory.
    source : directory or URL prefix tried alone (see :mod:`kmdask.data.sources`); None searches.
    chunk_rows : rows per zarr chunk.
    compressor : "lz4" (blosc), "zstd" (blosc) or "none".
    augment, seed : append ``augment`` warped copies of the training set drawn from ``seed``.
    quiet : no progress lines on stderr.
    """
    from kmdask import __version__
    from kmdask.data.sources import describe, find_dataset

    t0 = time.perf_counter()
    spec = get_spec(dataset)
    if not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ConfigError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
    if compressor not in CODECS:
        raise ConfigError(f"compressor must be one of {', '.join(CODECS)}, got {compressor!r}")
    if not isinstance(augment, int) or augment < 0:
        raise ConfigError(f"augment must be an integer >= 0, got {augment!r}")
    if out is None:
        out = Path("data") / (f"{dataset}-aug{augment}.zarr" if augment else f"{dataset}.zarr")
    out = Path(os.path.abspath(out))
    aug = augment_params(augment, seed)
    wanted = _wanted(spec, chunk_rows, compressor, aug)
    n_rows = {"train": spec.n_rows("train") * (augment + 1), "test": spec.n_rows("test")}

    _check_out_parent(out.parent)
    if out.parent.is_dir():
        _clean_stale(out.parent, out.name)
    if out.exists() or out.is_symlink():
        _check_existing(out, wanted, n_rows)
        log.info(f"kmdask: reusing valid store at {out}")
        return StageResult(out, True, time.perf_counter() - t0, _dir_size(out))

    found = find_dataset(dataset, source)
    attrs = {
        "kmdask_store": STORE_FORMAT,
        **wanted,
        "files": {n: {**f, "nbytes": len(found.files[n])} for n, f in wanted["files"].items()},
        "splits": n_rows,
        "source": found.source,
        "kmdask_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as exc:
        raise DataError(f"cannot write output directory {out.parent}: "
                        f"{exc.strerror or exc}") from None
    try:
        log.info(f"kmdask: writing {dataset} to {describe(tmp)}")
        _write_store(tmp, spec, found.files, attrs)
        os.rename(tmp, out)  # atomic on one file system; fails if out appeared meanwhile
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if out.exists() and is_store(out):  # a concurrent stage finished first
            _check_existing(out, wanted, n_rows)
            log.info(f"kmdask: reusing valid store at {out} (staged concurrently)")
            return StageResult(out, True, time.perf_counter() - t0, _dir_size(out))
        raise DataError(f"cannot write {out}: {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.perf_counter() - t0
    nbytes = _dir_size(out)
    log.info(f"kmdask: staged {dataset} at {out} ({nbytes / 2**20:.1f} MiB, {seconds:.1f} s)")
    return StageResult(out, False, seconds, nbytes)
