"""Bad input, table-driven, through the command line: each case gives a one-line error (the
last line on stderr, no traceback), a non-zero exit, and writes nothing. Every case runs
in-process (``kmdask.cli.main``, no traceback can escape unseen: a stray exception fails the
test); a few also through the real console script."""

from __future__ import annotations

import gzip
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from conftest import run_kmdask

FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
         "t10k-labels-idx1-ubyte")


def _source(tmp: Path, mnist_source: Path, name: str, data: bytes, gz: bool) -> Path:
    """A source directory of the real files, with ``name`` replaced by ``data``."""
    src = tmp / "src"
    src.mkdir()
    for f in FILES:
        if f != name:
            (src / f"{f}.gz").symlink_to(mnist_source / f"{f}.gz")
    (src / (f"{name}.gz" if gz else name)).write_bytes(data)
    return src


def _labels(mnist_source: Path) -> bytes:
    with gzip.open(mnist_source / "train-labels-idx1-ubyte.gz") as f:
        return f.read()


def _stage_case(make: Callable[[bytes], tuple[bytes, bool]], file: str = FILES[1]):
    def build(tmp: Path, mnist_source: Path, store: Path) -> list[str]:
        data, gz = make(_labels(mnist_source))
        src = _source(tmp, mnist_source, file, data, gz)
        return ["stage", "--source", str(src), "--out", str(tmp / "out.zarr")]
    return build


def _job_case(text: str):
    def build(tmp: Path, mnist_source: Path, store: Path) -> list[str]:
        (tmp / "job.yaml").write_text(text.replace("STORE", str(store)))
        return ["run", str(tmp / "job.yaml")]
    return build


def _store_case(dtype: str, cols: int):
    def build(tmp: Path, mnist_source: Path, store: Path) -> list[str]:
        import numpy as np
        import zarr

        bad = tmp / "bad.zarr"
        shutil.copytree(store, bad)
        shutil.rmtree(bad / "train" / "images")
        zarr.create_array(store=str(bad), name="train/images", shape=(60000, cols),
                          dtype=np.dtype(dtype), chunks=(10000, cols))
        (tmp / "job.yaml").write_text(f"job: j\ndata: {{store: {bad}}}\nfits:\n"
                                      "  - {name: a, k: 3}\n")
        return ["run", str(tmp / "job.yaml")]
    return build


def _array_case(make: Callable[[Path], dict]):
    """A job whose data.array (and labels, image_shape) ``make`` writes and returns."""
    def build(tmp: Path, mnist_source: Path, store: Path) -> list[str]:
        data = make(tmp)
        (tmp / "job.yaml").write_text(yaml.safe_dump({"job": "j", "data": data,
                                                      "fits": [{"name": "a", "k": 3}]}))
        return ["run", str(tmp / "job.yaml")]
    return build


def _npy(tmp: Path, name: str, arr) -> str:
    import numpy as np

    np.save(tmp / name, arr)
    return str(tmp / name)


def _rows(n: int = 100, d: int = 784, dtype: str = "uint8"):
    import numpy as np

    return np.arange(n * d).reshape(n, d).astype(dtype)


def _truncated(tmp: Path) -> dict:
    path = _npy(tmp, "x.npy", _rows())
    with open(path, "r+b") as f:
        f.truncate(50_000)
    return {"array": path}


def _own_idx_case(sha: str):
    def build(tmp: Path, mnist_source: Path, store: Path) -> list[str]:
        return ["stage", "--name", "own", "--images",
                str(mnist_source / "t10k-images-idx3-ubyte.gz"), "--labels",
                str(mnist_source / "t10k-labels-idx1-ubyte.gz"), "--sha256", sha,
                "--out", str(tmp / "own.zarr")]
    return build


def _report_case(kind: str):
    def build(tmp: Path, mnist_source: Path, store: Path) -> list[str]:
        run = tmp / "runs" / "j" / "abc"
        if kind == "incomplete":
            (run / "fits").mkdir(parents=True)  # a run that died before its manifest
        return ["report", str(run), "--out", str(tmp / "report")]
    return build


