"""The run directory: what a run leaves behind, and the only thing the report reads.

Layout of ``runs/<job>/<run-id>/`` (run-id = the first 16 hex digits of the fingerprint)::

    manifest.json                      job, fingerprint, versions, data, profile, timings, metrics
    data/head_images.npy               first H rows of the clustered data (uint8, for samples)
    data/true_labels.npy               true class of every clustered row (uint8)
    fits/<fit>/k<K>/centers.npy        (K, d) float64 cluster means, pixel scale [0, 1]
    fits/<fit>/k<K>/labels.npy         (rows,) int32 cluster of every row
    fits/<fit>/k<K>/members.npy        (K, P, d) uint8 images of each cluster's first P members
    fits/<fit>/k<K>/members_idx.npy    (K, P) int64 their row indices (-1 = fewer members)
    fits/<fit>/k<K>/result.json        inertia, n_iter, histories, trials, counts, metrics

Job extensions add their own files (the error-case extension: ``classifier/``, ``cases.zarr``,
``experiments/``; see :mod:`kmdask.errorcases`) and name the ones a complete run must hold.

Runs are written under ``.<run-id>.partial/`` and renamed into place when complete; ``latest``
(a symlink) is switched atomically afterwards. numpy + json only.

Checksums: a complete run holds ``SHA256SUMS`` (the format of ``sha256sum``, so ``sha256sum -c
SHA256SUMS`` checks it by hand) listing every file of the run, the manifest included; each
finished fit of a partial run holds one of its own (``fits/<fit>/SHA256SUMS``), so a resume
trusts only what still matches (see :func:`seal` and :func:`damaged`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kmdask.batch.extensions import extensions
from kmdask.errors import DataError

MANIFEST = "manifest.json"
SUMS = "SHA256SUMS"
MEMBERS_PER_CLUSTER = 105  # enough for every figure (the error-case figures show up to 105)


def _file_mode() -> int:
    # mkstemp creates 0600 files; run files should follow the user's umask like any other file
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _mkstemp(path: Path) -> tuple[int, str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, _file_mode())
    return fd, tmp


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temporary file in the same directory, then rename)."""
    fd, tmp = _mkstemp(path)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=_json_default)
        f.write("\n")
    os.replace(tmp, path)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_npy(path: Path, arr: np.ndarray) -> None:
    fd, tmp = _mkstemp(path)
    with os.fdopen(fd, "wb") as f:
        np.save(f, arr, allow_pickle=False)
    os.replace(tmp, path)


def sha256_file(path: Path) -> str:
    """The sha256 of a file's bytes, in hex."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _files(directory: Path) -> list[Path]:
    """The files under ``directory`` that a seal covers: all but the seal itself and hidden
    names (temporary files of an interrupted atomic write)."""
    return sorted(p for p in directory.rglob("*")
                  if p.is_file() and p != directory / SUMS
                  and not any(part.startswith(".") for part in p.relative_to(directory).parts))


def seal(directory: Path) -> None:
    """Write ``directory/SHA256SUMS``: the sha256 of every file under it (``sha256sum``'s
    format, paths relative to ``directory``). Written atomically, after the files."""
    lines = [f"{sha256_file(p)}  {p.relative_to(directory).as_posix()}\n"
             for p in _files(directory)]
    fd, tmp = _mkstemp(directory / SUMS)
    with os.fdopen(fd, "w") as f:
        f.writelines(lines)
    os.replace(tmp, directory / SUMS)


_SUM_LINE = re.compile(r"([0-9a-f]{64})  (\S.*)")


def damaged(directory: Path, required: tuple[str, ...] = ()) -> list[tuple[Path, str]]:
    """What under ``directory`` does not match its ``SHA256SUMS``: (file, why) per problem
    (empty: intact). A missing or unreadable seal, a listed file that is missing or differs, a
    file the seal does not list, and a ``required`` name it does not list are all problems: a
    resume recomputes rather than trusting such a directory."""
    sums = directory / SUMS
    try:
        text = sums.read_text()
    except FileNotFoundError:
        return [(sums, "missing (nothing to check the files against)")]
    except (OSError, UnicodeDecodeError) as exc:
        return [(sums, f"unreadable ({exc})")]
    listed: dict[str, str] = {}
    for i, line in enumerate(text.splitlines(), 1):
        m = _SUM_LINE.fullmatch(line)
        if m is None:
            return [(sums, f"line {i} is not '<sha256>  <file>' (damaged)")]
        listed[m.group(2)] = m.group(1)
    problems = [(directory / name, f"not listed in {sums} (damaged seal)")
                for name in required if name not in listed]
    for name, digest in listed.items():
        p = directory / name
        if not p.is_file():
            problems.append((p, f"missing (listed in {sums})"))
        elif sha256_file(p) != digest:
            problems.append((p, f"does not match its checksum in {sums} (damaged)"))
    problems += [(p, f"not listed in {sums} (added, or a damaged seal)")
                 for p in _files(directory) if p.relative_to(directory).as_posix() not in listed]
    return problems


def describe_damage(problems: list[tuple[Path, str]]) -> str:
    """One line for what :func:`damaged` found: the first problem, and how many more."""
    path, why = problems[0]
    return f"{path}: {why}" + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else "")


def first_members(labels: np.ndarray, k: int, per_cluster: int = MEMBERS_PER_CLUSTER
                  ) -> np.ndarray:
    """(k, per_cluster) row indices of each cluster's first members in row order, -1 padded."""
    out = np.full((k, per_cluster), -1, dtype=np.int64)
    order = np.argsort(labels, kind="stable")  # stable: row order kept inside each cluster
    bounds = np.searchsorted(labels[order], np.arange(k + 1))
    for j in range(k):
        idx = order[bounds[j] : bounds[j + 1]][:per_cluster]
        out[j, : idx.size] = idx
    return out


