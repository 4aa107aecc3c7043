"""Cluster profiles against real processes: a LocalCluster, a `dask scheduler` + `dask worker`s
started here (plain and TLS), and the single-node SLURM of tests/slurm/slurm.sh (sbatch, and
qsub through slurm-wlm-torque). SLURM tests skip only where sbatch/qsub is absent, and never
under .ci/run (KMDASK_REQUIRE_SLURM=1)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import dask
import numpy as np
import psutil
import pytest
import yaml
from conftest import address_profile
from daskutil import dask_cluster, free_port
from slurmutil import ensure_slurm

from kmdask.batch.cluster import _worker_prologue, connect, merged_dask_config
from kmdask.batch.profiles import deep_merge, load_profile
from kmdask.errors import ConfigError, KmdaskError

REPO = Path(__file__).resolve().parents[1]


def _profile(name: str, **changes) -> dict:
    """A profile of the shipped cluster.yaml, with top-level keys replaced."""
    p = load_profile(name, REPO / "cluster.yaml")
    p.update(changes)
    return p


def _square_sum(client) -> int:
    futs = client.map(lambda x: x * x, range(20))
    return client.submit(sum, futs).result(timeout=60)


# ------------------------------------------------------------------------------------------
# dask configuration


def test_partial_jobqueue_section_keeps_the_other_defaults():
    prof = _profile("slurm", config={
        "jobqueue": {"slurm": {"cores": 3, "job_extra_directives": ["--comment=x"]}},
        "jobqueue.slurm.walltime": "00:05:00",  # dotted keys work too
        "distributed": {"comm": {"timeouts": {"connect": "7s"}}},
    })
    merged = merged_dask_config(prof)
    sec = merged["jobqueue"]["slurm"]
    assert sec["cores"] == 3 and sec["walltime"] == "00:05:00"
    # mapped onto dask-jobqueue's spelling, not added next to it (which it would ignore)
    assert sec["job-extra-directives"] == ["--comment=x"] and "job_extra_directives" not in sec
    defaults = dask.config.defaults
    jq = next(d["jobqueue"]["slurm"] for d in defaults if "slurm" in d.get("jobqueue", {}))
    assert set(jq) <= set(sec)  # every other default key survives
    assert sec["shebang"] == jq["shebang"] and sec["death-timeout"] == jq["death-timeout"]
    assert merged["distributed"]["comm"]["timeouts"]["connect"] == "7s"
    assert merged["distributed"]["scheduler"]  # untouched siblings kept
    assert dask.config.get("jobqueue.slurm.cores") != 3  # the global config is not changed


def test_bad_profile_values_are_one_line_errors():
    with (
        pytest.raises(ConfigError, match=r"profiles\.address\.timeout.*'soon'"),
        connect(_profile("address", timeout="soon")),
    ):
        pass
    with (
        pytest.raises(ConfigError, match=r"security\.tls_cert: unknown key"),
        connect(_profile("address", security={"tls_cert": "x"})),
    ):
        pass
    with (
        pytest.raises(ConfigError, match=r"require_encryption: is true but the address"),
        connect(_profile("address", security={"require_encryption": True})),
    ):
        pass


# ------------------------------------------------------------------------------------------
# local


def _listening(proc: psutil.Process) -> list[str]:
    out = []
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            out += [c.laddr.ip for c in p.net_connections("inet") if c.status == "LISTEN"]
    return out


def test_local_profile_binds_only_loopback():
    with connect(_profile("local")) as client:
        info = client.kmdask_cluster
        assert _square_sum(client) == sum(x * x for x in range(20))
        assert info["kind"] == "local" and info["n_workers"] == 2
        assert info["scheduler"].startswith("tcp://127.0.0.1:")
        assert info["dashboard"].startswith("http://127.0.0.1:")
        ips = _listening(psutil.Process())
        assert ips and set(ips) == {"127.0.0.1"}, ips  # scheduler, dashboard, workers, nannies


def _numpy_hugepages() -> bool:
    """In a worker: whether numpy asks for transparent huge pages (its setting, unchanged)."""
    from numpy._core.multiarray import _set_madvise_hugepage

    was = _set_madvise_hugepage(True)
    _set_madvise_hugepage(was)
    return bool(was)


@pytest.mark.parametrize("limit, tuned", [("4GiB", True), ("400MB", False)])
def test_local_workers_malloc_environment(limit, tuned):
    """Big workers keep multi-MB buffers in the heap (fast re-use); small ones keep dask's
    default (freed memory goes straight back to the OS). Neither asks for transparent huge
    pages (numpy's madvise), whose faults can stall for compaction."""
    with connect(_profile("local", n_workers=1, memory_limit=limit)) as client:
        env = next(iter(client.run(lambda: {k: os.environ.get(k) for k in (
            "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "OPENBLAS_NUM_THREADS")}).values()))
        hugepages = set(client.run(_numpy_hugepages).values())
    assert env["OPENBLAS_NUM_THREADS"] == "1"  # dask's own settings are kept
    assert hugepages == {False}
    if tuned:
        assert env["MALLOC_MMAP_THRESHOLD_"] == env["MALLOC_TRIM_THRESHOLD_"] == str(32 << 20)
    else:
        assert env["MALLOC_MMAP_THRESHOLD_"] is None and env["MALLOC_TRIM_THRESHOLD_"] == "65536"


@pytest.mark.parametrize("memory, processes, tuned", [
    ("8GB", 2, True), ("3GB", 2, False), ("1GB", None, False), (None, 1, True)])
def test_batch_workers_get_the_local_workers_environment(memory, processes, tuned):
    """A batch job's workers get what LocalCluster workers get: no huge pages asked for, and
    the malloc thresholds where a worker (the job's memory split over its processes) is big."""
    section = {k: v for k, v in (("memory", memory), ("processes", processes)) if v}
    prof = _profile("slurm", config={"jobqueue": {"slurm": section}})
    with dask.config.set(merged_dask_config(prof)):
        if memory is None:
            dask.config.set({"jobqueue.slurm.memory": None})
        lines = _worker_prologue(prof, "slurm")
    assert "export NUMPY_MADVISE_HUGEPAGE=0" in lines
    malloc = [ln for ln in lines if "MALLOC_" in ln]
    assert malloc == ([f"export MALLOC_TRIM_THRESHOLD_={32 << 20}",
                       f"export MALLOC_MMAP_THRESHOLD_={32 << 20}"] if tuned else
                      [f'[ "${{MALLOC_TRIM_THRESHOLD_-}}" != {32 << 20} ] || unset '
                       "MALLOC_TRIM_THRESHOLD_",
                       f'[ "${{MALLOC_MMAP_THRESHOLD_-}}" != {32 << 20} ] || unset '
                       "MALLOC_MMAP_THRESHOLD_"])


def test_small_workers_do_not_inherit_settings_a_big_cluster_left(monkeypatch):
    """A nanny copies its settings into this process's os.environ whenever it restarts a
    worker: after a big cluster's restart, kmdask's malloc values sit there, and a small
    cluster's workers must still start with dask's defaults (and the values stay put)."""
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(32 << 20))
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", str(32 << 20))
    with connect(_profile("local", n_workers=1, memory_limit="400MB")) as client:
        env = next(iter(client.run(lambda: {k: os.environ.get(k) for k in (
            "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}).values()))
    assert env == {"MALLOC_MMAP_THRESHOLD_": None, "MALLOC_TRIM_THRESHOLD_": "65536"}
    assert os.environ["MALLOC_MMAP_THRESHOLD_"] == str(32 << 20)


def _loaded_kernels() -> dict[str, int]:
    """In a worker: how many compiled signatures each of the engine's kernels holds."""
    import sys

    from numba.core.registry import CPUDispatcher

    mods = [m for name, m in list(sys.modules.items()) if name.startswith("kmdask.")]
    return {f"{m.__name__}.{n}": len(f.signatures) for m in mods
            for n, f in vars(m).items() if isinstance(f, CPUDispatcher)}


def test_local_workers_start_with_the_engine_warm():
    """LocalCluster workers are forked from a server that warmed the engine: before any task,
    the kernels a fit calls already hold compiled code (no first-fit tax)."""
    with connect(_profile("local")) as client:
        loaded = client.run(_loaded_kernels)
    for worker, kernels in loaded.items():
        assert kernels.get("kmdask.engine.kernels._assign_block", 0) >= 1, (worker, kernels)
        assert kernels.get("kmdask.engine.kernels._row_sq_norms_u8", 0) >= 1
        warm = sum(1 for v in kernels.values() if v)
        assert warm >= 10, kernels  # uint8 and float paths, seeding, the original's kernels


# ------------------------------------------------------------------------------------------
# address: a scheduler and workers started here


@pytest.fixture(scope="module")
def dask_address(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dask-address")
    with dask_cluster(tmp, 2) as address:
        yield address


def _wait_workers(profile: dict, n: int) -> None:
    from distributed import Client

    with Client(profile["address"], timeout=20, security=None) as c:
        c.wait_for_workers(n, timeout=60)


def test_address_profile_runs_on_an_existing_scheduler(dask_address):
    prof = _profile("address", address=dask_address)
    _wait_workers(prof, 2)
    with connect(prof) as client:
        assert _square_sum(client) == sum(x * x for x in range(20))
        info = client.kmdask_cluster
        assert info["n_workers"] == 2 and info["scheduler"] == dask_address
    # --address overrides whatever kind the profile has
    with connect(_profile("local"), address=dask_address) as client:
        assert client.kmdask_cluster["kind"] == "address"
        assert len(client.scheduler_info(n_workers=-1)["workers"]) == 2


def test_address_alone_needs_no_cluster_file(dask_address, mnist_store, tmp_path, capsys,
                                             monkeypatch):
    """A user with only a running scheduler: `kmdask run JOB --address URL` in a directory
    without cluster.yaml runs there; without --address the error says what to give."""
    import json

    from conftest import kmdask_main

    for var in ("KMDASK_PROFILE", "KMDASK_CLUSTER_FILE"):
        monkeypatch.delenv(var, raising=False)
    job = {"job": "bare", "data": {"store": str(mnist_store), "split": "train"},
           "fits": [{"name": "f", "algorithm": "scalable", "rows": 2000, "k": 3,
                     "iterations": 5}]}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    assert not (tmp_path / "cluster.yaml").exists()
    r = kmdask_main(capsys, "run", "job.yaml", "--address", dask_address, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / r.stdout.strip() / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["cluster"]["kind"] == "address"
    assert manifest["cluster"]["scheduler"] == dask_address
    r = kmdask_main(capsys, "run", "job.yaml", "--runs-dir", "other", cwd=tmp_path)
    assert r.returncode != 0 and not (tmp_path / "other").exists()
    err = r.stderr.strip()
    assert err.startswith("kmdask: error: cluster.yaml: no such file") and "\n" not in err
    assert "--address" in err and "--cluster-file" in err
    # a profile or cluster file asked for by name must exist, --address or not
    r = kmdask_main(capsys, "run", "job.yaml", "--profile", "address", "--address",
                    dask_address, cwd=tmp_path)
    assert r.returncode != 0 and "cluster.yaml: no such file" in r.stderr


def test_address_profile_closed_port_fails_within_timeout():
    prof = _profile("address", address=f"tcp://127.0.0.1:{free_port()}", timeout="2s")
    t0 = time.perf_counter()
    with pytest.raises(KmdaskError) as err, connect(prof):
        pass
    took = time.perf_counter() - t0
    msg = str(err.value)
    assert "cannot reach the dask scheduler at tcp://127.0.0.1:" in msg and "within 2 s" in msg
    assert "\n" not in msg
    assert took < 8, took


# ------------------------------------------------------------------------------------------
# TLS


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _make_ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
             "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN=kmdask test {name}", cwd=d)


def _make_cert(d: Path, name: str, ca: str) -> None:
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
             f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", "san.ext",
             cwd=d)


@pytest.fixture(scope="module")
def tls_certs(tmp_path_factory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not found (needed to make test certificates)")
    d = tmp_path_factory.mktemp("tls")
    _make_ca(d, "ca")
    _make_cert(d, "node", "ca")     # scheduler and workers
    _make_cert(d, "client", "ca")   # kmdask
    _make_ca(d, "rogue")            # an unrelated CA, and a client it signed
    _make_cert(d, "intruder", "rogue")
    return d


def test_tls_address_profile_with_require_encryption(tls_certs, tmp_path):
    d = tls_certs
    node = {"ca": d / "ca.pem", "cert": d / "node.pem", "key": d / "node.key"}
    with dask_cluster(tmp_path, 1, tls=node) as address:
        assert address.startswith("tls://")
        prof = _profile("address", address=address, timeout="20s", security={
            "tls_ca_file": str(d / "ca.pem"), "tls_client_cert": str(d / "client.pem"),
            "tls_client_key": str(d / "client.key"), "require_encryption": True})
        with connect(prof) as client:
            assert _square_sum(client) == sum(x * x for x in range(20))
            assert client.kmdask_cluster["scheduler"].startswith("tls://127.0.0.1:")
        # a plain-text client is not let in ...
        plain = _profile("address", address="tcp://" + address[len("tls://"):], timeout="2s")
        with pytest.raises(KmdaskError, match="cannot reach"), connect(plain):
            pass
        # ... nor one whose certificate another CA signed
        rogue = _profile("address", address=address, timeout="3s", security={
            "tls_ca_file": str(d / "rogue.pem"), "tls_client_cert": str(d / "intruder.pem"),
            "tls_client_key": str(d / "intruder.key"), "require_encryption": True})
        with pytest.raises(KmdaskError, match="cannot reach") as err, connect(rogue):
            pass
        assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------
# SLURM and PBS (dask-jobqueue) against the real single-node cluster


def _jobs_named(name: str) -> list[str]:
    out = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i %T"], capture_output=True,
                         text=True, timeout=30).stdout.split("\n")
    return [ln for ln in out if ln.strip()]


@pytest.mark.parametrize("kind", ["slurm", "pbs"])
def test_jobqueue_profile_starts_workers_through_the_scheduler(kind, tmp_path, monkeypatch):
    ensure_slurm("sbatch" if kind == "slurm" else "qsub")
    # what a big LocalCluster's nanny can leave in os.environ, which a job inherits
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(32 << 20))
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", str(32 << 20))
    name = f"kmdask-test-{uuid.uuid4().hex[:8]}"
    prof = _profile(kind, timeout="120s")
    # a partial section: only these keys change, cluster.yaml's and dask-jobqueue's stay
    prof["config"] = yaml.safe_load(yaml.safe_dump(prof["config"]))
    sec = prof["config"]["jobqueue"][kind]
    sec.update({"name": name, "log-directory": str(tmp_path / "logs"), "walltime": "00:07:00",
                "job_extra_directives": ["--comment=kmdask" if kind == "slurm" else "-r n"]})
    # distributed.* reaches the scheduler (here) and the workers (in the batch jobs)
    prof["config"]["distributed"] = {"scheduler": {"allowed-failures": 7}}
    with connect(prof) as client:
        info = client.kmdask_cluster
        script = client.cluster.job_script()
        assert _square_sum(client) == sum(x * x for x in range(20))
        key = "distributed.scheduler.allowed-failures"
        assert client.run_on_scheduler(lambda: dask.config.get(key)) == 7
        client.wait_for_workers(2, timeout=60)
        assert set(client.run(lambda: dask.config.get(key)).values()) == {7}
        # what LocalCluster workers get: these workers are small (1GB), so no malloc values.
        # (A nested copy of _numpy_hugepages: these workers cannot import this module.)
        def hugepages() -> bool:
            from numpy._core.multiarray import _set_madvise_hugepage

            was = _set_madvise_hugepage(True)
            _set_madvise_hugepage(was)
            return bool(was)

        assert set(client.run(hugepages).values()) == {False}
        assert set(client.run(lambda: os.environ.get("MALLOC_TRIM_THRESHOLD_")).values()) \
            == {"65536"}
        assert len(info["job_ids"]) == 2  # scale: {jobs: 2}
        assert info["dashboard"].startswith("http://127.0.0.1:")
        assert info["scheduler"].startswith("tcp://127.0.0.1:")
        assert len(_jobs_named(name)) == 2
    prefix = "#SBATCH" if kind == "slurm" else "#PBS"
    assert f"{prefix} {'-J' if kind == 'slurm' else '-N'} {name}" in script
    assert "00:07:00" in script
    assert (f"{prefix} --comment=kmdask" if kind == "slurm" else "#PBS -r n") in script
    assert "--interface lo" in script and "--death-timeout 60" in script  # cluster.yaml kept
    assert "--memory-limit 0.93GiB" in script  # memory: 1GB from cluster.yaml
    # the worker logs went where the profile said (for pbs too, despite qsub's own -o)
    assert len(list((tmp_path / "logs").iterdir())) >= 2
    deadline = time.monotonic() + 30  # closing the client cancels every worker job
    while _jobs_named(name) and any("RUNNING" in j or "PENDING" in j for j in _jobs_named(name)):
        assert time.monotonic() < deadline, _jobs_named(name)
        time.sleep(0.5)


def test_slurm_profile_with_adapt_bounds(tmp_path):
    ensure_slurm("sbatch")
    name = f"kmdask-test-{uuid.uuid4().hex[:8]}"
    prof = _profile("slurm", timeout="120s", scale=None,
                    adapt={"minimum_jobs": 1, "maximum_jobs": 2})
    prof["config"] = deep_merge(prof["config"], {"jobqueue": {"slurm": {
        "name": name, "log-directory": str(tmp_path)}}})
    with connect(prof) as client:
        assert _square_sum(client) == sum(x * x for x in range(20))
        assert 1 <= len(_jobs_named(name)) <= 2
    with (
        pytest.raises(ConfigError, match=r"profiles\.slurm\.adapt\.most: unknown key"),
        connect(_profile("slurm", adapt={"most": 3})),
    ):
        pass
    with (
        pytest.raises(ConfigError, match=r"profiles\.slurm\.adapt: set minimum_jobs"),
        connect(_profile("slurm", adapt={"maximum_jobs": 3})),
    ):
        pass


def test_jobqueue_profile_without_the_scheduler_command(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    for kind, exe in (("slurm", "sbatch"), ("pbs", "qsub")):
        with (
            pytest.raises(KmdaskError, match=f"needs the {kind.upper()} command '{exe}'"),
            connect(_profile(kind)),
        ):
            pass


# ------------------------------------------------------------------------------------------
# one job, every profile, identical results


@pytest.fixture()
def smoke_job(tmp_path, mnist_store) -> Path:
    job = yaml.safe_load((REPO / "jobs" / "smoke.yaml").read_text())
    job["data"]["store"] = str(mnist_store)
    job.pop("figures")  # the fits are compared; four renderings of one figure add nothing
    p = tmp_path / "smoke.yaml"
    p.write_text(yaml.safe_dump(job))
    return p


def _arrays(run: Path) -> dict[str, np.ndarray]:
    return {str(f.relative_to(run)): np.load(f) for f in sorted((run / "fits").rglob("*.npy"))}


def test_smoke_job_identical_on_every_profile(smoke_job, dask_address, tmp_path, monkeypatch):
    from kmdask.cli import main

    monkeypatch.chdir(tmp_path)  # the jobqueue profiles' worker logs go under ./runs
    ensure_slurm("sbatch")
    ensure_slurm("qsub")
    runs = {}
    for prof, extra in (("local", []), ("address", ["--address", dask_address]),
                        ("slurm", []), ("pbs", []), ):
        out = tmp_path / f"runs-{prof}"
        rc = main(["run", str(smoke_job), "--cluster-file", str(REPO / "cluster.yaml"),
                   "--profile", prof, "--runs-dir", str(out), "-q", *extra])
        assert rc == 0, prof
        runs[prof] = next(p for p in (out / "smoke").iterdir() if p.is_dir()
                          and not p.is_symlink() and (p / "manifest.json").exists())
    ref = _arrays(runs["local"])
    assert any("centres" in k or "centers" in k for k in ref), sorted(ref)
    for prof, run in runs.items():
        got = _arrays(run)
        assert got.keys() == ref.keys(), prof
        for k in ref:
            np.testing.assert_array_equal(got[k], ref[k], err_msg=f"{prof}: {k}")


def test_a_job_runs_on_its_profiles_cluster_whatever_client_is_current(mnist_store, client,
                                                                      tmp_path):
    """run_job in a program that has a client of its own entered as current: the fits run on
    the cluster the profile names, not on that client's."""
    from distributed import Client

    from kmdask.batch.cluster import local_cluster
    from kmdask.batch.runner import run_job
    from kmdask.batch.spec import parse_job

    job = parse_job({"job": "where", "data": {"store": str(mnist_store)},
                     "fits": [{"name": "a", "k": [3], "rows": 2000, "iterations": 3}]},
                    "job.yaml")
    transitions = lambda dask_scheduler: dask_scheduler.transition_counter  # noqa: E731
    with local_cluster(n_workers=1, threads_per_worker=1, host="127.0.0.1",
                       dashboard_address="127.0.0.1:0") as other, \
            Client(other, set_as_default=False) as theirs, client.as_current():
        before = client.run_on_scheduler(transitions)
        run_job(job, address_profile(other.scheduler_address), runs_dir=tmp_path / "runs")
        assert client.run_on_scheduler(transitions) == before
        assert theirs.run_on_scheduler(transitions) > 0
