"""``kmdask submit``: run a whole job as one SLURM (sbatch) or PBS (qsub) batch job.

The driver runs inside the allocation: the generated script writes a one-profile cluster file
sized to what the scheduler granted (one single-threaded LocalCluster worker per allocated CPU,
memory split between them) and runs ``python -m kmdask run JOB`` with it. Script, scheduler
output and a small JSON record live in ``<runs_dir>/<job>/submit/``:

* ``<job>-<stamp>.sbatch`` / ``.pbs``: the batch script;
* ``<job>-<stamp>.out``: everything the job printed (the last line is the run directory);
* ``<job>-<stamp>.json``: job id, scheduler, paths, when.

The profile's ``submit:`` mapping carries the scheduler options (see :data:`SUBMIT_KEYS`).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from kmdask.batch.cluster import profile_dask_config
from kmdask.errors import ConfigError, KmdaskError

#: keys of a profile's ``submit:`` mapping
SUBMIT_KEYS = {
    "cpus": "CPUs for the job (the driver's LocalCluster gets one worker per CPU)",
    "memory": "memory for the job, e.g. 3G (sbatch --mem / PBS mem=)",
    "walltime": "time limit, HH:MM:SS",
    "partition": "SLURM partition (#SBATCH -p)",
    "queue": "PBS queue (#PBS -q); for SLURM the same as partition",
    "account": "account / project to charge (-A)",
    "job_name": "batch job name (default kmdask-<job>)",
    "resource_spec": "PBS -l resource string replacing the one built from cpus/memory",
    "extra": "list of further directive lines, verbatim (without #SBATCH / #PBS)",
    "setup": "list of shell lines run before kmdask, e.g. 'module load python'",
    "python": "the Python that runs kmdask inside the job (default: this one)",
}
_SCHEDULERS = {"slurm": ("sbatch", "squeue"), "pbs": ("qsub", "qstat")}


def _fail(profile: dict, key: str, msg: str) -> ConfigError:
    where = f"profiles.{profile.get('name', '?')}.submit" + (f".{key}" if key else "")
    return ConfigError(f"{profile.get('source', '<profile>')}: {where}: {msg}")


def submit_options(profile: dict) -> dict:
    """The profile's ``submit:`` mapping, checked (unknown keys and bad values are errors)."""
    opts = profile.get("submit") or {}
    if not isinstance(opts, dict):
        raise _fail(profile, "", f"expected a mapping, got {opts!r}")
    for key in opts:
        if key not in SUBMIT_KEYS:
            allowed = ", ".join(sorted(SUBMIT_KEYS))
            raise _fail(profile, str(key), f"unknown key (allowed: {allowed})")
    cpus = opts.get("cpus", 1)
    if isinstance(cpus, bool) or not isinstance(cpus, int) or cpus < 1:
        raise _fail(profile, "cpus", f"expected an integer >= 1, got {cpus!r}")
    for key in ("extra", "setup"):
        val = opts.get(key, [])
        if not isinstance(val, list) or not all(isinstance(v, str) for v in val):
            raise _fail(profile, key, f"expected a list of strings, got {val!r}")
    for key in ("memory", "walltime", "partition", "queue", "account", "job_name",
                "resource_spec", "python"):
        val = opts.get(key)
        if val is not None and (not isinstance(val, str | int) or "\n" in str(val)):
            raise _fail(profile, key, f"expected a one-line string, got {val!r}")
    return {"cpus": cpus, **{k: v for k, v in opts.items() if k != "cpus"}}


def _pbs_memory(mem: str | int) -> str:
    """``3G`` -> ``3gb`` (PBS units end in b; a bare number means megabytes, as for sbatch)."""
    text = str(mem).strip().lower()
    if text.isdigit():
        return f"{text}mb"
    return text if text.endswith("b") else text + "b"


