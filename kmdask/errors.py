"""The one exception type kmdask raises for bad input, bad config or failed runs.

The CLI turns a :class:`KmdaskError` into a single line on stderr and a non-zero exit;
anything else escaping is a bug.
"""

from __future__ import annotations


class KmdaskError(Exception):
    """A user-facing error: its message is one line that names the bad file/key/value."""

    exit_code = 2


class DataError(KmdaskError):
    """Bad or missing input data (IDX files, checksums, zarr stores)."""


class ConfigError(KmdaskError):
    """Bad job spec, cluster profile or parameter value."""


class ClusterStalled(KmdaskError):
    """The cluster cannot make progress (e.g. every worker paused by memory for too long)."""
