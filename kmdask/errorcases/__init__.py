"""Error-case clustering and the specialist experiment, as a job extension.

The original demo's stated purpose: train a classifier, cluster its uncertain cases, and route
each uncertain input to a specialist for its cluster. A job using this extension has a
``classifier:`` (the general network), fits with ``cases:`` (they cluster the network's outputs
instead of pixels) and ``experiments:`` (do cluster specialists beat the network?).

* :mod:`.spec` — the spec sections;
* :mod:`.classifier` — the general network (numpy MLP);
* :mod:`.vectors` — case vectors, the classifier cache, ``cases.zarr``;
* :mod:`.experiment` — specialists, routing, the equal-budget baseline, statistics;
* :mod:`.job` — the hooks the runner calls;
* :mod:`.figures` — the figures; :mod:`.report` — the figure kinds and the page's section.

Nothing imports this package but the extension registry (:mod:`kmdask.batch.extensions`).

Run directory additions::

    classifier/weights.npz             the general network (float32 arrays w0, w1, ...; no pickle)
    classifier/classifier.json         its settings, fingerprint, train/test accuracy, seconds
    cases.zarr/{train,test}/probs      (n, 10) float64 class probabilities, 10,000-row chunks
    cases.zarr/vectors/<fit>/{train,test}  (n, 10) float64 the fit's transformed case vectors
    fits/<fit>/k<K>/members.npy        still the images (uint8), not the vectors clustered
    fits/<fit>/k<K>/result.json        + reliable_cluster (the one holding the zeroed cases),
                                       display_order (it first), n_zeroed, relabelled
    experiments/<fit>/experiment.json  the routing experiment
    experiments/<fit>/predictions.npz  test labels, general/routed/baseline answers, routes
    experiment.json                    the first experiment's numbers + all under "experiments"
"""

from kmdask.batch.extensions import Extension
from kmdask.errorcases import spec

EXTENSION = Extension(
    name="errorcases",
    job_keys={"classifier": spec.classifier_section, "experiments": spec.experiments_section},
    fit_keys={"cases": spec.cases_spec},
    figure_rules={"cases": spec.needs_cases, "case_confusion": spec.needs_cases,
                  "experiment": spec.needs_experiment},
    run_files=spec.run_files,
    runtime="kmdask.errorcases.job:HOOKS",
    report="kmdask.errorcases.report:REPORT",
)
