"""The estimators behave as scikit-learn users expect: clone, Pipeline, GridSearchCV, parameter
and not-fitted errors, warnings, repr."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.datasets import make_blobs
from sklearn.metrics import adjusted_rand_score
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted

from kmdask import ConfigError, KMeans, McCaffreyKMeans, NotFittedError


@pytest.fixture(scope="module")
def blobs():
    X, y = make_blobs(3000, centers=4, n_features=5, cluster_std=0.6, random_state=1)
    return X, y


def test_clone_gives_an_unfitted_copy_with_the_same_parameters():
    km = KMeans(n_clusters=3, n_init=4, random_state=7, init=np.zeros((3, 2)))
    c = clone(km)
    assert type(c) is KMeans and c is not km
    assert c.get_params().keys() == km.get_params().keys()
    assert c.n_clusters == 3 and c.n_init == 4 and c.random_state == 7
    assert np.array_equal(c.init, km.init) and c.init is not km.init
    m = clone(McCaffreyKMeans(n_clusters=5, n_init=7))
    assert (m.n_clusters, m.n_init, m.max_iter, m.random_state) == (5, 7, 20, 0)


def test_repr_lists_the_parameters_that_differ_from_the_defaults():
    assert repr(KMeans()) == "KMeans()"
    assert repr(KMeans(3, n_init=10)) == "KMeans(n_clusters=3, n_init=10)"
    assert repr(KMeans(3, init=np.zeros((3, 2)))) == "KMeans(n_clusters=3, init=array(...))"
    assert repr(McCaffreyKMeans(10)) == "McCaffreyKMeans(n_clusters=10)"


def test_set_params_and_unknown_parameters():
    km = KMeans().set_params(n_clusters=4, tol=0.0)
    assert (km.n_clusters, km.tol) == (4, 0.0)
    with pytest.raises(ValueError, match="invalid parameter 'colour' for KMeans"):
        km.set_params(colour="red")
    with pytest.raises(ConfigError):  # kmdask's own error, and a ValueError
        km.set_params(colour="red")


def test_bad_parameter_values_are_value_errors(blobs):
    X, _ = blobs
    for bad in (dict(n_clusters=0), dict(n_init=0), dict(max_iter=-1), dict(init="random"),
                dict(algorithm="elkan")):
        with pytest.raises(ValueError):
            KMeans(**{"n_clusters": 3, **bad}).fit(X)


def test_unfitted_model_raises_value_and_attribute_error(blobs):
    X, _ = blobs
    for est in (KMeans(3), McCaffreyKMeans(3)):
        with pytest.raises(NotFittedError) as ei:
            est.predict(X)
        assert isinstance(ei.value, ValueError) and isinstance(ei.value, AttributeError)
    with pytest.raises(Exception, match="not fitted"):
        check_is_fitted(KMeans(3))
    km = KMeans(3, random_state=0).fit(X)
    check_is_fitted(km)


def test_array_init_with_n_init_warns_and_fits_one_trial(blobs):
    X, _ = blobs
    with pytest.warns(RuntimeWarning, match="n_init=5"):
        km = KMeans(4, init=X[:4].copy(), n_init=5).fit(X)
    assert len(km.trial_inertia_) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        KMeans(4, init=X[:4].copy()).fit(X)  # n_init left at 1: no warning


def test_pipeline_and_grid_search_over_n_clusters(blobs, client):
    X, y = blobs
    pipe = make_pipeline(StandardScaler(), KMeans(2, random_state=0, n_init=2))
    labels = pipe.fit_predict(X)
    assert labels.shape == (X.shape[0],)
    search = GridSearchCV(KMeans(random_state=0), {"n_clusters": [2, 4, 6]}, cv=3)
    search.fit(X)
    # score is minus the inertia, which more clusters always lower: the largest K wins; the
    # point is that every candidate was cloned, fitted and scored on held-out rows
    assert search.best_params_ == {"n_clusters": 6}
    assert np.all(np.isfinite(search.cv_results_["mean_test_score"]))
    assert list(search.cv_results_["param_n_clusters"]) == [2, 4, 6]
    four = GridSearchCV(KMeans(random_state=0), {"n_clusters": [4]}, cv=2).fit(X)
    assert adjusted_rand_score(y, four.best_estimator_.predict(X)) > 0.99


def test_mccaffrey_estimator_reproduces_a_published_row(mnist_train):
    km = McCaffreyKMeans(n_clusters=3, max_iter=20, n_init=20).fit(mnist_train[:100])
    assert np.bincount(km.labels_.compute(), minlength=3).tolist() == [16, 66, 18]
    assert km.inertia_ == min(km.trial_inertia_)
    assert np.array_equal(km.predict(mnist_train[:100]), km.labels_.compute())
