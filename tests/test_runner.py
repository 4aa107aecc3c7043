"""Jobs run through the real CLI on a real LocalCluster: reruns, resume, locks, validation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import address_profile, kmdask_main, run_kmdask

from kmdask.batch.spec import load_job, parse_job
from kmdask.errors import ConfigError

SMALL_JOB = {
    "job": "tiny",
    "data": {"store": None, "split": "train"},
    "fits": [
        {"name": "scal", "algorithm": "scalable", "rows": 4000, "k": [3, 4], "trials": 2,
         "iterations": 40},
        {"name": "mcc", "algorithm": "mccaffrey", "rows": 100, "k": 3, "iterations": 20,
         "trials": 20},
    ],
    "figures": [{"name": "m", "kind": "clusters", "fits": ["mcc"], "samples": 100}],
}


@pytest.fixture()
def workdir(tmp_path, mnist_store):
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump({
        "default": "local",
        "profiles": {"local": {"kind": "local", "n_workers": 2, "threads_per_worker": 1,
                               "memory_limit": "2GiB"}},
    }))
    return tmp_path


def _write_job(workdir: Path, store: Path, name: str = "tiny.yaml", **changes) -> Path:
    job = json.loads(json.dumps(SMALL_JOB))
    job["data"]["store"] = str(store)
    for k, v in changes.items():
        job[k] = v
    p = workdir / name
    p.write_text(yaml.safe_dump(job))
    return p


def _kmdask(workdir: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    return run_kmdask(*args, cwd=workdir, **kw)


def test_run_rerun_and_changed_spec(workdir, mnist_store, capsys):
    job = _write_job(workdir, mnist_store)
    r = _kmdask(workdir, "run", str(job))
    assert r.returncode == 0, r.stderr
    run = Path(workdir / r.stdout.strip())
    m = json.loads((run / "manifest.json").read_text())
    assert m["status"] == "complete"
    assert m["fits"]["mcc"]["results"]["3"]["counts"] == [16, 66, 18]  # SEED_SPEC row 1
    for k in ("3", "4"):
        res = m["fits"]["scal"]["results"][k]
        assert sum(res["counts"]) == 4000
        assert res["inertia"] == min(res["trial_inertia"])
    labels = np.load(run / "fits" / "scal" / "k3" / "labels.npy")
    assert labels.shape == (4000,) and set(np.unique(labels)) == {0, 1, 2}
    assert os.readlink(workdir / "runs" / "tiny" / "latest") == run.name

    # the first run above is the command line's own process; the ones after go through the
    # same main() in this process (no fresh interpreter and worker server for each)
    t0 = time.perf_counter()
    again = kmdask_main(capsys, "run", job, cwd=workdir)
    assert again.returncode == 0
    assert again.stdout.strip() == r.stdout.strip()
    assert "nothing to do" in again.stderr
    assert time.perf_counter() - t0 < 30

    changed = _write_job(workdir, mnist_store, fits=[dict(SMALL_JOB["fits"][1], trials=30)])
    r3 = kmdask_main(capsys, "run", changed, cwd=workdir)
    assert r3.returncode == 0, r3.stderr
    assert r3.stdout.strip() != r.stdout.strip()
    assert os.readlink(workdir / "runs" / "tiny" / "latest") == Path(r3.stdout.strip()).name

    listing = json.loads(kmdask_main(capsys, "runs", "--json", cwd=workdir).stdout)
    assert {row["run_id"] for row in listing} == {run.name, Path(r3.stdout.strip()).name}
    assert all(row["status"] == "complete" for row in listing)


def _long_job(workdir: Path, store: Path, name: str) -> Path:
    return _write_job(workdir, store, name=name, job="long", fits=[
        {"name": "sweep", "algorithm": "scalable", "rows": 30000, "k": [6, 7, 8, 9],
         "trials": 2, "iterations": 40, "tol": 0.0}], figures=[])


_LONG_REF: dict[str, Path] = {}  # one undisturbed run for both signals


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_resume_after_sigkill_is_bit_identical(sig, workdir, mnist_store, tmp_path_factory,
                                               client, capsys):
    """SIGKILL of the driver and its cluster, or SIGTERM (a batch time limit) of the driver:
    the rerun resumes from the last checkpoint and ends bit-identical. SIGTERM ends the run
    at once with exit 130 and one line."""
    from kmdask.batch.runner import run_job

    job = _long_job(workdir, mnist_store, "long.yaml")
    if "ref" not in _LONG_REF:  # undisturbed, on the session's cluster (results do not
        # depend on the cluster, and the run id names the job, data and settings only)
        _LONG_REF["ref"] = run_job(load_job(job), address_profile(client.scheduler.address),
                                   runs_dir=tmp_path_factory.mktemp("ref")).path

    proc = subprocess.Popen([sys.executable, "-m", "kmdask", "run", str(job)], cwd=workdir,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        ck = next(iter((workdir / "runs").glob("long/.*.partial/fits/sweep/checkpoint.npz")),
                  None)
        if ck is not None and ck.exists():
            with np.load(ck) as z:
                if max(m["n_iter"] for m in json.loads(str(z["meta"]))) >= 3:
                    break
        time.sleep(0.05)
    else:
        pytest.fail("no checkpoint appeared")
    if sig == "SIGKILL":
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its LocalCluster, mid-Lloyd
        proc.wait()
    else:
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)  # the driver only, as a time limit reaches it
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err
        assert time.monotonic() - t0 < 20
        lines = err.decode().strip().splitlines()
        assert lines[-1] == ("kmdask: error: interrupted; progress is saved: rerun the same "
                             "command to resume"), lines[-3:]
        assert "Traceback" not in err.decode()
    assert not list((workdir / "runs" / "long").glob("[!.]*/manifest.json"))

    resumed = kmdask_main(capsys, "run", job, cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at iteration" in resumed.stderr
    a, b = _LONG_REF["ref"], Path(workdir / resumed.stdout.strip())
    assert a.name == b.name  # same fingerprint
    for k in (6, 7, 8, 9):
        for f in ("centers.npy", "labels.npy"):
            assert (a / "fits/sweep" / f"k{k}" / f).read_bytes() == \
                (b / "fits/sweep" / f"k{k}" / f).read_bytes()


def _stderr_until(proc: subprocess.Popen, marker: str, what: str) -> None:
    """Read ``proc``'s stderr up to the first line that contains ``marker``; fail saying
    ``what`` did not happen if it ends first."""
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if marker in line:
            return
    pytest.fail(f"{what}: " + "".join(seen))


def test_concurrent_reruns_one_runs_one_waits(workdir, mnist_store):
    """A second run of a job that is running: --no-wait exits 4 at once; without it, it waits
    for the lock and then finds the run done. The first run is held (SIGSTOP) once its fits
    have started, so that the others meet it running however fast or busy the machine is."""
    job = _write_job(workdir, mnist_store)
    first = subprocess.Popen([sys.executable, "-m", "kmdask", "run", str(job)], cwd=workdir,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # the lock is taken before the fits start
    _stderr_until(first, "[1/", "the first run never started its fits")
    first.send_signal(signal.SIGSTOP)
    try:
        busy = _kmdask(workdir, "run", str(job), "--no-wait")
        assert busy.returncode == 4  # another run holds the lock
        assert busy.stderr.strip().count("\n") == 0
        assert "another run of job 'tiny' is in progress" in busy.stderr
        second = subprocess.Popen([sys.executable, "-m", "kmdask", "run", str(job)],
                                  cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
        _stderr_until(second, "waiting for another run of job 'tiny'",
                      "the second run did not wait")
    finally:
        first.send_signal(signal.SIGCONT)
    out1, _ = first.communicate(timeout=300)
    out2, rest = second.communicate(timeout=300)
    assert first.returncode == 0 and second.returncode == 0, rest
    assert "nothing to do" in rest  # it waited, then found the run complete
    assert out2.strip() == out1.strip()


BAD_JOBS = [
    ("job: [unclosed", "YAML does not parse at line 1"),
    ("job: x\nfits: []\n", "fits: expected a non-empty list"),
    ("job: x\nfits:\n  - {name: a, k: 3, colour: red}\n", "fits[0].colour: unknown key"),
    ("job: x\nfits:\n  - {name: a, k: 0}\n", "fits[0].k: must be >= 1, got 0"),
    ("job: x\nfits:\n  - {name: a, k: three}\n", "fits[0].k: expected an integer, got 'three'"),
    ("job: x\nfits:\n  - {name: a, k: 3, iterations: 0}\n", "fits[0].iterations: must be >= 1"),
    ("job: x\nfits:\n  - {name: a, k: 3, trials: -2}\n", "fits[0].trials: must be >= 1, got -2"),
    ("job: x\nfits:\n  - {name: a, k: 3, algorithm: magic}\n",
     "fits[0].algorithm: expected one of scalable, mccaffrey, got 'magic'"),
    ("job: x\ndata: {dataset: cifar}\nfits:\n  - {name: a, k: 3}\n",
     "data.dataset: expected one of mnist, fashion-mnist, got 'cifar'"),
    ("job: x\nfits:\n  - {name: a, k: 3}\nfigures:\n  - {name: f, fits: [b]}\n",
     "figures[0].fits[0]: no fit named 'b'"),
    ("job: x\nfits:\n  - {name: a, k: 3}\n  - {name: a, k: 4}\n", "fits[1].name: duplicate"),
]


@pytest.mark.parametrize(("text", "match"), BAD_JOBS)
def test_bad_job_specs_are_one_line_errors(tmp_path, text, match, monkeypatch, capsys):
    from kmdask.cli import main

    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as ei:
        load_job(p)
    assert match in str(ei.value) and str(p) in str(ei.value)
    monkeypatch.chdir(tmp_path)
    code = main(["run", str(p)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and match in err
    assert not (tmp_path / "runs").exists()


def test_rows_beyond_the_data_and_missing_profile(workdir, mnist_store):
    job = _write_job(workdir, mnist_store, fits=[{"name": "a", "k": 3, "rows": 70000}],
                     figures=[])
    r = _kmdask(workdir, "run", str(job))
    assert r.returncode != 0 and "rows=70000 but" in r.stderr
    assert r.stderr.count("\n") == 1
    r = _kmdask(workdir, "run", str(job), "--profile", "nope")
    assert r.returncode == 2 and "profiles.nope: no such profile" in r.stderr


def test_shipped_jobs_validate():
    root = Path(__file__).resolve().parents[1] / "jobs"
    names = {load_job(p).name for p in root.glob("*.yaml")}
    assert {"smoke", "sweep"} <= names
    assert parse_job(yaml.safe_load((root / "sweep.yaml").read_text())).fit("series").ks == \
        tuple(range(2, 11))


def test_manifest_has_no_home_paths(tmp_path, mnist_store, monkeypatch):
    home = tmp_path / "home"
    work = home / "work"
    work.mkdir(parents=True)
    (work / "cluster.yaml").write_text(yaml.safe_dump(
        {"profiles": {"local": {"kind": "local", "n_workers": 1}}}))
    store = work / "mnist.zarr"
    import shutil

    shutil.copytree(mnist_store, store)
    job = _write_job(work, store, fits=[{"name": "a", "k": 2, "rows": 500, "iterations": 5}],
                     figures=[])
    monkeypatch.setenv("HOME", str(home))
    r = _kmdask(work, "run", str(job))
    assert r.returncode == 0, r.stderr
    text = (work / r.stdout.strip() / "manifest.json").read_text()
    assert str(home) not in text
    assert "~/work/mnist.zarr" in text


def test_runs_and_stores_follow_the_umask(tmp_path, mnist_source, mnist_store):
    """Files kmdask writes get the user's umask (no world-readable results under umask 027,
    and none needlessly private under 022)."""
    import stat

    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(
        {"profiles": {"local": {"kind": "local", "n_workers": 1}}}))
    job = _write_job(tmp_path, mnist_store, fits=[{"name": "a", "k": 2, "rows": 300,
                                                   "iterations": 3}], figures=[])
    for mask in (0o027, 0o022):
        runs = tmp_path / f"runs{mask:o}"
        store = tmp_path / f"s{mask:o}.zarr"
        code = (f"import os, sys; os.umask({mask}); from kmdask.cli import main; "
                f"sys.exit(main(['run', '{job}', '--runs-dir', '{runs}']) or "
                f"main(['stage', '-q', '--source', '{mnist_source}', '--out', '{store}']))")
        r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        files = [p for p in [*runs.rglob("*"), *store.rglob("*")]
                 if p.is_file() and not p.is_symlink() and p.name != ".lock"]
        assert files
        for p in files:
            mode = stat.S_IMODE(p.stat().st_mode)
            assert mode == 0o666 & ~mask, f"{p}: {mode:o} under umask {mask:o}"
