"""Data: IDX files, the data sets kmdask knows, where their bytes come from, staging them (or
any IDX set) into chunked zarr stores, local or on object storage, opening those stores as
dask arrays, and opening arrays a user already has (zarr, .npy) in place.

Imports only :mod:`kmdask.errors`, :mod:`kmdask.log` and :mod:`kmdask.rng`.
"""
