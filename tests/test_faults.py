"""Faults injected into real files and processes: damaged stores, lost workers, killed drivers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kmdask import KMeans
from kmdask.datasets import open_images
from kmdask.errors import DataError


@pytest.fixture()
def damaged_store(mnist_store, tmp_path) -> Path:
    store = tmp_path / "mnist.zarr"
    shutil.copytree(mnist_store, store)
    return store


def _chunk_file(store: Path, i: int) -> Path:
    return store / "train" / "images" / "c" / str(i) / "0"


def _run_cli(tmp_path: Path, store: Path) -> subprocess.CompletedProcess:
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(
        {"profiles": {"local": {"kind": "local", "n_workers": 2}}}))
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"job": "dmg", "data": {"store": str(store)},
                                   "fits": [{"name": "a", "k": 3, "iterations": 5}]}))
    return subprocess.run([sys.executable, "-m", "kmdask", "run", str(job)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("damage", ["deleted", "corrupted", "zeroed"])
def test_damaged_chunk_stops_the_fit_naming_store_and_chunk(damaged_store, tmp_path, damage,
                                                            client):
    f = _chunk_file(damaged_store, 3)
    if damage == "deleted":
        f.unlink()  # zarr alone would silently read zeros here
    elif damage == "corrupted":
        data = bytearray(f.read_bytes())
        data[len(data) // 2 : len(data) // 2 + 64] = b"\x00" * 64
        f.write_bytes(bytes(data))
    else:  # a valid chunk of the wrong content: only the checksum can tell
        import zarr

        arr = zarr.open_array(store=str(damaged_store), path="train/images", mode="r+")
        arr[30_000:30_010] = 0
    with pytest.raises(DataError, match=r"train/images: chunk 3 (is corrupt|unreadable)"):
        KMeans(3, max_iter=3).fit(open_images(damaged_store))
    r = _run_cli(tmp_path, damaged_store)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1].startswith("kmdask: error: ")
    assert "Traceback" not in r.stderr
    assert f"{damaged_store}/train/images: chunk 3" in r.stderr
    assert not list((tmp_path / "runs").glob("dmg/[!.]*/manifest.json"))


def test_undamaged_copy_runs(damaged_store, tmp_path):
    r = _run_cli(tmp_path, damaged_store)
    assert r.returncode == 0, r.stderr
    m = json.loads((Path(tmp_path / r.stdout.strip()) / "manifest.json").read_text())
    assert m["status"] == "complete"
