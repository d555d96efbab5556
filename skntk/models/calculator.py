"""An ASE calculator for any MLIP handle (the protocol of :mod:`skntk.models.base`)."""

from __future__ import annotations

import numpy as np
import torch
from ase.calculators.calculator import Calculator, all_changes

__all__ = ["MLIPCalculator"]


class MLIPCalculator(Calculator):
    """ASE calculator evaluating an :class:`~skntk.models.base.MLIP` handle.

    Each call collates the one structure with the handle's ``collate`` (on the handle's
    device) and calls ``energy_and_forces``; results are NumPy float64.

    Parameters
    ----------
    model : MLIP
        The handle; its network is used as is (not copied), so later changes to its weights
        show up in later calculations.
    **kwargs
        Passed to :class:`ase.calculators.calculator.Calculator`.

    Examples
    --------
    >>> from ase.build import molecule
    >>> from skntk.models.builtin import BuiltinMLIP
    >>> atoms = molecule("H2O")
    >>> atoms.calc = BuiltinMLIP([1, 8], cutoff=4.0, n_hidden=8, n_blocks=1).calculator()
    >>> atoms.get_forces().shape
    (3, 3)
    """

    implemented_properties = ["energy", "free_energy", "forces"]

    def __init__(self, model, **kwargs):
        super().__init__(**kwargs)
        self.model = model

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        """Energy (eV), free energy (= energy, eV) and forces (n_atoms, 3) in eV/Å."""
        super().calculate(atoms, properties, system_changes)
        with torch.enable_grad():
            batch = self.model.collate([self.atoms])
            energy, forces = self.model.energy_and_forces(batch, create_graph=False)
        e = float(energy.detach().reshape(-1)[0])
        self.results = {
            "energy": e,
            "free_energy": e,
            "forces": forces.detach().to("cpu", torch.float64).numpy().astype(np.float64),
        }

    def __repr__(self) -> str:
        return f"MLIPCalculator({self.model!r})"
