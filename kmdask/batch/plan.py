"""Dry runs: what ``kmdask run|sweep|submit`` would do, found without doing it.

:func:`plan_job` opens the job's data as a run does (lazily: no chunk is read), computes the
same fingerprint and run id, and reads the run directories to say whether the run would be a
no-op, a resume (from which fit and iteration) or a fresh run. It computes nothing on the data,
starts no cluster, stages nothing and writes nothing, under the runs directory or elsewhere
(an array without a fingerprint cache is hashed, and the plan says so). The plan is a plain
JSON-ready dict; :func:`format_plan` is its text for a person.
"""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path
from typing import Any

import dask

from kmdask.batch import extensions, rundir, runner
from kmdask.batch.checkpoint import FileCheckpoint
from kmdask.batch.cluster import merged_dask_config, profile_dask_config
from kmdask.batch.spec import JobSpec
from kmdask.data.sources import describe

#: words of a setting's name that make its value a credential, never printed
#: (``key``, ``secret_access_key``, ``aws_session_token``, ``sasToken``, ``tls_client_key``)
SECRET_WORDS = frozenset({"key", "secret", "token", "password", "passwd", "credential",
                          "credentials", "signature"})
MASK = "***"


def run_state(job_dir: Path, run_id: str, job: JobSpec) -> dict:
    """What a run of ``job`` with ``run_id`` would find in ``job_dir`` (read only; the seals
    of the run and its fits are checked as the run checks them).

    Returns
    -------
    dict
        ``action``: ``"no-op"`` (an intact complete run with that id exists), ``"resume"`` (its
        partial directory exists, or its complete run is damaged and would be reopened) or
        ``"fresh"``; ``resume``: None, or the directory it resumes from (``partial``), what is
        damaged (``damaged``, None if nothing), the intact finished fits (``fits_done``, in
        job order) and the fit that would resume (``fit``; None: only the manifest is left)
        with its checkpoint's ``iteration`` (0: starts again from seeding).
    """
    final, partial = job_dir / run_id, job_dir / f".{run_id}.partial"
    damage = None
    if (final / rundir.MANIFEST).exists():
        problems = rundir.damaged(final, (rundir.MANIFEST,))
        if not problems:
            return {"action": "no-op", "resume": None}
        # the run reopens it as its partial run: intact fits are kept, the rest recomputed
        damage, partial = rundir.describe_damage(problems), final
    elif not partial.exists():
        return {"action": "fresh", "resume": None}
    done = [f.name for f in job.fits if _fit_done(partial / "fits" / f.name)]
    todo = [f.name for f in job.fits if f.name not in done]
    fit = todo[0] if todo else None
    iteration = FileCheckpoint(partial / "fits" / fit / "checkpoint.npz").iteration if fit else 0
    return {"action": "resume", "resume": {"partial": str(partial), "damaged": damage,
                                           "fits_done": done, "fit": fit,
                                           "iteration": iteration}}


def _fit_done(fit_dir: Path) -> bool:
    """Whether a run would skip this fit: finished, and its files match their seal."""
    return (fit_dir / "done.json").exists() and not rundir.damaged(fit_dir, ("done.json",))


def _is_secret(key: str) -> bool:
    """Whether a setting's name (snake, kebab, dotted or camel case) has a word of
    :data:`SECRET_WORDS`."""
    words = re.split(r"[^a-zA-Z]+|(?<=[a-z])(?=[A-Z])", key)
    return any(w.lower() in SECRET_WORDS for w in words)


def masked(value: Any, key: str = "") -> Any:
    """``value`` with every credential (the value of a setting named like ``key``,
    ``secret``, ``token``: see :data:`SECRET_WORDS`) replaced by ``***``, at any depth."""
    if isinstance(value, dict):
        return {k: masked(v, str(k)) for k, v in value.items()}
    if _is_secret(key) and value not in (None, "", False):
        return MASK
    return value


