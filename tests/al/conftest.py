"""Shared fixtures of the active-learning tests: tiny EMT-labelled Cu slabs and a tiny model."""

import numpy as np
import pytest
from ase.build import fcc111
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator


def _cu_slabs(n, seed, *, label=True, amp=0.1):
    """``n`` rattled 8-atom Cu(111) slabs; EMT energies/forces attached when ``label``.

    Each carries ``info["pool_id"] = k`` (its index) so oracles can report what they label.
    """
    frames = []
    for k in range(n):
        a = fcc111("Cu", (2, 2, 2), vacuum=4.0)
        a.rattle(amp, seed=seed * 1000 + k)
        a.info["pool_id"] = k
        if label:
            b = a.copy()
            b.calc = EMT()
            e, f = b.get_potential_energy(), b.get_forces()
            a.calc = SinglePointCalculator(a, energy=e, forces=np.array(f))
        frames.append(a)
    return frames


@pytest.fixture
def cu_slabs():
    """Factory ``cu_slabs(n, seed, label=True)`` of rattled Cu slabs (EMT-labelled)."""
    return _cu_slabs


@pytest.fixture
def tiny_model():
    from skntk.models.builtin import BuiltinMLIP

    return BuiltinMLIP([29], n_hidden=16, n_blocks=1, random_state=0)


@pytest.fixture
def one_torch_thread():
    """Tiny networks train fastest on one thread (and do not oversubscribe a shared machine)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
