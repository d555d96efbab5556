"""Active learning around the selectors: oracles label, the loop fine-tunes and evaluates.

- :mod:`skntk.al.oracles`: :class:`PoolOracle` (labels already in the pool) and
  :class:`CalculatorOracle` (any ASE calculator);
- :mod:`skntk.al.committee`: :class:`CommitteeSelector`, the query-by-committee baseline;
- :mod:`skntk.al.loop`: :class:`ActiveLearningLoop`, select → label → fine-tune → evaluate rounds;
- :mod:`skntk.al.onthefly`: :class:`OnTheFlyLearner`, MD that labels where the calibrated error
  bar is above a threshold and fine-tunes as it goes.
"""

from skntk.al.committee import CommitteeSelector
from skntk.al.loop import ActiveLearningLoop, ActiveLearningResult
from skntk.al.onthefly import OnTheFlyLearner, OnTheFlyResult
from skntk.al.oracles import CalculatorOracle, LabelResult, PoolOracle

__all__ = ["ActiveLearningLoop", "ActiveLearningResult", "CalculatorOracle", "CommitteeSelector",
           "LabelResult", "OnTheFlyLearner", "OnTheFlyResult", "PoolOracle"]
