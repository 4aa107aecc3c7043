"""IDX parsing, the registry, and opening staged stores (real files on disk)."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest
from synthdata import synth_arrays, write_idx_dir  # noqa: E402,F401

from kmdask.data import idx, store
from kmdask.data.idx import check_split, digests, idx_bytes, parse_idx, read_idx
from kmdask.data.registry import get_spec
from kmdask.data.store import data_fingerprint, open_images, open_labels, store_info, verify_store
from kmdask.errors import ConfigError, DataError

# ---------------------------------------------------------------------------------------------
# IDX


@pytest.mark.parametrize("dtype, code", [("u1", 0x08), ("i1", 0x09), (">i2", 0x0B),
                                         (">i4", 0x0C), (">f4", 0x0D), (">f8", 0x0E)])
def test_idx_roundtrip_dtypes(dtype, code):
    arr = (np.arange(24) % 100).astype(dtype).reshape(2, 3, 4)
    data = idx_bytes(arr)
    assert data[:8] == bytes([0, 0, code, 3, 0, 0, 0, 2])
    assert len(data) == 4 + 3 * 4 + arr.nbytes
    back = parse_idx(data, "x")
    np.testing.assert_array_equal(back, arr)
    assert back.dtype.isnative and back.shape == (2, 3, 4)


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_gz_and_raw(tmp_path, gz):
    arrays = synth_arrays(20, 5)
    write_idx_dir(tmp_path, arrays, gz=gz)
    suffix = ".gz" if gz else ""
    img = read_idx(tmp_path / f"train-images-idx3-ubyte{suffix}")
    lab = read_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}")
    np.testing.assert_array_equal(img, arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(lab, arrays["train-labels-idx1-ubyte"])
    assert img.dtype == np.uint8 and img.shape == (20, 28, 28)


def _bad(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


GOOD = idx_bytes(np.zeros((3, 28, 28), np.uint8))


@pytest.mark.parametrize("case, data, needle", [
    ("truncated-raw", GOOD[:-10], "truncated data"),
    ("trailing", GOOD + b"\0", "trailing bytes"),
    ("wrong-magic", b"\x08\x03" + GOOD[2:], "not an IDX file (magic number 0x08030803)"),
    ("bad-ndim", GOOD[:3] + b"\x07" + GOOD[4:], "not an IDX file"),
    ("bad-dtype", GOOD[:2] + b"\x0a" + GOOD[3:], "unknown IDX data type code 0x0a"),
    ("short-header", GOOD[:9], "truncated IDX header"),
    ("tiny", b"\0\0", "too short"),
    ("zero-dim", GOOD[:4] + b"\0\0\0\0" + GOOD[8:16], "zero dimension"),
    ("truncated-gz", gzip.compress(GOOD, mtime=0)[:-20], "truncated gzip"),
    ("corrupt-gz", gzip.compress(GOOD, mtime=0)[:10] + b"garbage" * 20, "corrupt gzip"),
])
def test_read_idx_bad_inputs_name_the_file(tmp_path, case, data, needle):
    p = _bad(tmp_path, f"{case}-idx3-ubyte", data)
    with pytest.raises(DataError) as exc:
        read_idx(p)
    msg = str(exc.value)
    assert str(p) in msg and needle in msg and "\n" not in msg


def test_read_idx_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope-idx1-ubyte: file not found"):
        read_idx(tmp_path / "nope-idx1-ubyte")


def test_check_split_dimensions_and_counts():
    lab = np.zeros(3, np.uint8)
    with pytest.raises(DataError, match=r"^img: wrong image dimensions 28x29 \(expected 28x28\)"):
        check_split(np.zeros((3, 28, 29), np.uint8), lab, "img", "lab")
    with pytest.raises(DataError, match=r"^lab: 2 labels but img has 3 images"):
        check_split(np.zeros((3, 28, 28), np.uint8), lab[:2], "img", "lab")
    with pytest.raises(DataError, match=r"^img: expected uint8 images"):
        check_split(np.zeros((3, 28, 28), np.float32), lab, "img", "lab")
    with pytest.raises(DataError, match=r"^lab: expected uint8 labels"):
        check_split(np.zeros((3, 28, 28), np.uint8), np.zeros((3, 1), np.uint8), "img", "lab")
    check_split(np.zeros((3, 28, 28), np.uint8), lab, "img", "lab")


def test_registry():
    for name in ("mnist", "fashion-mnist"):
        spec = get_spec(name)
        assert spec.n_rows("train") == 60000 and spec.n_rows("test") == 10000
        assert spec.file("train", "images").shape == (60000, 28, 28)
        assert all(len(f.md5) == 32 and len(f.sha256) == 64 for f in spec.files)
    with pytest.raises(ConfigError, match="unknown dataset 'cifar'"):
        get_spec("cifar")


def test_mnist_checksums_match_shared_files(mnist_source):
    """The hard-coded registry values are those of the real decompressed files."""
    for f in get_spec("mnist").files:
        data = idx.read_idx_bytes(mnist_source / (f.name + ".gz"))
        assert digests(data) == (f.md5, f.sha256)


# ---------------------------------------------------------------------------------------------
# stores


def test_store_info_rejects_non_stores(tmp_path):
    with pytest.raises(DataError, match="no such store"):
        store_info(tmp_path / "absent.zarr")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match=r"plain: not a kmdask store \(no zarr v3 group"):
        open_images(tmp_path / "plain")
    import zarr

    zarr.open_group(str(tmp_path / "g.zarr"), mode="w", zarr_format=3).attrs["x"] = 1
    with pytest.raises(DataError, match=r"g.zarr: not a kmdask store \(zarr group without"):
        open_labels(tmp_path / "g.zarr")
    assert not store.is_store(tmp_path / "g.zarr")


def test_open_store_and_fingerprint(synth, tmp_path):
    from kmdask.data.staging import stage_dataset

    arrays, src = synth
    a = stage_dataset("synth", out=tmp_path / "a.zarr", source=src, chunk_rows=64)
    b = stage_dataset("synth", out=tmp_path / "b.zarr", source=src, chunk_rows=100,
                      compressor="none")
    x = open_images(a.path)
    assert x.dtype == np.uint8 and x.shape == (250, 784)
    assert x.chunks == ((64, 64, 64, 58), (784,))
    assert open_labels(a.path, "test").chunks == ((50,),)
    np.testing.assert_array_equal(open_labels(b.path).compute(), arrays["train-labels-idx1-ubyte"])
    with pytest.raises(DataError, match=r"a.zarr: no split 'valid' in store \(has: train, test\)"):
        open_images(a.path, "valid")
    # content-derived: same for different chunking/codec, different per split
    fa, fb = data_fingerprint(a.path, "train"), data_fingerprint(b.path, "train")
    assert fa == fb and len(fa) == 16 and int(fa, 16) >= 0
    assert data_fingerprint(a.path, "test") != fa
    aug = stage_dataset("synth", out=tmp_path / "c.zarr", source=src, augment=1)
    assert data_fingerprint(aug.path, "train") != fa
    assert data_fingerprint(aug.path, "test") == data_fingerprint(a.path, "test")


def test_verify_store_detects_corruption(synth, tmp_path):
    from kmdask.data.staging import stage_dataset

    _, src = synth
    res = stage_dataset("synth", out=tmp_path / "s.zarr", source=src, chunk_rows=100,
                        compressor="none")
    verify_store(res.path)
    chunk = res.path / "train" / "images" / "c" / "1" / "0"
    data = bytearray(chunk.read_bytes())
    data[123] ^= 0xFF
    os.chmod(chunk, 0o644)
    chunk.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"train/images: chunk 1 is corrupt \(crc32"):
        verify_store(res.path)


def test_store_attributes(synth, tmp_path):
    from kmdask.data.staging import stage_dataset

    _, src = synth
    res = stage_dataset("synth", out=tmp_path / "s.zarr", source=src)
    info = store_info(res.path)
    assert info["dataset"] == "synth" and info["chunk_rows"] == 10000
    assert info["compressor"] == "lz4" and info["augment"] == {"copies": 0}
    assert info["splits"] == {"train": 250, "test": 50}
    assert info["kmdask_version"] and info["source"] == str(src)
    f = info["files"]["train-images-idx3-ubyte"]
    assert f["split"] == "train" and f["kind"] == "images" and f["nbytes"] == 16 + 250 * 784
    meta = json.loads((res.path / "train" / "images" / "zarr.json").read_text())
    assert meta["codecs"][1]["configuration"]["cname"] == "lz4"
    assert isinstance(meta["attributes"]["chunk_crc32"], list)


def test_gzip_bomb_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(idx, "MAX_IDX_BYTES", 1 << 20)
    bomb = gzip.compress(b"\0" * (4 << 20), compresslevel=9)  # 4 MiB of zeros, ~4 KB on disk
    p = tmp_path / "train-images-idx3-ubyte.gz"
    p.write_bytes(bomb)
    with pytest.raises(DataError, match=r"decompresses to more than 1,048,576 bytes"):
        idx.read_idx_bytes(p)
    assert len(bomb) < 10_000  # the file itself is tiny
