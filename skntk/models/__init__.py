"""Model handles: the MLIP protocol and its backends."""

from skntk.models.base import MLIP

__all__ = ["MLIP"]
