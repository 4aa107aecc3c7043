"""kmdask: distributed, out-of-core K-Means++ for MNIST-like image data on dask."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from kmdask.errors import ConfigError, DataError, KmdaskError

try:
    __version__ = version("kmdask")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+unknown"

__all__ = ["ConfigError", "DataError", "KmdaskError", "__version__"]
