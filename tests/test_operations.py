"""Running unattended: the exit codes a scheduler acts on (`kmdask --help`), and a run whose
disk fills up mid-run (a real tmpfs, mounted by the test as root)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import yaml
from conftest import address_profile, checkpoint_iteration, kmdask_main, run_kmdask, unavailable

from kmdask.errors import EXIT_CODES


def test_exit_codes_are_documented_in_help_and_docs():
    out = run_kmdask("--help", cwd=Path.cwd()).stdout
    docs = (Path(__file__).resolve().parents[1] / "docs" / "operations.md").read_text()
    for code, meaning in EXIT_CODES.items():
        assert f"  {code:<4} {meaning}" in out
        assert f"| {code} |" in docs, code


@contextlib.contextmanager
def _tmpfs(path: Path, size: str) -> Iterator[None]:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        unavailable(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}): "
                    "needs root and mount rights; .ci/run has both")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _job(workdir: Path, store: Path, name: str, fits: list[dict]) -> Path:
    p = workdir / f"{name}.yaml"
    p.write_text(yaml.safe_dump({"job": "full", "data": {"store": str(store)}, "fits": fits}))
    return p


SMALL = [{"name": "a", "algorithm": "scalable", "rows": 2000, "k": [3], "trials": 1,
          "iterations": 10}]
BIGGER = [{"name": "a", "algorithm": "scalable", "rows": 30000, "k": [6, 7, 8], "trials": 2,
           "iterations": 30, "tol": 0.0}]


def test_full_disk_exits_5_keeps_the_previous_run_and_resumes(tmp_path, mnist_store, client,
                                                              capsys):
    from kmdask.batch.runner import run_job
    from kmdask.batch.spec import load_job

    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump({"default": "local", "profiles": {
        "local": {"kind": "local", "n_workers": 2, "threads_per_worker": 1,
                  "memory_limit": "2GiB"}}}))
    # the undisturbed run, on the session's cluster (results do not depend on the cluster)
    ref = run_job(load_job(_job(tmp_path, mnist_store, "bigger", BIGGER)),
                  address_profile(client.scheduler.address), runs_dir=tmp_path / "ref")
    runs = tmp_path / "runs"
    with _tmpfs(runs, "6m"):
        # in-process, on the session's cluster: the disk is what this test is about (the
        # command line's own process and LocalCluster are covered elsewhere)
        on = ("--address", client.scheduler.address)
        first = kmdask_main(capsys, "run", _job(tmp_path, mnist_store, "small", SMALL), *on,
                            cwd=tmp_path)
        assert first.returncode == 0, first.stderr
        latest = runs / "full" / "latest"
        before = {p: p.read_bytes() for p in latest.resolve().rglob("*") if p.is_file()}
        target = os.readlink(latest)
        st = os.statvfs(runs)
        filler = runs / "filler"
        filler.write_bytes(b"\0" * (st.f_bavail * st.f_frsize - 400_000))

        full = kmdask_main(capsys, "run", _job(tmp_path, mnist_store, "bigger", BIGGER), *on,
                           cwd=tmp_path)
        assert full.returncode == 5, full.stderr
        last = full.stderr.strip().splitlines()[-1]
        assert last.startswith("kmdask: error: storage failed: [Errno 28] No space left"), last
        assert "Traceback" not in full.stderr
        # the previous complete run and `latest` are untouched; nothing new looks complete
        assert os.readlink(latest) == target
        assert {p: p.read_bytes() for p in latest.resolve().rglob("*") if p.is_file()} == before
        done = [p.parent.name for p in (runs / "full").glob("[!.]*/manifest.json")
                if not p.parent.is_symlink()]
        assert done == [Path(target).name]

        filler.unlink()
        again = kmdask_main(capsys, "run", _job(tmp_path, mnist_store, "bigger", BIGGER), *on,
                            cwd=tmp_path)
        assert again.returncode == 0, again.stderr
        a, b = ref.path, Path(tmp_path / again.stdout.strip())
        assert a.name == b.name
        for k in (6, 7, 8):
            for f in ("centers.npy", "labels.npy"):
                assert (a / "fits/a" / f"k{k}" / f).read_bytes() == \
                    (b / "fits/a" / f"k{k}" / f).read_bytes()
        m = json.loads((b / "manifest.json").read_text())
        assert m["status"] == "complete"


LOST = [{"name": "sweep", "algorithm": "scalable", "rows": 30000, "k": [8, 10], "trials": 4,
         "iterations": 40, "tol": 0.0}]


def _checkpoint_iteration(part_glob: list[Path]) -> int:
    return next((checkpoint_iteration(ck) for ck in part_glob), 0)


def test_scheduler_lost_mid_lloyd_exits_3_and_resumes_bit_identical(tmp_path, mnist_store,
                                                                    client, capsys):
    """`dask scheduler` + two `dask worker`s, the scheduler SIGKILLed mid-Lloyd: exit 3 and one
    line within the profile's timeout; a rerun on another cluster (the session's), and the
    result is bit-identical to an undisturbed run."""
    from daskutil import dask_cluster

    from kmdask.batch.runner import run_job
    from kmdask.batch.spec import load_job

    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump({"default": "sched", "profiles": {
        "sched": {"kind": "address", "address": "tcp://127.0.0.1:1", "timeout": "10s"}}}))
    job = _job(tmp_path, mnist_store, "lost", LOST)
    (tmp_path / "a").mkdir()
    procs: list[subprocess.Popen] = []
    with dask_cluster(tmp_path / "a", 2, procs_out=procs) as address:
        proc = subprocess.Popen([sys.executable, "-m", "kmdask", "run", str(job), "--address",
                                 address], cwd=tmp_path, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while _checkpoint_iteration(list(tmp_path.glob("runs/full/.*.partial/fits/sweep/"
                                                       "checkpoint.npz"))) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        os.killpg(procs[0].pid, signal.SIGKILL)
        t0 = time.monotonic()
        out, err = proc.communicate(timeout=90)
    assert proc.returncode == 3, err
    assert time.monotonic() - t0 < 30
    lines = err.strip().splitlines()
    assert "Traceback" not in err, err[-3000:]
    assert lines[-1].startswith("kmdask: error: job 'full' stopped in fit 'sweep'"), lines[-3:]
    # usually named as such; a closed stream seen before the loss is named as it came
    assert ("lost the connection to the dask scheduler" in lines[-1]
            or "CommClosedError" in lines[-1]), lines[-1]
    assert "rerun the same command to continue" in lines[-1]
    address = client.scheduler.address
    again = kmdask_main(capsys, "run", job, "--address", address, cwd=tmp_path)
    # the undisturbed run, in-process on the same cluster
    ref = run_job(load_job(job), address_profile(address), runs_dir=tmp_path / "ref")
    assert again.returncode == 0, again.stderr
    assert "resuming at iteration" in again.stderr
    a, b = ref.path, Path(tmp_path / again.stdout.strip())
    assert a.name == b.name
    for k in (8, 10):
        for f in ("centers.npy", "labels.npy"):
            assert (a / "fits/sweep" / f"k{k}" / f).read_bytes() == \
                (b / "fits/sweep" / f"k{k}" / f).read_bytes()
