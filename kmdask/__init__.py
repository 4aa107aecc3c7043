"""kmdask: distributed, out-of-core K-Means++ for MNIST-like image data on dask."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from kmdask.errors import ConfigError, DataError, KmdaskError, NotFittedError

try:
    __version__ = version("kmdask")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+unknown"

__all__ = ["ConfigError", "DataError", "KMeans", "KmdaskError", "McCaffreyKMeans",
           "NotFittedError", "__version__", "fit_sweep", "open_array", "open_images",
           "open_labels", "stage_dataset", "stage_files"]

_LAZY = {"KMeans": "kmdask.engine.estimator", "fit_sweep": "kmdask.engine.estimator",
         "fit_models": "kmdask.engine.estimator",
         "McCaffreyKMeans": "kmdask.mccaffrey.estimator",
         "open_images": "kmdask.data.store", "open_labels": "kmdask.data.store",
         "open_array": "kmdask.data.arrays", "stage_dataset": "kmdask.data.staging",
         "stage_files": "kmdask.data.staging"}


def __getattr__(name: str):
    # Lazy: importing kmdask (e.g. for the CLI's --help) should not import dask.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kmdask' has no attribute {name!r}")
