"""Oracles: where the labels (energies and forces) of picked structures come from.

Two oracles share one interface, :meth:`label(structures) -> list[LabelResult]`:

- :class:`PoolOracle` for *retrospective* runs: the pool already carries DFT labels (an attached
  calculator's results, e.g. a ``SinglePointCalculator`` read from extended XYZ, or
  ``REF_energy``/``REF_forces`` keys, read with :func:`skntk.io.get_labels`), revealed when picked.
- :class:`CalculatorOracle` for *prospective* runs with any ASE calculator (EMT, tblite's GFN2-xTB,
  a DFT code ...).

Every result carries a labelled **copy** of its input (``info``, ``arrays`` such as OC20's ``sid``,
``frame`` and ``fixed``, and constraints preserved; a ``SinglePointCalculator`` holding ``energy``
in eV and ``forces`` in eV/Å) or, for a structure that could not be labelled, the reason. One bad
structure never stops a batch; the input objects are never modified.
"""

from __future__ import annotations

import copy
import logging
import pickle
import re
import time
from dataclasses import dataclass
from numbers import Integral

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from skntk.atoms import as_atoms_list
from skntk.io import FORCES_KEYS, get_labels, label_problem

logger = logging.getLogger(__name__)

__all__ = ["LabelResult", "PoolOracle", "CalculatorOracle"]


@dataclass(frozen=True)
class LabelResult:
    """Outcome of labelling one structure.

    Parameters
    ----------
    atoms : ase.Atoms or None
        A copy of the input structure with a ``SinglePointCalculator`` holding ``energy`` (eV,
        float) and ``forces`` (eV/Å, ndarray of shape (n_atoms, 3), float64); ``None`` if the
        structure could not be labelled.
    error : str or None
        Why the structure could not be labelled; ``None`` on success.
    seconds : float
        Wall time spent on this structure, in seconds.

    Examples
    --------
    >>> LabelResult(None, "structure 0 (H2O): SCF not converged", 0.1).ok
    False
    """

    atoms: Atoms | None
    error: str | None
    seconds: float

    @property
    def ok(self) -> bool:
        """Whether the structure was labelled (``error is None``)."""
        return self.error is None


def _describe(atoms: Atoms, i: int) -> str:
    """``structure i (formula, sid=..., frame=...)`` for messages."""
    formula = atoms.get_chemical_formula() if len(atoms) else "empty"
    extra = "".join(f", {k}={atoms.info[k]!r}" for k in ("sid", "frame") if k in atoms.info)
    return f"structure {i} ({formula}{extra})"


def _strip_index(message: str) -> str:
    """``message`` of :func:`skntk.io.get_labels` on a one-structure list, without its prefix."""
    return re.sub(r"^X\[0\] (\([^)]*\) )?", "", message)


def _labelled_copy(atoms: Atoms, energy, forces) -> Atoms:
    """A copy of ``atoms`` (info, arrays, constraints kept) with a single-point calculator.

    Raises ``ValueError`` for a label :func:`skntk.io.label_problem` refuses (a non-finite
    energy, forces of the wrong shape or non-finite) or missing forces.
    """
    if forces is None:
        raise ValueError("no forces")
    problem = label_problem(atoms, energy, forces)
    if problem is not None:
        raise ValueError(problem.removeprefix("has "))
    energy = float(np.asarray(energy).reshape(()))
    forces = np.array(forces, dtype=np.float64)
    out = atoms.copy()  # deep copies of info/arrays/constraints; drops the calculator
    out.calc = SinglePointCalculator(out, energy=energy, forces=forces)
    return out


class PoolOracle:
    """Reveal labels that the pool already carries (retrospective active learning).

    Labels are read with :func:`skntk.io.get_labels`: first the attached calculator's results
    (a ``SinglePointCalculator`` from an extended XYZ file), then ``info``/``arrays`` keys such as
    ``REF_energy``/``REF_forces``. Both an energy and forces are required.

    Examples
    --------
    >>> import numpy as np
    >>> from ase.build import molecule
    >>> a = molecule("H2O")
    >>> a.info["REF_energy"] = -14.2
    >>> a.arrays["REF_forces"] = np.zeros((3, 3))
    >>> [r.ok for r in PoolOracle().label([a, molecule("CH4")])]
    [True, False]
    """

    def label(self, structures) -> list[LabelResult]:
        """Labelled copies of ``structures``.

        Parameters
        ----------
        structures : ase.Atoms, list of ase.Atoms or path to a structure file
            The picked structures, carrying their labels.

        Returns
        -------
        results : list of LabelResult of length n_structures
            One per input, in input order; a structure without an energy or forces label (or
            with non-finite ones) is a failed result whose ``error`` names it.
        """
        results = []
        for i, atoms in enumerate(as_atoms_list(structures, name="structures")):
            t0 = time.perf_counter()
            out, error = None, None
            try:
                energies, forces = get_labels([atoms])
            except (ValueError, TypeError) as exc:  # no energy label, or bad forces shape
                error = f"{_describe(atoms, i)} {_strip_index(str(exc))}"
            else:
                if forces[0] is None:
                    error = (f"{_describe(atoms, i)} has no forces label (looked in its "
                             f"calculator and arrays keys {list(FORCES_KEYS)}).")
                else:
                    try:
                        out = _labelled_copy(atoms, energies[0], forces[0])
                    except ValueError as exc:
                        error = f"{_describe(atoms, i)} has an unusable label: {exc}."
            results.append(LabelResult(out, error, time.perf_counter() - t0))
        return results

    def __repr__(self) -> str:
        return "PoolOracle()"


