"""The shipped schedule examples (jobs/schedule/) use real flags and run on a real scheduler."""

from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from slurmutil import ensure_slurm

from kmdask.cli import build_parser

SCHED = Path(__file__).resolve().parents[1] / "jobs" / "schedule"


def _kmdask_calls(command: str) -> list[list[str]]:
    """Every `.../kmdask ARGS` invocation in a shell command line."""
    calls = []
    for part in command.replace("&&", ";").split(";"):
        words = shlex.split(part.split(">>")[0])
        for i, w in enumerate(words):
            if w.endswith("kmdask"):
                calls.append(words[i + 1 :])
    return calls


def test_crontab_line_is_valid_and_uses_real_flags():
    lines = [ln for ln in (SCHED / "crontab").read_text().splitlines()
             if ln.strip() and not ln.startswith("#") and "=" not in ln.split()[0]]
    assert len(lines) == 1
    fields = lines[0].split(None, 5)
    minute, hour, dom, month, dow, command = fields
    assert 0 <= int(minute) < 60 and 0 <= int(hour) < 24 and (dom, month, dow) == ("*",) * 3
    calls = _kmdask_calls(command)
    assert [c[0] for c in calls] == ["run", "report"]
    for c in calls:
        build_parser().parse_args(c)  # exits (fails the test) on an unknown flag
    assert "--no-wait" in calls[0]


def test_systemd_units():
    svc = configparser.ConfigParser(interpolation=None)
    svc.read(SCHED / "kmdask-sweep.service")
    assert svc["Service"]["Type"] == "oneshot"
    for key in ("ExecStart", "ExecStartPost"):
        build_parser().parse_args(shlex.split(svc["Service"][key])[1:])
    timer = configparser.ConfigParser(interpolation=None)
    timer.read(SCHED / "kmdask-sweep.timer")
    cal = timer["Timer"]["OnCalendar"]
    assert timer["Timer"]["Persistent"] == "true"
    if shutil.which("systemd-analyze"):
        r = subprocess.run(["systemd-analyze", "calendar", cal], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr


def test_sbatch_script_syntax():
    r = subprocess.run(["bash", "-n", str(SCHED / "sweep-nightly.sbatch")], capture_output=True)
    assert r.returncode == 0, r.stderr


def test_sbatch_script_runs_a_job_on_real_slurm(tmp_path, mnist_store):
    """Submit the nightly script for real (without resubmission) with a small job."""
    import sys

    ensure_slurm("sbatch")

    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "runs").mkdir()
    (tmp_path / "jobs" / "schedule").mkdir(parents=True)
    shutil.copy(SCHED / "sweep-nightly.sbatch", tmp_path / "jobs" / "schedule")
    job = tmp_path / "tiny.yaml"
    job.write_text(yaml.safe_dump({
        "job": "nightly", "data": {"store": str(mnist_store)},
        "fits": [{"name": "a", "algorithm": "scalable", "rows": 1000, "k": 3,
                  "iterations": 10}],
    }))
    kmdask = tmp_path / "kmdask"
    kmdask.write_text(f"#!/bin/sh\nexec {sys.executable} -m kmdask \"$@\"\n")
    kmdask.chmod(0o755)
    env_vars = (f"ALL,KMDASK_JOB={job},KMDASK_BIN={kmdask},KMDASK_NO_RESUBMIT=1,"
                f"PYTHONPATH={repo}")
    r = subprocess.run(["sbatch", "--parsable", f"--export={env_vars}", "--cpus-per-task=1",
                        "--mem=1500M", "jobs/schedule/sweep-nightly.sbatch"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip().split(";")[0]
    deadline = time.time() + 300
    while time.time() < deadline:
        q = subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True)
        if not q.stdout.strip():
            break
        time.sleep(1)
    else:
        subprocess.run(["scancel", job_id])
        pytest.fail("the nightly job did not finish in 300 s")
    out = (tmp_path / "runs" / f"slurm-kmdask-sweep-{job_id}.out").read_text()
    assert "kmdask: nightly run complete" in out, out
    assert (tmp_path / "runs" / "nightly" / "latest" / "manifest.json").exists()
