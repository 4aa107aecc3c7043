"""The exceptions kmdask raises for bad input, bad configuration or failed runs.

The command line turns a :class:`KmdaskError` into a single line on stderr and a non-zero exit;
anything else escaping is a bug. Bad parameters and bad data are also ``ValueError`` s, and
using an estimator before ``fit`` is both a ``ValueError`` and an ``AttributeError``, as
scikit-learn's ``NotFittedError`` is.
"""

from __future__ import annotations


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
