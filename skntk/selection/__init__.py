"""Selectors: chunked posterior variance, LCMD and baselines, as scikit-learn estimators.

Import from the submodules (:mod:`skntk.selection.pv`, :mod:`skntk.selection.lcmd`,
:mod:`skntk.selection.baselines`); the names are re-exported here for convenience.
"""

from skntk.selection.baselines import MaxDistSelector, RandomSelector
from skntk.selection.lcmd import LCMDSelector
from skntk.selection.pv import ChunkedPosteriorVarianceSelector

__all__ = ["ChunkedPosteriorVarianceSelector", "LCMDSelector", "MaxDistSelector", "RandomSelector"]