def _leaves(cfg: dict, prefix: str = "") -> list[str]:
    """Dotted keys of the settings (not the sections) of a nested mapping."""
    out = []
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        out += _leaves(v, key + ".") if isinstance(v, dict) else [key]
    return out


def dask_changes(profile: dict) -> tuple[dict, dict]:
    """The dask settings ``profile`` changes, as ``connect`` would merge them.

    Returns
    -------
    (dict, dict)
        By dotted key: the merged value, and dask's value without the profile (None: unset).
        A key the profile sets to dask's own value changes nothing and is left out.
    """
    import distributed  # noqa: F401 - registers its defaults (a run's Client imports it)

    merged = merged_dask_config(profile)  # for slurm/pbs: dask-jobqueue's defaults count
    changed, before = {}, {}
    for key in _leaves(profile_dask_config(profile)):
        value = dask.config.get(key, None, config=merged)
        was = dask.config.get(key, None)
        if value != was:
            changed[key], before[key] = value, was
    return changed, before


def profile_plan(profile: dict, address: str | None = None) -> dict:
    """The profile as a run would use it: name, effective kind (``--address`` makes any
    profile an ``address`` one), its settings with credentials masked, the dask settings it
    changes, and the scheduler it names."""
    kind = "address" if address else profile.get("kind")
    effective = {**profile, "kind": kind}
    changed, before = dask_changes(effective)
    return {"name": profile.get("name"), "kind": kind,
            "file": describe(profile["source"]) if profile.get("source") else None,
            "resolved": masked({k: v for k, v in profile.items()
                                if k not in ("name", "source")}),
            "dask_config": masked(changed), "dask_defaults": masked(before),
            "address": address or profile.get("address"),
            "scheduler_file": None if address else profile.get("scheduler_file")}


def _data_plan(job: JobSpec, data: runner._Data | None, profile: dict) -> dict:
    if data is None:  # the default store, not staged yet: a run would stage it first
        loc = runner.resolve_store(job, profile.get("storage_options"), stage=False)
        return {"dataset": job.dataset, "store": describe(loc.url), "split": job.split,
                "would_stage": True, "rows": None, "features": None, "dtype": None,
                "chunks": None, "labels": None, "fingerprint": None, "verified": None,
                "fingerprint_computed": False,
                "note": f"{loc} is not staged yet: a run stages {job.dataset} there first, "
                        "and only then are the data's fingerprint and the run id known"}
    chunks = data.images.chunks[0]
    return {"dataset": data.name,
            ("store" if data.is_store else "array"): describe(data.store.url),
            "split": job.split if data.is_store else None, "would_stage": False,
            "rows": data.n, "features": int(data.images.shape[1]),
            "dtype": str(data.images.dtype),
            "chunks": {"count": len(chunks), "rows": int(max(chunks))},
            "labels": data.labels is not None, "fingerprint": data.fingerprint,
            "verified": data.verified, "fingerprint_computed": data.fingerprint_computed}


def plan_job(job: JobSpec, profile: dict, *, runs_dir: Path,
             address: str | None = None) -> dict:
    """What ``kmdask run`` would do with ``job``, found without computing or writing anything.

    Parameters
    ----------
    job : JobSpec
    profile : dict
        A cluster profile (:func:`kmdask.batch.profiles.load_profile`); not connected to.
    runs_dir : Path
        Where run directories go; only read.
    address : str, optional
        ``--address``: the scheduler the run would connect to instead of the profile's.

    Returns
    -------
    dict
        JSON-ready: ``job``, ``job_file``, ``data``, ``run_id`` and ``fingerprint`` (None while
        the default store is not staged), ``fits``, ``action`` and ``resume`` (see
        :func:`run_state`), ``run_dir`` and ``profile`` (see :func:`profile_plan`).

    Raises
    ------
    KmdaskError
        What the run would fail on before connecting: missing data, fits larger than it.
    """
    data = runner._open_data(job, profile, runs_dir, dry_run=True)
    fp = None
    if data is not None:
        extra: dict = {}
        for h in (runner._Hooks(e.hooks()) for e in extensions.used_by(job)):
            extra.update(h.fingerprint_inputs(job, data.store))
        fp = runner.fingerprint(job, data.fingerprint, data.images.chunks[0], extra)
    run_id = fp[:16] if fp else None
    job_dir = runs_dir / job.name
    state = run_state(job_dir, run_id, job) if run_id else {"action": "fresh", "resume": None}
    rows = data.n if data is not None else None
    return {
        "job": job.name, "job_file": describe(job.source),
        "data": _data_plan(job, data, profile), "run_id": run_id, "fingerprint": fp,
        "fits": [{"name": f.name, "algorithm": f.algorithm, "ks": list(f.ks),
                  "rows": f.rows or rows, "iterations": f.iterations, "trials": f.trials,
                  "seed": f.seed, "init": f.init} for f in job.fits],
        **state, "run_dir": str(job_dir / run_id) if run_id else None,
        "profile": profile_plan(profile, address),
    }


