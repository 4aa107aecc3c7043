"""Shared fixtures: real MNIST (files, arrays, a staged store), a real multi-process
LocalCluster, and the command line run as a user runs it."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


# The heaviest test files, heaviest first (seconds in one `make test`, 2026-12-02): they are
# started first, so that `-n 2 --dist loadfile` ends on small files instead of one worker
# finishing a long file while the other idles. A file missing here only runs later.
_HEAVY_FIRST = ("test_faults.py",  # 103 s
                "test_runner.py",  # 56
                "test_mccaffrey.py",  # 52
                "test_data_anywhere.py",  # 39
                "test_engine.py",  # 39
                "test_pruned.py",  # 37
                "test_cluster.py",  # 37
                "test_report.py",  # 33
                "test_storage_faults.py",  # 33
                "test_errorcases.py",  # 24
                "test_fashion.py",  # 19
                "test_staging.py",  # 19
                "test_operations.py",  # 19
                "test_submit.py",  # 15
                "test_schedule.py",  # 14
                "test_out_of_core.py",  # 14
                "test_damaged_runs.py",  # 11
                "test_browser.py",  # 10
                "test_dryrun.py")  # 8


def pytest_collection_modifyitems(items: list) -> None:
    rank = {name: i for i, name in enumerate(_HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept


def unavailable(reason: str) -> None:
    """Skip a test whose system component this machine lacks, saying what to install; under
    ``.ci/run`` (KMDASK_CI=1, which installs every component) fail instead, so CI can never
    pass by skipping."""
    if os.environ.get("KMDASK_CI") == "1":
        pytest.fail(f"{reason} (under .ci/run, which should have provided it)")
    pytest.skip(reason)


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
    from distributed import Client

    from kmdask.batch.cluster import local_cluster

    # workers forked warm, as a job's LocalCluster's are (and cheaper to start than spawned)
    with local_cluster(n_workers=2, threads_per_worker=1, dashboard_address="127.0.0.1:0",
                       host="127.0.0.1", memory_limit="4GiB") as cluster:
        # the default client, not entered as a context manager: that would make it the
        # session's *current* client too, ahead of the clients the tests' jobs connect
        c = Client(cluster)
        yield c
        c.close()


def checkpoint_iteration(ck: Path) -> int:
    """The Lloyd iteration a run's ``checkpoint.npz`` holds (0 while it is missing or being
    replaced)."""
    import json

    try:
        with np.load(ck) as z:
            return max(m["n_iter"] for m in json.loads(str(z["meta"])))
    except (OSError, ValueError, KeyError):
        return 0


def address_profile(address: str, **extra) -> dict:
    """An ``address`` profile for a running scheduler, as cluster.yaml would give it, for
    ``run_job`` (``extra``: more of its keys, e.g. ``storage_options``)."""
    return {"name": "t", "kind": "address", "address": address, "source": "test",
            "timeout": 30, **extra}


def run_kmdask(*args: str, cwd: Path, timeout: float = 600,
               **kwargs) -> subprocess.CompletedProcess:
    """``python -m kmdask ARGS`` in ``cwd``, as a user runs it (text output captured)."""
    return subprocess.run([sys.executable, "-m", "kmdask", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, **kwargs)


def kmdask_main(capsys, *args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    """``kmdask ARGS`` through the command line's ``main()`` in this process, in ``cwd``,
    for runs that need no process of their own (a rerun after a killed one): the same code
    and output, without a fresh interpreter's imports and worker server (~3.5 CPU-s); a
    LocalCluster's workers fork from this process's warm server."""
    from kmdask.cli import main

    capsys.readouterr()
    with contextlib.chdir(cwd):
        code = main([str(a) for a in args])
    got = capsys.readouterr()
    return subprocess.CompletedProcess(["kmdask", *map(str, args)], code, got.out, got.err)


# ------------------------------------------------------------------------------------------
# object storage: a real S3 endpoint on loopback (moto's server mode)


@dataclass
class S3:
    """The test endpoint: its URL, a bucket made for the test, and the options that reach it
    (what a cluster profile's ``storage_options`` would hold)."""

    endpoint: str
    bucket: str
    options: dict

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    @property
    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(**self.options)

    def objects(self) -> set[str]:
        self.fs.invalidate_cache()
        return set(self.fs.find(self.bucket))

    @property
    def env(self) -> dict[str, str]:
        """The same credentials and endpoint as environment variables (boto's usual place)."""
        return {"AWS_ACCESS_KEY_ID": self.options["key"],
                "AWS_SECRET_ACCESS_KEY": self.options["secret"],
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def moto_endpoint():
    """moto's S3 server on 127.0.0.1 at a free port, for the session."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture()
def s3(moto_endpoint, monkeypatch) -> S3:
    """An emptied endpoint with one bucket; boto finds no credentials of this machine's (no
    config files), so only what a test passes reaches the endpoint."""
    import urllib.request

    import s3fs

    urllib.request.urlopen(urllib.request.Request(f"{moto_endpoint}/moto-api/reset",
                                                  method="POST"), timeout=10).close()
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                "AWS_ENDPOINT_URL", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    s3fs.S3FileSystem.clear_instance_cache()
    opts = {"key": "testing", "secret": "testing", "endpoint_url": moto_endpoint}
    store = S3(moto_endpoint, "kmdask-test", opts)
    store.fs.mkdir(store.bucket)
    yield store
    s3fs.S3FileSystem.clear_instance_cache()
