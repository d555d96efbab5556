"""Baselines in the selector API: random selection and MaxDist (farthest point, greedy k-centre)."""

from __future__ import annotations

import numpy as np
from sklearn.utils import check_random_state

from skntk.selection._base import BaseSelector
from skntk.selection._kernel import _KernelCentresSelector

__all__ = ["RandomSelector", "MaxDistSelector"]


class RandomSelector(BaseSelector):
    """Uniformly random selection without replacement (the baseline every method must beat).

    Parameters
    ----------
    n_to_select : int, float or None, default=None
        Default budget of :meth:`select`: a count, a fraction of the candidates, or half of them.
    random_state : int, RandomState instance or None, default=None
        Resolved at each :meth:`select` call, so an int gives the same batch every time.
    working_memory : float or None, default=None
        MiB budget for input validation chunks.

    Attributes
    ----------
    n_features_in_ : int
    selected_idx_ : ndarray of int of shape (n_to_select,)
        Indices into the last ``X`` given to :meth:`select`.

    Examples
    --------
    >>> import numpy as np
    >>> from skntk.selection.baselines import RandomSelector
    >>> X = np.zeros((10, 2))
    >>> idx = RandomSelector(n_to_select=3, random_state=0).fit(X).select(X)
    >>> len(set(idx.tolist())), bool(idx.max() < 10)
    (3, True)
    """

    _parameter_constraints: dict = {
        **BaseSelector._parameter_constraints,
        "random_state": ["random_state"],
    }

    def __init__(self, n_to_select=None, *, random_state=None, working_memory=None):
        self.n_to_select = n_to_select
        self.random_state = random_state
        self.working_memory = working_memory

    def fit(self, X, y=None):
        """Record the feature dimension of the labelled set.

        Parameters
        ----------
        X : FeatureBlocks or array-like of shape (n_structures, n_features)
        y : None
            Ignored.

        Returns
        -------
        self : RandomSelector
        """
        self._validate_params()
        X = self._check_X(X, reset=True)
        self.n_train_ = len(X)
        return self

    def _select(self, X, candidates, n_to_select):
        rng = check_random_state(self.random_state)
        return np.asarray(candidates)[rng.permutation(len(candidates))[:n_to_select]]


class MaxDistSelector(_KernelCentresSelector):
    """Farthest-point selection (greedy k-centre) with the train structures as initial centres.

    bmdal_reg's ``MaxDistSelectionMethod``: the next pick is the candidate whose squared kernel
    distance to the nearest centre is largest (first index on ties; without centres, the largest
    ``k(x, x)``); it becomes a centre. Parameters, kernels and attributes are those of
    :class:`~skntk.selection.lcmd.LCMDSelector`.

    Parameters
    ----------
    n_to_select : int, float or None, default=None
    kernel : {"auto", "linear", "gram"}, default="auto"
    gram_features : {"auto", "exact", "sketch"}, default="auto"
    n_sketch_features : int, default=1024
    features : {"prior", "posterior"}, default="prior"
    sigma2 : float, default=1e-3
    normalize : bool, default=True
    sel_with_train : bool, default=True
    random_state : int, RandomState instance or None, default=None
    working_memory : float or None, default=None

    Attributes
    ----------
    kernel_ : str
    gram_features_ : str or None
    centres_ : ndarray of shape (n_centres, D)
    n_features_in_ : int
    selected_idx_ : ndarray of int of shape (n_to_select,)

    Examples
    --------
    >>> import numpy as np
    >>> from skntk.selection.baselines import MaxDistSelector
    >>> train = np.array([[0.0, 0.0]])
    >>> pool = np.array([[0.1, 0.0], [5.0, 0.0], [5.1, 0.0], [0.0, 3.0]])
    >>> MaxDistSelector(n_to_select=2).fit(train).select(pool).tolist()
    [2, 3]
    """

    _method = "maxdist"
