"""Energies and forces of a handle for a list of structures, in batches (no training).

What :mod:`skntk.metrics`, :mod:`skntk.finetune` and :mod:`skntk.uncertainty` predict with;
``skntk.finetune.predict_energies_forces`` re-exports it.
"""

from __future__ import annotations

import numpy as np
import torch

from skntk.models.base import MLIP, deterministic_on_cpu

__all__ = ["predict_energies", "predict_energies_forces"]


def predict_energies_forces(model: MLIP, atoms, *, batch_size: int = 16, device=None):
    """Energies and forces of ``model`` for each structure.

    Parameters
    ----------
    model : MLIP
    atoms : list of ase.Atoms of length n_structures
    batch_size : int, default=16
        Structures per graph.
    device : str or torch.device or None, default=None
        Where batches are collated (``None``: the handle's device).

    Returns
    -------
    energies : ndarray of shape (n_structures,)
        Total energies in eV (float64).
    forces : list of ndarray of shape (n_atoms_i, 3)
        Forces in eV/Å (float64).
    """
    energies, forces = [], []
    for s, chunk, batch in _batches(model, atoms, batch_size, device):
        # forces by autograd, even when called under no_grad; summed in a fixed order
        with torch.enable_grad(), deterministic_on_cpu(batch.ptr.device):
            e, f = model.energy_and_forces(batch, create_graph=False)
        energies.append(_finite_energies(e, s, chunk))
        f = f.detach().to("cpu", torch.float64).numpy()
        ptr = batch.ptr.to("cpu").numpy()
        forces.extend(f[ptr[i]:ptr[i + 1]] for i in range(len(chunk)))
    return (np.concatenate(energies) if energies else np.zeros(0)), forces


def _batches(model: MLIP, atoms, batch_size: int, device):
    """``(start, structures, collated batch)`` of consecutive chunks of ``atoms``."""
    for s in range(0, len(atoms), batch_size):
        chunk = list(atoms[s:s + batch_size])
        yield s, chunk, (model.collate(chunk) if device is None else model.collate(chunk, device))


def _finite_energies(e, start: int, chunk) -> np.ndarray:
    """``e`` as float64 on the host; a non-finite one is refused, naming its structure."""
    e = e.detach().to("cpu", torch.float64).numpy().reshape(-1)
    bad = ~np.isfinite(e)
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        raise FloatingPointError(
            f"the model predicted a non-finite energy for structure {start + k} "
            f"({chunk[k].get_chemical_formula()}).")
    return e


def predict_energies(model: MLIP, atoms, *, batch_size: int = 16, device=None) -> np.ndarray:
    """Energies of ``model`` for each structure, without forces (no backward pass).

    Parameters and units as :func:`predict_energies_forces`; about a third of its cost where the
    forces need a backward pass (SevenNet, CHGNet, MACE, the built-in model).

    Returns
    -------
    energies : ndarray of shape (n_structures,)
        Total energies in eV (float64).
    """
    energies = []
    for s, chunk, batch in _batches(model, atoms, batch_size, device):
        with torch.no_grad():
            energies.append(_finite_energies(model.energy(batch), s, chunk))
    return np.concatenate(energies) if energies else np.zeros(0)
