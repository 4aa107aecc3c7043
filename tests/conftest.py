"""Shared fixtures: real MNIST (files, arrays, a staged store), a real multi-process
LocalCluster, and the command line run as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def mnist_dir() -> Path | None:
    """The directory holding the real MNIST IDX files, or None when this machine lacks it."""
    cand = os.environ.get("KMDASK_TEST_MNIST")
    paths = [Path(cand)] if cand else []
    paths.append(REPO.parent / "shared" / "data" / "mnist")
    for p in paths:
        if (p / "train-images-idx3-ubyte.gz").exists() or (p / "train-images-idx3-ubyte").exists():
            return p
    return None


@pytest.fixture(autouse=True)
def kmdask_log():
    """kmdask's progress lines on stderr, as the command line sets them up (tests read them
    with capsys)."""
    from kmdask import log

    log.setup(0)


@pytest.fixture(scope="session")
def mpl_config(tmp_path_factory) -> Path:
    """One matplotlib configuration (and font cache) for every process of the session."""
    return tmp_path_factory.mktemp("matplotlib")


@pytest.fixture(autouse=True)
def offline_env(tmp_path_factory, monkeypatch, mpl_config):
    """No test may reach the network or the user's cache: empty mirror list, no PyPI.

    Environment changes reach the subprocesses tests start, too."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
    monkeypatch.setenv("MPLCONFIGDIR", str(mpl_config))
    monkeypatch.setenv("KMDASK_MIRRORS", "")
    monkeypatch.setenv("KMDASK_NO_PYPI", "1")
    monkeypatch.delenv("KMDASK_DATA_DIR", raising=False)


@pytest.fixture()
def synth(tmp_path, monkeypatch):
    """A registered synthetic data set "synth" and a gz source directory holding it."""
    from synthdata import synth_arrays, synth_spec, write_idx_dir

    from kmdask.data import registry

    arrays = synth_arrays()
    monkeypatch.setitem(registry.REGISTRY, "synth", synth_spec("synth", arrays))
    return arrays, write_idx_dir(tmp_path / "src", arrays)


@pytest.fixture(scope="session")
def mnist_source() -> Path:
    p = mnist_dir()
    if p is None:
        pytest.skip("real MNIST not found: set KMDASK_TEST_MNIST or place ../shared/data/mnist")
    return p


@pytest.fixture(scope="session")
def mnist_train(mnist_source) -> np.ndarray:
    """The 60,000 real MNIST training images as (60000, 784) uint8, read once per session."""
    from kmdask.data.idx import read_idx

    name = "train-images-idx3-ubyte"
    path = mnist_source / f"{name}.gz"
    return read_idx(path if path.exists() else mnist_source / name).reshape(60000, 784)


@pytest.fixture(scope="session")
def mnist_store(mnist_source, tmp_path_factory) -> Path:
    """Real MNIST staged once per test session into a zarr store on disk."""
    from kmdask.data.staging import stage_dataset

    out = tmp_path_factory.mktemp("stores") / "mnist.zarr"
    stage_dataset("mnist", out=out, source=mnist_source)
    return out


@pytest.fixture(scope="session")
def client():
    """A real 2-worker x 1-thread LocalCluster (worker processes), shared by the session."""
    from distributed import Client, LocalCluster

    cluster = LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address="127.0.0.1:0",
        host="127.0.0.1",
        memory_limit="4GiB",
    )
    c = Client(cluster)
    yield c
    c.close()
    cluster.close()


def run_kmdask(*args: str, cwd: Path, timeout: float = 600,
               **kwargs) -> subprocess.CompletedProcess:
    """``python -m kmdask ARGS`` in ``cwd``, as a user runs it (text output captured)."""
    return subprocess.run([sys.executable, "-m", "kmdask", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, **kwargs)
