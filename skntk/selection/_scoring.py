"""What a selection is worth: the objectives behind ``score`` (for ``GridSearchCV``).

**Linearised fine-tuning** (the default of :meth:`skntk.pipeline.SelectionPipeline.score` on
``ase.Atoms``). Fine-tuning the pretrained model ``f(·; θ₀)`` on the labelled structures plus the
selected batch is, to first order, a ridge regression of the *residuals* ``y − f(θ₀)`` on the NTK
features ``g = ∂f/∂θ`` (the posterior mean of the linearised GP). The score is minus the RMSE of
that prediction on the unselected rest of the pool:

1. residual targets: energies ``E − E(θ₀)`` (eV) and forces ``F − F(θ₀)`` (eV/Å) of the
   pretrained model (no model: the labels themselves);
2. composition offsets removed: per-element reference energies ``μ`` refitted on the energy
   residuals of the fit structures (labelled ∪ selected) by :func:`fit_composition_offsets` (the
   mean per-atom energy, unpenalised, plus a small ridge per-element correction, since the
   compositions of a data set are often collinear), subtracted from every structure's residual,
   then divided by the atom count when the energy rows are per-atom gradients;
3. a ridge / linearised-GP mean (:class:`~skntk.selection._posterior.FeaturePosterior`,
   normalised features, noise ``SCORE_SIGMA2``) on the rows of the fit structures;
4. ``−√mean(err²)`` over the evaluated rows of the unselected structures: energy rows (eV/atom,
   or eV per structure without per-atom rows) and, when the blocks hold exact force rows and every
   structure has force labels, force components (eV/Å) pooled row by row — one row per energy and
   3N per structure for forces, as the rows weigh in the kernel.

Adding a constant per-atom energy to every label, or any per-element reference, leaves the score
unchanged (it is absorbed by the composition offsets).
"""

from __future__ import annotations

import numpy as np

from skntk.blocks import FeatureBlocks

#: Ridge penalty (relative to the mean squared train row norm) of :func:`ridge_rmse`, the
#: yardstick of :func:`skntk.selection._base.selection_score`.
SCORE_SIGMA2 = 1e-3

__all__ = [
    "COMPOSITION_RIDGE",
    "composition_counts",
    "fit_composition_offsets",
    "linearised_finetune_score",
    "residual_row_targets",
    "ridge_rmse",
]

#: Ridge of the per-element correction in :func:`fit_composition_offsets`, relative to the mean
#: diagonal of ``CᵀC`` (C: element counts).
COMPOSITION_RIDGE = 1e-10


def ridge_rmse(fit_rows, fit_targets, eval_rows, eval_targets, *, sigma2=SCORE_SIGMA2,
               fit_intercept=False):
    """Minus the RMSE on ``eval_rows`` of the ridge / linearised-GP mean fitted on ``fit_rows``.

    The model is :meth:`FeaturePosterior.predict` with normalised features (mean squared fit-row
    norm 1) and noise ``sigma2``; without fit rows (or all-zero ones) it predicts 0.
    ``fit_intercept=True`` adds an unpenalised intercept (rows and targets centred on the fit
    means first, as :class:`sklearn.linear_model.Ridge` does).

    Parameters
    ----------
    fit_rows : ndarray of shape (n_fit, d)
    fit_targets : ndarray of shape (n_fit,)
    eval_rows : ndarray of shape (n_eval, d)
    eval_targets : ndarray of shape (n_eval,)
    sigma2 : float, default=SCORE_SIGMA2

    Returns
    -------
    score : float

    Examples
    --------
    >>> import numpy as np
    >>> from skntk.selection._scoring import ridge_rmse
    >>> X = np.eye(3)
    >>> round(ridge_rmse(X, [1.0, 2.0, 3.0], X, [1.0, 2.0, 3.0], sigma2=1e-12), 6)
    -0.0
    """
    from skntk.selection._posterior import FeaturePosterior

    fit_rows = np.asarray(fit_rows, dtype=np.float64)
    eval_rows = np.asarray(eval_rows, dtype=np.float64)
    eval_targets = np.asarray(eval_targets, dtype=np.float64)
    fit_targets = np.asarray(fit_targets, dtype=np.float64)
    if eval_targets.size == 0:
        raise ValueError("score needs unselected rows to evaluate on; there are none "
                         "(lower n_to_select).")
    if fit_intercept and fit_targets.size:
        x_mean, y_mean = fit_rows.mean(axis=0), fit_targets.mean()
        fit_rows, eval_rows = fit_rows - x_mean, eval_rows - x_mean
        fit_targets, eval_targets = fit_targets - y_mean, eval_targets - y_mean
    if fit_rows.shape[0] == 0 or not np.any(fit_rows):
        pred = np.zeros(eval_targets.shape[0])
    else:
        post = FeaturePosterior(sigma2, normalize=True)
        post.fit(FeatureBlocks(fit_rows, np.arange(fit_rows.shape[0] + 1)), fit_targets)
        pred = post.predict(FeatureBlocks(eval_rows, np.arange(eval_rows.shape[0] + 1)))
    return -float(np.sqrt(np.mean((pred - eval_targets) ** 2)))


