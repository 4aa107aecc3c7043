"""Bring your own data: IDX sets kmdask does not know (any image size), zarr v2/v3 and .npy
arrays used where they lie, and object storage (a real S3 endpoint on loopback, moto's server
mode). Every source of the same rows gives the same centres as the staged MNIST store."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import address_profile
from daskutil import dask_cluster

from kmdask.batch.runner import run_job
from kmdask.batch.spec import parse_job
from kmdask.data.idx import idx_bytes, read_idx
from kmdask.data.store import open_images, store_info
from kmdask.errors import DataError

pytestmark = pytest.mark.mnist

ROWS = 12_000  # rows every source here holds (two chunks of the default 10,000 + 2,000)
FIT = {"name": "a", "algorithm": "scalable", "k": [4, 7], "iterations": 8, "tol": 0.0,
       "seed": 3}


def _job(data: dict, *, rows: int | None = None, figures: tuple = (), name: str = "own"):
    fit = dict(FIT, rows=rows) if rows else dict(FIT)
    return parse_job({"job": name, "data": data, "fits": [fit], "figures": list(figures)},
                     f"{name}.yaml")


def _centres(run: Path) -> dict[int, bytes]:
    return {k: (run / "fits" / "a" / f"k{k}" / "centers.npy").read_bytes() for k in FIT["k"]}


def _array(blob: bytes) -> np.ndarray:
    return np.load(io.BytesIO(blob))


@pytest.fixture(scope="module")
def profile(client) -> dict:
    """The session's LocalCluster as an ``address`` profile."""
    return address_profile(client.scheduler.address)


@pytest.fixture(scope="module")
def mnist_rows(mnist_train, mnist_source) -> tuple[np.ndarray, np.ndarray]:
    """The first ROWS real MNIST training images and labels."""
    labels = read_idx(mnist_source / "train-labels-idx1-ubyte.gz")
    return mnist_train[:ROWS], labels[:ROWS]


@pytest.fixture(scope="module")
def reference(mnist_store, profile, tmp_path_factory) -> dict[int, bytes]:
    """The job on the first ROWS rows of the staged MNIST store: what every source must give."""
    out = run_job(_job({"store": str(mnist_store)}, rows=ROWS), profile,
                  runs_dir=tmp_path_factory.mktemp("ref-runs"))
    m = json.loads((out.path / "manifest.json").read_text())
    assert m["data"]["dataset"] == "mnist" and m["data"]["image_shape"] == [28, 28]
    return _centres(out.path)


# ------------------------------------------------------------------------------------------
# IDX sets kmdask does not know