def _directives(kind: str, opts: dict, name: str, out: Path, cwd: Path) -> list[str]:
    if kind == "slurm":
        lines = [f"--job-name={name}", f"--output={out}", f"--chdir={cwd}", "--nodes=1",
                 "--ntasks=1", f"--cpus-per-task={opts['cpus']}"]
        if opts.get("memory") is not None:
            lines.append(f"--mem={opts['memory']}")
        if opts.get("walltime"):
            lines.append(f"--time={opts['walltime']}")
        part = opts.get("partition") or opts.get("queue")
        if part:
            lines.append(f"--partition={part}")
        if opts.get("account"):
            lines.append(f"--account={opts['account']}")
        prefix = "#SBATCH"
    else:
        spec = opts.get("resource_spec")
        if not spec:
            spec = f"select=1:ncpus={opts['cpus']}"
            if opts.get("memory") is not None:
                spec += f":mem={_pbs_memory(opts['memory'])}"
        lines = [f"-N {name}", f"-o {out}", "-j oe", f"-l {spec}"]
        if opts.get("walltime"):
            lines.append(f"-l walltime={opts['walltime']}")
        if opts.get("queue") or opts.get("partition"):
            lines.append(f"-q {opts.get('queue') or opts.get('partition')}")
        if opts.get("account"):
            lines.append(f"-A {opts['account']}")
        prefix = "#PBS"
    return [f"{prefix} {line}" for line in lines + list(opts.get("extra", []))]


# The allocation's size, from whichever scheduler started us; SLURM's PBS emulation sets the
# SLURM_* variables, real PBS sets PBS_NP/NCPUS. Memory: SLURM tells us, PBS does not (auto).
_BODY = r"""set -euo pipefail
cd {cwd}
{setup}
ncpu="${{SLURM_CPUS_ON_NODE:-${{PBS_NP:-${{NCPUS:-$(nproc)}}}}}}"
mem_mb="${{SLURM_MEM_PER_NODE:-}}"
if [ -z "$mem_mb" ] && [ -n "${{SLURM_MEM_PER_CPU:-}}" ]; then
  mem_mb=$((SLURM_MEM_PER_CPU * ncpu))
fi
# 3/4 of the allocation for the workers, the rest for the driver and the OS
limit=auto
[ -n "$mem_mb" ] && limit="$((mem_mb * 3 / 4 / ncpu))MB"
jobid="${{SLURM_JOB_ID:-${{PBS_JOBID:-$$}}}}"
cluster_file={submit_dir}/allocation-"$jobid".yaml
cat >"$cluster_file" <<EOF
# kmdask submit: a LocalCluster sized to batch job $jobid ($ncpu CPUs, ${{mem_mb:-?}} MB)
default: allocation
profiles:
  allocation:
    kind: local
    n_workers: $ncpu
    threads_per_worker: 1
    memory_limit: $limit
    config: {config}
EOF
echo "kmdask submit: job $jobid on $(hostname): $ncpu CPUs, memory ${{mem_mb:-?}} MB, $(date)"
{command}
"""


def _heredoc_safe(text: str) -> str:
    """Escape what an unquoted heredoc would expand (the cluster file is written by one)."""
    return text.replace("\\", "\\\\").replace("$", "\\$").replace("`", "\\`")


def render_script(kind: str, opts: dict, *, name: str, out: Path, cwd: Path, submit_dir: Path,
                  run_args: list[str], python: str, config: dict, header: str) -> str:
    """The batch script text (no I/O): directives, allocation sizing, then ``kmdask run``."""
    command = shlex.join([python, "-m", "kmdask", "run", *run_args,
                          "--cluster-file"]) + ' "$cluster_file" --profile allocation'
    body = _BODY.format(cwd=shlex.quote(str(cwd)),
                        setup="\n".join(opts.get("setup", [])),
                        submit_dir=shlex.quote(str(submit_dir)),
                        config=_heredoc_safe(json.dumps(config)), command=command)
    return "\n".join(["#!/usr/bin/env bash", *_directives(kind, opts, name, out, cwd),
                      header, body])


def _kind(profile: dict) -> str:
    kind = profile.get("kind")
    if kind not in _SCHEDULERS:
        raise ConfigError(f"{profile.get('source', '<profile>')}: profiles."
                          f"{profile.get('name', '?')}.kind: kmdask submit needs a slurm or pbs "
                          f"profile, got {kind!r}")
    return kind


def _require(kind: str, profile_name: str | None = None) -> str:
    exe = _SCHEDULERS[kind][0]
    if shutil.which(exe) is None:
        who = f"kmdask submit --profile {profile_name}: " if profile_name else ""
        raise KmdaskError(f"{who}the {kind.upper()} command '{exe}' is not on PATH (run it on "
                          "the cluster's login node)")
    return exe