def fit_dir(run: Path, fit: str, k: int) -> Path:
    """Where the model of ``fit`` at ``k`` lives in run directory ``run``."""
    return run / "fits" / fit / f"k{k}"


def write_model(run: Path, fit: str, k: int, centres: np.ndarray, labels: np.ndarray,
                idx: np.ndarray, members: np.ndarray, result: dict) -> None:
    """Write one model: centres, labels, the members kept (``idx`` from :func:`first_members`,
    ``members`` their images) and ``result.json``."""
    d = fit_dir(run, fit, k)
    write_npy(d / "centers.npy", np.asarray(centres, dtype=np.float64))
    write_npy(d / "labels.npy", np.asarray(labels, dtype=np.int32))
    write_npy(d / "members.npy", members)
    write_npy(d / "members_idx.npy", idx)
    write_json(d / "result.json", result)


@dataclass
class ModelArtefacts:
    """One (fit, K) result as read back from a run directory."""

    fit: str
    k: int
    path: Path
    result: dict

    @property
    def centers(self) -> np.ndarray:
        return _load(self.path / "centers.npy")

    @property
    def labels(self) -> np.ndarray:
        return _load(self.path / "labels.npy")

    @property
    def members(self) -> np.ndarray:
        return _load(self.path / "members.npy")

    @property
    def members_idx(self) -> np.ndarray:
        return _load(self.path / "members_idx.npy")


@dataclass
class Run:
    """A complete run directory."""

    path: Path
    manifest: dict

    def model(self, fit: str, k: int) -> ModelArtefacts:
        d = fit_dir(self.path, fit, k)
        res = self.manifest["fits"].get(fit, {}).get("results", {}).get(str(k))
        if res is None:
            raise DataError(f"{self.path}: run has no result for fit {fit!r}, K={k}")
        return ModelArtefacts(fit=fit, k=k, path=d, result=res)

    @property
    def head_images(self) -> np.ndarray:
        return _load(self.path / "data" / "head_images.npy")

    @property
    def true_labels(self) -> np.ndarray:
        return _load(self.path / "data" / "true_labels.npy")

    @property
    def has_labels(self) -> bool:
        """Whether the clustered rows came with true classes (staged stores always do)."""
        return bool(self.manifest.get("data", {}).get("labels", True))

    @property
    def image_shape(self) -> tuple[int, int] | None:
        """(height, width) of the clustered rows as images, or None when they are not images
        (runs made before the key existed: MNIST's 28 x 28)."""
        data = self.manifest.get("data", {})
        shape = data.get("image_shape", [28, 28]) if "image_shape" in data or "store" in data \
            else None
        return None if shape is None else (int(shape[0]), int(shape[1]))

    def class_name(self, c: int) -> str:
        """What the run's class ``c`` is called ("Coat" for Fashion-MNIST; else the digit)."""
        names = self.manifest.get("data", {}).get("class_names")
        return str(names[c]) if names and 0 <= c < len(names) else str(c)

    @property
    def class_noun(self) -> str:
        """"class" where the classes have names, "digit" where they are MNIST's digits."""
        return "class" if self.manifest.get("data", {}).get("class_names") else "digit"

    @property
    def divisor(self) -> float:
        """uint8 rows are divided by it."""
        return float(self.manifest.get("data", {}).get("divisor") or 255.0)

    def fit_info(self, fit: str) -> dict:
        """The manifest's section of ``fit`` (algorithm, rows, settings, results by K)."""
        info = self.manifest["fits"].get(fit)
        if info is None:
            raise DataError(f"{self.path}: run has no fit named {fit!r}")
        return info

    def ks(self, fit: str) -> list[int]:
        """The K values ``fit`` holds results for, ascending."""
        return sorted(int(k) for k in self.fit_info(fit)["results"])

    def fit_labels(self, fit: str, k: int) -> np.ndarray:
        """The cluster of every row of ``fit`` at ``k``, checked against the fit's row count."""
        rows = int(self.fit_info(fit)["rows"])
        labels = self.model(fit, k).labels
        if labels.shape != (rows,):
            raise DataError(f"{self.path}: fits/{fit}/k{k}/labels.npy holds {labels.shape[0]} "
                            f"labels for a {rows}-row fit (damaged run)")
        return labels

    def truth(self, rows: int) -> np.ndarray:
        """The true class of the first ``rows`` clustered rows."""
        if not self.has_labels:
            raise DataError(f"{self.path}: the clustered rows came without true classes (give "
                            "the job data.labels); this figure compares the clusters with them")
        t = self.true_labels
        if t.shape[0] < rows:
            raise DataError(f"{self.path}: data/true_labels.npy holds {t.shape[0]} labels, the "
                            f"fits need {rows} (damaged run)")
        return t[:rows]