_OK = "job: j\ndata: {store: STORE}\n"
CASES = {
    # IDX and gzip files
    "wrong IDX magic": _stage_case(lambda b: (b"\x00\x00\x08\x05" + b[4:], False)),
    "truncated raw IDX": _stage_case(lambda b: (b[:-100], False)),
    "truncated gz": _stage_case(lambda b: (gzip.compress(b)[:-20], True)),
    "not gzip at all": _stage_case(lambda b: (b"\x1f\x8bthis is not gzip", True)),
    "checksum mismatch": _stage_case(lambda b: (b[:-1] + bytes([(b[-1] + 1) % 256]), False)),
    "images/labels count mismatch": _stage_case(
        lambda b: (b[:4] + (59999).to_bytes(4, "big") + b[8:-1], False)),
    # stores
    "store with wrong dtype": _store_case("float32", 784),
    "store with wrong shape": _store_case("uint8", 783),
    # your own data
    "unknown scheme (stage)": lambda tmp, src, store: [
        "stage", "--source", str(src), "--out", "ftp://host/mnist.zarr"],
    "unknown scheme (job)": _job_case("job: j\ndata: {store: 'hdfs://nn/mnist.zarr'}\n"
                                      "fits:\n  - {name: a, k: 3}\n"),
    "--sha256 mismatch": _own_idx_case("images=" + "0" * 64),
    "--sha256 not hex": _own_idx_case("images=xyz"),
    "--sha256 without role": _own_idx_case("0" * 64),
    "array not 2-D": _array_case(lambda t: {"array": _npy(t, "x.npy", _rows().reshape(
        100, 28, 28))}),
    "array of int64": _array_case(lambda t: {"array": _npy(t, "x.npy", _rows(dtype="int64"))}),
    "truncated .npy": _array_case(_truncated),
    "labels of the wrong length": _array_case(lambda t: {
        "array": _npy(t, "x.npy", _rows()), "labels": _npy(t, "y.npy", _rows(99, 1)[:, 0])}),
    "image shape not the row length": _array_case(lambda t: {
        "array": _npy(t, "x.npy", _rows()), "image_shape": [20, 20]}),
    "missing array": _array_case(lambda t: {"array": str(t / "nope.zarr")}),
    "a store named as an array": lambda tmp, src, store: _array_case(
        lambda t: {"array": str(store)})(tmp, src, store),
    "error cases on an array": _job_case("job: j\ndata: {array: x.npy}\nclassifier: {}\n"
                                         "fits:\n  - {name: a, k: 3}\n"),
    "array and store both": _job_case("job: j\ndata: {store: STORE, array: x.npy}\n"
                                      "fits:\n  - {name: a, k: 3}\n"),
    # job specs
    "YAML does not parse": _job_case("job: j\nfits: [\n"),
    "unknown key": _job_case(_OK + "fits:\n  - {name: a, k: 3, colour: red}\n"),
    "wrong type": _job_case(_OK + "fits:\n  - {name: a, k: 3, trials: many}\n"),
    "K < 1": _job_case(_OK + "fits:\n  - {name: a, k: 0}\n"),
    "K > rows": _job_case(_OK + "fits:\n  - {name: a, k: 50, rows: 20}\n"),
    "rows > available": _job_case(_OK + "fits:\n  - {name: a, k: 3, rows: 60001}\n"),
    "zero iterations": _job_case(_OK + "fits:\n  - {name: a, k: 3, iterations: 0}\n"),
    "negative trials": _job_case(_OK + "fits:\n  - {name: a, k: 3, trials: -1}\n"),
    "unknown dataset": _job_case("job: j\ndata: {dataset: cifar10}\nfits:\n  - {name: a, k: 3}\n"),
    "missing job file": lambda tmp, src, store: ["run", str(tmp / "nope.yaml")],
    "missing profile": lambda tmp, src, store: _job_case(_OK + "fits:\n  - {name: a, k: 3}\n")(
        tmp, src, store) + ["--profile", "nope"],
    # reports
    "report on a missing run": _report_case("missing"),
    "report on an incomplete run": _report_case("incomplete"),
}


THROUGH_THE_SCRIPT = ("wrong IDX magic", "YAML does not parse", "report on an incomplete run")


def _check(case: str, code: int, stderr: str, tmp_path: Path, before: set) -> None:
    assert code != 0, f"{case}: exit 0\n{stderr}"
    lines = stderr.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("kmdask: error: ")]
    # progress lines may come first; the error itself is exactly one line, the last
    assert errors == lines[-1:], f"{case}: stderr:\n{stderr}"
    assert "Traceback" not in stderr
    written = {p for p in tmp_path.rglob("*")} - before
    assert not written, f"{case}: wrote {sorted(map(str, written))}"


def _setup(case: str, tmp_path: Path, mnist_source: Path, mnist_store: Path) -> list[str]:
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(
        {"profiles": {"local": {"kind": "local", "n_workers": 1}}}))
    return CASES[case](tmp_path, mnist_source, mnist_store)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, tmp_path, mnist_source, mnist_store, monkeypatch, capsys):
    from kmdask.cli import main

    args = _setup(case, tmp_path, mnist_source, mnist_store)
    before = {p for p in tmp_path.rglob("*")}
    monkeypatch.chdir(tmp_path)
    code = main(args)
    _check(case, code, capsys.readouterr().err, tmp_path, before)


@pytest.mark.parametrize("case", THROUGH_THE_SCRIPT)
def test_bad_input_through_the_console_script(case, tmp_path, mnist_source, mnist_store):
    args = _setup(case, tmp_path, mnist_source, mnist_store)
    before = {p for p in tmp_path.rglob("*")}
    r = run_kmdask(*args, cwd=tmp_path, timeout=120)
    _check(case, r.returncode, r.stderr, tmp_path, before)
