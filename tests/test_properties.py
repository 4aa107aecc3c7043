"""Property-based tests: arbitrary input never crashes with anything but kmdask's own errors."""

from __future__ import annotations

import gzip
import math
import struct

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kmdask.batch.spec import parse_job
from kmdask.data.idx import decompress_idx, parse_idx
from kmdask.errors import KmdaskError

FAST = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


def _idx_like() -> st.SearchStrategy[bytes]:
    """Bytes that often look like IDX: a plausible header followed by some payload."""
    header = st.builds(
        lambda code, dims: bytes([0, 0, code, len(dims)]) + b"".join(
            struct.pack(">I", d) for d in dims),
        st.sampled_from([0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E, 0x07, 0xFF]),
        st.lists(st.integers(0, 2**32 - 1) | st.integers(0, 8), min_size=0, max_size=4),
    )
    return st.builds(lambda h, p: h + p, header, st.binary(max_size=200)) | st.binary(
        max_size=64)


@FAST
@given(_idx_like())
def test_parse_idx_returns_an_array_or_a_kmdask_error(data):
    try:
        arr = parse_idx(data, "fuzz.idx")
    except KmdaskError as exc:
        assert "fuzz.idx" in str(exc) and "\n" not in str(exc)
        return
    assert isinstance(arr, np.ndarray)
    assert 1 <= arr.ndim <= 3 and arr.size > 0


@FAST
@given(st.binary(max_size=300), st.booleans(), st.integers(0, 300))
def test_gzip_layer_returns_bytes_or_a_kmdask_error(payload, wrap, cut):
    raw = gzip.compress(payload)[:cut] if wrap else b"\x1f\x8b" + payload
    try:
        out = decompress_idx(raw, "fuzz.gz")
    except KmdaskError as exc:
        assert "fuzz.gz" in str(exc)
        return
    assert isinstance(out, bytes)


_scalars = st.none() | st.booleans() | st.integers(-5, 70_000) | st.floats(
    allow_nan=True) | st.text(max_size=12)
_keys = st.sampled_from(["job", "data", "fits", "figures", "defaults", "name", "k", "rows",
                         "iterations", "trials", "seed", "algorithm", "init", "tol", "store",
                         "dataset", "split", "kind", "samples", "persist", "from", "to",
                         "per_cluster", "threshold", "oversampling_factor", "init_rounds",
                         "description", "colour"])
_docs = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    _keys, inner, max_size=6), max_leaves=25)


def _plausible_job() -> st.SearchStrategy[dict]:
    fit = st.fixed_dictionaries(
        {"name": st.text(min_size=1, max_size=5), "k": _scalars | st.lists(_scalars, max_size=3)},
        optional={"rows": _scalars, "iterations": _scalars, "trials": _scalars,
                  "algorithm": st.sampled_from(["scalable", "mccaffrey", "x"]) | _scalars,
                  "seed": _scalars, "tol": _scalars, "persist": _scalars})
    return st.fixed_dictionaries(
        {"job": st.text(max_size=8) | _scalars, "fits": st.lists(fit, max_size=3) | _docs},
        optional={"data": _docs, "figures": _docs, "defaults": _docs})


@FAST
@given(_docs | _plausible_job())
def test_job_validator_accepts_or_names_the_problem(doc):
    try:
        job = parse_job(doc, "fuzz.yaml")
    except KmdaskError as exc:
        assert str(exc).startswith("fuzz.yaml") and "\n" not in str(exc)
        return
    assert job.fits and all(k >= 1 for f in job.fits for k in f.ks)
    assert all(f.iterations >= 1 and f.trials >= 1 for f in job.fits)
    assert all(math.isfinite(f.tol) and f.tol >= 0 for f in job.fits)
