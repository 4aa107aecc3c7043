"""Staging into zarr: round trips, bad inputs (in-process and via the CLI), idempotence,
atomicity under SIGKILL, and augmentation. Real files and real stores in tmp_path."""

from __future__ import annotations

import gzip
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from synthdata import synth_arrays, write_idx_dir

from kmdask.data.augment import train_rows, warp_images
from kmdask.data.idx import read_idx, read_idx_bytes
from kmdask.data.staging import stage_dataset
from kmdask.data.store import is_store, open_images, open_labels, store_info, verify_store
from kmdask.errors import ConfigError, DataError

FASHION = Path("/usr/share/datasets/fashion-mnist")


def _cli(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "kmdask", "stage", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _leftovers(out: Path) -> list[str]:
    parent = out.parent
    return [p.name for p in parent.glob(f".{out.name}.tmp-*")] if parent.exists() else []


# fixtures shared with test_datasets.py (offline_env is autouse: no network, no user cache)

# ---------------------------------------------------------------------------------------------
# bad inputs: each builder returns (source, out, text the one-line error must contain)


def _small(d: Path, **override: np.ndarray) -> Path:
    """Four small (10-row) MNIST-layout files in ``d``, some replaced by ``override``."""
    arrays = synth_arrays(10, 10)
    names = {"ti": "train-images-idx3-ubyte", "tl": "train-labels-idx1-ubyte"}
    arrays.update({names[k]: v for k, v in override.items()})
    return write_idx_dir(d, arrays, gz=False)


def case_missing(tmp: Path) -> tuple[Path, Path, str]:
    (tmp / "src").mkdir()
    return tmp / "src", tmp / "new" / "o.zarr", "src/train-images-idx3-ubyte[.gz]: file not found"


def case_truncated_gz(tmp: Path) -> tuple[Path, Path, str]:
    src = _small(tmp / "src")
    data = gzip.compress((src / "train-images-idx3-ubyte").read_bytes())
    (src / "train-images-idx3-ubyte").unlink()
    (src / "train-images-idx3-ubyte.gz").write_bytes(data[: len(data) // 2])
    return src, tmp / "o.zarr", "train-images-idx3-ubyte.gz: truncated gzip stream"


def case_truncated_raw(tmp: Path) -> tuple[Path, Path, str]:
    src = _small(tmp / "src")
    p = src / "train-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-100])
    return src, tmp / "o.zarr", "train-images-idx3-ubyte: truncated data: 7756 bytes"


def case_wrong_magic(tmp: Path) -> tuple[Path, Path, str]:
    src = _small(tmp / "src")
    p = src / "train-labels-idx1-ubyte"
    p.write_bytes(b"\x12\x34" + p.read_bytes()[2:])
    return src, tmp / "o.zarr", "train-labels-idx1-ubyte: not an IDX file (magic number 0x1234"


def case_wrong_dims(tmp: Path) -> tuple[Path, Path, str]:
    src = _small(tmp / "src", ti=np.zeros((10, 28, 29), np.uint8))
    return src, tmp / "o.zarr", "train-images-idx3-ubyte: wrong image dimensions 28x29"


def case_count_mismatch(tmp: Path) -> tuple[Path, Path, str]:
    src = _small(tmp / "src", tl=np.zeros(9, np.uint8))
    return src, tmp / "o.zarr", ("train-labels-idx1-ubyte: 9 labels but "
                                 f"{src}/train-images-idx3-ubyte has 10 images")


def case_wrong_count(tmp: Path) -> tuple[Path, Path, str]:
    src = _small(tmp / "src")
    return src, tmp / "o.zarr", "train-images-idx3-ubyte: shape (10, 28, 28) but mnist"


def case_checksum(tmp: Path) -> tuple[Path, Path, str]:
    """Right shapes, wrong bytes (all zeros): only the checksum can tell."""
    arrays = {"train-images-idx3-ubyte": np.zeros((60000, 28, 28), np.uint8),
              "train-labels-idx1-ubyte": np.zeros(60000, np.uint8),
              "t10k-images-idx3-ubyte": np.zeros((10000, 28, 28), np.uint8),
              "t10k-labels-idx1-ubyte": np.zeros(10000, np.uint8)}
    src = write_idx_dir(tmp / "src", arrays, gz=True)
    return src, tmp / "o.zarr", ("train-images-idx3-ubyte.gz: checksum mismatch for mnist "
                                 "train-images-idx3-ubyte: expected sha256 ba891046e650")


def case_out_not_a_store(tmp: Path) -> tuple[Path, Path, str]:
    out = tmp / "o.zarr"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    return tmp / "unused", out, f"{out}: exists and is not a kmdask store; remove it"


def case_unwritable(tmp: Path) -> tuple[Path, Path, str]:
    # chmod cannot stop root, so make mkdir impossible instead: a parent that is a regular file
    (tmp / "afile").write_text("x")
    src = _small(tmp / "src")
    return src, tmp / "afile" / "sub" / "o.zarr", (
        f"cannot create output directory {tmp}/afile/sub: {tmp}/afile is not a directory")


BAD_CASES: dict[str, Callable[[Path], tuple[Path, Path, str]]] = {
    f.__name__.removeprefix("case_"): f for f in (
        case_missing, case_truncated_gz, case_truncated_raw, case_wrong_magic, case_wrong_dims,
        case_count_mismatch, case_wrong_count, case_checksum, case_out_not_a_store,
        case_unwritable)
}


def _assert_nothing_left(out: Path, case: str, parent_existed: bool) -> None:
    if case == "out_not_a_store":  # left untouched
        assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]
    else:
        assert not out.exists()
    assert out.parent.exists() == parent_existed  # not even the parent directory was made
    assert _leftovers(out) == []


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_in_process(tmp_path, case):
    src, out, needle = BAD_CASES[case](tmp_path)
    parent_existed = out.parent.exists()
    with pytest.raises(DataError) as exc:
        stage_dataset("mnist", out=out, source=src)
    msg = str(exc.value)
    assert needle in msg and "\n" not in msg
    _assert_nothing_left(out, case, parent_existed)


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_cli_one_line(tmp_path, case):
    src, out, needle = BAD_CASES[case](tmp_path)
    parent_existed = out.parent.exists()
    proc = _cli("--source", src, "--out", out, "-q")
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("kmdask: error: ") and needle in lines[0]
    _assert_nothing_left(out, case, parent_existed)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions; "
                    "case_unwritable covers root with a parent that is a regular file")
def test_read_only_directory_as_non_root(synth, tmp_path):
    _, src = synth
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    with pytest.raises(DataError, match=rf"output directory {ro} is not writable"):
        stage_dataset("synth", out=ro / "o.zarr", source=src)
    assert list(ro.iterdir()) == []


def test_lost_rename_race_reuses_the_winner(synth, tmp_path, monkeypatch):
    """Two stages racing for one path: the one that renames second reuses the winner's store."""
    from kmdask.data import staging

    _, src = synth
    out = tmp_path / "race.zarr"
    real = staging._write_store

    def write_then_lose(*args, **kwargs):
        real(*args, **kwargs)
        monkeypatch.setattr(staging, "_write_store", real)
        stage_dataset("synth", out=out, source=src)  # the winner, in between

    monkeypatch.setattr(staging, "_write_store", write_then_lose)
    res = stage_dataset("synth", out=out, source=src)
    assert res.reused and is_store(out) and _leftovers(out) == []
    verify_store(out)


def test_bad_parameters(synth, tmp_path):
    _, src = synth
    with pytest.raises(ConfigError, match="chunk_rows must be a positive integer, got 0"):
        stage_dataset("synth", out=tmp_path / "o.zarr", source=src, chunk_rows=0)
    with pytest.raises(ConfigError, match="compressor must be one of lz4, zstd, none"):
        stage_dataset("synth", out=tmp_path / "o.zarr", source=src, compressor="gzip")
    with pytest.raises(ConfigError, match="augment must be an integer >= 0"):
        stage_dataset("synth", out=tmp_path / "o.zarr", source=src, augment=-1)
    assert not (tmp_path / "o.zarr").exists()


# ---------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("compressor", ["lz4", "zstd", "none"])
def test_synthetic_round_trip(synth, tmp_path, compressor):
    arrays, src = synth
    res = stage_dataset("synth", out=tmp_path / "s.zarr", source=src, chunk_rows=64,
                        compressor=compressor)
    assert res.path == tmp_path / "s.zarr" and not res.reused and res.nbytes > 0
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x = open_images(res.path, split)
        assert x.chunks[0] == tuple(min(64, x.shape[0] - i) for i in range(0, x.shape[0], 64))
        want = arrays[f"{prefix}-images-idx3-ubyte"]
        np.testing.assert_array_equal(x.compute(), want.reshape(len(want), 784))
        np.testing.assert_array_equal(open_labels(res.path, split).compute(),
                                      arrays[f"{prefix}-labels-idx1-ubyte"])
    assert store_info(res.path)["compressor"] == compressor
    verify_store(res.path)
    assert _leftovers(res.path) == []


def test_real_mnist_round_trip(mnist_store, mnist_source):
    """The staged store holds exactly the IDX bytes."""
    info = store_info(mnist_store)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        raw = read_idx_bytes(mnist_source / f"{prefix}-images-idx3-ubyte.gz")
        x = open_images(mnist_store, split)
        assert x.dtype == np.uint8 and x.shape == ((len(raw) - 16) // 784, 784)
        assert x.compute().tobytes() == raw[16:]
        labels = read_idx_bytes(mnist_source / f"{prefix}-labels-idx1-ubyte.gz")
        assert open_labels(mnist_store, split).compute().tobytes() == labels[8:]
        f = info["files"][f"{prefix}-images-idx3-ubyte"]
        assert f["nbytes"] == len(raw) and len(f["md5"]) == 32
    assert open_images(mnist_store).chunks[0] == (10000,) * 6
    assert info["dataset"] == "mnist" and info["chunk_rows"] == 10000
    assert info["splits"] == {"train": 60000, "test": 10000}
    verify_store(mnist_store)


def test_idempotent_reuse_and_refusal(mnist_store, mnist_source, capsys):
    before = {p: p.stat().st_mtime_ns for p in mnist_store.rglob("*")}
    res = stage_dataset("mnist", out=mnist_store, source=mnist_source)
    assert res.reused and res.seconds < 2.0 and res.path == mnist_store
    assert f"reusing valid store at {mnist_store}" in capsys.readouterr().err
    # reuse needs no source at all: the registry checksums are compared with the store's
    assert stage_dataset("mnist", out=mnist_store, source="/nonexistent").reused
    with pytest.raises(DataError, match=r"is a kmdask store with different parameters: "
                                        r"chunk_rows 10000 \(wanted 5000\); remove it or choose"):
        stage_dataset("mnist", out=mnist_store, source=mnist_source, chunk_rows=5000)
    with pytest.raises(DataError, match=r"different parameters: compressor 'lz4'"):
        stage_dataset("mnist", out=mnist_store, compressor="none")
    with pytest.raises(DataError, match=r"different parameters: dataset 'mnist'.*files \(diff"):
        stage_dataset("fashion-mnist", out=mnist_store)
    assert {p: p.stat().st_mtime_ns for p in mnist_store.rglob("*")} == before


def test_default_out_and_stale_temporaries(synth, tmp_path, monkeypatch):
    _, src = synth
    monkeypatch.chdir(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / "data" / f".synth.zarr.tmp-{dead.pid}-0badf00d"
    live = tmp_path / "data" / f".synth.zarr.tmp-{os.getppid()}-0000beef"
    for d in (stale, live):
        (d / "train").mkdir(parents=True)
    res = stage_dataset("synth", source=src)
    assert res.path == tmp_path / "data" / "synth.zarr" and is_store(res.path)
    assert not stale.exists() and live.exists()  # a running stage's temporary is left alone
    aug = stage_dataset("synth", source=src, augment=2)
    assert aug.path == tmp_path / "data" / "synth-aug2.zarr"


def test_sigkill_midway_leaves_nothing_valid(mnist_source, tmp_path):
    out = tmp_path / "k.zarr"
    args = ["--source", mnist_source, "--out", out, "--chunk-rows", "2000", "--augment", "1"]
    proc = subprocess.Popen([sys.executable, "-m", "kmdask", "stage", *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:  # wait until chunks are being written
            tmps = list(tmp_path.glob(".k.zarr.tmp-*/train/images/c/*"))
            if len(tmps) >= 3 or proc.poll() is not None:
                break
            time.sleep(0.005)
        assert proc.poll() is None, "stage finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert not out.exists() and not is_store(out)
    assert len(_leftovers(out)) == 1  # the killed stage's temporary, not a store
    res = stage_dataset("mnist", out=out, source=mnist_source, chunk_rows=2000, augment=1)
    assert not res.reused and is_store(out) and _leftovers(out) == []
    verify_store(out)
    assert open_images(out).shape == (120000, 784)


@pytest.mark.skipif(not FASHION.is_dir(),
                    reason=f"{FASHION} absent (apt-get install dataset-fashion-mnist)")
def test_fashion_mnist_from_debian_files(tmp_path):
    res = stage_dataset("fashion-mnist", out=tmp_path / "f.zarr")
    info = store_info(res.path)
    assert info["dataset"] == "fashion-mnist" and info["source"] == str(FASHION)
    want = read_idx(FASHION / "train-images-idx3-ubyte.gz").reshape(60000, 784)
    np.testing.assert_array_equal(open_images(res.path).compute(), want)
    np.testing.assert_array_equal(open_labels(res.path, "test").compute(),
                                  read_idx(FASHION / "t10k-labels-idx1-ubyte.gz"))


# ---------------------------------------------------------------------------------------------
# augmentation


def test_warp_images_geometry():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, size=(4, 784), dtype=np.uint8)
    zero = np.zeros(4)
    np.testing.assert_array_equal(warp_images(img, zero, zero, zero), img)
    sq = img.reshape(4, 28, 28)
    shifted = warp_images(img, zero + 2, zero - 1, zero).reshape(4, 28, 28)
    np.testing.assert_array_equal(shifted[:, :27, 2:], sq[:, 1:, :26])  # right 2, up 1
    assert not shifted[:, :, :2].any() and not shifted[:, 27].any()  # zeros shifted in
    rot = warp_images(img, zero, zero, zero + np.pi / 2).reshape(4, 28, 28)
    np.testing.assert_array_equal(rot, np.rot90(sq, -1, axes=(1, 2)))
    half = warp_images(img, zero + 0.5, zero, zero).reshape(4, 28, 28).astype(int)
    mid = (sq[:, :, :-1].astype(int) + sq[:, :, 1:]) / 2  # bilinear: the mean of neighbours
    assert np.abs(half[:, :, 1:] - mid).max() <= 0.5


def _warp_reference(images, dx, dy, theta):
    """The vectorised numpy warp that made the first augmented stores (float32 throughout):
    the compiled warp must give the very same bytes, so existing stores stay valid."""
    n, s = images.shape[0], 28
    p = s + 2
    centre = (s - 1) / 2.0
    gy, gx = np.mgrid[0:s, 0:s]
    u, v = (gx.ravel() - centre).astype(np.float32), (gy.ravel() - centre).astype(np.float32)
    pad = np.zeros((n, p, p), np.float32)
    pad[:, 1:-1, 1:-1] = images.reshape(n, s, s)
    flat = pad.ravel()
    cos = np.cos(theta).astype(np.float32)[:, None]
    sin = np.sin(theta).astype(np.float32)[:, None]
    qx, qy = u - dx.astype(np.float32)[:, None], v - dy.astype(np.float32)[:, None]
    px, py = cos * qx + sin * qy + centre, cos * qy - sin * qx + centre
    x0, y0 = np.floor(px), np.floor(py)
    fx, fy = px - x0, py - y0
    xi = np.clip(x0, -1, s).astype(np.int32) + 1
    yi = np.clip(y0, -1, s).astype(np.int32) + 1
    i00 = (np.arange(n, dtype=np.int32) * p * p)[:, None] + yi * p + xi
    step_x = np.minimum(xi + 1, p - 1) - xi
    step_y = (np.minimum(yi + 1, p - 1) - yi) * p
    a, b = flat[i00], flat[i00 + step_x]
    c, d = flat[i00 + step_y], flat[i00 + step_y + step_x]
    top = a + fx * (b - a)
    return np.clip(np.rint(top + fy * (c + fx * (d - c) - top)), 0, 255).astype(np.uint8)


def test_compiled_warp_equals_the_numpy_reference_on_real_mnist(mnist_train):
    from kmdask.data.augment import augment_draws

    for copy, block in ((1, 0), (7, 3), (39, 5)):
        dx, dy, th = augment_draws(0, copy, block)
        images = mnist_train[block * 10_000:(block + 1) * 10_000][:4000]
        got = warp_images(images, dx[:4000], dy[:4000], th[:4000])
        np.testing.assert_array_equal(got, _warp_reference(images, dx[:4000], dy[:4000],
                                                           th[:4000]))


def test_augment_shape_labels_determinism(synth, tmp_path):
    arrays, src = synth
    imgs = arrays["train-images-idx3-ubyte"].reshape(250, 784)
    labels = arrays["train-labels-idx1-ubyte"]
    a = stage_dataset("synth", out=tmp_path / "a.zarr", source=src, augment=2, seed=7,
                      chunk_rows=64)
    xa = open_images(a.path).compute()
    assert xa.shape == (750, 784) and open_images(a.path, "test").shape == (50, 784)
    np.testing.assert_array_equal(xa[:250], imgs)  # originals first, unchanged
    np.testing.assert_array_equal(open_labels(a.path).compute(), np.tile(labels, 3))
    for copy in (1, 2):
        aug = xa[250 * copy:250 * (copy + 1)].astype(float)
        assert (aug != imgs).any(axis=1).mean() > 0.9  # nearly every image moved
        ratio = aug.sum(axis=1) / imgs.sum(axis=1)  # ... but kept its ink
        assert ratio.min() > 0.75 and ratio.max() < 1.1
    assert (xa[250:500] != xa[500:]).any()
    assert store_info(a.path)["augment"]["copies"] == 2
    # same seed, different chunking -> identical; other seed -> different
    b = stage_dataset("synth", out=tmp_path / "b.zarr", source=src, augment=2, seed=7,
                      chunk_rows=100)
    np.testing.assert_array_equal(open_images(b.path).compute(), xa)
    c = stage_dataset("synth", out=tmp_path / "c.zarr", source=src, augment=2, seed=8,
                      chunk_rows=64)
    xc = open_images(c.path).compute()
    np.testing.assert_array_equal(xc[:250], imgs)
    assert (xc[250:] != xa[250:]).any(axis=1).mean() > 0.9
    verify_store(c.path)
    # the rows are a pure function of (seed, row): any slice can be recomputed alone
    part, lab = train_rows(imgs, labels, 300, 333, seed=7)
    np.testing.assert_array_equal(part, xa[300:333])
    np.testing.assert_array_equal(lab, labels[50:83])


def _peak_bytes(fn: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_augment_real_mnist_memory_stays_bounded(mnist_source, tmp_path):
    """augment=2 writes 120,000 extra rows (94 MB) chunk by chunk: the peak barely moves."""
    def stage(n: int, name: str) -> Callable[[], object]:
        return lambda: stage_dataset("mnist", out=tmp_path / name, source=mnist_source,
                                     chunk_rows=5000, augment=n)
    base = _peak_bytes(stage(0, "plain.zarr"))
    aug = _peak_bytes(stage(2, "aug.zarr"))
    extra = 2 * 60000 * 784
    assert aug - base < 0.35 * extra, (base, aug)
    x = open_images(tmp_path / "aug.zarr")
    assert x.shape == (180000, 784) and x.chunks[0] == (5000,) * 36
    np.testing.assert_array_equal(x[:60000].compute(),
                                  open_images(tmp_path / "plain.zarr").compute())
    lab = open_labels(tmp_path / "aug.zarr").compute()
    np.testing.assert_array_equal(lab[120000:], lab[:60000])