def _write_idx(directory: Path, arrays: dict[str, np.ndarray]) -> dict[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    for role, arr in arrays.items():
        p = directory / f"{role}.idx.gz"
        p.write_bytes(gzip.compress(idx_bytes(arr), compresslevel=1))
        out[role] = p
    return out


def test_stage_an_unknown_idx_set_unverified_then_verified(mnist_rows, profile, tmp_path,
                                                          capsys):
    """Inverted, reordered MNIST ("kmnist-like"): its checksums are in no registry, so it is
    staged with the computed ones recorded and marked unverified; with every --sha256 given
    it is verified."""
    from kmdask.cli import main

    images, labels = mnist_rows
    order = np.random.default_rng(0).permutation(3000)
    arrays = {"images": 255 - images[order].reshape(-1, 28, 28), "labels": labels[order],
              "test-images": 255 - images[3000:3500].reshape(-1, 28, 28),
              "test-labels": labels[3000:3500]}
    files = _write_idx(tmp_path / "src", arrays)
    args = ["stage", "--name", "kmnist-like", "--images", files["images"], "--labels",
            files["labels"], "--test-images", files["test-images"], "--test-labels",
            files["test-labels"], "--chunk-rows", "1000"]
    out = tmp_path / "k.zarr"
    assert main([*map(str, args), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    info = store_info(out)
    assert info["dataset"] == "kmnist-like" and info["verified"] is False
    assert info["image_shape"] == [28, 28] and info["splits"] == {"train": 3000, "test": 500}
    sha = {role: hashlib.sha256(idx_bytes(a)).hexdigest() for role, a in arrays.items()}
    assert sorted(f["sha256"] for f in info["files"].values()) == sorted(sha.values())
    np.testing.assert_array_equal(open_images(out, "train").compute(),
                                  arrays["images"].reshape(-1, 784))
    np.testing.assert_array_equal(open_images(out, "test").compute(),
                                  arrays["test-images"].reshape(-1, 784))
    assert main([*map(str, args), "--out", str(out)]) == 0  # an unchanged stage: reused
    assert "reusing valid store" in capsys.readouterr().err
    run = run_job(_job({"store": str(out)}), profile, runs_dir=tmp_path / "runs")
    m = json.loads((run.path / "manifest.json").read_text())
    assert m["data"]["dataset"] == "kmnist-like" and m["data"]["verified"] is False
    assert "unverified" in capsys.readouterr().err
    assert m["data"]["rows"] == 3000 and 0 < m["fits"]["a"]["results"]["7"]["nmi"] < 1

    checks = [x for role, h in sha.items() for x in ("--sha256", f"{role}={h}")]
    verified = tmp_path / "v.zarr"
    assert main([*map(str, args), *checks, "--out", str(verified)]) == 0
    assert store_info(verified)["verified"] is True


def test_any_image_size_is_staged_clustered_and_drawn(mnist_rows, profile, tmp_path):
    """MNIST padded to 32 x 32, staged from IDX, clustered; the figure draws 32 x 32 means."""
    import matplotlib.image as mpimg

    from kmdask.batch.rundir import open_run
    from kmdask.data.staging import stage_files
    from kmdask.report.clusters import draw_clusters

    images, labels = mnist_rows
    padded = np.pad(images[:2000].reshape(-1, 28, 28), ((0, 0), (2, 2), (2, 2)))
    files = _write_idx(tmp_path / "src", {"images": padded, "labels": labels[:2000]})
    store = stage_files("mnist32", files["images"], files["labels"], out=tmp_path / "p.zarr")
    assert store_info(store.path)["image_shape"] == [32, 32]
    fig = {"name": "c", "kind": "clusters", "fits": ["a"], "per_cluster": 5}
    out = run_job(_job({"store": str(store.path)}, figures=(fig,)), profile,
                  runs_dir=tmp_path / "runs")
    run = open_run(out.path)
    assert run.image_shape == (32, 32) and run.manifest["data"]["dataset"] == "mnist32"
    drawn = draw_clusters(run, run_figures(run)["c"], tmp_path)
    assert len(drawn) == 2
    for d in drawn:
        png = (mpimg.imread(d.path)[..., :3] * 255).round().astype(np.uint8)
        for t in d.means:
            v = run.model("a", t.k).centers[t.cluster].reshape(32, 32)
            assert t.rgb.shape == (32, 32, 3)
            np.testing.assert_array_equal(t.rgb[..., 0], np.rint(255 * v).astype(np.uint8))
            assert (t.rgb[:2] == 0).all() and (t.rgb[:, -2:] == 0).all()  # the padding
            tile = png[t.y:t.y + 32 * t.scale, t.x:t.x + 32 * t.scale]
            np.testing.assert_array_equal(tile, t.rgb.repeat(t.scale, 0).repeat(t.scale, 1))


def run_figures(run) -> dict:
    return {f.name: f for f in parse_job(run.manifest["spec"]).figures}


# ------------------------------------------------------------------------------------------
# arrays used where they lie


def test_jobs_run_from_npy_and_foreign_zarr_arrays(mnist_rows, profile, reference, tmp_path):
    """A .npy and zarr arrays written by zarr itself (v3 chunked in both axes, v2 in 5,000-row
    chunks), with .npy / zarr labels, are read in row chunks of 10,000 like the store: the
    centres are the store's, bit for bit. A v2 array in 3,000-row chunks is read in chunks of
    9,000 (seeding draws per chunk, so the run differs) and still clusters as well."""
    images, labels = mnist_rows
    np.save(tmp_path / "x.npy", images)
    np.save(tmp_path / "y.npy", labels.astype(np.int64))
    for name, chunks, fmt in (("x3", (2500, 392), 3), ("x2", (5000, 784), 2),
                              ("odd", (3000, 784), 2)):
        z = zarr.create_array(store=str(tmp_path / f"{name}.zarr"), shape=images.shape,
                              chunks=chunks, dtype=np.uint8, zarr_format=fmt)
        z[:] = images
    y2 = zarr.create_array(store=str(tmp_path / "y2.zarr"), shape=labels.shape,
                           chunks=(5000,), dtype=np.uint8, zarr_format=2)
    y2[:] = labels
    got = {}
    for name, data in (("npy", {"array": "x.npy", "labels": "y.npy"}),
                       ("v3", {"array": "x3.zarr", "labels": "y.npy"}),
                       ("v2", {"array": "x2.zarr", "labels": "y2.zarr"}),
                       ("odd", {"array": "odd.zarr"})):
        data = {k: str(tmp_path / v) for k, v in data.items()}
        out = run_job(_job(data, name=name), profile, runs_dir=tmp_path / "runs")
        m = json.loads((out.path / "manifest.json").read_text())
        assert m["data"]["rows"] == ROWS and m["data"]["array"] == data["array"]
        assert m["data"]["labels"] is ("labels" in data)
        assert m["data"]["image_shape"] == [28, 28]  # a square row length: taken as images
        got[name] = (out, m)
    for name in ("npy", "v3", "v2"):
        assert _centres(got[name][0].path) == reference, name
        assert 0.3 < got[name][1]["fits"]["a"]["results"]["7"]["nmi"] < 1
    odd = got["odd"][1]
    assert odd["data"]["chunks"] == [9000, 3000]
    ref_inertia = _inertia(images, _array(reference[7]))
    assert abs(_inertia(images, np.load(got["odd"][0].path / "fits/a/k7/centers.npy"))
               / ref_inertia - 1) < 0.03
    # the fingerprint is of the content in its row chunks, not of where or how it is stored
    assert got["npy"][1]["data"]["fingerprint"] == got["v3"][1]["data"]["fingerprint"]


def _inertia(images: np.ndarray, centres: np.ndarray) -> float:
    """Sum of squared distances to the nearest centre, in float64."""
    x = images.astype(np.float64) / 255
    c = centres.astype(np.float64)
    d = (x * x).sum(1)[:, None] - 2 * x @ c.T + (c * c).sum(1)[None, :]
    return float(np.maximum(d.min(1), 0).sum())


def test_array_fingerprint_is_cached_and_changed_data_reruns(mnist_rows, profile, tmp_path,
                                                             capsys):
    images, labels = mnist_rows
    x = tmp_path / "x.npy"
    np.save(x, images[:3000])
    job = _job({"array": str(x)})
    first = run_job(job, profile, runs_dir=tmp_path / "runs")
    assert "fingerprinting" in capsys.readouterr().err
    assert (tmp_path / "x.npy.kmdask.json").exists()
    again = run_job(job, profile, runs_dir=tmp_path / "runs")
    assert again.reused and again.path == first.path
    assert "fingerprinting" not in capsys.readouterr().err  # read from the cache
    m = json.loads((first.path / "manifest.json").read_text())
    assert m["data"]["labels"] is False and "nmi" not in m["fits"]["a"]["results"]["4"]

    changed = images[:3000].copy()
    changed[1234] = 255 - changed[1234]
    np.save(x, changed)
    rerun = run_job(job, profile, runs_dir=tmp_path / "runs")
    assert not rerun.reused and rerun.fingerprint != first.fingerprint

    # where the cache cannot go beside the array, it goes to the runs directory
    y = tmp_path / "ro" / "y.npy"
    y.parent.mkdir()
    np.save(y, images[:3000])
    (tmp_path / "ro" / "y.npy.kmdask.json").mkdir()  # a path kmdask cannot write a file to
    out = run_job(_job({"array": str(y)}), profile, runs_dir=tmp_path / "runs2")
    assert json.loads((out.path / "manifest.json").read_text())["data"]["fingerprint"] == \
        m["data"]["fingerprint"]  # the same content
    assert len(list((tmp_path / "runs2" / "_fingerprints").glob("*.json"))) == 1


def test_float_rows_and_divisor(mnist_rows, profile, reference, tmp_path):
    """float32 rows are used as they are; uint8 rows with data.divisor are divided by it."""
    images, _ = mnist_rows
    np.save(tmp_path / "f.npy", images.astype(np.float32) / np.float32(255))
    np.save(tmp_path / "u.npy", images)
    f = run_job(_job({"array": str(tmp_path / "f.npy")}), profile, runs_dir=tmp_path / "r")
    d = run_job(_job({"array": str(tmp_path / "u.npy"), "divisor": 1.0}), profile,
                runs_dir=tmp_path / "r")
    for k, ref in reference.items():
        want = _array(ref)
        np.testing.assert_allclose(np.load(f.path / f"fits/a/k{k}/centers.npy"), want,
                                   rtol=0, atol=1e-5)
        np.testing.assert_allclose(np.load(d.path / f"fits/a/k{k}/centers.npy"), 255 * want,
                                   rtol=0, atol=255e-5)


def test_non_square_rows_with_image_shape(mnist_rows, profile, tmp_path):
    """28 x 20 crops as a .npy with data.image_shape: the run records the shape, the figure
    draws it."""
    from kmdask.batch.rundir import open_run
    from kmdask.report.clusters import draw_clusters

    images, _ = mnist_rows
    crops = np.ascontiguousarray(images[:2000].reshape(-1, 28, 28)[:, :, 4:24]).reshape(-1, 560)
    np.save(tmp_path / "c.npy", crops)
    fig = {"name": "c", "kind": "clusters", "fits": ["a"], "per_cluster": 5}
    out = run_job(_job({"array": str(tmp_path / "c.npy"), "image_shape": [28, 20]},
                       figures=(fig,)), profile, runs_dir=tmp_path / "runs")
    run = open_run(out.path)
    assert run.image_shape == (28, 20)
    for d in draw_clusters(run, run_figures(run)["c"], tmp_path):
        for t in d.means:
            assert t.rgb.shape == (28, 20, 3)
            v = run.model("a", t.k).centers[t.cluster].reshape(28, 20)
            np.testing.assert_array_equal(t.rgb[..., 0], np.rint(255 * v).astype(np.uint8))


# ------------------------------------------------------------------------------------------
# object storage


def test_stage_to_s3_and_run_from_it(mnist_source, profile, reference, s3, tmp_path,
                                     monkeypatch, capsys):
    """`kmdask stage --out s3://...` with credentials from the environment; a job reading the
    store with credentials from its profile's storage_options gives the local store's
    centres; an array on S3 opens through the Python API with its fingerprint cached there."""
    from kmdask.cli import main
    from kmdask.data.arrays import open_array

    for k, v in s3.env.items():
        monkeypatch.setenv(k, v)
    url = s3.url("stores/mnist.zarr")
    assert main(["stage", "--source", str(mnist_source), "--out", url]) == 0
    assert capsys.readouterr().out.strip() == url
    objects = s3.objects()
    assert f"{s3.bucket}/stores/mnist.zarr/zarr.json" in objects
    assert not [o for o in objects if ".tmp-" in o]  # the temporary prefix is gone
    for k in s3.env:
        monkeypatch.delenv(k)  # from here on only the profile's options reach the endpoint

    prof = dict(profile, storage_options=s3.options)
    out = run_job(_job({"store": url}, rows=ROWS), prof, runs_dir=tmp_path / "runs")
    assert _centres(out.path) == reference
    m = json.loads((out.path / "manifest.json").read_text())
    assert m["data"]["store"] == url
    assert "testing" not in (out.path / "manifest.json").read_text()  # no credentials

    images = open_images(url, storage_options=s3.options)[:ROWS].compute()
    arr = zarr.create_array(store=s3.url("arrays/x.zarr"), storage_options=s3.options,
                            shape=images.shape, chunks=(4000, 784), dtype=np.uint8)
    arr[:] = images
    src = open_array(s3.url("arrays/x.zarr"), storage_options=s3.options)
    assert src.chunk_rows == 8000
    np.testing.assert_array_equal(src.images.compute(), images)
    assert f"{s3.bucket}/arrays/x.zarr.kmdask.json" in s3.objects()


def test_workers_without_a_shared_file_system(mnist_source, reference, s3, tmp_path,
                                              monkeypatch):
    """`dask scheduler` and two `dask worker`s, each in an empty directory of its own, with
    the credentials in their environment: a job on an S3 store ends bit-identical to the same
    job on the local store, and the driver reads no chunk (the workers read them)."""
    import s3fs

    from kmdask.data.staging import stage_dataset

    for k, v in s3.env.items():
        monkeypatch.setenv(k, v)
    url = s3.url("nfs-free/mnist.zarr")
    stage_dataset("mnist", out=url, source=mnist_source)
    s3fs.S3FileSystem.clear_instance_cache()

    driver_reads: list[str] = []
    cat_file = s3fs.S3FileSystem._cat_file

    async def counting(self, path, *args, **kwargs):
        driver_reads.append(path)
        return await cat_file(self, path, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_cat_file", counting)
    driver = tmp_path / "driver"
    driver.mkdir()
    monkeypatch.chdir(driver)
    with dask_cluster(tmp_path, 2, env=s3.env, own_dirs=True) as address:
        prof = address_profile(address)
        from distributed import Client

        with Client(address, timeout=30) as c:
            c.wait_for_workers(2, timeout=60)
            cwds = c.run(lambda: __import__("os").getcwd())
        assert len(set(cwds.values())) == 2 and str(driver) not in cwds.values()
        out = run_job(_job({"store": url}, rows=ROWS), prof, runs_dir=driver / "runs")
    assert _centres(out.path) == reference
    assert driver_reads and not [p for p in driver_reads if "/c/" in p]  # metadata only


def test_s3_objects_deleted_or_changed_after_staging(mnist_source, profile, s3, tmp_path):
    from kmdask.data.staging import stage_dataset

    url = s3.url("gone/mnist.zarr")
    stage_dataset("mnist", out=url, source=mnist_source, storage_options=s3.options)
    prof = dict(profile, storage_options=s3.options)
    fs = s3.fs
    key = f"{s3.bucket}/gone/mnist.zarr/train/images/c/1/0"  # rows 10,000-20,000
    blob = fs.cat_file(key)
    fs.rm(key)
    with pytest.raises(DataError) as ei:
        run_job(_job({"store": url}, rows=ROWS), prof, runs_dir=tmp_path / "runs")
    msg = str(ei.value)
    assert "\n" not in msg and f"{url}/train/images: chunk 1" in msg
    fs.pipe_file(key, blob[:-1] + bytes([blob[-1] ^ 1]))  # one bit changed
    with pytest.raises(DataError) as ei:
        run_job(_job({"store": url}, rows=ROWS), prof, runs_dir=tmp_path / "runs")
    assert "\n" not in str(ei.value) and f"{url}/train/images: chunk 1" in str(ei.value)
    assert not list((tmp_path / "runs").glob("own/[!.]*/manifest.json"))


def test_an_interrupted_stage_to_s3_leaves_nothing_that_looks_complete(mnist_source, s3,
                                                                       monkeypatch):
    """The copy from the temporary prefix fails half-way: the store's URL holds no store."""
    from kmdask.data import staging
    from kmdask.data.store import is_store

    url = s3.url("half/mnist.zarr")
    real_copy = type(s3.fs).copy
    calls = []

    def failing(self, *args, **kwargs):
        calls.append(args)
        if len(calls) == 2:  # the objects were copied; the root metadata never is
            raise OSError("connection reset")
        return real_copy(self, *args, **kwargs)

    monkeypatch.setattr(type(s3.fs), "copy", failing)
    with pytest.raises(DataError):
        staging.stage_dataset("mnist", out=url, source=mnist_source, storage_options=s3.options)
    monkeypatch.setattr(type(s3.fs), "copy", real_copy)
    assert len(calls) == 2 and not is_store(url, s3.options)
    assert s3.objects() == set()  # neither the copied objects nor the temporary prefix


# ------------------------------------------------------------------------------------------
# bad object-storage input: one line, a non-zero exit, nothing written (locally or remotely)


def _s3_case(kind: str, s3, tmp: Path, mnist_source: Path) -> list[str]:
    """The command line of one case; credentials come from the profile ``cloud``."""
    import yaml

    options = dict(s3.options)
    if kind.startswith("wrong credentials"):
        options.update(key="AKIAWRONGWRONGWRONG1", secret="wrong")
    (tmp / "cluster.yaml").write_text(yaml.safe_dump({"profiles": {"cloud": {
        "kind": "local", "n_workers": 1, "storage_options": options}}}))
    url = s3.url("x/mnist.zarr") if "bucket" not in kind else "s3://no-such-bucket/mnist.zarr"
    if kind.endswith("(stage)"):
        return ["stage", "--source", str(mnist_source), "--out", url, "--profile", "cloud"]
    data = {"store": url} if "store" in kind else {"array": url.replace("mnist.zarr", "x.npy")}
    (tmp / "job.yaml").write_text(json.dumps({"job": "j", "data": data,
                                              "fits": [{"name": "a", "k": 3}]}))
    return ["run", str(tmp / "job.yaml"), "--profile", "cloud"]


S3_CASES = {
    "bucket missing (stage)": "bucket 'no-such-bucket' does not exist",
    "bucket missing (job store)": "bucket 'no-such-bucket' does not exist",
    "bucket missing (job array)": "bucket 'no-such-bucket' does not exist",
    "wrong credentials (stage)": "access denied",
    "wrong credentials (job store)": "access denied",
    "wrong credentials (job array)": "access denied",
}


@pytest.mark.parametrize("case", list(S3_CASES))
def test_bad_object_storage_input(case, s3, mnist_source, tmp_path, monkeypatch, capsys):
    from moto.core.authorization import enable_iam_authentication

    from kmdask.cli import main

    args = _s3_case(case, s3, tmp_path, mnist_source)
    monkeypatch.chdir(tmp_path)
    before = {p for p in tmp_path.rglob("*")}, s3.objects()
    with enable_iam_authentication() if "credentials" in case else contextlib.nullcontext():
        code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("kmdask: error: ") and S3_CASES[case] in err[-1], err
    assert not [ln for ln in err if "Traceback" in ln] and "AKIAWRONG" not in err[-1]
    assert ({p for p in tmp_path.rglob("*")}, s3.objects()) == before
