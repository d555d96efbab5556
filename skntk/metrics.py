"""Errors of a model on labelled structures, the same way for every model.

:func:`evaluate` is what :class:`skntk.al.ActiveLearningLoop` logs each round and what the evidence
benchmarks report: per-atom energy errors (eV/atom), also after removing each system's mean offset,
and force errors on free atoms (eV/Å).
"""

from __future__ import annotations

import warnings
from collections import defaultdict

import numpy as np

from skntk.atoms import _label, as_atoms_list
from skntk.io import free_atoms, get_labels, label_problem

__all__ = ["evaluate", "error_metrics"]


def _predict(model, atoms):
    """``(energies, forces)`` of an MLIP handle, a fitted regressor or an ASE calculator."""
    from skntk.models.base import MLIP
    from skntk.models.predict import predict_energies_forces

    if hasattr(model, "model_"):  # a fitted MLIPRegressor (or anything exposing its handle)
        model = model.model_
    if isinstance(model, MLIP):
        return predict_energies_forces(model, atoms)
    if hasattr(model, "get_potential_energy") or hasattr(model, "calculate"):
        energies, forces = [], []
        for a in atoms:
            b = a.copy()
            b.calc = model
            energies.append(float(b.get_potential_energy()))
            forces.append(np.asarray(b.get_forces(), dtype=float))
        return np.asarray(energies), forces
    raise TypeError(f"evaluate() takes an MLIP handle, a fitted MLIPRegressor or an ASE "
                    f"calculator; got {type(model).__name__}.")


def _system(a, key):
    if key in a.info:
        return str(a.info[key])
    return a.get_chemical_formula()