def plan_submission(job_path: Path, profile: dict, *, runs_dir: Path,
                    extra_args: list[str] | tuple[str, ...] = ()) -> dict:
    """:func:`plan_job`'s plan plus ``script``: the batch script ``kmdask submit`` would write
    (``path``, ``output``, ``text``) and the command that would submit it (``command``;
    ``command_found``: whether it is on PATH here). Writes and submits nothing."""
    from kmdask.batch import submit
    from kmdask.batch.spec import load_job

    script = submit.batch_script(job_path, profile, runs_dir=runs_dir)  # checks the kind
    command = submit.submit_command(profile["kind"], script.path, out=script.output,
                                    extra_args=extra_args)
    plan = plan_job(load_job(job_path), profile, runs_dir=runs_dir)
    return {**plan, "script": {
        "path": str(script.path), "output": str(script.output), "command": command,
        "command_found": shutil.which(command[0]) is not None, "text": script.text,
        "note": "inside the batch job the run uses a LocalCluster sized to the allocation "
                "(profile 'allocation', written by the script), with every dask setting of "
                "this profile but its jobqueue.* ones"}}


# ------------------------------------------------------------------------------------------
# text


def _ks(ks: list[int]) -> str:
    """``[2, 3, ..., 10]`` -> ``2..10``; anything else as a list."""
    if len(ks) > 2 and ks == list(range(ks[0], ks[-1] + 1)):
        return f"{ks[0]}..{ks[-1]}"
    return ",".join(map(str, ks))


def _show(value: Any) -> str:
    return value if isinstance(value, str) else "null" if value is None else repr(value)


def _resume_text(resume: dict) -> str:
    done = [f"fit {name} done" for name in resume["fits_done"]]
    if resume["fit"] is None:
        return ", ".join(done + ["only the manifest is left to write"])
    at = (f"fit {resume['fit']} resumes at iteration {resume['iteration']}"
          if resume["iteration"] else f"fit {resume['fit']} starts again from seeding "
                                      "(no checkpoint)")
    return ", ".join(done + [at])


# the first line of a plan, by what the run would do ("stage": the data must be staged first)
_HEADLINES = {
    "no-op": "nothing to do: job {job} is unchanged; its complete run {run_id} is {run_dir} "
             "(a real run only points latest at it)",
    "fresh": "would start a fresh run {run_id} of job {job} ({n} fit(s)) in {run_dir}",
    "resume": "would resume run {run_id} of job {job}: {progress}",
    "stage": "would stage {store}, then run job {job} afresh ({n} fit(s); the run id is known "
             "once the data is staged)",
}


def _fit_state(plan: dict, name: str) -> str:
    """What the run would do with one fit."""
    resume = plan["resume"]
    if plan["action"] == "no-op":
        return "complete"
    if resume is None:
        return "to run"
    if name in resume["fits_done"]:
        return "done"
    if name == resume["fit"]:
        return f"resumes at iteration {resume['iteration']}" if resume["iteration"] else \
            "from seeding"
    return "to run"


