"""scikit-learn's private API, in one place.

skntk follows scikit-learn's own estimator conventions (declared ``_parameter_constraints``
checked in ``fit``, ``Pipeline`` subclassing), which today needs a few names scikit-learn does
not make public. Every use in skntk goes through this module, so a scikit-learn release that
moves or changes one of them breaks here, in one file, rather than across the package (as
scikit-matter and imbalanced-learn do with their own ``_sklearn_compat``).

Tested range: ``scikit-learn>=1.6,<1.10`` (the bound in ``pyproject.toml``). ``make test`` runs
the suite on the pinned release (1.9.1); ``make test-sklearn-latest`` runs a fast subset on the
newest release, ignoring the upper bound (``.ci/run`` prints a loud banner when it fails). When
it passes on a new minor release, raise the bound; when it fails, fix this module first.

The names:

``_fit_context``
    ``sklearn.base._fit_context``: decorator of ``fit`` that validates
    ``_parameter_constraints`` once (skipping nested estimators with
    ``prefer_skip_nested_validation=True``) and applies the global config.
``Interval``, ``StrOptions``, ``HasMethods``, ``RealNotInt``, ``InvalidParameterError``
    ``sklearn.utils._param_validation``: the constraint types of ``_parameter_constraints``
    (e.g. ``Interval(Integral, 1, None, closed="left")``, ``StrOptions({"trace", "max"})``) and
    the error their check raises (tests match it).
``_safe_indexing``
    ``sklearn.utils._safe_indexing``, how scikit-learn's splitters index ``X`` (tests check that
    skntk's containers survive it).
:func:`validate_params`
    ``BaseEstimator._validate_params()``: the same check outside ``fit`` (``select``,
    ``score_samples`` of selectors that may run unfitted).
:func:`pipeline_steps`
    ``Pipeline._iter(with_final=..., filter_passthrough=...)``: ``(index, name, step)`` of the
    steps, without ``"passthrough"`` / ``None`` ones.
:func:`row_key`
    ``sklearn.utils._safe_indexing`` (used by ``train_test_split``, ``cross_validate`` and
    ``GridSearchCV``) indexes an object that is neither an array nor a DataFrame as
    ``X[key, ...]``, i.e. with the tuple ``(key, Ellipsis)``; this unwraps it.

Examples
--------
>>> from skntk._sklearn_compat import row_key
>>> row_key(([0, 2], Ellipsis)), row_key(slice(1, 3))
([0, 2], slice(1, 3, None))
"""

from __future__ import annotations

from sklearn.base import _fit_context
from sklearn.utils import _safe_indexing
from sklearn.utils._param_validation import (
    HasMethods,
    Interval,
    InvalidParameterError,
    RealNotInt,
    StrOptions,
)

__all__ = ["_fit_context", "_safe_indexing", "HasMethods", "Interval", "InvalidParameterError",
           "RealNotInt", "StrOptions", "validate_params", "pipeline_steps", "row_key",
           "TESTED_RANGE"]

#: The scikit-learn versions ``pyproject.toml`` allows and CI tests: (lowest, first excluded).
TESTED_RANGE = ("1.6", "1.10")


def validate_params(estimator) -> None:
    """Check ``estimator``'s parameters against its ``_parameter_constraints``.

    Raises ``sklearn.utils._param_validation.InvalidParameterError`` (a ``ValueError`` and
    ``TypeError``) with scikit-learn's message, "The 'x' parameter of Y must be … Got …".
    """
    estimator._validate_params()


def pipeline_steps(pipeline, *, with_final: bool = True, filter_passthrough: bool = True):
    """Iterate ``(index, name, step)`` over a ``Pipeline``'s steps (``Pipeline._iter``).

    Parameters
    ----------
    pipeline : sklearn.pipeline.Pipeline
    with_final : bool, default=True
        Include the last step.
    filter_passthrough : bool, default=True
        Skip ``"passthrough"`` and ``None`` steps.
    """
    return pipeline._iter(with_final=with_final, filter_passthrough=filter_passthrough)


def row_key(key):
    """The row selection of ``key``: ``key[0]`` when ``key`` is ``(rows, Ellipsis)`` (how
    ``_safe_indexing`` indexes custom containers), else ``key`` unchanged."""
    if isinstance(key, tuple) and len(key) == 2 and key[1] is Ellipsis:
        return key[0]
    return key