def error_metrics(atoms, energies, forces, pred_energies, pred_forces, *, system_key="sid"):
    """The errors of :func:`evaluate` from labels and predictions.

    Parameters
    ----------
    atoms : list of ase.Atoms of length n_structures
    energies, pred_energies : array-like of shape (n_structures,)
        Labelled and predicted total energies in eV.
    forces, pred_forces : list of (ndarray of shape (n_atoms_i, 3) or None)
        Labelled and predicted forces in eV/Å (``None`` labels are skipped).
    system_key : str, default="sid"
        ``info`` key naming a structure's system (its chemical formula when absent).

    Returns
    -------
    metrics : dict
        ``energy_mae``, ``energy_rmse`` (eV/atom), ``energy_mae_centered``,
        ``energy_rmse_centered`` (eV/atom, after subtracting each system's mean per-atom error),
        ``force_mae``, ``force_rmse`` (eV/Å, components of free atoms), the tails of the
        per-atom force error norm |ΔF_i| over free atoms: ``force_q95``, ``force_q99`` (95th /
        99th percentile), ``force_max`` (largest), ``force_max_atom_mean`` (mean over structures
        of each structure's largest |ΔF_i|), ``force_mae_q90`` (90th percentile of the
        per-structure force MAE), ``n_structures``, ``n_force_atoms``. Every force key is NaN
        when no structure has force labels (an energy-only test set).
    """
    n_atoms = np.array([len(a) for a in atoms], dtype=float)
    err = (np.asarray(pred_energies, float) - np.asarray(energies, float)) / n_atoms
    groups = defaultdict(list)
    for i, a in enumerate(atoms):
        groups[_system(a, system_key)].append(i)
    centred = err.copy()
    for idx in groups.values():
        centred[idx] -= err[idx].mean()
    # per structure: the force errors of its free atoms, shape (n_free_i, 3)
    per = [(np.asarray(pf) - np.asarray(f))[free_atoms(a)]
           for a, f, pf in zip(atoms, forces, pred_forces, strict=True) if f is not None]
    per = [d for d in per if d.size]
    dF = np.concatenate(per).ravel() if per else np.empty(0)
    norms = np.concatenate([np.linalg.norm(d, axis=1) for d in per]) if per else np.empty(0)
    nan = float("nan")
    return {
        "energy_mae": float(np.mean(np.abs(err))),
        "energy_rmse": float(np.sqrt(np.mean(err ** 2))),
        "energy_mae_centered": float(np.mean(np.abs(centred))),
        "energy_rmse_centered": float(np.sqrt(np.mean(centred ** 2))),
        "force_mae": float(np.mean(np.abs(dF))) if dF.size else nan,
        "force_rmse": float(np.sqrt(np.mean(dF ** 2))) if dF.size else nan,
        "force_q95": float(np.quantile(norms, 0.95)) if norms.size else nan,
        "force_q99": float(np.quantile(norms, 0.99)) if norms.size else nan,
        "force_max": float(norms.max()) if norms.size else nan,
        "force_max_atom_mean": (float(np.mean([np.linalg.norm(d, axis=1).max() for d in per]))
                                if per else nan),
        "force_mae_q90": (float(np.quantile([np.mean(np.abs(d)) for d in per], 0.9))
                          if per else nan),
        "n_structures": len(atoms),
        "n_force_atoms": int(dF.size // 3),
    }


def _finite_labels(atoms, energies, forces) -> np.ndarray:
    """Indices of the structures whose labels are finite; one warning names the others."""
    bad = [(i, p) for i, (a, e, f) in enumerate(zip(atoms, energies, forces, strict=True))
           if (p := label_problem(a, e, f)) is not None]
    if len(bad) == len(atoms):
        i, problem = bad[0]
        raise ValueError(f"evaluate(): no structure has finite labels ({_label(atoms[i], i, 'X')} "
                         f"{problem}); nothing to evaluate.")
    if bad:
        shown = "; ".join(f"{_label(atoms[i], i, 'X')} {p}" for i, p in bad[:5])
        more = f"; and {len(bad) - 5} more" if len(bad) > 5 else ""
        warnings.warn(f"evaluate() skips {len(bad)} of the {len(atoms)} structures, whose labels "
                      f"are not finite (counted in 'n_skipped'): {shown}{more}.", UserWarning,
                      stacklevel=3)
    skipped = {i for i, _ in bad}
    return np.array([i for i in range(len(atoms)) if i not in skipped], dtype=np.int64)


def evaluate(model, atoms, *, groups=None, system_key="sid") -> dict:
    """Energy and force errors of ``model`` on labelled structures.

    Parameters
    ----------
    model : MLIP, fitted MLIPRegressor or ase.calculators.calculator.Calculator
    atoms : list of ase.Atoms of length n_structures, or a structure file path
        Labelled structures (calculator results or ``REF_energy`` / ``REF_forces``).
    groups : str, array-like of shape (n_structures,) or None, default=None
        Also report the errors per subgroup: an ``info`` key (e.g. ``"temperature"``,
        ``"sid"``) or one label per structure.
    system_key : str, default="sid"
        ``info`` key naming each structure's system for the centred energy errors (the chemical
        formula when absent).

    Returns
    -------
    metrics : dict
        ``energy_mae``, ``energy_rmse`` (eV/atom: per-structure ``|E_pred - E_ref| / N``),
        ``energy_mae_centered``, ``energy_rmse_centered`` (eV/atom, after removing each system's
        mean per-atom offset), ``force_mae``, ``force_rmse`` (eV/Å, over the force components of
        free atoms: OC20's ``fixed`` and ASE ``FixAtoms`` exclude atoms), the tail errors
        ``force_q95``, ``force_q99``, ``force_max``, ``force_max_atom_mean`` and
        ``force_mae_q90`` (eV/Å; see :func:`error_metrics`), ``n_structures``,
        ``n_force_atoms``, ``n_skipped``; with ``groups``, also ``"groups": {label: metrics}``.

    Warns
    -----
    UserWarning
        When some structures have a NaN/inf energy or force label: they are skipped (not
        counted in ``n_structures``; counted in ``n_skipped``) and the warning names each one
        (``X[4] (C2H6O) has a non-finite energy label (nan eV)``). A test set in which no
        structure has finite labels is refused (``ValueError``).

    Examples
    --------
    >>> from ase.build import bulk
    >>> from ase.calculators.emt import EMT
    >>> frames = []
    >>> for k in range(2):
    ...     a = bulk("Cu", cubic=True)
    ...     a.rattle(0.05, seed=k)
    ...     a.calc = EMT()
    ...     _ = a.get_forces()
    ...     frames.append(a)
    >>> m = evaluate(EMT(), frames)
    >>> round(m["energy_mae"], 12), round(m["force_mae"], 12)  # EMT against itself
    (0.0, 0.0)
    """
    atoms = as_atoms_list(atoms)
    if not atoms:
        raise ValueError("evaluate() needs at least one labelled structure; got none.")
    energies, forces = get_labels(atoms, finite=False)
    labels = None
    if groups is not None:
        if isinstance(groups, str):
            missing = [i for i, a in enumerate(atoms) if groups not in a.info]
            if missing:
                raise KeyError(f"structure {missing[0]} has no info[{groups!r}] to group on.")
            labels = [a.info[groups] for a in atoms]
        else:
            labels = list(groups)
            if len(labels) != len(atoms):
                raise ValueError(f"groups has {len(labels)} labels; there are {len(atoms)} "
                                 f"structures.")
    keep = _finite_labels(atoms, energies, forces)
    n_skipped = len(atoms) - len(keep)
    if n_skipped:
        atoms, energies = [atoms[i] for i in keep], energies[keep]
        forces = [forces[i] for i in keep]
        labels = None if labels is None else [labels[i] for i in keep]
    pred_e, pred_f = _predict(model, atoms)
    out = error_metrics(atoms, energies, forces, pred_e, pred_f, system_key=system_key)
    out["n_skipped"] = n_skipped
    if labels is not None:
        out["groups"] = {}
        for g in sorted({str(v) for v in labels}):
            idx = [i for i, v in enumerate(labels) if str(v) == g]
            out["groups"][g] = error_metrics(
                [atoms[i] for i in idx], energies[idx], [forces[i] for i in idx],
                pred_e[idx], [pred_f[i] for i in idx], system_key=system_key)
    return out
