"""Fine-tuning any MLIP handle as a scikit-learn regressor.

:class:`MLIPRegressor` trains a **copy** of a handle's network (the user's model is never
changed) on labelled ``ase.Atoms``: first it refits the per-element reference energies on the
residuals ``E_label - E_model`` (:func:`refit_reference_energies`), then it trains a parameter
subset with Adam on per-atom energy and force losses, keeping the weights of the best validation
epoch (the pretrained weights included: a fine-tuning that does not help is not kept).
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted
from tqdm.auto import tqdm

from skntk._sklearn_compat import Interval, _fit_context
from skntk.io import free_atoms, get_labels
from skntk.models.base import MLIP, deterministic_on_cpu
from skntk.models.predict import predict_energies, predict_energies_forces  # re-exported

logger = logging.getLogger(__name__)

__all__ = ["MLIPRegressor", "predict_energies", "predict_energies_forces",
           "refit_reference_energies", "train_builtin"]

#: Ridge of the reference-energy refit, relative to the mean diagonal of ``CᵀC`` (C: counts).
REFIT_RIDGE = 1e-6


def composition_matrix(atoms, elements) -> np.ndarray:
    """Element counts, shape (n_structures, n_elements): ``C[s, k]`` atoms of ``elements[k]``."""
    elements = np.asarray(elements)
    return np.stack([(a.numbers[:, None] == elements[None, :]).sum(0) for a in atoms]).astype(float)


def refit_reference_energies(model: MLIP, atoms, energies, *, predicted=None,
                             ridge: float = REFIT_RIDGE) -> dict[int, float]:
    """Shift ``model``'s per-element reference energies (in place) to fit ``energies``.

    Solves ``min_Δ ‖C Δ - r‖² + λ ‖Δ‖²`` with ``r = E_label - E_model`` the residuals (eV), ``C``
    the element counts and ``λ = ridge · mean(diag CᵀC)``: a small ridge toward the model's own
    references, so collinear compositions (all frames of one molecule: rank 1) get the
    minimum-norm change instead of an ill-posed solve. Only elements present in ``atoms`` change.

    Parameters
    ----------
    model : MLIP
        Handle whose references are changed in place (pass a copy to keep the original).
    atoms : list of ase.Atoms of length n_structures
    energies : array-like of shape (n_structures,)
        Labels in eV.
    predicted : array-like of shape (n_structures,) or None, default=None
        ``model``'s energies for ``atoms`` (computed when ``None``).
    ridge : float, default=REFIT_RIDGE

    Returns
    -------
    delta : dict of int to float
        Change of the reference of each element present, eV per atom.
    """
    if predicted is None:
        predicted = predict_energies(model, atoms)
    resid = np.asarray(energies, float) - np.asarray(predicted, float)
    elements = sorted({int(z) for a in atoms for z in a.numbers})
    C = composition_matrix(atoms, elements)
    gram = C.T @ C
    lam = ridge * max(float(np.trace(gram)) / len(elements), 1e-12)
    delta = np.linalg.solve(gram + lam * np.eye(len(elements)), C.T @ resid)
    refs = model.reference_energies()
    model.set_reference_energies({z: refs[z] + float(d) for z, d in zip(elements, delta,
                                                                        strict=True)})
    return {z: float(d) for z, d in zip(elements, delta, strict=True)}


def _composition_span(atoms, tol=1e-8):
    """``(elements, basis, formulas)``: an orthonormal basis (rank, n_elements) of the span of
    the element counts of ``atoms``, and up to three of their distinct formulas."""
    elements = sorted({int(z) for a in atoms for z in a.numbers})
    C = composition_matrix(atoms, elements)
    _, sv, vt = np.linalg.svd(C, full_matrices=False)
    basis = vt[:int(np.sum(sv > tol * sv[0]))]
    formulas = list(dict.fromkeys(a.get_chemical_formula() for a in atoms))
    return elements, basis, formulas[:3] + (["..."] if len(formulas) > 3 else [])


def _outside_span(atoms, span, tol=1e-6):
    """Indices of ``atoms`` made of the span's elements whose element counts lie outside it (the
    refitted references do not determine their energies)."""
    if span is None:
        return []
    elements, basis, _ = span
    known = set(elements)
    idx = [i for i, a in enumerate(atoms) if set(a.numbers.tolist()) <= known]
    if not idx:  # atoms with an unlabelled element are warned about on their own
        return []
    C = composition_matrix([atoms[i] for i in idx], elements)
    resid = np.linalg.norm(C - (C @ basis.T) @ basis, axis=1)
    return [i for i, r, n in zip(idx, resid, np.linalg.norm(C, axis=1), strict=True)
            if r > tol * n]


def _labels(atoms):
    energies, forces = get_labels(atoms)
    return energies, forces, [free_atoms(a) for a in atoms]


class MLIPRegressor(RegressorMixin, BaseEstimator):
    """Fine-tune an MLIP handle on labelled structures (a scikit-learn regressor).

    ``fit`` copies the handle's network, refits the per-element reference energies on the label
    residuals (``refit_shifts``), then trains the parameter subset ``parameters`` with Adam on

        ``energy_weight · mean_s ((E_s - E_s^ref) / N_s)² + force_weight · mean (F - F^ref)²``

    (eV²/atom² and eV²/Å²; forces of free atoms only: OC20's ``fixed`` array or an ASE
    ``FixAtoms`` constraint mark the others), one epoch over fixed mini-batches in a seeded
    order. The validation loss is measured before training (epoch 0) and after each epoch, and
    the best weights are kept, so fine-tuning never ends worse on the validation split than the
    refitted pretrained model.

    Parameters
    ----------
    model : MLIP or str
        Handle (never changed, never copied by ``clone``) or a name/path for
        :func:`skntk.models.load`.
    parameters : str or list of str, default="default"
        Subset to train (``"default"``: the backend's ``default_subset``; ``"readout"``,
        ``"last_block"``, ``"all"`` or fnmatch patterns).
    epochs : int, default=30
        Maximum number of epochs.
    learning_rate : float, default=1e-3
        Adam learning rate, halved after ``patience // 2`` epochs without improvement.
    batch_size : int, default=4
        Structures per mini-batch.
    energy_weight, force_weight : float, default=1.0, 1.0
        Weights of the per-atom energy and force losses.
    validation_fraction : float, default=0.2
        Fraction of the structures held out for early stopping (at least one when there are two or
        more structures; none for one structure, which then trains for ``epochs``).
    patience : int, default=6
        Epochs without validation improvement before stopping.
    refit_shifts : bool, default=True
        Refit per-element reference energies first (:func:`refit_reference_energies`).
    device : str, default="auto"
        Training device (``"auto"``: CUDA when available).
    random_state : int, RandomState instance or None, default=None
        Seed of the split, the batch order and torch's generator during ``fit``.
    progress_bar : bool, default=False
        tqdm bar over epochs.

    Attributes
    ----------
    model_ : MLIP
        The fine-tuned handle (its own copy of the network): ``model_.save(path)``,
        ``model_.calculator()``.
    history_ : list of dict
        Per epoch (0 = before training): ``epoch``, ``train_loss``, ``val_loss``, ``seconds``.
    reference_shifts_ : dict of int to float
        Change of each element's reference energy (eV/atom); empty without ``refit_shifts``.
    elements_ : frozenset of int
        Elements of the training structures.
    compositions_ : tuple or None
        ``(elements, basis, formulas)``: the span of the element counts the references were
        refitted on (None without ``refit_shifts``). ``predict`` warns for a
        structure whose counts lie outside it (one molecule's labels fix the sum of its
        elements' references, not each one: another molecule's energy is then off by a
        constant; forces are unaffected).
    train_indices_ : ndarray of int of shape (n_train,)
        Indices into ``X`` of the structures trained on (sorted).
    validation_indices_ : ndarray of int of shape (n_validation,)
        Indices into ``X`` of the structures held out for early stopping (sorted; empty when
        there is no validation split). :meth:`skntk.ForceUncertainty.from_regressor` calibrates
        on them.
    best_epoch_ : int
        Epoch whose weights were kept (0: the pretrained weights, after the refit).
    fit_time_ : float
        Seconds spent in ``fit``.

    Notes
    -----
    Defaults were chosen on held-out SevenNet-0 / 3BPA frames (docs/active_learning.md): batches
    of 4 and a learning rate of 1e-3 on the ``last_block`` subset lower the force error within a
    few epochs, and early stopping on the validation split (which includes the untrained model,
    epoch 0) guards against making it worse.

    Examples
    --------
    >>> from ase.build import bulk
    >>> from ase.calculators.emt import EMT
    >>> from skntk.models.builtin import BuiltinMLIP
    >>> frames = []
    >>> for k in range(4):
    ...     a = bulk("Cu", cubic=True)
    ...     a.rattle(0.05, seed=k)
    ...     a.calc = EMT()
    ...     _ = a.get_forces()
    ...     frames.append(a)
    >>> reg = MLIPRegressor(BuiltinMLIP([29], n_hidden=8, n_blocks=1), epochs=2,
    ...                     random_state=0).fit(frames)
    >>> reg.predict(frames).shape, len(reg.history_)
    ((4,), 3)
    """

    _parameter_constraints = {
        "model": [MLIP, str, os.PathLike, None],
        "parameters": [str, list, tuple],
        "epochs": [Interval(Integral, 0, None, closed="left")],
        "learning_rate": [Interval(Real, 0, None, closed="neither")],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "energy_weight": [Interval(Real, 0, None, closed="left")],
        "force_weight": [Interval(Real, 0, None, closed="left")],
        "validation_fraction": [Interval(Real, 0, 1, closed="left")],
        "patience": [Interval(Integral, 1, None, closed="left")],
        "refit_shifts": ["boolean"],
        "device": [str, torch.device],
        "random_state": ["random_state"],
        "progress_bar": ["boolean"],
    }

    def __init__(self, model=None, *, parameters="default", epochs=30, learning_rate=1e-3,
                 batch_size=4, energy_weight=1.0, force_weight=1.0, validation_fraction=0.2,
                 patience=6, refit_shifts=True, device="auto", random_state=None,
                 progress_bar=False):
        self.model = model
        self.parameters = parameters
        self.epochs = epochs
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.energy_weight = energy_weight
        self.force_weight = force_weight
        self.validation_fraction = validation_fraction
        self.patience = patience
        self.refit_shifts = refit_shifts
        self.device = device
        self.random_state = random_state
        self.progress_bar = progress_bar

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.target_tags.required = False
        return tags

    # -- fitting -------------------------------------------------------------------------------
    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Fine-tune a copy of ``model`` on the labelled structures ``X``.

        Parameters
        ----------
        X : list of ase.Atoms of length n_structures, or a structure file path
            Labels from the attached calculator or ``REF_energy`` / ``REF_forces`` (as
            :func:`skntk.io.get_labels`); a structure without forces contributes its energy only.
        y : None
            Ignored (labels travel with the structures).

        Returns
        -------
        self : MLIPRegressor
        """
        from skntk.models import resolve_model
        from skntk.models._util import resolve_device

        t_start = time.perf_counter()
        base = resolve_model(self.model, type(self).__name__)
        X = base.validate(X)
        energies, forces, free = _labels(X)
        rng = check_random_state(self.random_state)
        seed = int(rng.randint(np.iinfo(np.int32).max))
        perm = rng.permutation(len(X))
        n_val = 0
        if self.validation_fraction > 0 and len(X) > 1:
            n_val = min(len(X) - 1, max(1, int(round(self.validation_fraction * len(X)))))
        val_idx, tr_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])

        model = base.copy()
        device = resolve_device(self.device, cuda_fallback=True)
        _move(model, device)
        _check_copy(base, model, X[:1])
        self.elements_ = frozenset(int(z) for a in X for z in a.numbers)
        self.reference_shifts_ = {}
        self.compositions_ = None
        if self.refit_shifts:
            tr_atoms = [X[i] for i in tr_idx]
            self.reference_shifts_ = refit_reference_energies(model, tr_atoms, energies[tr_idx])
            self.compositions_ = _composition_span(tr_atoms)

        names = {n for n, _ in model.parameters(self.parameters)}
        params = dict(model.module.named_parameters())
        flags = {n: p.requires_grad for n, p in params.items()}
        train_batches = self._batches(model, X, energies, forces, free, tr_idx)
        val_batches = self._batches(model, X, energies, forces, free, val_idx)
        history = []
        try:
            for n, p in params.items():
                p.requires_grad_(n in names)
            with torch.random.fork_rng(devices=[]), deterministic_on_cpu(device):
                torch.manual_seed(seed)
                history, best_epoch = self._train(model, [params[n] for n in sorted(names)],
                                                  train_batches, val_batches, rng, t_start)
        finally:
            for n, p in params.items():
                p.requires_grad_(flags[n])
        self.model_ = model
        self.train_indices_ = tr_idx
        self.validation_indices_ = val_idx
        self.history_ = history
        self.best_epoch_ = best_epoch
        self.fit_time_ = time.perf_counter() - t_start
        return self

    def _batches(self, model, X, energies, forces, free, idx):
        out = []
        for s in range(0, len(idx), self.batch_size):
            sel = idx[s:s + self.batch_size]
            atoms = [X[i] for i in sel]
            batch = model.collate(atoms)
            dev, dt = batch.ptr.device, _float_dtype(model)
            n = torch.tensor([len(a) for a in atoms], dtype=torch.float64, device=dev)
            e = torch.as_tensor(energies[sel], dtype=torch.float64, device=dev)
            has_f = [forces[i] is not None for i in sel]
            f = np.concatenate([forces[i] if forces[i] is not None else np.zeros((len(X[i]), 3))
                                for i in sel])
            mask = np.concatenate([free[i] & has for i, has in zip(sel, has_f, strict=True)])
            out.append((batch, e, n, torch.as_tensor(f, dtype=dt, device=dev),
                        torch.as_tensor(mask, device=dev)))
        return out

    def _loss(self, model, item, create_graph):
        batch, e_ref, n, f_ref, mask = item
        energy, forces = model.energy_and_forces(batch, create_graph=create_graph)
        le = torch.mean(((energy.to(torch.float64) - e_ref) / n) ** 2)
        lf = torch.mean((forces[mask] - f_ref[mask]) ** 2) if bool(mask.any()) \
            else forces.sum() * 0.0
        return self.energy_weight * le + self.force_weight * lf.to(torch.float64)

    def _evaluate(self, model, batches):
        if not batches:
            return math.nan
        total = 0.0
        for item in batches:
            total += float(self._loss(model, item, False).detach()) * len(item[2])
        return total / sum(len(item[2]) for item in batches)

    def _train(self, model, params, train_batches, val_batches, rng, t_start):
        net = model.module
        monitor = val_batches or train_batches
        best = self._evaluate(model, monitor)
        best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        best_epoch, stall = 0, 0
        history = [{"epoch": 0, "train_loss": self._evaluate(model, train_batches),
                    "val_loss": self._evaluate(model, val_batches),
                    "seconds": time.perf_counter() - t_start}]
        if not params or self.epochs == 0:
            return history, 0
        opt = torch.optim.Adam(params, lr=self.learning_rate)
        bar = tqdm(range(1, self.epochs + 1), desc="fine-tune", disable=not self.progress_bar,
                   leave=False)
        for epoch in bar:
            train_loss = 0.0
            for k in rng.permutation(len(train_batches)):
                opt.zero_grad(set_to_none=True)
                loss = self._loss(model, train_batches[k], True)
                loss.backward()
                opt.step()
                train_loss += float(loss.detach()) / len(train_batches)
            val_loss = self._evaluate(model, val_batches)
            # without a validation split, monitor the training loss of the weights as they are
            # now (the running ``train_loss`` is that of the weights before each step, one
            # update behind the weights that would be kept)
            score = val_loss if val_batches else self._evaluate(model, train_batches)
            history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss,
                            "seconds": time.perf_counter() - t_start})
            bar.set_postfix(val=f"{score:.4g}")
            if not math.isfinite(score):
                logger.warning("fine-tuning diverged at epoch %d (loss %s); keeping epoch %d",
                               epoch, score, best_epoch)
                break
            if score < best:
                best, best_epoch, stall = score, epoch, 0
                best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            else:
                stall += 1
                if stall % max(1, self.patience // 2) == 0:
                    for g in opt.param_groups:
                        g["lr"] *= 0.5
                if stall >= self.patience:
                    break
        if best_epoch != history[-1]["epoch"]:  # epoch 0: the pretrained (refitted) weights
            with torch.no_grad():
                for k, v in net.state_dict().items():
                    v.copy_(best_state[k])
        return history, best_epoch

    # -- prediction ----------------------------------------------------------------------------
    def _checked(self, X, energies=True):
        check_is_fitted(self, "model_")
        X = self.model_.validate(X)
        if self.refit_shifts:
            unseen = sorted({int(z) for a in X for z in a.numbers} - set(self.elements_))
            if unseen:
                from ase.data import chemical_symbols

                warnings.warn(
                    f"elements {[chemical_symbols[z] for z in unseen]} had no label in fit: they "
                    f"keep the pretrained model's reference energies.", UserWarning, stacklevel=3)
            outside = _outside_span(X, getattr(self, "compositions_", None)) if energies else []
            if outside:
                i = outside[0]
                more = f" and {len(outside) - 1} more" if len(outside) > 1 else ""
                warnings.warn(
                    f"X[{i}] ({X[i].get_chemical_formula()}){more}: a composition that is not a "
                    f"combination of the compositions fit refitted the reference energies on "
                    f"({', '.join(self.compositions_[2])}); its energy carries a per-element "
                    f"offset the labels did not determine (forces do not). Label a few such "
                    f"structures, or compare energies with the offset removed "
                    f"(energy_mae_centered).", UserWarning, stacklevel=3)
        return X

    def predict(self, X, return_forces=False):
        """Energies (and forces) of the fine-tuned model.

        Parameters
        ----------
        X : list of ase.Atoms of length n_structures, or a structure file path
        return_forces : bool, default=False

        Returns
        -------
        energies : ndarray of shape (n_structures,)
            Total energies in eV.
        forces : list of ndarray of shape (n_atoms_i, 3)
            Forces in eV/Å (only with ``return_forces=True``).
        """
        X = self._checked(X)
        energies, forces = predict_energies_forces(self.model_, X)
        return (energies, forces) if return_forces else energies

    def predict_forces(self, X):
        """Forces in eV/Å, a list of arrays of shape (n_atoms_i, 3)."""
        return self.predict(X, return_forces=True)[1]

    def score(self, X, y=None):
        """Minus the force MAE (eV/Å) on the free atoms of the labelled structures ``X``.

        Larger is better, as scikit-learn expects; :func:`skntk.metrics.evaluate` gives the
        other errors.
        """
        from skntk.metrics import evaluate

        return -evaluate(self, self._checked(X, energies=False))["force_mae"]


def _check_copy(base: MLIP, copy: MLIP, atoms) -> None:
    """Refuse a copy that does not predict what the original does (a network whose state lives
    outside its parameters and buffers would be trained from a different starting point)."""
    e0 = predict_energies_forces(base, atoms)[0]
    e1 = predict_energies_forces(copy, atoms)[0]
    if not np.allclose(e0, e1, rtol=1e-5, atol=1e-4):
        raise RuntimeError(
            f"copying {base!r} changed its prediction for X[0] ({atoms[0].get_chemical_formula()}) "
            f"from {e0[0]:.6f} to {e1[0]:.6f} eV; the network keeps state that copy.deepcopy "
            f"does not carry, so it cannot be fine-tuned safely.")


def _float_dtype(model: MLIP) -> torch.dtype:
    for p in model.module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _move(model: MLIP, device: torch.device) -> None:
    """Put a handle (which skntk owns: a copy) on ``device``."""
    current = next(model.module.parameters()).device
    if current == device:
        return
    model.module.to(device)
    if "device" in vars(model):
        model.device = device


def train_builtin(model, X, energies=None, forces=None, *, validation=0.1, energy_weight=1.0,
                  force_weight=10.0, max_epochs=300, batch_size=16, lr=3e-3, patience=20,
                  random_state=0, refit_shifts=True):
    """Train a :class:`~skntk.models.builtin.BuiltinMLIP` in place on energies and forces.

    A thin call of :class:`MLIPRegressor` (the one trainer of skntk) on all parameters, whose
    weights are then written back into ``model.module``. With ``refit_shifts`` the energy scale
    is first set to the RMS of the label forces (the network starts from random weights) and the
    per-element shifts are refitted. (It was ``BuiltinMLIP.fit`` until 0.1.0.dev0: a handle no
    longer trains itself, so that the models never import the trainer.)

    Parameters
    ----------
    model : BuiltinMLIP
        Trained in place.
    X : list of ase.Atoms of length n_structures, or a structure file path
    energies : array-like of shape (n_structures,) or None, default=None
        Total energies in eV; ``None`` reads the labels stored with ``X``.
    forces : list of array-like of shape (n_atoms_i, 3) or None, default=None
        Forces in eV/Å; ``None`` reads them from ``X``.
    validation : float, default=0.1
        Fraction of ``X`` held out for early stopping.
    energy_weight, force_weight : float
        Loss weights (per-atom energy and force mean squared errors).
    max_epochs, batch_size, lr, patience, random_state
        ``epochs``, ``batch_size``, ``learning_rate``, ``patience`` and ``random_state`` of
        the regressor.
    refit_shifts : bool, default=True

    Returns
    -------
    regressor : MLIPRegressor
        The fitted regressor (``history_``: per-epoch losses); ``model`` holds its weights.
    """
    from ase.calculators.singlepoint import SinglePointCalculator

    X = model.validate(X)
    if energies is None or forces is None:
        e_lab, f_lab = get_labels(X, require_forces=forces is None)
        energies = e_lab if energies is None else energies
        forces = f_lab if forces is None else forces
    energies = np.asarray(energies, dtype=np.float64)
    if energies.shape != (len(X),):
        raise ValueError(f"energies has shape {energies.shape}; X has {len(X)} structures.")
    forces = [np.asarray(f, dtype=np.float64) for f in forces]
    labelled = []
    for i, (a, e, f) in enumerate(zip(X, energies, forces, strict=True)):
        if f.shape != (len(a), 3):
            raise ValueError(f"forces[{i}] has shape {f.shape}; X[{i}] has {len(a)} atoms.")
        b = a.copy()
        b.calc = SinglePointCalculator(b, energy=float(e), forces=f)
        labelled.append(b)
    if refit_shifts:
        fall = np.concatenate([f.ravel() for f in forces])
        with torch.no_grad():
            model.module.scale.fill_(max(float(np.sqrt(np.mean(fall ** 2))), 1e-3))
    reg = MLIPRegressor(model, parameters="all", epochs=max_epochs, learning_rate=lr,
                        batch_size=batch_size, energy_weight=energy_weight,
                        force_weight=force_weight, validation_fraction=validation,
                        patience=patience, refit_shifts=refit_shifts,
                        device=str(model.device), random_state=random_state).fit(labelled)
    with torch.no_grad():
        for name, t in model.module.state_dict().items():
            t.copy_(reg.model_.module.state_dict()[name])
    return reg
