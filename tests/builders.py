"""The tiny built-in model and small structures that many tests build (fixtures of them are in
``tests/conftest.py``; import these where a test needs parameters or runs at import time)."""

import numpy as np
from ase.build import fcc111, molecule
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator

MOLECULES = ["H2O", "CH4", "C2H6", "CH3OH", "C2H4", "CO2", "HCOOH", "H2CO"]


def tiny_builtin(species=(1, 6, 8), *, n_hidden=8, random_state=0, **kw):
    """A one-block built-in MLIP (the default cutoff, basis and readout unless given)."""
    from skntk.models.builtin import BuiltinMLIP

    return BuiltinMLIP(list(species), n_hidden=n_hidden, n_blocks=1, random_state=random_state,
                       **kw)


def molecules(n, seed=0):
    """``n`` distinct small H/C/O molecules (copies of MOLECULES rattled by 0.02 Å, seed
    ``seed + k``)."""
    out = []
    for k in range(n):
        a = molecule(MOLECULES[k % len(MOLECULES)])
        a.rattle(0.02, seed=seed + k)
        out.append(a)
    return out


def emt_label(a):
    """A copy of ``a`` carrying EMT energy (eV) and forces (eV/Å) in a SinglePointCalculator."""
    b = a.copy()
    b.calc = EMT()
    e = b.get_potential_energy()
    f = b.get_forces(apply_constraint=False)
    out = a.copy()
    out.calc = SinglePointCalculator(out, energy=e, forces=f)
    return out


def cu_slabs(n, seed, *, label=True, amp=0.1):
    """``n`` 8-atom Cu(111) slabs rattled by ``amp`` Å (seed ``seed * 1000 + k``); EMT energies
    and forces attached when ``label``.

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
