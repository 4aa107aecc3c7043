"""Where a store or an array lives: a local path, or object storage (``s3://``, ``gs://``).

A :class:`Location` is a URL (local paths become absolute paths) plus the fsspec storage
options needed to reach it. It is small and picklable, so that dask workers open the data
themselves (no chunk passes through the driver). Credentials come from the usual places
(the environment, AWS/Google configuration files) or from a cluster profile's
``storage_options:``; they travel inside the Location but never appear in its ``repr``, in
messages or in run manifests, which name the URL only.

Object storage goes through fsspec (s3fs, gcsfs) and zarr's ``FsspecStore``: zarr's own store
for fsspec filesystems, with the async s3fs client doing concurrent chunk reads.

An object store that throttles, answers 5xx or cannot be reached is retried with exponential
backoff (:func:`retrying`) for up to ``$KMDASK_STORAGE_RETRY_SECONDS`` (default 60) on top of
botocore's and s3fs's own few quick retries, which give up within seconds; a store still
failing then is a :class:`~kmdask.errors.StorageError` (exit 5, progress saved).
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from kmdask.errors import DataError, StorageError

log = logging.getLogger(__name__)
T = TypeVar("T")

#: URL schemes kmdask opens, and the package each needs
SCHEMES = {"file": None, "s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs"}


@dataclass(frozen=True)
class Location:
    """A local path (absolute) or an object-storage URL, with its storage options.

    Use :func:`location` to make one from user input.
    """

    url: str
    options: tuple = ()  # sorted (key, value) pairs of the fsspec storage options

    @property
    def scheme(self) -> str:
        return self.url.split("://", 1)[0] if "://" in self.url else "file"

    @property
    def local(self) -> bool:
        return self.scheme == "file"

    @property
    def path(self) -> Path:
        """The local path (local locations only)."""
        return Path(self.url)

    @property
    def name(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    @property
    def storage_options(self) -> dict[str, Any]:
        return {k: _thaw(v) for k, v in self.options}

    def _fs_options(self) -> dict[str, Any]:
        opts = self.storage_options
        if self.scheme == "s3":
            # s3fs sends a HEAD before every whole-object GET to decide on a concurrent
            # download, which only pays for objects above its 50 MiB block size; chunks are a
            # few MiB, so the HEAD is a wasted round trip per chunk (measured: a pass over
            # 10k-row chunks 0.083 s -> 0.068 s on a loopback endpoint; see docs/data.md)
            opts.setdefault("max_concurrency", 1)
        return opts

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:  # the options may hold credentials: never shown
        return f"Location({self.url!r})"

    def join(self, *parts: str) -> Location:
        """A location inside this one."""
        if self.local:
            return Location(str(Path(self.url, *parts)), self.options)
        return Location("/".join([self.url.rstrip("/"), *parts]), self.options)

    def parent(self) -> Location:
        if self.local:
            return Location(str(Path(self.url).parent), self.options)
        return Location(self.url.rstrip("/").rsplit("/", 1)[0], self.options)

    def fs(self):
        """The fsspec filesystem (fsspec caches instances per process)."""
        import fsspec

        return fsspec.filesystem(self.scheme, **self._fs_options())

    def fs_path(self) -> str:
        """The path fsspec's filesystem uses (the URL without its scheme)."""
        return self.url if self.local else self.url.split("://", 1)[1]

    def exists(self) -> bool:
        if self.local:
            return os.path.lexists(self.url)
        return remote_call(self, "look it up", lambda: self.fs().exists(self.fs_path()))

    def read_bytes(self) -> bytes:
        """The object's bytes (a missing one is a FileNotFoundError)."""
        if self.local:
            return Path(self.url).read_bytes()
        return remote_call(self, "read it", lambda: self.fs().cat_file(self.fs_path()))

    def zarr_store(self, read_only: bool = True):
        """A zarr store rooted here."""
        from zarr.storage import FsspecStore, LocalStore

        if self.local:
            return LocalStore(self.url, read_only=read_only)
        return FsspecStore.from_url(self.url, storage_options=self._fs_options(),
                                    read_only=read_only)


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return ("__dict__", tuple(sorted((k, _freeze(v)) for k, v in value.items())))
    if isinstance(value, list):
        return ("__list__", tuple(_freeze(v) for v in value))
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, tuple) and len(value) == 2 and value[0] == "__dict__":
        return {k: _thaw(v) for k, v in value[1]}
    if isinstance(value, tuple) and len(value) == 2 and value[0] == "__list__":
        return [_thaw(v) for v in value[1]]
    return value


def location(where: str | Path | Location, storage_options: dict | None = None) -> Location:
    """``where`` (a path, a ``file://``, ``s3://`` or ``gs://`` URL, or a Location) as a
    :class:`Location`; storage options given here replace those of a Location.

    Raises
    ------
    DataError
        An unknown scheme, a URL without a bucket, or a scheme whose package is missing.
    """
    if isinstance(where, Location):
        if storage_options is None:
            return where
        where = where.url
    text = str(where)
    opts = tuple(sorted((k, _freeze(v)) for k, v in (storage_options or {}).items()))
    if "://" not in text:
        return Location(os.path.abspath(os.path.expanduser(text)), opts)
    scheme, rest = text.split("://", 1)
    scheme = scheme.lower()
    if scheme not in SCHEMES:
        known = ", ".join(f"{s}://" for s in SCHEMES if s != "file")
        raise DataError(f"{text}: unknown scheme {scheme!r}; kmdask reads local paths, {known}")
    if scheme == "file":
        return Location(os.path.abspath(rest), opts)
    if not rest.split("/", 1)[0]:
        raise DataError(f"{text}: no bucket in the URL (expected {scheme}://BUCKET/PATH)")
    package = SCHEMES[scheme]
    try:
        __import__(package)
    except ImportError:
        raise DataError(f"{text}: {scheme}:// needs the {package} package: pip install "
                        f"'kmdask[{'s3' if scheme == 's3' else 'gcs'}]'") from None
    return Location(f"{scheme}://{rest.rstrip('/')}", opts)


