"""The estimator protocol scikit-learn expects, without depending on scikit-learn.

:class:`ParamsMixin` gives an estimator whose ``__init__`` stores each keyword argument under its
own name the methods that ``sklearn.base.clone``, ``Pipeline`` and ``GridSearchCV`` call:
``get_params``, ``set_params``, a ``__repr__`` that lists the parameters that differ from their
defaults, and ``__sklearn_tags__`` (built from scikit-learn's own classes when it is present: it
is only ever called by scikit-learn). Written here rather than inheriting scikit-learn's
``BaseEstimator`` so that kmdask runs without scikit-learn installed.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np

from kmdask.errors import ConfigError


class ParamsMixin:
    """``get_params`` / ``set_params`` / ``__repr__`` from the ``__init__`` signature."""

    _estimator_type = "clusterer"

    @classmethod
    def _param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return [p.name for p in sig.parameters.values()
                if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The estimator's parameters by name (``deep`` is accepted for scikit-learn; these
        estimators hold no sub-estimators)."""
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params: Any) -> ParamsMixin:
        """Set parameters by name; an unknown name is a :class:`~kmdask.errors.ConfigError`
        (a ``ValueError``), as in scikit-learn."""
        valid = self._param_names()
        for name, value in params.items():
            if name not in valid:
                raise ConfigError(f"invalid parameter {name!r} for {type(self).__name__}; "
                                  f"valid parameters: {', '.join(valid)}")
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        sig = inspect.signature(type(self).__init__)
        changed = []
        for name in self._param_names():
            value, default = getattr(self, name), sig.parameters[name].default
            same = (value is default or (not isinstance(value, np.ndarray)
                                         and not isinstance(default, np.ndarray)
                                         and value == default))
            if not same:
                shown = "array(...)" if isinstance(value, np.ndarray) else repr(value)
                changed.append(f"{name}={shown}")
        return f"{type(self).__name__}({', '.join(changed)})"

    def __sklearn_tags__(self):
        from sklearn.utils import InputTags, Tags, TargetTags

        return Tags(estimator_type="clusterer", target_tags=TargetTags(required=False),
                    input_tags=InputTags(allow_nan=False))