def _fresh_calculator(calculator):
    """An unused deep copy of ``calculator`` (results cleared).

    A calculator that cannot be deep-copied (tblite's ``TBLite`` after a first calculation holds a
    C handle) is rebuilt from its class and ``parameters`` instead.
    """
    try:
        calc = copy.deepcopy(calculator)
    except Exception as exc:  # noqa: BLE001
        params = getattr(calculator, "parameters", None)
        if params is None:
            raise TypeError(
                f"the calculator {type(calculator).__name__} can be neither deep-copied ({exc}) "
                "nor rebuilt from its parameters; pass an unused calculator."
            ) from exc
        calc = type(calculator)(**copy.deepcopy(dict(params)))
    if hasattr(calc, "reset"):
        calc.reset()
    return calc


def _label_one(template, atoms: Atoms, i: int) -> LabelResult:
    """Run a fresh copy of ``template`` on a copy of ``atoms``; never raises for a bad structure."""
    t0 = time.perf_counter()
    try:
        calc = _fresh_calculator(template)
        work = atoms.copy()
        work.calc = calc
        energy = work.get_potential_energy()
        forces = work.get_forces()
        out = _labelled_copy(atoms, energy, forces)
        error = None
    except Exception as exc:  # noqa: BLE001 - failures are recorded, not raised
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        out, error = None, f"{_describe(atoms, i)} failed: {reason}"
    return LabelResult(out, error, time.perf_counter() - t0)


class CalculatorOracle:
    """Label structures with an ASE calculator (prospective active learning).

    Each structure gets a fresh deep copy of ``calculator`` (no state leaks between structures)
    and is computed on a copy, so the inputs are never modified. A structure whose calculation
    fails (an exception such as an unconverged SCF, a non-finite energy or forces) is recorded as a
    failed :class:`LabelResult` with the reason; the others are labelled.

    Parameters
    ----------
    calculator : ase.calculators.calculator.Calculator
        Any ASE calculator, e.g. ``ase.calculators.emt.EMT()`` or
        ``tblite.ase.TBLite(method="GFN2-xTB")``. It must be picklable when ``n_jobs > 1``.
    n_jobs : int or None, default=1
        Structures labelled in parallel with joblib (processes); ``-1`` uses all cores, ``None``
        means 1 (or the enclosing ``joblib.parallel_config``).

    Examples
    --------
    >>> from ase.build import bulk
    >>> from ase.calculators.emt import EMT
    >>> res = CalculatorOracle(EMT()).label([bulk("Cu", cubic=True)])
    >>> res[0].ok, res[0].atoms.get_forces().shape
    (True, (4, 3))
    """

    def __init__(self, calculator, n_jobs=1):
        if not (hasattr(calculator, "get_potential_energy") or hasattr(calculator, "calculate")):
            raise TypeError(
                "calculator must be an ASE calculator (with get_potential_energy/calculate); got "
                f"{type(calculator).__name__}."
            )
        if n_jobs is not None and (not isinstance(n_jobs, Integral) or isinstance(n_jobs, bool)
                                   or n_jobs == 0):
            raise ValueError(f"n_jobs must be None or a non-zero int; got n_jobs={n_jobs!r}.")
        self.calculator = calculator
        self.n_jobs = n_jobs

    def label(self, structures) -> list[LabelResult]:
        """Compute energies and forces of ``structures``.

        Parameters
        ----------
        structures : ase.Atoms, list of ase.Atoms or path to a structure file

        Returns
        -------
        results : list of LabelResult of length n_structures
            One per input, in input order.

        Raises
        ------
        TypeError
            If ``n_jobs > 1`` and the calculator cannot be pickled.
        """
        atoms_list = as_atoms_list(structures, name="structures")
        template = _fresh_calculator(self.calculator)
        n_jobs = self.n_jobs
        if n_jobs is None or n_jobs == 1 or len(atoms_list) <= 1:
            return [_label_one(template, a, i) for i, a in enumerate(atoms_list)]
        try:
            pickle.dumps(template)
        except Exception as exc:  # noqa: BLE001
            raise TypeError(
                f"CalculatorOracle(n_jobs={n_jobs}) sends the calculator to worker processes, but "
                f"{type(self.calculator).__name__} cannot be pickled ({exc}); use n_jobs=1."
            ) from exc
        from joblib import Parallel, delayed

        return list(Parallel(n_jobs=n_jobs)(
            delayed(_label_one)(template, a, i) for i, a in enumerate(atoms_list)
        ))

    def __repr__(self) -> str:
        return f"CalculatorOracle({self.calculator!r}, n_jobs={self.n_jobs!r})"
