"""The engine: per-chunk kernels, the executor that runs them next to the data on dask workers,
k-means|| / k-means++ seeding, fused Lloyd passes for many models, and the scikit-learn style
:class:`~kmdask.engine.estimator.KMeans`.

Imports only :mod:`kmdask.errors`, :mod:`kmdask.log` and :mod:`kmdask.rng`; never reads YAML.
"""
