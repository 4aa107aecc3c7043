"""An object store that fails while a fit streams from it: the moto endpoint behind a
fault-injecting proxy (tests/s3proxy.py) that answers 503 SlowDown, answers slowly, or drops
every connection, reached by the real LocalCluster workers over real sockets."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import address_profile, checkpoint_iteration, kmdask_main
from s3proxy import FaultProxy

pytestmark = pytest.mark.mnist

FIT = {"name": "a", "algorithm": "scalable", "rows": 20000, "k": [5, 6], "trials": 2,
       "iterations": 12, "tol": 0.0, "persist": False}  # streamed: every pass reads the store


@pytest.fixture()
def staged(s3, mnist_source, monkeypatch, capsys) -> str:
    from kmdask.cli import main

    for k, v in s3.env.items():
        monkeypatch.setenv(k, v)
    url = s3.url("stores/mnist.zarr")
    assert main(["stage", "--source", str(mnist_source), "--out", url]) == 0
    capsys.readouterr()
    for k in s3.env:
        monkeypatch.delenv(k)
    return url


def _workdir(tmp: Path, s3, url: str, endpoint: str, extra: dict | None = None) -> Path:
    opts = dict(s3.options, endpoint_url=endpoint, **(extra or {}))
    (tmp / "cluster.yaml").write_text(yaml.safe_dump({"default": "local", "profiles": {
        "local": {"kind": "local", "n_workers": 2, "threads_per_worker": 1,
                  "memory_limit": "2GiB", "storage_options": opts}}}))
    (tmp / "job.yaml").write_text(yaml.safe_dump({"job": "remote", "data": {"store": url},
                                                  "fits": [FIT]}))
    return tmp


def _iteration(runs: Path) -> int:
    return next((checkpoint_iteration(ck) for ck in
                 runs.glob("remote/.*.partial/fits/a/checkpoint.npz")), 0)


def _start(wd: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kmdask", "run", "job.yaml"], cwd=wd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def _wait_iteration(proc: subprocess.Popen, runs: Path, n: int) -> None:
    deadline = time.monotonic() + 120
    while _iteration(runs) < n:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)


def _models(run: Path) -> dict[str, bytes]:
    return {f"{k}/{f}": (run / "fits" / "a" / f"k{k}" / f).read_bytes()
            for k in FIT["k"] for f in ("centers.npy", "labels.npy")}


def test_object_store_faults(staged, s3, tmp_path, client, capsys):
    """Failing for a while (503 SlowDown, then slow answers): retried with backoff, the fit
    ends bit-identical to an undisturbed one. Staying down: exit 5, one line, progress saved;
    the rerun once it is back resumes, bit-identical. botocore's own retries are turned off
    in the profile (s3fs's take 2 s at most), so that kmdask's retry is what is tested."""
    quick = {"config_kwargs": {"retries": {"total_max_attempts": 1}}}
    from kmdask.batch.runner import run_job
    from kmdask.batch.spec import parse_job

    for d in ("flaky", "down"):
        (tmp_path / d).mkdir()
    # the undisturbed run, on the session's cluster (results do not depend on the cluster)
    ref = run_job(parse_job({"job": "remote", "data": {"store": staged}, "fits": [FIT]},
                            "job.yaml"),
                  address_profile(client.scheduler.address, storage_options=s3.options),
                  runs_dir=tmp_path / "ref")
    want = _models(ref.path)
    with FaultProxy(s3.endpoint, delay=0.5) as proxy:
        wd = _workdir(tmp_path / "flaky", s3, staged, proxy.url, quick)
        proc = _start(wd)
        _wait_iteration(proc, wd / "runs", 2)
        proxy.mode = "error"
        time.sleep(3)
        proxy.mode = "slow"
        time.sleep(1)
        proxy.mode = "ok"
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        assert proxy.counts["error"] >= 5 and proxy.counts["slow"] >= 1, proxy.counts
        assert _models(wd / out.strip()) == want

        wd = _workdir(tmp_path / "down", s3, staged, proxy.url, quick)
        proc = _start(wd, {"KMDASK_STORAGE_RETRY_SECONDS": "3"})
        _wait_iteration(proc, wd / "runs", 2)
        proxy.mode = "down"
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 5, err
        assert time.monotonic() - t0 < 60
        assert "Traceback" not in err, err[-3000:]
        last = err.strip().splitlines()[-1]
        assert last.startswith("kmdask: error: job 'remote' stopped in fit 'a': "
                               f"{staged}: cannot read train/images chunk "), last
        assert "the object store kept failing for" in last
        assert "progress is saved in runs/remote/." in last and "resumes at iteration" in last
        assert _iteration(wd / "runs") >= 2  # the checkpoint is still there
        proxy.mode = "ok"
        again = kmdask_main(capsys, "run", "job.yaml", cwd=wd)
    assert again.returncode == 0, again.stderr
    assert "a: resuming at iteration" in again.stderr
    assert _models(wd / again.stdout.strip()) == want


def test_unreachable_store_at_the_start_is_exit_5(s3, tmp_path, monkeypatch, capsys):
    """Nothing listens at the endpoint: retried for KMDASK_STORAGE_RETRY_SECONDS, then exit 5
    and one line naming the store; no run directory is made."""
    from daskutil import free_port

    from kmdask.cli import main

    monkeypatch.setenv("KMDASK_STORAGE_RETRY_SECONDS", "1")
    wd = _workdir(tmp_path, s3, s3.url("stores/mnist.zarr"), f"http://127.0.0.1:{free_port()}",
                  {"config_kwargs": {"retries": {"total_max_attempts": 1}}})
    monkeypatch.chdir(wd)
    assert main(["run", "job.yaml"]) == 5
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("kmdask: error: s3://kmdask-test/stores/mnist.zarr/zarr.json: "
                              "cannot read it: "), err
    assert "the object store kept failing for" in err[-1]
    assert not [ln for ln in err if "Traceback" in ln]
    assert not (wd / "runs").exists()
