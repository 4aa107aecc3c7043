"""The report on a real small run: files written, links resolving, pixels equal to the cluster
means, and refusal of incomplete run directories (one-line error, nothing written)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import unavailable

from kmdask.batch import rundir
from kmdask.errors import DataError

JOB = {
    "job": "rep",
    "data": {"store": None, "split": "train"},
    "fits": [
        {"name": "scal", "algorithm": "scalable", "rows": 500, "k": [2, 3], "trials": 2,
         "iterations": 30},
        {"name": "mcc", "algorithm": "mccaffrey", "rows": 100, "k": 3, "iterations": 20,
         "trials": 20},
        {"name": "mcc30", "algorithm": "mccaffrey", "rows": 100, "k": 3, "iterations": 30,
         "trials": 30},
    ],
    "figures": [
        {"name": "demo", "kind": "clusters", "fits": ["mcc", "mcc30"], "samples": 100},
        {"name": "K", "kind": "clusters", "fits": ["scal"], "per_cluster": 10},
        {"name": "thr", "kind": "clusters", "fits": ["mcc"], "samples": 40, "threshold": 0.35,
         "title": "Thresholded"},
        {"name": "elbow", "kind": "elbow", "fits": ["scal"]},
        {"name": "composition", "kind": "composition", "fits": ["scal", "mcc"]},
        {"name": "scores", "kind": "scores", "fits": ["scal", "mcc"]},
        {"name": "convergence", "kind": "convergence", "fits": ["scal", "mcc"]},
        {"name": "timing", "kind": "timing", "fits": ["scal", "mcc", "mcc30"]},
    ],
}
PNGS = {"demo.png", "K2.png", "K3.png", "thr.png", "elbow.png", "composition_scal.png",
        "composition_mcc.png", "scores.png", "convergence.png", "timing.png"}


def _env(tmp: Path) -> dict:
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp / "xdg"), KMDASK_MIRRORS="",
               KMDASK_NO_PYPI="1")
    env.pop("KMDASK_DATA_DIR", None)
    return env


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, mnist_store) -> Path:
    """One real run of the job above on a 2-worker LocalCluster (about 10 s)."""
    work = tmp_path_factory.mktemp("reportrun")
    (work / "cluster.yaml").write_text(yaml.safe_dump({
        "default": "local",
        "profiles": {"local": {"kind": "local", "n_workers": 2, "threads_per_worker": 1,
                               "memory_limit": "2GiB"}}}))
    job = json.loads(json.dumps(JOB))
    job["data"]["store"] = str(mnist_store)
    (work / "rep.yaml").write_text(yaml.safe_dump(job))
    r = subprocess.run([sys.executable, "-m", "kmdask", "run", "rep.yaml", "-q",
                        "--cluster-file", "cluster.yaml"], cwd=work, env=_env(work),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return work / r.stdout.strip()


def _copy(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest, symlinks=True)
    return dest


def test_report_writes_every_figure_and_links_resolve(run_dir, tmp_path):
    from kmdask.report.build import write_report

    out = tmp_path / "report"
    index = write_report([run_dir], out)
    assert index == out / "index.html" and index.is_file()
    assert {p.name for p in (out / "rep").iterdir() if p.is_file()} == PNGS
    assert {p.name for p in (out / "rep").iterdir() if p.is_dir()} == {"thumbs", "models"}
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no temp left
    page = index.read_text()
    links = re.findall(r'(?:src|href)="([^"]+)"', page)
    files = [u for u in links if not u.startswith("#")]
    assert {Path(u).name for u in files if u.count("/") == 1} == PNGS  # the full figures
    assert {Path(u).name for u in files if "/models/" in u} == {
        "scal-k2.html", "scal-k3.html", "mcc-k3.html", "mcc30-k3.html"}
    for u in files:
        assert not re.match(r"^[a-z]+:|^/", u), u  # relative, no external assets
        with open(out / u, "rb") as f:
            head = f.read(15)
            assert head.startswith(b"\x89PNG\r\n\x1a\n" if u.endswith(".png")
                                   else b"<!DOCTYPE html>"), u
    from PIL import Image

    for png in PNGS:  # the index shows a thumbnail of every figure wider than 1600 px
        with Image.open(out / "rep" / png) as im:
            wide = im.width > 1600
        thumb = out / "rep" / "thumbs" / png
        assert thumb.is_file() == wide and (f'src="rep/thumbs/{png}"' in page) == wide, png
        if wide:
            with Image.open(thumb) as im:
                assert 800 <= im.width <= 1600, png
    anchors = set(re.findall(r'id="([^"]+)"', page))
    assert {u[1:] for u in links if u.startswith("#")} <= anchors
    m = json.loads((run_dir / "manifest.json").read_text())
    for needle in (m["run_id"], m["fingerprint"], "</span>66</span> ", "4,185.25",
                   m["versions"]["dask"], "connect"):
        assert needle in page
    # a second report into the same directory replaces the first one; two runs of one job
    # (here the run and a copy of it) get a section and a folder each
    again = _copy(run_dir, tmp_path / "again")
    write_report([run_dir, again], out)
    subs = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert subs == ["rep", f"rep-{m['run_id']}", f"rep-{m['run_id']}-2"]
    page = index.read_text()
    assert page.count('<section>') == 2
    for sub in subs[1:]:
        assert {p.name for p in (out / sub).iterdir() if p.is_file()} == PNGS
        assert f'href="{sub}/demo.png"' in page


def _data_means(store: Path, labels: np.ndarray, k: int) -> np.ndarray:
    from kmdask.data.store import open_images

    x = np.asarray(open_images(store)[: labels.shape[0]].compute())
    v = x.astype(np.float32) / np.float32(255)
    return np.stack([v[labels == j].astype(np.float64).mean(axis=0) for j in range(k)])


def test_mean_image_pixels_are_the_cluster_means(run_dir, mnist_store, tmp_path):
    import matplotlib.image as mpimg

    from kmdask.batch.rundir import open_run
    from kmdask.batch.spec import parse_job
    from kmdask.report.clusters import draw_clusters
    from kmdask.report.style import mean_image_rgb

    run = open_run(run_dir)
    figs = {f.name: f for f in parse_job(run.manifest["spec"]).figures}
    checked = 0
    for name, fits in (("demo", ("mcc", "mcc30")), ("K", ("scal",)), ("thr", ("mcc",))):
        fig = figs[name]
        for drawn in draw_clusters(run, fig, tmp_path):
            png = (mpimg.imread(drawn.path)[..., :3] * 255).round().astype(np.uint8)
            assert png.shape == drawn.canvas.shape
            for t in drawn.means:
                assert t.fit in fits
                model = run.model(t.fit, t.k)
                centre = model.centers[t.cluster]
                # the array drawn is the tinted mean: (255v, 180v, 0), v the centre's pixel
                v = centre.reshape(28, 28)
                if fig.threshold is not None:
                    v = np.where(v > fig.threshold, v, 0.0)
                    assert (t.rgb[centre.reshape(28, 28) <= fig.threshold] == 0).all()
                want = np.rint(np.stack([255 * v, 180 * v, 0 * v], axis=-1)).astype(np.uint8)
                np.testing.assert_array_equal(t.rgb, want)
                np.testing.assert_array_equal(t.rgb, mean_image_rgb(centre, fig.threshold))
                # ... the centre is the mean of the cluster's data rows ...
                means = _data_means(mnist_store, model.labels, t.k)
                np.testing.assert_allclose(centre, means[t.cluster], rtol=0, atol=1e-6)
                # ... and the PNG holds exactly that image, 16 x 16 pixels per image pixel
                s = t.scale
                tile = png[t.y:t.y + 28 * s, t.x:t.x + 28 * s]
                np.testing.assert_array_equal(tile, t.rgb.repeat(s, 0).repeat(s, 1))
                assert s >= 4
                checked += 1
    assert checked == 3 + 3 + 2 + 3 + 3


def test_samples_are_the_first_rows_in_their_clusters(run_dir, tmp_path):
    from kmdask.batch.rundir import open_run
    from kmdask.batch.spec import parse_job
    from kmdask.report.clusters import _panel

    run = open_run(run_dir)
    fig = next(f for f in parse_job(run.manifest["spec"]).figures if f.name == "demo")
    p = _panel(run, fig, "mcc", 3)
    labels = run.model("mcc", 3).labels
    head = run.head_images
    assert [s.shape[0] for s in p.samples] == [min(c, 60) for c in (16, 66, 18)]
    for j in range(3):
        np.testing.assert_array_equal(p.samples[j], head[:100][labels == j][:60])
    kfig = next(f for f in parse_job(run.manifest["spec"]).figures if f.name == "K")
    q = _panel(run, kfig, "scal", 3)
    members = run.model("scal", 3).members
    for j in range(3):
        np.testing.assert_array_equal(q.samples[j], members[j][:10])


def _report_fails(run: Path, out: Path, match: str) -> None:
    from kmdask.report.build import write_report

    with pytest.raises(DataError, match=match) as exc:
        write_report([run], out)
    assert "\n" not in str(exc.value)
    assert not (out / "index.html").exists()


def test_incomplete_run_is_refused(run_dir, tmp_path):
    broken = _copy(run_dir, tmp_path / "broken")
    (broken / "fits" / "scal" / "k3" / "labels.npy").unlink()
    _report_fails(broken, tmp_path / "out1", "labels.npy")

    unfinished = _copy(run_dir, tmp_path / "unfinished")
    mf = unfinished / "manifest.json"
    m = json.loads(mf.read_text())
    mf.write_text(json.dumps({**m, "status": "running"}))
    _report_fails(unfinished, tmp_path / "out2", "not marked complete")

    nofit = _copy(run_dir, tmp_path / "nofit")
    mf = nofit / "manifest.json"
    m = json.loads(mf.read_text())
    del m["fits"]["mcc30"]
    mf.write_text(json.dumps(m))
    rundir.seal(nofit)  # a hand-edited manifest, resealed: the check below is the figure's
    _report_fails(nofit, tmp_path / "out3", "figure 'demo' needs fit 'mcc30'")

    _report_fails(tmp_path / "nowhere", tmp_path / "out4", "no such run directory")


def test_cli_refuses_incomplete_run_with_one_line(run_dir, tmp_path):
    broken = _copy(run_dir, tmp_path / "broken")
    (broken / "manifest.json").unlink()
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "kmdask", "report", str(broken), "--out",
                        str(out)], env=_env(tmp_path), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kmdask: error:") and "manifest" in lines[0]
    assert not (out / "index.html").exists()


def test_failed_report_leaves_the_previous_one_intact(run_dir, tmp_path, monkeypatch):
    import dataclasses

    from kmdask.report import kinds
    from kmdask.report.build import write_report

    out = tmp_path / "report"
    write_report([run_dir], out)
    before = (out / "index.html").read_bytes()
    pngs = sorted((out / "rep").iterdir())

    def boom(*_a, **_k):
        raise RuntimeError("drawing failed")

    registry = kinds.figure_kinds()
    monkeypatch.setitem(registry, "timing", dataclasses.replace(registry["timing"], draw=boom))
    with pytest.raises(RuntimeError):
        write_report([run_dir], out)
    assert (out / "index.html").read_bytes() == before
    assert sorted((out / "rep").iterdir()) == pngs
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


def test_figures_writing_the_same_file_are_refused(run_dir, tmp_path):
    clash = _copy(run_dir, tmp_path / "clash")
    mf = clash / "manifest.json"
    m = json.loads(mf.read_text())
    m["spec"]["figures"] = [{"name": "K2", "kind": "timing", "fits": ["mcc"]},
                            {"name": "K", "kind": "clusters", "fits": ["scal"]}]
    mf.write_text(json.dumps(m))
    rundir.seal(clash)
    _report_fails(clash, tmp_path / "out", "figures 'K2' and 'K' both write K2.png")
    assert [p.name for p in (tmp_path / "out").iterdir()] == []


def test_truncated_result_json_is_refused_naming_it(run_dir, tmp_path):
    from kmdask.report.build import write_report

    out = tmp_path / "report"
    write_report([run_dir], out)
    before = (out / "index.html").read_bytes()
    for reseal in (False, True):  # caught by the seal, or (resealed by hand) when read
        bad = _copy(run_dir, tmp_path / f"truncated{int(reseal)}")
        res = rundir.fit_dir(bad, "scal", 3) / "result.json"
        res.write_text(res.read_text()[:40])
        if reseal:
            rundir.seal(bad)
        with pytest.raises(DataError, match=r"fits/scal/k3/result\.json") as exc:
            write_report([bad], out)
        assert "\n" not in str(exc.value)
        assert (out / "index.html").read_bytes() == before
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


@contextlib.contextmanager
def _mounted(*args: str):
    """``mount ARGS`` (root and mount rights: .ci/run has both), unmounted afterwards; the
    last argument is the mount point."""
    target = args[-1]
    r = subprocess.run(["mount", *args], capture_output=True, text=True)
    if r.returncode != 0:
        unavailable(f"cannot mount here ({r.stderr.strip() or r.returncode}): needs root and "
                    "mount rights; .ci/run has both")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", target], check=False)


def test_unwritable_report_directory_is_one_line_and_keeps_the_old_report(run_dir, tmp_path):
    from kmdask.errors import KmdaskError
    from kmdask.report.build import write_report

    # a file where the report directory should be
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    with pytest.raises(KmdaskError, match="blocker: cannot write the report") as exc:
        write_report([run_dir], blocker)
    assert "\n" not in str(exc.value)

    out = tmp_path / "report"
    out.mkdir()
    with _mounted("-t", "tmpfs", "-o", "size=32m", "tmpfs", str(out)):
        write_report([run_dir], out)
        before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
        # a full disk: the second report fails writing some file, and says which
        st = os.statvfs(out)
        filler = out / "filler"
        filler.write_bytes(b"\0" * (st.f_bavail * st.f_frsize - 300_000))
        with pytest.raises(KmdaskError, match=f"{out}/.*No space left") as exc:
            write_report([run_dir], out)
        assert "\n" not in str(exc.value)
        filler.unlink()
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
        # a read-only report directory
        subprocess.run(["mount", "-o", "remount,ro", str(out)], check=True)
        try:
            with pytest.raises(KmdaskError, match=f"{out}: cannot write the report there "
                               r"\(Read-only file system\)"):
                write_report([run_dir], out)
        finally:
            subprocess.run(["mount", "-o", "remount,rw", str(out)], check=True)
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
