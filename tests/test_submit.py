"""`kmdask submit` against the real single-node SLURM (tests/slurm/slurm.sh): sbatch and
slurm-wlm-torque's qsub. Skips only where sbatch/qsub is absent."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from slurmutil import ensure_slurm

from kmdask.batch.profiles import load_profile
from kmdask.batch.submit import submit_job, submit_script, wait_for_job, write_batch_script
from kmdask.errors import ConfigError, KmdaskError

REPO = Path(__file__).resolve().parents[1]
EXE = {"slurm": "sbatch", "pbs": "qsub"}


def _profile(kind: str, **submit) -> dict:
    p = load_profile(kind, REPO / "cluster.yaml")
    if submit:
        p["submit"] = {**p.get("submit", {}), **submit}
    return p


@pytest.fixture()
def smoke_job(tmp_path, mnist_store, monkeypatch) -> Path:
    """jobs/smoke.yaml reading the session's staged store; the job runs from tmp_path."""
    job = yaml.safe_load((REPO / "jobs" / "smoke.yaml").read_text())
    job["data"]["store"] = str(mnist_store)
    p = tmp_path / "smoke.yaml"
    p.write_text(yaml.safe_dump(job))
    monkeypatch.chdir(tmp_path)
    return p


# ------------------------------------------------------------------------------------------
# script generation (no scheduler needed)


@pytest.fixture()
def tiny_job(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump({"job": "tiny", "fits": [{"name": "a", "k": 2, "rows": 10}]}))
    return p


