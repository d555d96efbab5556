"""Baselines in the selector API: random selection and MaxDist (farthest point, greedy k-centre)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from ase import Atoms
from sklearn.utils import check_random_state

from skntk._sklearn_compat import validate_params
from skntk.selection._base import BaseSelector
from skntk.selection._kernel import _KernelCentresSelector

__all__ = ["RandomSelector", "MaxDistSelector"]


class _Structures:
    """Stand-in for a sequence of structures: random selection needs only its length."""

    def __init__(self, n: int):
        self._n = n

    def __len__(self) -> int:
        return self._n


def _n_structures(X):
    """Length of ``X`` if it is one ``ase.Atoms`` or a non-empty sequence of them, else ``None``.

    Lists, tuples and object arrays are checked item by item; any other sequence (a lazy pool)
    by its first item.
    """
    if isinstance(X, Atoms):
        return 1
    if isinstance(X, np.ndarray):
        if X.dtype != object or X.ndim != 1 or X.size == 0:
            return None
        return len(X) if all(isinstance(a, Atoms) for a in X) else None
    if isinstance(X, (list, tuple)):
        return len(X) if X and all(isinstance(a, Atoms) for a in X) else None
    if isinstance(X, Sequence) and not isinstance(X, (str, bytes)):
        return len(X) if len(X) and isinstance(X[0], Atoms) else None
    return None


class RandomSelector(BaseSelector):
    """Uniformly random selection without replacement (the baseline every method must beat).

    Besides features it accepts the structures themselves (one ``ase.Atoms`` or a sequence of
    them): only their number matters, so no featurisation is needed.

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
    >>> from ase.build import molecule
    >>> pool = [molecule("H2O"), molecule("CH4"), molecule("NH3")]
    >>> RandomSelector(n_to_select=2, random_state=0).fit(pool[:1]).select(pool).shape
    (2,)
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
        X : FeatureBlocks, array-like of shape (n_structures, n_features) or sequence of ase.Atoms
            Labelled set (structures: only their number is used, no ``n_features_in_``).
        y : None
            Ignored.

        Returns
        -------
        self : RandomSelector
        """
        validate_params(self)
        X = self._check_X(X, reset=True)
        self.n_train_ = len(X)
        return self

    def _check_X(self, X, *, reset):
        """Features as in :class:`BaseSelector`; structures (ase.Atoms) reduced to their count."""
        n = _n_structures(X)
        if n is None:
            return super()._check_X(X, reset=reset)
        if reset and hasattr(self, "n_features_in_"):
            del self.n_features_in_  # a refit on structures forgets a previous feature width
        return _Structures(n)

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
        Seed of the gram sketch (``None``: the fixed seed 0).
    working_memory : float or None, default=None
    progress_bar : bool, default=False
    device : str or None, default=None
        As in :class:`~skntk.selection.lcmd.LCMDSelector`.

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
