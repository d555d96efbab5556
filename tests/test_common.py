"""scikit-learn's estimator checks for every selector on plain arrays.

The NTK transformer's checks live with the transformer's tests.
"""

import pickle

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.utils.estimator_checks import parametrize_with_checks

from skntk.selection.baselines import MaxDistSelector, RandomSelector
from skntk.selection.lcmd import LCMDSelector
from skntk.selection.pv import ChunkedPosteriorVarianceSelector

SELECTORS = [
    ChunkedPosteriorVarianceSelector(),
    ChunkedPosteriorVarianceSelector(greedy=True, reduction="logdet"),
    ChunkedPosteriorVarianceSelector(shortlist_size=5, criterion="pool_variance_reduction"),
    ChunkedPosteriorVarianceSelector(criterion="density_weighted", greedy=True),
    LCMDSelector(),
    LCMDSelector(features="posterior", sel_with_train=False),
    MaxDistSelector(),
    RandomSelector(random_state=0),
]


def _expected_failed_checks(estimator):
    failed = {}
    if getattr(estimator, "criterion", "variance") != "variance":
        reason = f"{estimator.criterion} scores depend on the whole pool passed in"
        failed["check_methods_subset_invariance"] = reason
    return failed


@pytest.mark.filterwarnings("ignore:shortlist_size=5 is greater than:UserWarning")
@parametrize_with_checks(SELECTORS, expected_failed_checks=_expected_failed_checks)
def test_sklearn_compatible_selector(estimator, check):
    check(estimator)


@pytest.mark.parametrize("estimator", SELECTORS, ids=lambda e: type(e).__name__)
def test_clone_params_pickle_and_select(estimator):
    rng = np.random.default_rng(0)
    train, pool = rng.normal(size=(12, 4)), rng.normal(size=(30, 4))
    c = clone(estimator)
    assert c.get_params() == estimator.get_params()
    c.set_params(n_to_select=4)
    assert c.n_to_select == 4 and estimator.n_to_select is None
    c.fit(train)
    idx = c.select(pool)
    assert idx.dtype.kind == "i" and len(set(idx.tolist())) == 4
    assert np.all((idx >= 0) & (idx < 30))
    again = pickle.loads(pickle.dumps(c))
    assert again.select(pool).tolist() == idx.tolist()
    assert isinstance(c.score(pool, rng.normal(size=30)), float)
