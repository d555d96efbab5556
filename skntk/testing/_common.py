"""Helpers shared by :func:`skntk.testing.check_featurizer` and :func:`skntk.testing.check_mlip`:
failure messages that name the invariant and the structures, and the unknown-element check."""

from __future__ import annotations

import contextlib

import numpy as np
from ase import Atoms
from ase.data import chemical_symbols


def _label(X, idx) -> str:
    idx = [idx] if np.isscalar(idx) else list(idx)
    return ", ".join(f"X[{i}] ({X[i].get_chemical_formula() or 'empty'})" for i in idx)


@contextlib.contextmanager
def _invariant(who: str, name: str, where: str = ""):
    """Re-raise any AssertionError inside as one naming the invariant and the structures."""
    try:
        yield
    except AssertionError as err:
        detail = str(err).strip()
        raise AssertionError(f"{who} fails the invariant '{name}'"
                             + (f" on {where}" if where else "") + f":\n{detail}") from None


def _pick_species(species) -> list[int]:
    if not species:
        return [1, 6, 8]
    species = sorted(species)
    preferred = [z for z in (1, 6, 8) if z in species]
    return preferred if len(preferred) >= 2 else species[:3]


def _unknown_z(species) -> int | None:
    if species is None:
        return None
    for z in (79, 84, 95, 7, 118, *range(1, 119)):
        if z not in species:
            return z
    return None


def _bad_structure(z, species) -> Atoms:
    good = min(species) if species else 1
    return Atoms(numbers=[good, z], positions=[[0.0, 0.0, 0.0], [0.0, 0.0, 1.5]])


def _expect_named_error(call, z):
    symbol = chemical_symbols[z]
    try:
        call()
    except ValueError as err:
        msg = str(err)
        assert symbol in msg, f"the ValueError does not name the element {symbol}: {msg!r}"
        assert "[1]" in msg, f"the ValueError does not name the structure X[1]: {msg!r}"
    else:
        raise AssertionError(f"a structure with {symbol} (Z={z}) was accepted")
