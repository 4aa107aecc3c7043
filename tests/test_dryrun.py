"""``--dry-run`` of ``kmdask run``, ``sweep`` and ``submit``: plans made from a real staged store
and from real runs (one interrupted by SIGKILL mid-Lloyd, then completed), checked against what
those runs then did; a dry run writes nothing. Dry runs go through ``kmdask.cli.main``
in-process (no traceback can escape unseen), real runs through the console."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO, kmdask_main

from kmdask.batch.checkpoint import FileCheckpoint
from kmdask.cli import main
from kmdask.data.store import data_fingerprint

SECRET = "AKIA-NOT-TO-BE-PRINTED"
PROFILES = {
    "default": "local",
    "profiles": {
        "local": {"kind": "local", "n_workers": 2, "threads_per_worker": 1,
                  "memory_limit": "2GiB",
                  # 45s changes dask's 30s; 3 is dask's own allowed-failures: no change
                  "config": {"distributed.comm.timeouts.connect": "45s",
                             "distributed": {"scheduler": {"allowed-failures": 3}}}},
        "creds": {"kind": "local", "storage_options": {
            "key": SECRET, "secret": SECRET, "endpoint_url": "http://127.0.0.1:9",
            "client_kwargs": {"aws_session_token": SECRET, "region_name": "eu-west-1"}}},
    },
}


def _job(store: Path | None, **data) -> dict:
    return {"job": "dry", "data": {"store": str(store), **data} if store else data,
            "fits": [{"name": "a", "rows": 2000, "k": [2, 3], "iterations": 20, "trials": 2},
                     # long enough (tol 0) to be caught mid-Lloyd
                     {"name": "b", "rows": 6000, "k": [6, 7, 8, 9], "iterations": 200,
                      "trials": 2, "tol": 0.0}]}


@pytest.fixture()
def work(tmp_path, mnist_store, monkeypatch) -> Path:
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(PROFILES))
    (tmp_path / "dry.yaml").write_text(yaml.safe_dump(_job(mnist_store)))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _dry(capsys, command: str, *args: str) -> tuple[int, str, str]:
    """``kmdask COMMAND --dry-run ARGS`` in-process: (exit status, stdout, stderr)."""
    code = main([command, "--dry-run", *args])
    got = capsys.readouterr()
    return code, got.out, got.err


def _listing(root: Path) -> dict | None:
    """Every path under ``root`` with its mtime and size (None: ``root`` does not exist)."""
    if not root.exists():
        return None
    return {str(p.relative_to(root)): (p.lstat().st_mtime_ns, p.lstat().st_size)
            for p in [root, *root.rglob("*")]}


def test_fresh_resume_and_noop_plans_match_the_runs(work, mnist_store, capsys):
    # fresh: nothing under runs/, and a dry run creates nothing there
    code, out, err = _dry(capsys, "run", "dry.yaml", "--log-format", "json")
    assert code == 0, err
    fresh = json.loads(out)
    run_id = fresh["run_id"]
    assert fresh["action"] == "fresh" and fresh["resume"] is None
    assert re.fullmatch(r"[0-9a-f]{16}", run_id) and fresh["fingerprint"].startswith(run_id)
    assert fresh["run_dir"] == f"runs/dry/{run_id}"
    assert [(f["name"], f["ks"], f["rows"], f["iterations"], f["trials"], f["seed"])
            for f in fresh["fits"]] == [("a", [2, 3], 2000, 20, 2, 0),
                                        ("b", [6, 7, 8, 9], 6000, 200, 2, 0)]
    assert fresh["data"] == {
        "dataset": "mnist", "store": str(mnist_store), "split": "train", "would_stage": False,
        "rows": 60000, "features": 784, "dtype": "uint8", "chunks": {"count": 6, "rows": 10000},
        "labels": True, "fingerprint": data_fingerprint(mnist_store), "verified": True,
        "fingerprint_computed": False}
    code, text, _ = _dry(capsys, "run", "dry.yaml")
    assert text.splitlines()[0] == (f"would start a fresh run {run_id} of job dry (2 fit(s)) "
                                    f"in runs/dry/{run_id}")
    assert re.search(r"^\s+b\s+scalable\s+6\.\.9\s+6000\s+200\s+2\s+0\s+k-means\|\|\s+to run$",
                     text, re.MULTILINE), text
    assert not (work / "runs").exists()

    # resume: a real run killed (driver and cluster) mid-Lloyd in fit b
    proc = subprocess.Popen([sys.executable, "-m", "kmdask", "run", "dry.yaml"], cwd=work,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    ck = FileCheckpoint(work / "runs" / "dry" / f".{run_id}.partial" / "fits" / "b" /
                        "checkpoint.npz")
    deadline = time.monotonic() + 120
    while ck.iteration < 2:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no checkpoint of fit b caught: {proc.communicate()[1][-2000:]}")
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    iteration = ck.iteration
    assert 2 <= iteration < 200
    before = _listing(work / "runs")
    code, text, err = _dry(capsys, "run", "dry.yaml")
    assert code == 0, err
    assert text.splitlines()[0] == (f"would resume run {run_id} of job dry: fit a done, fit b "
                                    f"resumes at iteration {iteration}")
    code, out, _ = _dry(capsys, "run", "dry.yaml", "--log-format", "json")
    plan = json.loads(out)
    assert plan["action"] == "resume" and plan["run_id"] == run_id
    assert plan["resume"] == {"partial": f"runs/dry/.{run_id}.partial", "damaged": None,
                              "fits_done": ["a"], "fit": "b", "iteration": iteration}
    assert _listing(work / "runs") == before  # no lock taken, nothing touched

    # the real rerun resumes where the plan said, into the run id the fresh plan named
    resumed = kmdask_main(capsys, "run", "dry.yaml", cwd=work)
    assert resumed.returncode == 0, resumed.stderr
    assert f"b: resuming at iteration {iteration}\n" in resumed.stderr
    assert Path(resumed.stdout.strip()) == Path("runs/dry") / run_id

    # no-op: the complete run is found, and latest is left alone
    before = _listing(work / "runs")
    code, text, _ = _dry(capsys, "run", "dry.yaml")
    assert text.splitlines()[0].startswith(f"nothing to do: job dry is unchanged; its complete "
                                           f"run {run_id} is runs/dry/{run_id}")
    assert re.search(r"^\s+a\s+scalable\s+2,3\s+2000\s.*complete$", text, re.MULTILINE), text
    code, out, _ = _dry(capsys, "run", "dry.yaml", "--log-format", "json")
    assert json.loads(out)["action"] == "no-op"
    assert _listing(work / "runs") == before

    # a damaged complete run is no no-op: the run reopens it and computes fit b again
    labels = work / "runs" / "dry" / run_id / "fits" / "b" / "k6" / "labels.npy"
    intact = labels.read_bytes()
    labels.write_bytes(intact[:-1] + bytes([intact[-1] ^ 1]))
    before = _listing(work / "runs")
    code, out, _ = _dry(capsys, "run", "dry.yaml", "--log-format", "json")
    plan = json.loads(out)
    assert plan["action"] == "resume" and "labels.npy" in plan["resume"]["damaged"]
    assert (plan["resume"]["partial"], plan["resume"]["fits_done"], plan["resume"]["fit"],
            plan["resume"]["iteration"]) == (f"runs/dry/{run_id}", ["a"], "b", 0)
    assert _listing(work / "runs") == before
    again = kmdask_main(capsys, "run", "dry.yaml", cwd=work)
    assert again.returncode == 0, again.stderr
    assert "a: already done in this partial run, skipping" in again.stderr
    assert "b: already done" not in again.stderr
    assert labels.read_bytes() == intact


def test_json_plan_profile_changes_and_masked_credentials(work, capsys):
    code, out, err = _dry(capsys, "run", "dry.yaml", "--log-format", "json")
    assert code == 0, err
    plan = json.loads(out)
    assert set(plan) == {"job", "job_file", "data", "run_id", "fingerprint", "fits", "action",
                         "resume", "run_dir", "profile"}
    assert plan["job"] == "dry" and plan["job_file"] == "dry.yaml"
    prof = plan["profile"]
    assert (prof["name"], prof["kind"], prof["file"], prof["address"]) == \
        ("local", "local", "cluster.yaml", None)
    # only what the profile changes, with dask's value without it
    assert prof["dask_config"] == {"distributed.comm.timeouts.connect": "45s"}
    assert prof["dask_defaults"] == {"distributed.comm.timeouts.connect": "30s"}
    assert prof["resolved"]["n_workers"] == 2
    code, text, _ = _dry(capsys, "run", "dry.yaml")
    assert "distributed.comm.timeouts.connect: 45s (dask's: 30s)" in text
    assert "allowed-failures" not in text

    code, out, err = _dry(capsys, "run", "dry.yaml", "--profile", "creds", "--address",
                          "tcp://127.0.0.1:9", "--log-format", "json")
    assert code == 0, err  # nothing listens there: a dry run does not connect
    prof = json.loads(out)["profile"]
    assert (prof["kind"], prof["address"]) == ("address", "tcp://127.0.0.1:9")
    assert prof["resolved"]["storage_options"] == {
        "key": "***", "secret": "***", "endpoint_url": "http://127.0.0.1:9",
        "client_kwargs": {"aws_session_token": "***", "region_name": "eu-west-1"}}
    assert SECRET not in out + err
    assert not (work / "runs").exists()


def test_sweep_dry_run_lists_plans_and_the_report(work, capsys):
    code, out, err = _dry(capsys, "sweep", "dry.yaml", "dry.yaml", "--out", "rep",
                          "--log-format", "json")
    assert code == 0, err
    sweep = json.loads(out)
    assert (sweep["report"], sweep["index"]) == ("rep", "rep/index.html")
    assert [p["action"] for p in sweep["plans"]] == ["fresh", "fresh"]
    code, text, _ = _dry(capsys, "sweep", "dry.yaml", "--out", "rep")
    assert text.rstrip().endswith("then would write the report rep/index.html")
    assert not (work / "runs").exists() and not (work / "rep").exists()


def test_submit_dry_run_prints_the_exact_script_and_writes_nothing(work, capsys, monkeypatch):
    from kmdask.batch.profiles import load_profile
    from kmdask.batch.submit import write_batch_script

    monkeypatch.setenv("PATH", "/nonexistent")  # no sbatch: nothing could be submitted
    args = ("--cluster-file", str(REPO / "cluster.yaml"), "--profile", "slurm")
    code, out, err = _dry(capsys, "submit", *args, "--log-format", "json", "dry.yaml", "--",
                          "--begin=now+1hour")
    assert code == 0, err
    plan = json.loads(out)
    s = plan["script"]
    assert plan["action"] == "fresh" and plan["profile"]["kind"] == "slurm"
    assert plan["profile"]["dask_config"]["jobqueue.slurm.name"] == "kmdask-worker"
    assert s["command"] == ["sbatch", "--parsable", "--begin=now+1hour", s["path"]]
    assert s["command_found"] is False
    assert not (work / "runs").exists()  # neither the script nor runs/dry/submit/

    written, output = write_batch_script(Path("dry.yaml"), load_profile("slurm", REPO /
                                         "cluster.yaml"), runs_dir=Path("runs"))
    # the same but for the time stamp in the file names and the header
    stamp = re.compile(r"\d{8}-\d{6}-\d+|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")
    assert stamp.sub("T", s["text"]) == stamp.sub("T", written.read_text())
    assert stamp.sub("T", s["path"]) == stamp.sub("T", str(written))
    assert stamp.sub("T", s["output"]) == stamp.sub("T", str(output))
    assert "#SBATCH --cpus-per-task=2" in s["text"]

    code, text, _ = _dry(capsys, "submit", *args, "dry.yaml")
    assert stamp.sub("T", written.read_text()).rstrip() in stamp.sub("T", text)
    assert "sbatch is not on PATH here" in text
    # kmdask's options may follow the job file; what follows '--' is sbatch's
    code, out, err = _dry(capsys, "submit", "dry.yaml", *args, "--log-format", "json", "--",
                          "--begin=now+1hour", "--dry-run")
    assert code == 0, err
    assert json.loads(out)["script"]["command"][2:4] == ["--begin=now+1hour", "--dry-run"]


def test_default_store_is_not_staged_by_a_dry_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no data/mnist.zarr here
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(PROFILES))
    (tmp_path / "dry.yaml").write_text(yaml.safe_dump(_job(None, dataset="mnist")))
    code, out, err = _dry(capsys, "run", "dry.yaml", "--log-format", "json")
    assert code == 0, err
    plan = json.loads(out)
    assert (plan["action"], plan["run_id"], plan["fingerprint"], plan["run_dir"]) == \
        ("fresh", None, None, None)
    data = plan["data"]
    store = tmp_path / "data" / "mnist.zarr"  # as manifests write it
    assert data["would_stage"] is True and data["store"] == str(store)
    assert data["fingerprint"] is None and "not staged yet" in data["note"]
    assert [f["rows"] for f in plan["fits"]] == [2000, 6000]
    code, text, _ = _dry(capsys, "run", "dry.yaml")
    assert text.startswith(f"would stage {store}, then run job dry afresh")
    assert sorted(os.listdir(tmp_path)) == ["cluster.yaml", "dry.yaml"]


def test_array_fingerprint_cache_is_read_never_written(tmp_path, monkeypatch, capsys):
    from kmdask.data.arrays import open_array

    monkeypatch.chdir(tmp_path)
    rows = np.random.default_rng(0).integers(0, 256, (500, 64), dtype=np.uint8)
    np.save(tmp_path / "rows.npy", rows)
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(PROFILES))
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(
        {"job": "arr", "data": {"array": "rows.npy"},
         "fits": [{"name": "a", "k": 2, "rows": 100, "iterations": 5}]}))
    code, out, err = _dry(capsys, "run", "job.yaml", "--log-format", "json")
    assert code == 0, err
    first = json.loads(out)["data"]
    assert first["fingerprint_computed"] is True and first["array"].endswith("rows.npy")
    assert (first["rows"], first["features"], first["split"]) == (500, 64, None)
    assert sorted(os.listdir(tmp_path)) == ["cluster.yaml", "job.yaml", "rows.npy"]

    src = open_array("rows.npy", cache_dir=tmp_path / "runs" / "_fingerprints")  # caches it
    code, out, _ = _dry(capsys, "run", "job.yaml", "--log-format", "json")
    again = json.loads(out)["data"]
    assert again["fingerprint_computed"] is False
    assert again["fingerprint"] == first["fingerprint"] == src.fingerprint


@pytest.mark.parametrize("command, job, match", [
    ("run", "job: dry\nfits: [{name: a, k: 0}]\n", r"fits\[0\]\.k"),
    ("run", "job: dry\ndata: {store: STORE}\nfits: [{name: a, k: 2, rows: 70000}]\n",
     r"rows=70000 but .* has only 60000 rows"),
    ("run", "job: dry\ndata: {store: /nonexistent/x.zarr}\nfits: [{name: a, k: 2}]\n",
     r"/nonexistent/x\.zarr"),
    ("submit", "job: dry\ndata: {store: STORE}\nfits: [{name: a, k: 2}]\n",
     "needs a slurm or pbs profile, got 'local'"),
])
def test_bad_input_is_one_line_and_exit_2(command, job, match, work, mnist_store, capsys):
    (work / "bad.yaml").write_text(job.replace("STORE", str(mnist_store)))
    code, out, err = _dry(capsys, command, "bad.yaml")
    lines = err.strip().splitlines()
    assert code == 2 and out == ""
    assert len(lines) == 1 and lines[0].startswith("kmdask: error: "), lines
    assert re.search(match, lines[0]), lines[0]
    assert not (work / "runs").exists()