def composition_counts(atoms, elements):
    """Element counts, shape (n_structures, n_elements): ``C[s, k]`` atoms of ``elements[k]``."""
    elements = np.asarray(elements)
    if not len(atoms):
        return np.zeros((0, elements.size))
    return np.stack([(a.numbers[:, None] == elements[None, :]).sum(0)
                     for a in atoms]).astype(np.float64)


def fit_composition_offsets(counts, energies, *, ridge=COMPOSITION_RIDGE):
    """Per-element reference energies ``μ`` (eV/atom) so that ``counts @ μ`` fits ``energies``.

    ``μ = ē·1 + δ``: ``ē = Σ E / Σ N`` the mean energy per atom (unpenalised, so a constant
    per-atom shift of every label moves ``ē`` and nothing else), and
    ``δ = argmin ‖C δ − (E − ē N)‖² + λ ‖δ‖²`` with ``λ = ridge · mean(diag CᵀC)``: a small ridge,
    because compositions are often collinear (every frame of one molecule: rank 1).

    Parameters
    ----------
    counts : ndarray of shape (n_structures, n_elements)
    energies : ndarray of shape (n_structures,)
        Energies (eV) or energy residuals.
    ridge : float, default=COMPOSITION_RIDGE

    Returns
    -------
    mu : ndarray of shape (n_elements,)

    Examples
    --------
    >>> import numpy as np
    >>> from skntk.selection._scoring import fit_composition_offsets
    >>> C = np.array([[2.0, 1.0], [4.0, 2.0], [0.0, 1.0]])
    >>> mu = fit_composition_offsets(C, C @ [-13.6, -2000.0])
    >>> np.round(mu, 3).tolist()
    [-13.6, -2000.0]
    """
    C = np.asarray(counts, dtype=np.float64)
    E = np.asarray(energies, dtype=np.float64)
    k = C.shape[1]
    n_atoms = C.sum(axis=1)
    if C.shape[0] == 0 or not n_atoms.sum() > 0:
        return np.zeros(k)
    e_bar = E.sum() / n_atoms.sum()
    r = E - e_bar * n_atoms
    gram = C.T @ C
    lam = ridge * max(float(np.mean(np.diag(gram))), 1e-300)
    delta = np.linalg.solve(gram + lam * np.eye(k), C.T @ r)
    return e_bar + delta


def _layout(blocks, n_atoms, kind_hint):
    """``(energy_row, force_rows)`` flags of the blocks (checked against the atom counts)."""
    m = blocks.n_rows_per_structure
    kind = blocks.kind
    if np.all(m == 1) and kind in ("energy", "plain"):
        return True, False
    if kind == "joint":
        if not np.array_equal(m, 1 + 3 * n_atoms):
            raise ValueError("joint blocks must have 1 + 3N rows per structure.")
        return True, True
    if kind == "force":
        if not np.array_equal(m, 3 * n_atoms):
            raise ValueError("force blocks must have 3N rows per structure.")
        return False, True
    if kind_hint == "joint":  # force probes: the first row is the energy row, probes unused
        return True, False
    raise ValueError(
        f"score cannot relate the rows of these blocks (kind={kind!r}, force probes) to energies "
        "or forces; use kind='joint' (energy rows are used) or exact force rows, or pass "
        "scoring=callable."
    )


def residual_row_targets(blocks, atoms, energy_res, force_res, *, per_atom=True,
                         kind_hint=None):
    """Rows of ``blocks`` that have a residual target, and those targets.

    Parameters
    ----------
    blocks : FeatureBlocks
        Energy (one row), force (3N rows, atom-major), joint (1 + 3N) or force-probe blocks.
    atoms : list of ase.Atoms
    energy_res : ndarray of shape (n_structures,)
        Energy residuals after composition offsets (eV per structure).
    force_res : list of ndarray of shape (n_atoms_i, 3) or None
        Force residuals (eV/Å); ``None``: energy rows only.
    per_atom : bool, default=True
        Energy rows are per-atom gradients: divide the energy residual by ``N``.
    kind_hint : str or None
        The featuriser's ``kind`` (tells joint probe blocks apart).

    Returns
    -------
    rows : ndarray of int
        Row indices into ``blocks.rows``.
    targets : ndarray of float
    """
    n_atoms = np.array([len(a) for a in atoms], dtype=np.int64)
    has_e, has_f = _layout(blocks, n_atoms, kind_hint)
    if force_res is None:
        if not has_e:
            raise ValueError("force blocks need force labels for every structure to be scored.")
        has_f = False
    e = np.asarray(energy_res, dtype=np.float64) / (np.maximum(n_atoms, 1) if per_atom else 1.0)
    rows, targets = [], []
    for i in range(len(blocks)):
        start = int(blocks.offsets[i])
        if has_e:
            rows.append(np.array([start]))
            targets.append(e[i:i + 1])
            start += 1
        if has_f:
            f = np.asarray(force_res[i], dtype=np.float64).reshape(-1)
            rows.append(start + np.arange(f.size))
            targets.append(f)
    return np.concatenate(rows).astype(np.int64), np.concatenate(targets)


