"""Data: IDX files, the data sets kmdask knows, where their bytes come from, staging them into
chunked zarr stores, and opening those stores as dask arrays.

Imports only :mod:`kmdask.errors`, :mod:`kmdask.log` and :mod:`kmdask.rng`.
"""