def _load(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{path}: missing from the run directory (incomplete run?)") from None
    except ValueError as exc:
        raise DataError(f"{path}: unreadable ({exc})") from None


_REQUIRED = ("centers.npy", "labels.npy", "members.npy", "members_idx.npy", "result.json")


def open_run(path: str | Path) -> Run:
    """Open and check a complete run directory; anything missing is a one-line DataError."""
    p = Path(path)
    if not p.is_dir():
        raise DataError(f"{p}: no such run directory")
    mf = p / MANIFEST
    if not mf.is_file():
        raise DataError(f"{p}: not a complete run (no {MANIFEST}); rerun the job to finish it")
    try:
        manifest = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"{mf}: not valid JSON") from None
    if not isinstance(manifest, dict) or manifest.get("status") != "complete":
        raise DataError(f"{mf}: run is not marked complete")
    problems = damaged(p, (MANIFEST,))
    if problems:
        raise DataError(f"{describe_damage(problems)}; refusing the run: rerun its job to "
                        "recompute what is damaged")
    for fit, info in manifest.get("fits", {}).items():
        for k in info.get("results", {}):
            d = fit_dir(p, fit, int(k))
            for name in _REQUIRED:
                if not (d / name).is_file():
                    raise DataError(f"{d / name}: missing from the run directory "
                                    "(incomplete or damaged run)")
    inputs = ["head_images.npy"] + (["true_labels.npy"]
                                     if manifest.get("data", {}).get("labels", True) else [])
    for name in inputs:
        if not (p / "data" / name).is_file():
            raise DataError(f"{p / 'data' / name}: missing from the run directory")
    needed = [p / rel for e in extensions() for rel in e.run_files(manifest)]
    for f in needed:
        if not f.is_file():
            raise DataError(f"{f}: missing from the run directory (incomplete or damaged run)")
    return Run(path=p, manifest=manifest)


def list_runs(runs_dir: Path = Path("runs")) -> list[dict]:
    """Every run under ``runs_dir``: complete ones and interrupted partial ones.

    Directories whose names start with ``_`` or ``.`` are kmdask's own (caches, locks), never
    jobs (job names cannot start with either)."""
    out = []
    if not runs_dir.is_dir():
        return out
    for job_dir in sorted(p for p in runs_dir.iterdir()
                          if p.is_dir() and not p.name.startswith((".", "_"))):
        latest = job_dir / "latest"
        latest_id = os.readlink(latest) if latest.is_symlink() else None
        for d in sorted(job_dir.iterdir()):
            if not d.is_dir() or d.is_symlink() or d.name == "submit":
                continue
            partial = d.name.endswith(".partial")
            row = {"job": job_dir.name, "run_id": d.name.strip(".").removesuffix(".partial"),
                   "status": "partial" if partial else "complete", "path": str(d),
                   "latest": d.name == latest_id}
            mf = d / MANIFEST
            if not partial and mf.exists():
                m = json.loads(mf.read_text())
                row.update(fingerprint=m["fingerprint"], finished=m.get("finished"),
                           seconds=round(m["timings"]["total"], 2), headline=_headline(m))
            elif not partial:
                row["status"] = "damaged"
            out.append(row)
    return out


def _headline(manifest: dict) -> str:
    parts = []
    for name, f in manifest.get("fits", {}).items():
        for k, r in f.get("results", {}).items():
            parts.append((name, k, r.get("inertia")))
    if not parts:
        return ""
    name, k, inertia = parts[0]
    return f"{name} K={k} inertia {inertia:.6g}" + (f" (+{len(parts) - 1} more)"
                                                     if len(parts) > 1 else "")
