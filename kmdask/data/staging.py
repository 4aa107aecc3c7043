"""Stage IDX files into a chunked zarr v3 store, locally or on object storage, atomically and
idempotently.

A store (default ``data/<name>.zarr``) holds ``train/images`` (n, height * width) uint8,
``train/labels`` (n,) uint8 and, when the set has one, the same under ``test/``, chunked by
rows, with provenance in the group attributes (checksums of the decompressed IDX files, whether
they were verified, the image shape) and a crc32 per chunk in each array's attributes.

* Two kinds of set: one kmdask knows by checksum (:func:`stage_dataset`: MNIST,
  Fashion-MNIST, found and verified by :mod:`kmdask.data.sources`), or any IDX files
  (:func:`stage_files`: checked against given sha256 values, or staged with their computed
  checksums recorded and the store marked unverified).
* Atomic: written under ``.<name>.tmp-<pid>-<rand>`` beside ``out`` and moved into place only
  when complete, so ``out`` is either absent or whole. Locally that is a rename; on object
  storage (which has no rename) every object is copied under the final prefix, the group's
  metadata, which holds the attributes that make it a kmdask store, last. Temporaries of dead
  processes are removed by the next local stage into the same directory.
* Idempotent: a valid store with the same content, chunking, codec and augment parameters is
  reused; a store with other parameters is never overwritten silently.
* ``augment=N`` appends N warped copies of the training set (:mod:`kmdask.data.augment`).
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import secrets
import shutil
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kmdask.data.augment import augment_params, train_rows
from kmdask.data.idx import IMAGE_SIDE, check_split, digests, parse_idx, read_idx_bytes
from kmdask.data.location import Location, bucket_exists, location
from kmdask.data.registry import REGISTRY, DatasetSpec, FileSpec, get_spec
from kmdask.data.store import STORE_FORMAT, is_store, store_info
from kmdask.errors import ConfigError, DataError

log = logging.getLogger(__name__)

CODECS = ("lz4", "zstd", "none")
ROLES = {"images": ("train", "images"), "labels": ("train", "labels"),
         "test-images": ("test", "images"), "test-labels": ("test", "labels")}
_PROGRESS_EVERY = 2.0  # seconds between progress lines


@dataclass(frozen=True)
class StageResult:
    """Outcome of a stage: where the store is (a path, or a URL on object storage), whether an
    existing one was reused, seconds and bytes stored."""

    path: Path | str
    reused: bool
    seconds: float
    nbytes: int


# ---------------------------------------------------------------------------------------------
# where the store goes


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
            log.info("kmdask: removing stale temporary %s", tmp)
            shutil.rmtree(tmp, ignore_errors=True)


def _prepare_out(out: Location) -> None:
    """Check that ``out`` can be written before anything is read or downloaded."""
    if out.local:
        _check_out_parent(out.path.parent)
        if out.path.parent.is_dir():
            _clean_stale(out.path.parent, out.name)
    elif not bucket_exists(out):
        raise DataError(f"{out}: bucket {out.fs_path().split('/', 1)[0]!r} does not exist")


def _size(loc: Location) -> int:
    if loc.local:
        return sum(f.stat().st_size for f in loc.path.rglob("*") if f.is_file())
    return int(loc.fs().du(loc.fs_path()))


def _publish(tmp: Location, out: Location) -> None:
    """Move a complete store from ``tmp`` to ``out`` (an OSError if ``out`` appeared)."""
    if out.local:
        os.rename(tmp.url, out.url)  # atomic on one file system; fails if out exists
        return
    if out.exists():
        raise FileExistsError(out.url)
    # Object stores have no rename: copy (server-side, concurrently) every object but the
    # root metadata, then that one. Until it lands, `out` is not a store (is_store reads it).
    fs, src, dst = tmp.fs(), tmp.fs_path(), out.fs_path()
    marker = f"{src}/zarr.json"
    objects = [o for o in sorted(fs.find(src)) if o != marker]
    try:
        if objects:
            fs.copy(objects, [dst + o[len(src):] for o in objects])
        fs.copy(marker, dst + "/zarr.json")
    except BaseException:
        if not out.join("zarr.json").exists():  # ours, never published: leave no debris
            _discard(out)
        raise
    _discard(tmp)


def _discard(tmp: Location) -> None:
    if tmp.local:
        shutil.rmtree(tmp.url, ignore_errors=True)
    else:
        try:
            tmp.fs().rm(tmp.fs_path(), recursive=True)
        except OSError:
            log.warning("could not remove the temporary %s", tmp)


# ---------------------------------------------------------------------------------------------
# what the store holds


def _wanted(spec: DatasetSpec, chunk_rows: int, compressor: str, augment: dict[str, Any],
            verified: bool) -> dict[str, Any]:
    """The attributes that decide whether an existing store can be reused."""
    files = {f.name: {"split": f.split, "kind": f.kind, "md5": f.md5, "sha256": f.sha256}
             for f in spec.files}
    return {"dataset": spec.name, "files": files, "chunk_rows": chunk_rows,
            "compressor": compressor, "augment": augment,
            "image_shape": list(spec.image_shape), "verified": verified}


def _check_existing(out: Location, wanted: dict[str, Any], n_rows: dict[str, int]) -> None:
    """Return when ``out`` is a reusable store, else raise a DataError saying how to fix it."""
    if not is_store(out):
        hint = "" if out.local else (" (a stage interrupted while publishing leaves no root "
                                     "zarr.json)")
        raise DataError(f"{out}: exists and is not a kmdask store{hint}; remove it or choose "
                        "another --out")
    info = store_info(out)
    info["files"] = _strip(info.get("files"))
    info.setdefault("image_shape", [IMAGE_SIDE, IMAGE_SIDE])  # stores older than the key
    info.setdefault("verified", True)
    diff = [k for k, v in wanted.items() if info.get(k) != v]
    if diff:
        what = ", ".join(f"{k} {info.get(k)!r} (wanted {wanted[k]!r})" if k != "files"
                         else "files (different checksums)" for k in diff)
        raise DataError(f"{out}: is a kmdask store with different parameters: {what}; remove "
                        "it or choose another --out")
    import zarr

    width = int(np.prod(wanted["image_shape"]))
    try:
        for split, n in n_rows.items():
            for kind, shape in (("images", (n, width)), ("labels", (n,))):
                arr = zarr.open_array(store=out.zarr_store(), path=f"{split}/{kind}", mode="r")
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
    if split != "train" or n == images.shape[0]:
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


def _write_store(tmp: Location, spec: DatasetSpec, files: dict[str, bytes],
                 attrs: dict[str, Any]) -> None:
    import zarr

    chunk_rows, copies = attrs["chunk_rows"], attrs["augment"]["copies"]
    seed = attrs["augment"].get("seed", 0)
    width = int(np.prod(spec.image_shape))
    root = zarr.open_group(store=tmp.zarr_store(read_only=False), mode="w-", zarr_format=3)
    for split in spec.splits:
        img_f, lab_f = spec.file(split, "images"), spec.file(split, "labels")
        images = parse_idx(files[img_f.name], img_f.name).reshape(-1, width)
        labels = parse_idx(files[lab_f.name], lab_f.name)
        n = images.shape[0] * (copies + 1 if split == "train" else 1)
        group = root.create_group(split)
        # write_empty_chunks: every chunk exists on disk, so a missing file means damage
        opts: dict[str, Any] = {"dtype": "uint8", "fill_value": 0,
                                "compressors": _compressors(attrs["compressor"]),
                                "config": {"write_empty_chunks": True}}
        img_arr = group.create_array("images", shape=(n, width), chunks=(chunk_rows, width),
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


def _check_params(chunk_rows: Any, compressor: Any, augment: Any) -> None:
    if not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ConfigError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
    if compressor not in CODECS:
        raise ConfigError(f"compressor must be one of {', '.join(CODECS)}, got {compressor!r}")
    if not isinstance(augment, int) or augment < 0:
        raise ConfigError(f"augment must be an integer >= 0, got {augment!r}")


def _stage(spec: DatasetSpec, out: Location, fetch: Callable[[], tuple[dict, str]],
           chunk_rows: int, compressor: str, augment: int, seed: int,
           verified: bool) -> StageResult:
    """Reuse a valid store at ``out``, or fetch the files and write one atomically.

    ``fetch()`` returns (the decompressed IDX bytes by file name, where they came from)."""
    from kmdask import __version__
    from kmdask.data.sources import describe

    t0 = time.perf_counter()
    if augment and spec.image_shape != (IMAGE_SIDE, IMAGE_SIDE):
        raise ConfigError(f"augment needs {IMAGE_SIDE}x{IMAGE_SIDE} images; {spec.name} has "
                          f"{spec.image_shape[0]}x{spec.image_shape[1]}")
    wanted = _wanted(spec, chunk_rows, compressor, augment_params(augment, seed), verified)
    n_rows = {s: spec.n_rows(s) * (augment + 1 if s == "train" else 1) for s in spec.splits}
    _prepare_out(out)
    if out.exists() or (out.local and out.path.is_symlink()):
        _check_existing(out, wanted, n_rows)
        log.info("kmdask: reusing valid store at %s", out)
        return StageResult(_shown(out), True, time.perf_counter() - t0, _size(out))
    files, source = fetch()
    attrs = {
        "kmdask_store": STORE_FORMAT, **wanted,
        "files": {n: {**f, "nbytes": len(files[n])} for n, f in wanted["files"].items()},
        "splits": n_rows, "source": source, "kmdask_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    tmp = out.parent().join(f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    if out.local:
        try:
            out.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DataError(f"cannot write output directory {out.path.parent}: "
                            f"{exc.strerror or exc}") from None
    try:
        log.info("kmdask: writing %s to %s", spec.name, describe(tmp.url))
        _write_store(tmp, spec, files, attrs)
        _publish(tmp, out)
    except OSError as exc:
        _discard(tmp)
        if out.exists() and is_store(out):  # a concurrent stage finished first
            _check_existing(out, wanted, n_rows)
            log.info("kmdask: reusing valid store at %s (staged concurrently)", out)
            return StageResult(_shown(out), True, time.perf_counter() - t0, _size(out))
        raise DataError(f"cannot write {out}: {getattr(exc, 'strerror', None) or exc}") \
            from None
    except BaseException:
        _discard(tmp)
        raise
    seconds = time.perf_counter() - t0
    nbytes = _size(out)
    log.info("kmdask: staged %s at %s (%.1f MiB, %.1f s)", spec.name, out, nbytes / 2**20,
             seconds)
    return StageResult(_shown(out), False, seconds, nbytes)


def _shown(out: Location) -> Path | str:
    return out.path if out.local else out.url


def stage_dataset(dataset: str, out: str | Path | None = None,
                  source: str | Path | None = None, chunk_rows: int = 10_000,
                  compressor: str = "lz4", augment: int = 0, seed: int = 0,
                  storage_options: dict | None = None) -> StageResult:
    """Find verified IDX files for a data set kmdask knows and write them to a zarr store.

    Parameters
    ----------
    dataset : str
        Registry name ("mnist", "fashion-mnist").
    out : path or URL, optional
        Where the store goes: a path (default ``data/<dataset>.zarr``, or
        ``data/<dataset>-aug<N>.zarr`` with augment) or an ``s3://`` / ``gs://`` URL.
    source : directory or URL prefix, optional
        Tried alone (see :mod:`kmdask.data.sources`); None searches.
    chunk_rows : int
        Rows per zarr chunk.
    compressor : {"lz4", "zstd", "none"}
        Chunk codec (blosc).
    augment, seed : int
        Append ``augment`` warped copies of the training set drawn from ``seed``.
    storage_options : dict, optional
        fsspec options for an object-storage ``out`` (credentials, endpoint).
    """
    from kmdask.data.sources import find_dataset

    spec = get_spec(dataset)
    _check_params(chunk_rows, compressor, augment)
    if out is None:
        out = Path("data") / (f"{dataset}-aug{augment}.zarr" if augment else f"{dataset}.zarr")

    def fetch() -> tuple[dict, str]:
        found = find_dataset(dataset, source)
        return found.files, found.source

    return _stage(spec, location(out, storage_options), fetch, chunk_rows, compressor, augment,
                  seed, verified=True)


def stage_files(name: str, images: str | Path, labels: str | Path,
                test_images: str | Path | None = None, test_labels: str | Path | None = None,
                *, sha256: dict[str, str] | None = None, out: str | Path | None = None,
                chunk_rows: int = 10_000, compressor: str = "lz4", augment: int = 0,
                seed: int = 0, storage_options: dict | None = None) -> StageResult:
    """Stage any IDX image set (gz or raw): train images and labels, optionally a test split.

    Images may have any height x width (rows are height * width pixels). With ``sha256``
    (by role: ``images``, ``labels``, ``test-images``, ``test-labels``) each named file must
    match; a set whose files match a data set kmdask knows counts as verified too; otherwise
    the computed checksums are recorded and the store is marked unverified (never invented).

    Parameters
    ----------
    name : str
        The data set's name (``data/<name>.zarr`` by default; it names the set in figures).
    images, labels, test_images, test_labels : path
        The IDX files.
    sha256 : dict, optional
        Expected sha256 of the decompressed bytes, by role.
    out, chunk_rows, compressor, augment, seed, storage_options
        As for :func:`stage_dataset`.
    """
    from kmdask.data.sources import describe

    if not name or not all(ch.isalnum() or ch in "-_." for ch in name) or name[0] in "._":
        raise ConfigError(f"data set name: use letters, digits, '-', '_' and '.' (not first: "
                          f"'.', '_'), got {name!r}")
    if (test_images is None) != (test_labels is None):
        raise ConfigError("give both --test-images and --test-labels, or neither")
    _check_params(chunk_rows, compressor, augment)
    sha256 = dict(sha256 or {})
    for role, value in sha256.items():
        if role not in ROLES:
            raise ConfigError(f"--sha256 {role}=...: unknown file role (roles: "
                              f"{', '.join(ROLES)})")
        if not (len(value) == 64 and all(c in "0123456789abcdef" for c in value.lower())):
            raise ConfigError(f"--sha256 {role}={value}: not a sha256 (64 hex digits)")
    paths = {"images": images, "labels": labels, "test-images": test_images,
             "test-labels": test_labels}
    paths = {r: Path(p) for r, p in paths.items() if p is not None}
    for role in sha256:
        if role not in paths:
            raise ConfigError(f"--sha256 {role}=...: no {role} file given")
    data = {r: read_idx_bytes(p) for r, p in paths.items()}
    arrays = {r: parse_idx(b, paths[r]) for r, b in data.items()}
    for split in ("train", "test"):
        img, lab = ("images", "labels") if split == "train" else ("test-images", "test-labels")
        if img in arrays:
            check_split(arrays[img], arrays[lab], paths[img], paths[lab], shape=None)
    if "test-images" in arrays and arrays["test-images"].shape[1:] != arrays["images"].shape[1:]:
        raise DataError(f"{paths['test-images']}: images of {arrays['test-images'].shape[1:]} "
                        f"but {paths['images']} has {arrays['images'].shape[1:]}")
    for role, want in sha256.items():
        got = hashlib.sha256(data[role]).hexdigest()
        if got != want.lower():
            raise DataError(f"{paths[role]}: sha256 {got} does not match the expected {want}")
    files = []
    for role, blob in data.items():
        split, kind = ROLES[role]
        files.append(FileSpec(paths[role].name.removesuffix(".gz"), split, kind,
                              arrays[role].shape, *digests(blob)))
    if len({f.name for f in files}) != len(files):
        raise ConfigError("the IDX files need different names (they name the files in the "
                          "store's provenance)")
    spec = DatasetSpec(name, tuple(files))
    known = {f.sha256 for s in REGISTRY.values() for f in s.files}
    verified = len(sha256) == len(files) or all(f.sha256 in known for f in files)
    if not verified:
        log.warning("%s: no checksums to verify against; the computed ones are recorded and "
                    "the store is marked unverified", name)
    if out is None:
        out = Path("data") / (f"{name}-aug{augment}.zarr" if augment else f"{name}.zarr")
    by_name = {f.name: data[r] for f, r in zip(files, data, strict=True)}
    source = ", ".join(describe(os.path.abspath(p)) for p in paths.values())
    return _stage(spec, location(out, storage_options), lambda: (by_name, source), chunk_rows,
                  compressor, augment, seed, verified)