def _table(rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.rjust(w) if i in right else c.ljust(w)
                             for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip()
            for r in rows]


def _data_lines(d: dict) -> list[str]:
    where = f"store {d['store']} ({d['split']})" if "store" in d else f"array {d['array']}"
    if d["would_stage"]:
        return [f"data         {d['dataset']}: {where}", f"             {d['note']}"]
    shape = (f"{d['rows']} rows x {d['features']} {d['dtype']}, {d['chunks']['count']} "
             f"chunk(s) of {d['chunks']['rows']} rows")
    checks = {True: ", verified checksums", False: ", UNVERIFIED (no known checksums)",
              None: ""}[d["verified"]]
    how = " (hashed now: no cache held it)" if d["fingerprint_computed"] else ""
    return [f"data         {d['dataset']}: {where}", f"             {shape}{checks}",
            f"             fingerprint {d['fingerprint']}{how}"]


def _profile_lines(p: dict) -> list[str]:
    out = [f"profile      {p['name']} ({p['kind']})" + (f", from {p['file']}" if p["file"]
                                                         else "")]
    simple = {k: v for k, v in p["resolved"].items()
              if k not in ("kind", "description", "config") and not isinstance(v, dict | list)}
    if simple:
        out.append("             " + ", ".join(f"{k}={_show(v)}" for k, v in simple.items()))
    if p["address"] or p["scheduler_file"]:
        out.append(f"             scheduler {p['address'] or p['scheduler_file']}")
    if not p["dask_config"]:
        return [*out, "             dask settings it changes: none (dask's own)"]
    out.append("             dask settings it changes:")
    return out + [f"               {k}: {_show(v)} (dask's: {_show(p['dask_defaults'][k])})"
                  for k, v in p["dask_config"].items()]


def format_plan(plan: dict) -> str:
    """A plan as lines a person reads: what would happen, the data, the fits, the profile."""
    key = plan["action"] if plan["run_id"] else "stage"
    head = _HEADLINES[key].format(
        job=plan["job"], run_id=plan["run_id"], run_dir=plan["run_dir"], n=len(plan["fits"]),
        store=plan["data"].get("store"),
        progress=_resume_text(plan["resume"]) if plan["resume"] else "")
    rows = [["fit", "algorithm", "K", "rows", "iterations", "trials", "seed", "init", "state"]]
    rows += [[f["name"], f["algorithm"], _ks(f["ks"]), str(f["rows"] or "all"),
              str(f["iterations"]), str(f["trials"]), str(f["seed"]), f["init"],
              _fit_state(plan, f["name"])] for f in plan["fits"]]
    lines = [head, f"job file     {plan['job_file']}"]
    if plan["resume"]:
        lines.append(f"partial run  {plan['resume']['partial']}")
    if plan["resume"] and plan["resume"]["damaged"]:
        lines.append(f"damaged      {plan['resume']['damaged']}: reopened, what it affects "
                     "is computed again")
    lines += _data_lines(plan["data"])
    if plan["fingerprint"]:
        lines.append(f"run id       {plan['run_id']} (job fingerprint {plan['fingerprint']})")
    return "\n".join([*lines, *_profile_lines(plan["profile"]), "fits:",
                      *_table(rows, {3, 4, 5, 6})])


def format_sweep(sweep: dict) -> str:
    """A sweep's plans, then the report it would write."""
    parts = [format_plan(p) for p in sweep["plans"]]
    return "\n\n".join([*parts, f"then would write the report {sweep['index']}"])


def format_submission(plan: dict) -> str:
    """A submission's plan, then the batch script, verbatim."""
    s = plan["script"]
    found = "" if s["command_found"] else (f" ({s['command'][0]} is not on PATH here: submit "
                                           "from the cluster's login node)")
    return "\n".join([format_plan(plan), "",
                      f"batch script {s['path']} (not written), submitted with: "
                      f"{shlex.join(s['command'])}{found}",
                      f"scheduler output {s['output']}", s["note"], "",
                      s["text"].rstrip("\n")])
