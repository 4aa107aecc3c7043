"""Case vectors: the general network's output for every train and test image, transformed.

A job whose fits carry ``cases:`` clusters these vectors instead of pixels. This module trains
(or reuses) the general network, computes the class probabilities of both splits, and writes
them with each fit's transformed vectors into ``<run>/cases.zarr``, chunked like the images::

    cases.zarr/{train,test}/probs          (n, 10) float64 class probabilities
    cases.zarr/vectors/<fit>/{train,test}  (n, 10) float64 the fit's case vectors

The trained network is cached under ``<runs>/_models/<fingerprint>/`` (fingerprint = the
train and test data fingerprints + the classifier settings + kmdask version) and hard-linked
(or copied) into ``<run>/classifier/``: a second job with the same classifier never retrains.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kmdask import __version__
from kmdask.batch.fitkinds import FIT_KINDS
from kmdask.batch.spec import JobSpec
from kmdask.data.location import Location
from kmdask.errorcases.classifier import Network, accuracy, read_model, train, write_model
from kmdask.errorcases.spec import CasesSpec, ClassifierSpec
from kmdask.errors import ConfigError

log = logging.getLogger(__name__)

N_CLASSES = 10
TRAINER_VERSION = 2  # bump when kmdask.errorcases.classifier.train changes what it computes


def transform(probs: np.ndarray, targets: np.ndarray | None, vector: str, power: int
              ) -> np.ndarray:
    """Case vectors without zero-out: ``probs`` or ``one_hot(targets) - probs``, each component
    raised to ``power`` with its sign kept (so power 2 keeps an error's direction)."""
    p = np.asarray(probs, dtype=np.float64)
    if vector == "error":
        if targets is None:
            raise ValueError("error vectors need the true targets")
        v = np.eye(p.shape[1])[np.asarray(targets, dtype=np.int64)] - p
    else:
        v = p.copy()
    if power != 1:
        v = np.sign(v) * np.abs(v) ** power
    return v


def zero_mask(probs: np.ndarray, zero_out: float | None) -> np.ndarray:
    """Which cases are "reliable": top probability >= ``zero_out`` (none when it is None)."""
    if zero_out is None:
        return np.zeros(probs.shape[0], dtype=bool)
    return np.asarray(probs).max(axis=1) >= zero_out


def choose_threshold(probs: np.ndarray, labels: np.ndarray, max_error: float) -> float:
    """The lowest ``zero_out`` at which the network errs on at most ``max_error`` of the
    (validation) cases it would zero: cases sorted by top probability, the longest prefix
    whose error rate is within the bound; 1.0 (nothing zeroed below certainty) when even the
    most confident case is wrong."""
    top = np.asarray(probs).max(axis=1)
    wrong = np.argmax(probs, axis=1) != np.asarray(labels)
    order = np.argsort(-top, kind="stable")
    rate = np.cumsum(wrong[order]) / np.arange(1, top.shape[0] + 1)
    ok = np.flatnonzero(rate <= max_error)
    if ok.size == 0:
        return 1.0
    i = int(ok[-1])
    # ties: every case with the same top probability as the last one kept is zeroed with it
    return float(top[order[i]])


def case_vectors(probs: np.ndarray, targets: np.ndarray | None, spec: CasesSpec
                 ) -> tuple[np.ndarray, np.ndarray]:
    """``(vectors, zeroed)``: the transformed vectors, with reliable cases set to zero."""
    v = transform(probs, targets, spec.vector, spec.power)
    zeroed = zero_mask(probs, spec.zero_out)
    v[zeroed] = 0.0
    return v, zeroed


def reliable_cluster(labels: np.ndarray, zeroed: np.ndarray) -> int | None:
    """The cluster holding the zeroed cases (identical rows always share one), or None."""
    if not zeroed.any():
        return None
    found = np.unique(labels[zeroed])
    if found.size != 1:  # impossible for a nearest-centre assignment; guard anyway
        raise ValueError(f"zeroed cases are split over clusters {found.tolist()}")
    return int(found[0])


def case_order(algorithm: str, labels: np.ndarray, centres: np.ndarray,
               zeroed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Find the reliable cluster (the one holding the zeroed cases) of a cases fit.

    Where the fit kind's cluster numbers carry no meaning (the scalable engine) the reliable
    cluster is renumbered 0; an ordered kind's numbers (the mccaffrey mode: the order its
    centres were drawn) are kept, and figures draw its reliable cluster first, saying which
    index it has."""
    if zeroed is None:
        return labels, centres, {}
    k = centres.shape[0]
    rel = reliable_cluster(labels, zeroed[: labels.shape[0]])
    relabelled = False
    if rel is not None and rel != 0 and not FIT_KINDS[algorithm].ordered:
        perm = np.array([rel] + [j for j in range(k) if j != rel])
        inverse = np.argsort(perm)
        labels, centres, rel, relabelled = inverse[labels], centres[perm], 0, True
    order = list(range(k)) if rel is None else [rel] + [j for j in range(k) if j != rel]
    return labels, centres, {"reliable_cluster": rel, "display_order": order,
                             "n_zeroed": int(zeroed[: labels.shape[0]].sum()),
                             "relabelled": relabelled}


def classifier_fingerprint(spec: ClassifierSpec, train_fp: str, test_fp: str) -> str:
    blob = json.dumps({"train": train_fp, "test": test_fp, "classifier": spec.settings(),
                       "kmdask": __version__, "trainer": TRAINER_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class CaseData:
    """What the fits and the experiments of a cases job use (all in memory but the vectors)."""

    path: Path  # <run>/cases.zarr
    network: Network
    info: dict  # classifier.json (+ "reused")
    images: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    probs: dict[str, np.ndarray]
    zeroed: dict[str, np.ndarray]  # per fit: the training cases zeroed
    thresholds: dict[str, float | None]  # per fit: its zero_out (chosen on validation rows)
    train_rows: int  # the networks train on rows [0, train_rows) of the training split
    chunk_rows: int
    split: str = "train"  # the split the fits cluster
    seconds: float = 0.0  # spent preparing (training or loading, vectors)

    def vectors(self, fit: str, split: str = "train"):
        """A fit's case vectors as a dask array read from the zarr store, chunked like it."""
        import dask.array as da

        return da.from_zarr(str(self.path), component=f"vectors/{fit}/{split}",
                            chunks=(self.chunk_rows, N_CLASSES))


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """Two jobs wanting the same classifier: one trains, the other waits and reuses it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def get_classifier(spec: ClassifierSpec, fp: str, runs_dir: Path, data: dict
                   ) -> tuple[Network, dict, Path]:
    """The cached network of fingerprint ``fp``, trained first if there is none."""
    models = runs_dir / "_models"
    cache = models / fp[:16]
    with _lock(models / f".{fp[:16]}.lock"):
        if (cache / "classifier.json").is_file() and (cache / "weights.npz").is_file():
            net, info = read_model(cache)
            if info.get("fingerprint") == fp:
                log.info(f"  classifier: reusing {cache} (test accuracy "
                         f"{info['test_accuracy']:.2%})")
                return net, {**info, "reused": True}, cache
        rows, stop = spec.split_rows(data["images"]["train"].shape[0])
        log.info(f"  classifier: training {spec.hidden} on {rows} rows, {spec.epochs} epochs"
                 + (f" ({stop - rows} more held out for validation)" if stop > rows else ""))
        x, y = data["images"]["train"][:rows], data["labels"]["train"][:rows]

        def show(p: dict) -> None:
            log.info(f"  classifier epoch {p['epoch']:3d}: loss {p['loss']:.4f} "
                     f"({p['seconds']:.1f} s)")

        net, hist = train(x, y, spec, progress=show)
        info = {"fingerprint": fp, "settings": spec.settings(), "kmdask": __version__,
                "train_rows": int(rows), "train_seconds": hist["seconds"],
                "epoch_loss": hist["epoch_loss"],
                "train_accuracy": accuracy(net, x, y),
                "test_accuracy": accuracy(net, data["images"]["test"], data["labels"]["test"])}
        if stop > rows:
            info.update(validation_rows=[int(rows), int(stop)], validation_accuracy=accuracy(
                net, data["images"]["train"][rows:stop], data["labels"]["train"][rows:stop]))
        tmp = models / f".{fp[:16]}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        write_model(tmp, net, info)
        shutil.rmtree(cache, ignore_errors=True)
        os.replace(tmp, cache)
        log.info(f"  classifier: test accuracy {info['test_accuracy']:.2%} "
                 f"({hist['seconds']:.1f} s), cached in {cache}")
        return net, {**info, "reused": False}, cache


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # another file system
        shutil.copy2(src, dst)


def prepare_cases(run: Path, job: JobSpec, store: Location, runs_dir: Path) -> CaseData:
    """Train or reuse the general network, then write ``run/cases.zarr`` and
    ``run/classifier/``."""
    import zarr

    from kmdask.data.store import data_fingerprint, open_images, open_labels

    data: dict[str, dict] = {"images": {}, "labels": {}}
    for split in ("train", "test"):
        data["images"][split] = np.asarray(open_images(store, split).compute())
        data["labels"][split] = np.asarray(open_labels(store, split).compute()).astype(np.int64)
    spec = job.classifier or ClassifierSpec()
    fp = classifier_fingerprint(spec, data_fingerprint(store, "train"),
                                data_fingerprint(store, "test"))
    net, info, cache = get_classifier(spec, fp, runs_dir, data)
    for name in ("weights.npz", "classifier.json"):
        _link_or_copy(cache / name, run / "classifier" / name)
    chunk_rows = int(open_images(store, job.split).chunks[0][0])
    probs = {s: net.proba(data["images"][s]) for s in ("train", "test")}
    path = run / "cases.zarr"
    shutil.rmtree(path, ignore_errors=True)
    root = zarr.open_group(str(path), mode="w", zarr_format=3)

    def put(name: str, arr: np.ndarray, attrs: dict | None = None) -> None:
        a = root.create_array(name, shape=arr.shape, dtype=arr.dtype,
                              chunks=(chunk_rows, *arr.shape[1:]), fill_value=0)
        a[...] = arr
        if attrs:
            a.attrs.update(attrs)

    for s in ("train", "test"):
        put(f"{s}/probs", probs[s])
    zeroed: dict[str, np.ndarray] = {}
    thresholds: dict[str, float | None] = {}
    n_train = data["images"]["train"].shape[0]
    train_rows, stop = spec.split_rows(n_train)
    for f in job.fits:
        if "cases" not in f.extras:
            continue
        if stop > train_rows and (f.rows or n_train) > train_rows:
            raise ConfigError(f"{job.source}: fits[{f.name}].rows: {f.rows or n_train} rows "
                              f"would cluster the validation rows [{train_rows}, {stop}); at "
                              f"most {train_rows}")
        cs = f.cases
        if cs.validation_error is not None:  # chosen on the validation rows only
            t = choose_threshold(probs["train"][train_rows:stop],
                                 data["labels"]["train"][train_rows:stop], cs.validation_error)
            log.info(f"  cases {f.name}: zero_out {t:.6g} (network errs on at most "
                     f"{cs.validation_error:.2%} of the validation cases at or above it)")
            cs = dataclasses.replace(cs, zero_out=t)
        thresholds[f.name] = cs.zero_out
        for s in ("train", "test"):
            v, z = case_vectors(probs[s], data["labels"][s], cs)
            put(f"vectors/{f.name}/{s}", v, {"vector": cs.vector, "power": cs.power,
                                             "zero_out": cs.zero_out,
                                             "n_zeroed": int(z.sum())})
            if s == job.split:
                zeroed[f.name] = z
    root.attrs.update({"classifier": fp, "chunk_rows": chunk_rows})
    log.info(f"  cases: probabilities of {probs['train'].shape[0]} train and "
             f"{probs['test'].shape[0]} test images; vectors for "
             f"{', '.join(zeroed) or 'no fit'} in {path.name}")
    return CaseData(path=path, network=net, info=info, images=data["images"],
                    labels=data["labels"], probs=probs, zeroed=zeroed, thresholds=thresholds,
                    train_rows=train_rows, chunk_rows=chunk_rows, split=job.split)
