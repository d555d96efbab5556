"""The scikit-learn private-API shim: every name imports and behaves as skntk relies on."""

import numpy as np
import pytest
import sklearn
from sklearn.base import BaseEstimator
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from skntk import _sklearn_compat as compat
from skntk._sklearn_compat import (  # noqa: F401 - every name of the shim must import
    TESTED_RANGE,
    HasMethods,
    Interval,
    RealNotInt,
    StrOptions,
    _fit_context,
    _safe_indexing,
    pipeline_steps,
    row_key,
    validate_params,
)
from skntk.blocks import FeatureBlocks


def test_all_names_import():
    for name in compat.__all__:
        assert getattr(compat, name) is not None, name


def test_installed_version_is_inside_or_above_the_tested_range():
    def key(v):
        return tuple(int(p) for p in v.split(".")[:2])

    assert key(sklearn.__version__) >= key(TESTED_RANGE[0])


class _Est(BaseEstimator):
    _parameter_constraints = {"k": [Interval(RealNotInt, 0, None, closed="neither")],
                              "mode": [StrOptions({"a", "b"})]}

    def __init__(self, k=1.0, mode="a"):
        self.k = k
        self.mode = mode

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X=None, y=None):
        self.fitted_ = True
        return self


def test_fit_context_and_validate_params():
    assert _Est().fit().fitted_
    with pytest.raises(ValueError, match="The 'k' parameter of _Est must be"):
        _Est(k=-1.0).fit()
    with pytest.raises(ValueError, match="The 'mode' parameter of _Est must be"):
        validate_params(_Est(mode="c"))
    validate_params(_Est(mode="b"))


def test_pipeline_steps_skips_passthrough_and_final():
    pipe = Pipeline([("a", StandardScaler()), ("skip", "passthrough"), ("b", StandardScaler())])
    assert [name for _, name, _ in pipeline_steps(pipe)] == ["a", "b"]
    assert [name for _, name, _ in pipeline_steps(pipe, with_final=False)] == ["a"]
    assert [name for _, name, _ in pipeline_steps(pipe, filter_passthrough=False)] == \
        ["a", "skip", "b"]


def test_row_key_and_safe_indexing_of_blocks():
    assert row_key(([1, 2], Ellipsis)) == [1, 2]
    assert row_key(3) == 3
    blocks = FeatureBlocks(np.arange(12.0).reshape(6, 2), np.array([0, 1, 3, 6]))
    sub = _safe_indexing(blocks, [2, 0])  # scikit-learn indexes it as blocks[key, ...]
    assert len(sub) == 2
    np.testing.assert_array_equal(sub.block(0), blocks.block(2))
