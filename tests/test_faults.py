"""Faults injected into real files and processes: damaged stores, lost workers, killed drivers."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import address_profile, kmdask_main

from kmdask import KMeans
from kmdask.data.store import open_images
from kmdask.errors import DataError, KmdaskError


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


def _worker_pids(client) -> dict[str, int]:
    return client.run(os.getpid)


@contextlib.contextmanager
def _job_cluster(config: dict | None = None):
    """Two worker processes (under dask ``config``), forked warm as a job's are, a client, and
    an ``address`` profile for them."""
    import dask
    from distributed import Client

    from kmdask.batch.cluster import local_cluster

    with dask.config.set(config or {}), \
            local_cluster(n_workers=2, threads_per_worker=1, host="127.0.0.1",
                          dashboard_address="127.0.0.1:0") as cluster, \
            Client(cluster, set_as_default=False) as c:
        yield c, address_profile(cluster.scheduler_address)


def _killer(c, victims: str, at_iteration: int):
    """A progress callback that SIGKILLs one worker process (``victims="one"``) or every one,
    once, at ``at_iteration``; and the list of the pids it killed."""
    killed: list[int] = []

    def kill(p: dict) -> None:
        if p["iteration"] == at_iteration and not killed:
            pids = sorted(_worker_pids(c).values())
            for pid in pids[:1] if victims == "one" else pids:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

    return kill, killed


_UNDISTURBED: dict[bool, object] = {}  # persist -> the fit nobody disturbed


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("victims", "persist"), [("one", True), ("all", True), ("all", False)])
def test_workers_killed_mid_lloyd_give_identical_result(mnist_store, victims, persist):
    """SIGKILL one worker process, or every one at once, in the middle of Lloyd (the nannies
    restart them at new addresses): lost persisted chunks are recomputed, tasks meant for the
    dead workers run on the new ones, and the fit ends bit-identical. With every worker gone,
    dask would keep a task meant for a dead worker waiting for that address forever."""
    from kmdask.engine.estimator import fit_models

    X = open_images(mnist_store)[:30_000]
    kw = dict(n_init=2, random_state=5, max_iter=12, tol=0.0, persist=persist)
    with _job_cluster() as (c, _), c.as_current():
        if persist not in _UNDISTURBED:  # the same for every victim: computed once
            _UNDISTURBED[persist] = fit_models(X, [6, 8], **kw)
        ref = _UNDISTURBED[persist]
        kill, killed = _killer(c, victims, at_iteration=4)
        got = fit_models(X, [6, 8], progress=kill, **kw)
        assert len(killed) == (1 if victims == "one" else 2)
    for a, b in zip(ref.results, got.results, strict=True):
        assert np.array_equal(a.centres, b.centres)
        assert all(np.array_equal(x, y) for x, y in zip(a.labels, b.labels, strict=True))
        assert a.inertia == b.inertia and a.n_iter == b.n_iter


_MCC_UNDISTURBED: list = []  # the seed-mode fit nobody disturbed, the same for both victims


@pytest.mark.timeout(300)
@pytest.mark.parametrize("victims", ["one", "all"])
def test_mccaffrey_mode_survives_lost_workers(mnist_store, victims):
    """The original's algorithm runs on the engine's executor: SIGKILL one worker, or every
    one, between two Lloyd passes; the per-chunk labels kept on the workers are recomputed
    from their lineage and the fit ends bit-identical."""
    from kmdask.mccaffrey.fit import fit_mccaffrey

    X = open_images(mnist_store)[:20_000]
    with _job_cluster() as (c, _), c.as_current():
        if not _MCC_UNDISTURBED:
            _MCC_UNDISTURBED.append(fit_mccaffrey(X, 5, 15, 6, 0))
        ref = _MCC_UNDISTURBED[0]
        kill, killed = _killer(c, victims, at_iteration=3)
        got = fit_mccaffrey(X, 5, 15, 6, 0, progress=kill)
        assert len(killed) == (1 if victims == "one" else 2)
    assert np.array_equal(got.labels, ref.labels)
    assert got.centers.tobytes() == ref.centers.tobytes()
    assert got.trial_wcss == ref.trial_wcss and got.trial_n_iter == ref.trial_n_iter


@pytest.mark.timeout(120)
def test_results_lost_before_gathering_are_recomputed(monkeypatch):
    """Every worker dies after a pass's tasks finished but before their results reached the
    client: dask recomputes them under the old placement hint, which no new worker matches;
    the pass resubmits them and returns the same results."""
    import dask.array as da
    import distributed

    from kmdask.engine.executor import ChunkedRows

    x = (np.arange(4000 * 8) % 251).astype(np.uint8).reshape(4000, 8)
    X = da.from_array(x, chunks=(500, 8))
    total = lambda chunk: int(chunk.x.sum(dtype=np.int64))  # noqa: E731 (pickled by value)
    with _job_cluster() as (c, _), c.as_current():
        rows = ChunkedRows(X, persist=False)
        ref = rows.map(total)
        real_wait, killed = distributed.wait, []

        def wait_then_kill_all(fs, *args, **kwargs):
            out = real_wait(fs, *args, **kwargs)
            if not killed:
                for pid in _worker_pids(c).values():
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                while all(f.done() for f in fs):  # until the client hears the results are lost
                    time.sleep(0.01)
            return out

        monkeypatch.setattr(distributed, "wait", wait_then_kill_all)
        got = rows.map(total)
        c.wait_for_workers(2, timeout=60)  # closing a cluster mid-restart logs tracebacks
    assert len(killed) == 2
    assert got == ref == [int(x[i * 500:(i + 1) * 500].sum()) for i in range(8)]


def _wait_for_checkpoint(part) -> None:
    while not list(part.glob(".*.partial/fits/a/checkpoint.npz")):
        time.sleep(0.02)


def test_repeated_worker_loss_ends_clearly_and_resumes(mnist_store, tmp_path):
    """Workers killed again and again beyond allowed-failures: the run stops with a one-line
    error and a checkpoint; rerunning resumes it and ends identical to an undisturbed run."""
    from kmdask.batch.runner import run_job
    from kmdask.batch.spec import parse_job

    spec = {"job": "flaky", "data": {"store": str(mnist_store)},
            "fits": [{"name": "a", "algorithm": "scalable", "rows": 40_000, "k": [7, 9],
                      "trials": 2, "iterations": 40, "tol": 0.0, "persist": False}]}
    job = parse_job(spec, "flaky.yaml")
    with _job_cluster({"distributed.scheduler.allowed-failures": 0}) as (c, profile):
        stop = threading.Event()

        def killer():
            part = tmp_path / "runs" / "flaky"
            while not stop.is_set():  # start once Lloyd has checkpointed twice
                cks = list(part.glob(".*.partial/fits/a/checkpoint.npz"))
                if cks:
                    break
                time.sleep(0.02)
            time.sleep(0.5)
            seen: dict[int, float] = {}
            while not stop.is_set():
                now = time.monotonic()
                with contextlib.suppress(Exception):  # workers die under our feet
                    pids = _worker_pids(c).values() if c.scheduler_info()["workers"] else []
                    for pid in pids:
                        # a worker killed the instant it registers can take its nanny down
                        # (no restart: the run would wait for workers forever), so each new
                        # worker gets a second to settle before it is killed
                        if now - seen.setdefault(pid, now) >= 1.0:
                            with contextlib.suppress(ProcessLookupError):
                                os.kill(pid, signal.SIGKILL)
                time.sleep(0.3)

        t = threading.Thread(target=killer, daemon=True)
        t.start()
        try:
            with pytest.raises(KmdaskError) as ei:
                run_job(job, profile, runs_dir=tmp_path / "runs")
        finally:
            stop.set()
            t.join()
        msg = str(ei.value)
        assert "\n" not in msg and "stopped in fit 'a'" in msg and "rerun" in msg
        assert ei.value.exit_code == 3  # the cluster failed, progress saved
        assert list((tmp_path / "runs" / "flaky").glob(".*.partial/fits/a/checkpoint.npz"))
        c.wait_for_workers(2, timeout=60)
        resumed = run_job(job, profile, runs_dir=tmp_path / "runs")
        ref = run_job(job, profile, runs_dir=tmp_path / "ref")
    for k in (7, 9):
        for f in ("centers.npy", "labels.npy"):
            assert (resumed.path / "fits/a" / f"k{k}" / f).read_bytes() == \
                (ref.path / "fits/a" / f"k{k}" / f).read_bytes()


def test_driver_killed_mid_seeding_resumes_identically(mnist_store, tmp_path, client, capsys):
    """SIGKILL the driver (and its LocalCluster) after the first fit finished, while the second
    is seeding: the rerun keeps the finished fit, seeds again and ends bit-identical."""
    from kmdask.batch.runner import run_job
    from kmdask.batch.spec import parse_job

    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(
        {"profiles": {"local": {"kind": "local", "n_workers": 2}}}))
    spec = {"job": "seedkill", "data": {"store": str(mnist_store)}, "fits": [
        {"name": "first", "algorithm": "mccaffrey", "rows": 100, "k": 3, "iterations": 20,
         "trials": 20},
        {"name": "second", "algorithm": "scalable", "rows": 60_000, "k": [8, 9, 10],
         "trials": 3, "iterations": 6, "init_rounds": 8, "persist": False}]}
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(spec))
    # the undisturbed run, on the session's cluster (results do not depend on the cluster)
    ref = run_job(parse_job(spec, "job.yaml"), address_profile(client.scheduler.address),
                  runs_dir=tmp_path / "ref")
    proc = subprocess.Popen([sys.executable, "-m", "kmdask", "run", str(job)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    runs = tmp_path / "runs" / "seedkill"
    deadline = time.time() + 300
    while time.time() < deadline:
        if list(runs.glob(".*.partial/fits/first/done.json")):
            break
        time.sleep(0.01)
    else:
        pytest.fail("first fit never finished")
    time.sleep(0.3)  # into the second fit's stats/seeding passes
    assert not list(runs.glob(".*.partial/fits/second/checkpoint.npz")), "too late: in Lloyd"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    again = kmdask_main(capsys, "run", job, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "resuming interrupted run" in again.stderr
    assert "first: already done" in again.stderr
    a, b = ref.path, tmp_path / again.stdout.strip()
    for k in (8, 9, 10):
        for f in ("centers.npy", "labels.npy"):
            assert (a / "fits/second" / f"k{k}" / f).read_bytes() == \
                (b / "fits/second" / f"k{k}" / f).read_bytes()


def test_workers_paused_for_memory_end_the_run_clearly(mnist_store, tmp_path):
    """Every worker paused by dask for memory (and nothing it could spill): instead of waiting
    forever, the run stops with a one-line error and its progress saved."""
    from kmdask.batch.runner import run_job
    from kmdask.batch.spec import parse_job

    spec = {"job": "paused", "data": {"store": str(mnist_store)},
            "fits": [{"name": "a", "algorithm": "scalable", "rows": 20_000, "k": [5],
                      "iterations": 300, "tol": 0.0, "persist": False}]}
    job = parse_job(spec, "paused.yaml")
    with _job_cluster({"kmdask.paused-timeout": 2}) as (c, profile):
        pause = threading.Event()

        def pauser():  # once Lloyd has checkpointed, pause every worker as memory would
            _wait_for_checkpoint(tmp_path / "runs" / "paused")
            # what the memory monitor does when a worker's memory passes the pause fraction
            c.run(lambda dask_worker: setattr(dask_worker.memory_manager,
                                              "memory_pause_fraction", 1e-6))
            pause.set()

        t = threading.Thread(target=pauser, daemon=True)
        t.start()
        t0 = time.monotonic()
        with pytest.raises(KmdaskError) as ei:
            run_job(job, profile, runs_dir=tmp_path / "runs")
        t.join()
        assert pause.is_set() and time.monotonic() - t0 < 60
    msg = str(ei.value)
    assert "\n" not in msg and "ClusterStalled" in msg and "paused" in msg and "rerun" in msg
    assert list((tmp_path / "runs" / "paused").glob(".*.partial/fits/a/checkpoint.npz"))
