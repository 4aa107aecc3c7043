"""The error-case extension's hooks: what it does while a job runs (see
:class:`kmdask.batch.extensions.JobHooks`).

Before the fits: train or reuse the general network and write every fit's case vectors. For a
fit with ``cases:``: cluster its vectors instead of the images, and find its reliable cluster.
After the fits: the specialist experiments.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from kmdask.batch.spec import FitSpec, JobSpec
from kmdask.data.location import Location
from kmdask.errorcases.vectors import CaseData, case_order, prepare_cases
from kmdask.errors import ConfigError


class ErrorCasesJob:
    """The hooks (one instance serves every run; the run's state is the :class:`CaseData`)."""

    def fingerprint_inputs(self, job: JobSpec, store: Location) -> dict:
        """The classifier is scored on the test split: its content is an input of the run."""
        from kmdask.data.store import data_fingerprint, image_shape, store_info

        shape = image_shape(store_info(store))
        if shape != (28, 28):  # the network's input layer and the figures are MNIST's
            raise ConfigError(f"{job.source}: error cases need 28 x 28 images; {store} holds "
                              f"{shape[0]} x {shape[1]}")
        return {"test_data": data_fingerprint(store, "test")}

    def prepare(self, run: Path, job: JobSpec, store: Location, runs_dir: Path) -> CaseData:
        t0 = time.perf_counter()
        cases = prepare_cases(run, job, store, runs_dir)
        cases.seconds = time.perf_counter() - t0
        return cases

    def fit_rows(self, cases: CaseData, fit: FitSpec, n: int) -> Any:
        """A fit with ``cases:`` clusters its case vectors (a dask array read from zarr)."""
        if "cases" not in fit.extras:
            return None
        return cases.vectors(fit.name, cases.split)[:n]

    def model_result(self, cases: CaseData, fit: FitSpec, labels: np.ndarray,
                     centres: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
        if "cases" not in fit.extras:
            return labels, centres, {}
        labels, centres, extra = case_order(fit.algorithm, labels, centres,
                                            cases.zeroed[fit.name])
        return labels, centres, {**extra, "zero_out": cases.thresholds[fit.name]}

    def finish(self, run: Path, job: JobSpec, cases: CaseData) -> tuple[dict, dict]:
        extra: dict = {"classifier": {k: v for k, v in cases.info.items() if k != "epoch_loss"}}
        timings = {"classifier_and_cases": cases.seconds}
        if job.experiments:
            from kmdask.errorcases.experiment import run_experiments

            t0 = time.perf_counter()
            extra["experiments"] = run_experiments(run, job, cases)
            timings["experiments"] = time.perf_counter() - t0
        return extra, timings


HOOKS = ErrorCasesJob()