def _scheduler_message(text: str) -> str:
    """The one line of a scheduler's complaint worth showing (qsub wraps sbatch's in prose)."""
    lines = [ln.strip(" '\t") for ln in text.splitlines() if ln.strip(" '\t")]
    for ln in lines:
        if "error:" in ln.lower() and "error running" not in ln.lower():
            return ln[:300]
    return (lines[-1] if lines else "no message")[:300]


def submit_command(kind: str, script: Path, *, out: Path | None = None,
                   extra_args: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The sbatch/qsub command line that submits ``script`` (no I/O)."""
    exe = _SCHEDULERS[kind][0]
    cmd = [exe, "--parsable"] if kind == "slurm" else [exe]
    if kind == "pbs" and out is not None:
        cmd += ["-o", str(out), "-j", "oe"]
    return [*cmd, *extra_args, str(script)]


def submit_script(script: Path, kind: str, *, out: Path | None = None,
                  extra_args: list[str] | tuple[str, ...] = (), cwd: Path | None = None,
                  timeout: float = 60.0) -> str:
    """Submit an existing batch script with sbatch (``kind="slurm"``) or qsub (``"pbs"``).

    Returns the job id; a refusal is a one-line :class:`KmdaskError` with the scheduler's reason.
    ``out`` is passed as ``-o`` to qsub (SLURM's qsub emulation ignores ``#PBS -o``).
    """
    exe = _require(kind)
    cmd = submit_command(kind, script, out=out, extra_args=extra_args)
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    except subprocess.TimeoutExpired:
        raise KmdaskError(f"{exe} did not answer within {timeout:g} s") from None
    text = (res.stdout or "") + (res.stderr or "")
    if res.returncode != 0:
        raise KmdaskError(f"{exe} refused the job: {_scheduler_message(text)}")
    # sbatch --parsable: "123" or "123;cluster"; qsub: "123" or "123.server"
    m = re.search(r"^\s*(\d+(?:\.[\w.-]+)?)(?:;\S+)?\s*$", res.stdout or "", re.MULTILINE)
    if not m:
        raise KmdaskError(f"{exe} gave no job id: {_scheduler_message(text)}")
    return m.group(1)


def _relative_to(path: Path, base: Path) -> Path:
    """``path`` relative to ``base`` when inside it: the job runs in ``base`` too, and the run
    manifest then records the same paths as a `kmdask run` from the same directory."""
    try:
        return path.relative_to(base)
    except ValueError:
        return path


@dataclass(frozen=True)
class BatchScript:
    """A batch script as :func:`write_batch_script` would write it: where, its scheduler
    output file, and its text."""

    path: Path
    output: Path
    text: str


def batch_script(job_path: Path, profile: dict, *, runs_dir: Path,
                 extra_run_args: list[str] | None = None) -> BatchScript:
    """The batch script for ``job_path``, rendered but not written (``kmdask submit
    --dry-run``). Reads the job spec only: a bad one fails here, before anything is written.

    Parameters
    ----------
    job_path : Path
        The job spec.
    profile : dict
        A ``slurm`` or ``pbs`` profile; its ``submit:`` mapping gives the batch options.
    runs_dir : Path
        Where the job's run directory goes; the script goes to ``<runs_dir>/<job>/submit/``.
    extra_run_args : list of str, optional
        Further arguments of the ``kmdask run`` inside the job.
    """
    from kmdask.batch.spec import load_job

    kind = _kind(profile)
    opts = submit_options(profile)
    spec = load_job(job_path)  # a bad job spec fails here, not hours later in the queue
    cwd = Path.cwd()
    job_file = _relative_to(Path(spec.source).resolve(), cwd)
    runs_dir = Path(runs_dir).resolve()
    submit_dir = runs_dir / spec.name / "submit"
    stamp = time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
    stem = submit_dir / f"{spec.name}-{stamp}"
    script = stem.with_suffix(".sbatch" if kind == "slurm" else ".pbs")
    out = stem.with_suffix(".out")
    # the driver inherits the profile's dask settings, not its dask-jobqueue section
    config = {k: v for k, v in profile_dask_config(profile).items() if k != "jobqueue"}
    header = (f"# generated by `kmdask submit` from profile {profile.get('name')!r} "
              f"({profile.get('source', '?')}) at {time.strftime('%Y-%m-%d %H:%M:%S')}")
    text = render_script(
        kind, opts, name=str(opts.get("job_name") or f"kmdask-{spec.name}"), out=out,
        cwd=cwd, submit_dir=submit_dir,
        run_args=[str(job_file), "--runs-dir", str(_relative_to(runs_dir, cwd)),
                  *(extra_run_args or [])],
        python=str(opts.get("python") or sys.executable), config=config, header=header)
    return BatchScript(script, out, text)


def write_batch_script(job_path: Path, profile: dict, *, runs_dir: Path,
                       extra_run_args: list[str] | None = None) -> tuple[Path, Path]:
    """Write ``<runs_dir>/<job>/submit/<job>-<stamp>.{sbatch,pbs}``; returns (script, output).

    Needs no scheduler command: the script can be written anywhere and inspected."""
    script = batch_script(job_path, profile, runs_dir=runs_dir, extra_run_args=extra_run_args)
    script.path.parent.mkdir(parents=True, exist_ok=True)
    script.path.write_text(script.text)
    script.path.chmod(0o755)
    return script.path, script.output


def submit_job(job_path: Path, profile: dict, *, runs_dir: Path,
               extra_args: list[str]) -> str:
    """Submit ``kmdask run JOB`` as one batch job; returns the scheduler's job id.

    Parameters
    ----------
    job_path : Path
        The job spec (validated here before anything is submitted).
    profile : dict
        A ``slurm`` or ``pbs`` profile; its ``submit:`` mapping gives the batch options.
    runs_dir : Path
        Where the job's run directory goes (must be on a file system the node shares).
    extra_args : list of str
        Passed to sbatch/qsub verbatim before the script, e.g. ``["--begin=now+1hour"]``.
    """
    kind = _kind(profile)
    submit_options(profile)
    _require(kind, profile.get("name"))  # before writing anything
    script, out = write_batch_script(job_path, profile, runs_dir=runs_dir)
    job_id = submit_script(script, kind, out=out, extra_args=extra_args, cwd=script.parent)
    record = {"job_id": job_id, "scheduler": kind, "profile": profile.get("name"),
              "script": script.name, "output": out.name,
              "submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    script.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    return job_id


def job_state(job_id: str, kind: str) -> str | None:
    """The job's state (``PENDING``, ``RUNNING``, ``COMPLETED``, ``FAILED``...) or None once the
    scheduler has forgotten it. PBS single-letter states are mapped onto SLURM's words."""
    if kind == "slurm":
        res = subprocess.run(["squeue", "-h", "-t", "all", "-j", str(job_id), "-o", "%T"],
                             capture_output=True, text=True, timeout=30)
        state = res.stdout.strip().splitlines()
        return state[0] if res.returncode == 0 and state else None
    res = subprocess.run(["qstat", str(job_id)], capture_output=True, text=True, timeout=30)
    # "Job id  Name  User  Time Use  S  Queue": the id may carry a ".server" suffix
    rows = [f for f in (ln.split() for ln in res.stdout.splitlines())
            if len(f) >= 5 and f[0].split(".")[0] == str(job_id).split(".")[0]]
    if res.returncode != 0 or not rows:
        return None
    letter = rows[0][4]
    return {"Q": "PENDING", "H": "PENDING", "W": "PENDING", "R": "RUNNING", "E": "COMPLETING",
            "C": "COMPLETED", "F": "COMPLETED"}.get(letter, letter)


def wait_for_job(job_id: str, kind: str, *, timeout: float = 600.0, poll: float = 1.0) -> str:
    """Poll until the job has left the queue; returns its last state seen.

    ``COMPLETED`` only says the scheduler is done with it; check the job's output for success.
    """
    deadline = time.monotonic() + timeout
    last = "PENDING"
    while time.monotonic() < deadline:
        state = job_state(job_id, kind)
        if state is None or state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING"):
            # forgotten before we saw it finish (SLURM keeps ended jobs for MinJobAge)
            return state or "UNKNOWN"
        last = state
        time.sleep(poll)
    why = ""
    if kind == "slurm":  # e.g. Resources, Priority, or PartitionConfig (never satisfiable)
        res = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%r"],
                             capture_output=True, text=True, timeout=30)
        why = f" ({res.stdout.strip()})" if res.returncode == 0 and res.stdout.strip() else ""
    raise KmdaskError(f"{kind.upper()} job {job_id} still {last}{why} after {timeout:g} s")