def test_generated_scripts(tiny_job, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # writing a script needs no sbatch/qsub
    script, out = write_batch_script(tiny_job, _profile(
        "slurm", partition="short", account="proj", extra=["--exclusive"],
        setup=["module load python"]), runs_dir=tmp_path / "runs")
    text = script.read_text()
    assert script.parent == tmp_path / "runs" / "tiny" / "submit" and script.suffix == ".sbatch"
    for line in ("#SBATCH --cpus-per-task=2", "#SBATCH --mem=3G", "#SBATCH --time=01:00:00",
                 "#SBATCH --partition=short", "#SBATCH --account=proj", "#SBATCH --exclusive",
                 f"#SBATCH --output={out}", f"#SBATCH --chdir={tmp_path}", "module load python",
                 "-m kmdask run tiny.yaml --runs-dir runs --cluster-file"):
        assert line in text, line
    pbs, _ = write_batch_script(tiny_job, _profile("pbs", queue="workq"),
                                runs_dir=tmp_path / "runs")
    text = pbs.read_text()
    for line in ("#PBS -l select=1:ncpus=2:mem=3gb", "#PBS -l walltime=01:00:00",
                 "#PBS -q workq", "#PBS -j oe", "#PBS -N kmdask-tiny"):
        assert line in text, line
    # sbatch/qsub parse directives only before the first command
    body = text.split("\n", 1)[1]
    first_cmd = next(i for i, ln in enumerate(body.splitlines()) if not ln.startswith("#"))
    assert all(not ln.startswith("#PBS") for ln in body.splitlines()[first_cmd:])


def test_submit_errors_are_one_line(tiny_job, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"profiles\.slurm\.submit\.gpus: unknown key"):
        submit_job(tiny_job, _profile("slurm", gpus=1), runs_dir=tmp_path, extra_args=[])
    with pytest.raises(ConfigError, match=r"submit\.cpus: expected an integer >= 1, got 0"):
        submit_job(tiny_job, _profile("slurm", cpus=0), runs_dir=tmp_path, extra_args=[])
    with pytest.raises(ConfigError, match="needs a slurm or pbs profile, got 'local'"):
        submit_job(tiny_job, load_profile("local", REPO / "cluster.yaml"), runs_dir=tmp_path,
                   extra_args=[])
    bad = tmp_path / "bad.yaml"
    bad.write_text("job: bad\nfits: [{name: a, k: 0}]\n")
    with pytest.raises(ConfigError, match=r"fits\[0\]\.k.*>= 1"):  # before any submission
        write_batch_script(bad, _profile("slurm"), runs_dir=tmp_path)
    monkeypatch.setenv("PATH", "/nonexistent")
    for kind, exe in EXE.items():
        with pytest.raises(KmdaskError, match=f"the {kind.upper()} command '{exe}' is not on"):
            submit_job(tiny_job, _profile(kind), runs_dir=tmp_path / "none", extra_args=[])
    assert not (tmp_path / "none").exists()  # nothing written when nothing can be submitted


# ------------------------------------------------------------------------------------------
# real submissions


@pytest.mark.parametrize("kind", ["slurm", "pbs"])
def test_trivial_script_runs_and_refusal_is_reported(kind, tmp_path):
    ensure_slurm(EXE[kind])
    script = tmp_path / "hello.sh"
    script.write_text("#!/usr/bin/env bash\necho hello from $SLURM_JOB_ID\n")
    out = tmp_path / "hello.out"
    extra = ["-o", str(out)] if kind == "slurm" else []
    job_id = submit_script(script, kind, out=out, extra_args=extra, cwd=tmp_path)
    assert job_id.isdigit()
    assert wait_for_job(job_id, kind, timeout=60) in ("COMPLETED", "UNKNOWN")
    assert out.read_text().strip() == f"hello from {job_id}"
    # the scheduler's own reason, on one line
    bad = ["--partition=nosuchpartition"] if kind == "slurm" else ["-q", "nosuchqueue"]
    with pytest.raises(KmdaskError, match=r"refused the job: .*(?i:invalid partition)") as err:
        submit_script(script, kind, out=out, extra_args=bad, cwd=tmp_path)
    assert "\n" not in str(err.value)


def _run_dir_from(out: Path) -> Path:
    lines = out.read_text().strip().splitlines()
    return Path(lines[-1])


def test_submit_smoke_job_to_slurm_and_pbs(smoke_job, tmp_path):
    ensure_slurm("sbatch")
    ensure_slurm("qsub")
    node_cpus = int(subprocess.run(["sinfo", "-h", "-N", "-o", "%c"], capture_output=True,
                                   text=True, timeout=30).stdout.split()[0])
    cpus = min(2, node_cpus)
    runs = {}
    # both submitted at once: the scheduler's queueing and start-up overlap
    ids = {kind: submit_job(smoke_job, _profile(kind, cpus=cpus),
                            runs_dir=tmp_path / f"runs-{kind}", extra_args=[])
           for kind in ("slurm", "pbs")}
    for kind, job_id in ids.items():
        runs_dir = tmp_path / f"runs-{kind}"
        assert job_id.isdigit()
        try:
            state = wait_for_job(job_id, kind, timeout=180, poll=0.25)
        except KmdaskError:
            for other in ids.values():  # leave nothing queued
                subprocess.run(["scancel", other], timeout=30)
            raise
        submit_dir = runs_dir / "smoke" / "submit"
        record = json.loads(next(submit_dir.glob("*.json")).read_text())
        assert record["job_id"] == job_id and record["scheduler"] == kind
        out = submit_dir / record["output"]
        assert state in ("COMPLETED", "UNKNOWN"), (state, out.read_text()[-2000:])
        text = out.read_text()
        assert f"kmdask submit: job {job_id} on" in text
        assert f"{cpus} CPUs, memory 3072 MB" in text
        run = _run_dir_from(out)
        assert not run.is_absolute() and (tmp_path / run / "manifest.json").exists(), text
        m = json.loads((tmp_path / run / "manifest.json").read_text())
        assert m["status"] == "complete" and m["profile"]["name"] == "allocation"
        cf = yaml.safe_load(next(submit_dir.glob("allocation-*.yaml")).read_text())
        assert cf["profiles"]["allocation"]["n_workers"] == cpus  # sized to the allocation
        assert cf["profiles"]["allocation"]["memory_limit"] == f"{3072 * 3 // 4 // cpus}MB"
        runs[kind] = tmp_path / run
    a, b = (sorted((r / "fits").rglob("*.npy")) for r in runs.values())
    assert [p.relative_to(runs["slurm"]) for p in a] == [p.relative_to(runs["pbs"]) for p in b]
    for pa, pb in zip(a, b, strict=True):
        np.testing.assert_array_equal(np.load(pa), np.load(pb), err_msg=str(pa))
