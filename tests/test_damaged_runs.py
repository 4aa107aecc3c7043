"""Damaged artefacts of earlier runs: checkpoints, result.json, labels.npy, the manifest and
the seal (SHA256SUMS) truncated or altered. A resume names the file and recomputes from the
last good state, bit-identical to an undisturbed run; the report refuses a damaged run."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import address_profile, checkpoint_iteration, kmdask_main, run_kmdask

from kmdask.batch import rundir
from kmdask.batch.checkpoint import FileCheckpoint
from kmdask.errors import DataError

FITS = [
    {"name": "a", "algorithm": "scalable", "rows": 20000, "k": [6, 7], "trials": 2,
     "iterations": 40, "tol": 0.0},
    {"name": "b", "algorithm": "scalable", "rows": 5000, "k": [3], "trials": 1,
     "iterations": 10},
    {"name": "c", "algorithm": "scalable", "rows": 3000, "k": [4], "trials": 1,
     "iterations": 10},
]
MODELS = [("a", 6), ("a", 7), ("b", 3), ("c", 4)]


@pytest.fixture(scope="module")
def work(tmp_path_factory, mnist_store, client) -> dict:
    """A working directory with the job and a LocalCluster profile, and one undisturbed run
    (on the session's cluster: results do not depend on the cluster)."""
    from kmdask.batch.runner import run_job
    from kmdask.batch.spec import load_job

    wd = tmp_path_factory.mktemp("damaged")
    (wd / "cluster.yaml").write_text(yaml.safe_dump({"default": "local", "profiles": {
        "local": {"kind": "local", "n_workers": 2, "threads_per_worker": 1,
                  "memory_limit": "2GiB"}}}))
    job = wd / "dmg.yaml"
    job.write_text(yaml.safe_dump({"job": "dmg", "data": {"store": str(mnist_store)},
                                   "fits": FITS}))
    ref = run_job(load_job(job), address_profile(client.scheduler.address),
                  runs_dir=wd / "ref")
    return {"dir": wd, "job": job, "ref": ref.path}


def _same_models(a: Path, b: Path) -> None:
    for fit, k in MODELS:
        d = Path("fits") / fit / f"k{k}"
        for name in ("centers.npy", "labels.npy", "members.npy", "members_idx.npy"):
            assert (a / d / name).read_bytes() == (b / d / name).read_bytes(), d / name
        ra, rb = (json.loads((x / d / "result.json").read_text()) for x in (a, b))
        ra.pop("seconds")
        rb.pop("seconds")
        assert ra == rb, d


def _flip_byte(path: Path, offset: int = -17) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_checkpoint_with_a_bad_checksum_falls_back_to_the_one_before(tmp_path, caplog):
    ck = FileCheckpoint(tmp_path / "checkpoint.npz")
    rec = [{"n_iter": 1}]
    ck.save({"x": np.arange(5.0)}, rec)
    ck.save({"x": np.arange(5.0) + 1}, [{"n_iter": 2}])
    assert ck.iteration == 2 and ck.previous.exists()
    # altered contents in a well-formed file: only the checksum can tell
    with np.load(ck.path) as z:
        entries = {k: z[k] for k in z.files}
    np.savez(ck.path, **{**entries, "x": entries["x"] + 0.5})
    arrays, records = FileCheckpoint(ck.path).load()
    assert records == rec and np.array_equal(arrays["x"], np.arange(5.0))
    assert f"{ck.path} is damaged (its contents do not match its checksum)" in caplog.text
    _truncate(ck.previous)
    again = FileCheckpoint(ck.path)
    assert again.load() is None and again.iteration == 0
    assert "starting the fit again from seeding" in caplog.text
    ck.remove()
    assert not ck.path.exists() and not ck.previous.exists()


def test_truncated_checkpoint_resumes_from_the_one_before_bit_identical(work, capsys):
    wd, runs = work["dir"], work["dir"] / "runs-ck"
    proc = subprocess.Popen([sys.executable, "-m", "kmdask", "run", str(work["job"]),
                             "--runs-dir", str(runs)], cwd=wd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while True:
        cks = list(runs.glob("dmg/.*.partial/fits/a/checkpoint.npz"))
        if cks and checkpoint_iteration(cks[0]) >= 3 and \
                cks[0].with_name("checkpoint.prev.npz").exists():
            break
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    ck = cks[0]
    before = checkpoint_iteration(ck.with_name("checkpoint.prev.npz"))
    _truncate(ck)
    r = kmdask_main(capsys, "run", work["job"], "--runs-dir", runs, cwd=wd)
    assert r.returncode == 0, r.stderr
    assert f"kmdask: warning: {ck} is damaged (unreadable" in r.stderr, r.stderr
    assert "using the checkpoint before it" in r.stderr
    assert f"a: resuming at iteration {before}" in r.stderr
    _same_models(work["ref"], wd / r.stdout.strip())


DAMAGES = {
    "result.json truncated": ("fits/a/k6/result.json", _truncate),
    "labels.npy altered": ("fits/b/k3/labels.npy", _flip_byte),
    "manifest altered": ("manifest.json", lambda p: p.write_text(
        p.read_text().replace('"status": "complete"', '"status": "complete" '))),
    "seal truncated": ("SHA256SUMS", lambda p: p.write_bytes(p.read_bytes()[:-30])),
}


@pytest.mark.parametrize("what", DAMAGES)
def test_report_refuses_a_damaged_run_naming_the_file(work, tmp_path, what):
    rel, damage = DAMAGES[what]
    run = tmp_path / "run"
    shutil.copytree(work["ref"], run)
    rundir.open_run(run)  # intact
    damage(run / rel)
    with pytest.raises(DataError) as exc:
        rundir.open_run(run)
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(str(run / rel)), msg
    assert "refusing the run" in msg


def test_cli_report_of_a_damaged_run_is_one_line_exit_2(work, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(work["ref"], run)
    _flip_byte(run / "fits" / "a" / "k7" / "labels.npy")
    r = run_kmdask("report", str(run), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0] == (f"kmdask: error: {run}/fits/a/k7/labels.npy: does not match its "
                        f"checksum in {run}/SHA256SUMS (damaged); refusing the run: rerun its "
                        "job to recompute what is damaged")
    assert not (tmp_path / "out" / "index.html").exists()


def test_rerun_of_a_damaged_run_recomputes_only_the_damaged_fits(work, capsys):
    wd, ref = work["dir"], work["ref"]
    runs = wd / "runs-complete"
    final = runs / "dmg" / ref.name
    shutil.copytree(ref, final)
    (runs / "dmg" / "latest").symlink_to(ref.name)
    for what in ("result.json truncated", "labels.npy altered", "manifest altered"):
        rel, damage = DAMAGES[what]
        damage(final / rel)
    r = kmdask_main(capsys, "run", work["job"], "--runs-dir", runs, cwd=wd)
    assert r.returncode == 0, r.stderr
    err = r.stderr
    assert f"kmdask: warning: {final}/" in err and "recomputing what it affects" in err, err
    assert "fits/a/k6/result.json: does not match its checksum" in err
    assert "fit 'a' is computed again" in err and "fit 'b' is computed again" in err
    assert "c: already done in this partial run, skipping" in err
    assert wd / r.stdout.strip() == final
    _same_models(ref, final)
    assert rundir.damaged(final, (rundir.MANIFEST,)) == []
    rundir.open_run(final)
