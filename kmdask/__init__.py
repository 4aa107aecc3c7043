"""kmdask: distributed, out-of-core K-Means++ for MNIST-like image data on dask."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from kmdask.errors import ConfigError, DataError, KmdaskError

try:
    __version__ = version("kmdask")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+unknown"

__all__ = ["ConfigError", "DataError", "KMeans", "KmdaskError", "__version__", "fit_sweep"]


def __getattr__(name: str):
    # Lazy: importing kmdask (e.g. for the CLI's --help) should not import dask.
    if name in ("KMeans", "fit_sweep", "fit_models"):
        from kmdask.engine import estimator

        return getattr(estimator, name)
    raise AttributeError(name)