def why_missing(loc: Location, what: str) -> str:
    """Why nothing is at ``loc``: its bucket does not exist, or there is no ``what``."""
    if not loc.local and not bucket_exists(loc):
        return f"bucket {loc.fs_path().split('/', 1)[0]!r} does not exist"
    return f"no such {what}"


def bucket_exists(loc: Location) -> bool:
    """Whether the bucket of a remote location exists and can be reached with its options."""
    bucket = loc.fs_path().split("/", 1)[0]
    fs = loc.fs()
    if loc.scheme == "s3":
        # exists() answers False for a bucket it may not read; HEAD tells 404 from 403
        def call():
            return fs.call_s3("head_bucket", Bucket=bucket)
    else:
        def call():
            return fs.info(bucket)
    try:
        remote_call(loc, "reach its bucket", call)
    except FileNotFoundError:
        return False
    return True


RETRY_SECONDS_DEFAULT = 60.0
# errnos s3fs gives throttling and server errors (SlowDown, ServiceUnavailable: EBUSY;
# InternalError: EREMOTEIO), and those of failed connections
_TRANSIENT_ERRNOS = frozenset({errno.EBUSY, errno.EREMOTEIO, errno.EAGAIN, errno.ETIMEDOUT,
                               errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED})
# botocore's, aiohttp's and fsspec's names for a request that failed on the way (named, not
# imported: a local store needs none of those packages)
_TRANSIENT_NAMES = frozenset({"HTTPClientError", "EndpointConnectionError",
                              "ConnectionClosedError", "ReadTimeoutError",
                              "ConnectTimeoutError", "ClientPayloadError",
                              "ClientConnectionError", "ServerDisconnectedError",
                              "FSTimeoutError", "IncompleteRead", "ResponseParserError"})


def is_transient(exc: BaseException) -> bool:
    """Whether a storage error may pass by itself: throttling, a server error, a connection
    refused, reset or timed out (in ``exc`` or what caused it). Missing objects and denied
    access are not."""
    seen: BaseException | None = exc
    for _ in range(5):  # the error, and what it was raised from
        if seen is None:
            return False
        if isinstance(seen, (FileNotFoundError, PermissionError)):
            return False
        if isinstance(seen, (ConnectionError, TimeoutError)):
            return True
        if isinstance(seen, OSError) and seen.errno in _TRANSIENT_ERRNOS:
            return True
        if _TRANSIENT_NAMES & {c.__name__ for c in type(seen).__mro__}:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def retry_seconds() -> float:
    """How long a failing object store is retried (``$KMDASK_STORAGE_RETRY_SECONDS``)."""
    try:
        return max(0.0, float(os.environ.get("KMDASK_STORAGE_RETRY_SECONDS",
                                             RETRY_SECONDS_DEFAULT)))
    except ValueError:
        return RETRY_SECONDS_DEFAULT


def retrying(loc: Location, what: str, call: Callable[[], T]) -> T:
    """``call()``, retried with exponential backoff (0.25 s doubling to 8 s) while it fails
    transiently (:func:`is_transient`) and ``loc`` is remote, for up to :func:`retry_seconds`;
    then a one-line StorageError. Other errors pass through untouched."""
    t0 = time.monotonic()
    delay, attempt = 0.25, 1
    while True:
        try:
            return call()
        except Exception as exc:
            if loc.local or not is_transient(exc):
                raise
            waited = time.monotonic() - t0
            if waited + delay > retry_seconds():
                raise StorageError(
                    f"{loc}: cannot {what}: the object store kept failing for {waited:.0f} s "
                    f"({attempt} attempts; last: {type(exc).__name__}: {_first_line(exc)})"
                ) from None
            log.warning("%s: cannot %s (%s: %s); retrying in %.2g s", loc, what,
                        type(exc).__name__, _first_line(exc), delay)
            time.sleep(delay)
            delay, attempt = min(2 * delay, 8.0), attempt + 1


def remote_call(loc: Location, what: str, call):
    """Run ``call`` (which reaches ``loc``), retried while the store fails transiently, and
    turn its other errors into one-line DataErrors; a missing object stays a
    FileNotFoundError for the caller to word."""
    try:
        return retrying(loc, what, call)
    except FileNotFoundError:
        raise
    except PermissionError as exc:
        raise DataError(f"{loc}: cannot {what}: access denied ({_first_line(exc)}); check "
                        "the credentials (environment, AWS config, or the profile's "
                        "storage_options)") from None
    except OSError as exc:
        raise DataError(f"{loc}: cannot {what} ({type(exc).__name__}: "
                        f"{_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
