"""skntk: force-aware neural-tangent-kernel active learning for MLIPs, as scikit-learn estimators."""

from skntk.blocks import FeatureBlocks, as_blocks

__version__ = "0.1.0.dev0"

__all__ = ["FeatureBlocks", "as_blocks", "__version__"]
