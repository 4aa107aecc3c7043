"""The exceptions kmdask raises for bad input, bad configuration or failed runs.

The command line turns a :class:`KmdaskError` into a single line on stderr and its
:attr:`~KmdaskError.exit_code` (see :data:`EXIT_CODES`); anything else escaping is a bug. Bad
parameters and bad data are also ``ValueError`` s, and
using an estimator before ``fit`` is both a ``ValueError`` and an ``AttributeError``, as
scikit-learn's ``NotFittedError`` is.
"""

from __future__ import annotations

import errno

# OSErrors that mean the storage, not the input or the cluster, failed
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES,
                            errno.EPERM, errno.EIO})


# What a scheduler script can act on (`kmdask --help`, docs/operations.md).
EXIT_CODES = {
    0: "done, or nothing to do (an unchanged job is a no-op)",
    1: "a bug in kmdask (a traceback follows; please report it)",
    2: "bad input or configuration: fix it; a rerun as it is fails the same way",
    3: "the cluster failed (workers or scheduler lost); progress is saved: rerun to resume",
    4: "another run holds the job's lock (--no-wait): it is still going",
    5: "storage failed (disk full, read-only, store unreachable); nothing was corrupted: "
       "free space or fix access, then rerun to resume",
    130: "interrupted (SIGINT, or SIGTERM as at a batch time limit); progress is saved: "
         "rerun to resume",
}


class KmdaskError(Exception):
    """A user-facing error: its message is one line that names the bad file/key/value."""

    exit_code = 2


class DataError(KmdaskError, ValueError):
    """Bad or missing input data (IDX files, checksums, zarr stores, arrays)."""


class ConfigError(KmdaskError, ValueError):
    """Bad job spec, cluster profile or parameter value."""


class NotFittedError(KmdaskError, ValueError, AttributeError):
    """An estimator used before ``fit``."""


class ClusterStalled(KmdaskError):
    """The cluster cannot make progress (e.g. every worker paused by memory for too long)."""

    exit_code = 3


class ClusterFailed(KmdaskError):
    """The cluster failed mid-run (lost workers, lost scheduler); what finished is saved."""

    exit_code = 3


class JobLocked(KmdaskError):
    """Another run holds the job's lock and the caller would not wait."""

    exit_code = 4


class StorageError(KmdaskError):
    """A write or read of the run directory or a data store failed for lack of space or
    access; files are replaced atomically, so nothing half-written is left."""

    exit_code = 5
