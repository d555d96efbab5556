"""skntk: force-aware neural-tangent-kernel active learning for MLIPs, as scikit-learn estimators.

Data flows one way: ``ase.Atoms`` → :mod:`skntk.atoms` batch → :mod:`skntk.models` handle →
:mod:`skntk.ntk` rows (:class:`FeatureBlocks`) → :mod:`skntk.selection` selectors → indices.
Around it, :mod:`skntk.al` runs the active-learning loop: select, label (:mod:`skntk.al.oracles`),
fine-tune (:class:`MLIPRegressor`), evaluate (:func:`evaluate`).
"""

from skntk._version import __version__
from skntk.al import (
    ActiveLearningLoop,
    CalculatorOracle,
    CommitteeSelector,
    OnTheFlyLearner,
    PoolOracle,
)
from skntk.blocks import FeatureBlocks, as_blocks
from skntk.finetune import MLIPRegressor
from skntk.metrics import evaluate
from skntk.models import MLIP, load
from skntk.models.builtin import BuiltinMLIP
from skntk.pipeline import SelectionPipeline, make_pv_lcmd_pipeline
from skntk.selection.baselines import MaxDistSelector, RandomSelector
from skntk.selection.lcmd import LCMDSelector
from skntk.selection.pv import ChunkedPosteriorVarianceSelector
from skntk.transformers import EmbeddingTransformer, ForceNTKTransformer
from skntk.uncertainty import ForceUncertainty

__all__ = [
    "ActiveLearningLoop",
    "CalculatorOracle",
    "CommitteeSelector",
    "MLIPRegressor",
    "OnTheFlyLearner",
    "PoolOracle",
    "evaluate",
    "BuiltinMLIP",
    "ChunkedPosteriorVarianceSelector",
    "EmbeddingTransformer",
    "FeatureBlocks",
    "ForceNTKTransformer",
    "ForceUncertainty",
    "LCMDSelector",
    "MLIP",
    "MaxDistSelector",
    "RandomSelector",
    "SelectionPipeline",
    "as_blocks",
    "load",
    "make_pv_lcmd_pipeline",
    "__version__",
]