def linearised_finetune_score(lab_blocks, lab_atoms, lab_labels, pool_blocks, pool_atoms,
                              pool_labels, selected_idx, *, lab_pred=None, pool_pred=None,
                              per_atom=True, kind_hint=None, sigma2=SCORE_SIGMA2,
                              ridge=COMPOSITION_RIDGE):
    """Minus the RMSE on the unselected pool of linearised fine-tuning on labelled ∪ selected.

    See the module docstring for the definition and units.

    Parameters
    ----------
    lab_blocks : FeatureBlocks or None
        Features of the labelled structures (``None``: only the selected ones are fitted).
    lab_atoms : list of ase.Atoms or None
    lab_labels : (energies, forces) or None
        Energies (n,) in eV and a list of forces (n_atoms_i, 3) in eV/Å (entries may be None).
    pool_blocks : FeatureBlocks
    pool_atoms : list of ase.Atoms
    pool_labels : (energies, forces)
    selected_idx : ndarray of int
        Indices into the pool.
    lab_pred, pool_pred : (energies, forces) or None
        The pretrained model's predictions ``f(θ₀)`` (``None``: zero).
    per_atom : bool, default=True
        Energy rows are gradients of the energy per atom.
    kind_hint : str or None
    sigma2 : float, default=SCORE_SIGMA2
    ridge : float, default=COMPOSITION_RIDGE

    Returns
    -------
    score : float
    """
    n_pool = len(pool_atoms)
    selected_idx = np.asarray(selected_idx, dtype=np.int64)
    rest = np.setdiff1d(np.arange(n_pool), selected_idx)
    if rest.size == 0:
        raise ValueError(f"score needs unselected structures to evaluate on; all {n_pool} "
                         "structures were selected (lower n_to_select).")
    use_lab = lab_blocks is not None and lab_labels is not None and len(lab_atoms) > 0
    parts = [(pool_blocks, pool_atoms, pool_labels, pool_pred)]
    if use_lab:
        parts.insert(0, (lab_blocks, lab_atoms, lab_labels, lab_pred))
    # residuals of the pretrained model
    residuals = []
    for _, atoms, (E, F), pred in parts:
        E = np.asarray(E, dtype=np.float64)
        E0, F0 = pred if pred is not None else (np.zeros(len(atoms)), None)
        rE = E - np.asarray(E0, dtype=np.float64)
        if F is None or any(f is None for f in F):
            rF = None
        else:
            rF = [np.asarray(f, dtype=np.float64) - (0.0 if F0 is None else F0[i])
                  for i, f in enumerate(F)]
        residuals.append((rE, rF))
    if any(rF is None for _, rF in residuals):  # forces only where every structure has them
        residuals = [(rE, None) for rE, _ in residuals]
    # composition offsets fitted on the fit structures (labelled ∪ selected)
    elements = np.unique(np.concatenate([a.numbers for _, atoms, _, _ in parts for a in atoms]))
    counts = [composition_counts(atoms, elements) for _, atoms, _, _ in parts]
    fit_C = np.concatenate(([counts[0]] if use_lab else []) + [counts[-1][selected_idx]])
    fit_E = np.concatenate(([residuals[0][0]] if use_lab else [])
                           + [residuals[-1][0][selected_idx]])
    mu = fit_composition_offsets(fit_C, fit_E, ridge=ridge)

    fit_rows, fit_t = [], []
    for p, (part, (rE, rF), C) in enumerate(zip(parts, residuals, counts, strict=True)):
        blocks, atoms = part[0], part[1]
        rows, t = residual_row_targets(blocks, atoms, rE - C @ mu, rF, per_atom=per_atom,
                                       kind_hint=kind_hint)
        X = np.asarray(blocks.rows, dtype=np.float64)
        if p < len(parts) - 1:  # labelled: all fitted
            fit_rows.append(X[rows])
            fit_t.append(t)
            continue
        struct = np.searchsorted(blocks.offsets, rows, side="right") - 1
        is_sel = np.isin(struct, selected_idx)
        fit_rows.append(X[rows[is_sel]])
        fit_t.append(t[is_sel])
        eval_rows, eval_t = X[rows[~is_sel]], t[~is_sel]
    return ridge_rmse(np.concatenate(fit_rows), np.concatenate(fit_t), eval_rows, eval_t,
                      sigma2=sigma2)
