"""Query by committee: the baseline that pays for K fine-tunings instead of one feature pass.

:class:`CommitteeSelector` fine-tunes ``n_members`` clones of a regressor (each with its own seed,
each on a bootstrap resample of the labelled set) and picks the pool structures on which the members
disagree most. The force criteria are DP-GEN's *model deviation*: for atom ``i`` of a structure,

    σ_i = sqrt( mean_k ‖F_k,i − F̄_i‖² ),   F̄_i = mean_k F_k,i        (eV/Å)

and the structure's score is ``max_i σ_i`` (``"force_max"``) or ``mean_i σ_i`` (``"force_mean"``)
over its *free* atoms (atoms held fixed by OC20's ``fixed`` array or an ASE ``FixAtoms``
constraint do not count). ``"energy"`` is the standard deviation over members of the energy per
atom (eV/atom).
"""

from __future__ import annotations

import time
from numbers import Integral

import numpy as np
from sklearn.base import BaseEstimator, clone
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted

from skntk._sklearn_compat import HasMethods, Interval, RealNotInt, StrOptions, validate_params
from skntk.atoms import validate_structures
from skntk.io import free_atoms
from skntk.selection._base import resolve_n_to_select

__all__ = ["CommitteeSelector", "committee_disagreement"]

#: Structures per ``predict`` call of each member in :meth:`CommitteeSelector.score_samples`.
_PREDICT_CHUNK = 512


def committee_disagreement(energies, forces, n_atoms, free=None, *, disagreement="force_max"):
    """Disagreement of K committee members on n structures.

    Parameters
    ----------
    energies : ndarray of shape (n_members, n_structures)
        Predicted total energies in eV (used by ``"energy"`` only).
    forces : list of ndarray of shape (n_members, n_atoms_i, 3) or None
        Predicted forces in eV/Å, one array per structure (used by the force criteria only).
    n_atoms : ndarray of shape (n_structures,)
        Atom counts.
    free : list of (ndarray of shape (n_atoms_i,) bool) or None, default=None
        Atoms whose forces count; ``None`` counts all of them.
    disagreement : {"force_max", "force_mean", "energy"}, default="force_max"

    Returns
    -------
    scores : ndarray of shape (n_structures,)
        eV/Å for the force criteria, eV/atom for ``"energy"``. A structure without free atoms
        scores 0 on the force criteria.

    Examples
    --------
    >>> import numpy as np
    >>> f = [np.array([[[0.0, 0, 0], [1, 0, 0]], [[0.0, 0, 0], [-1, 0, 0]]])]  # 2 members, 2 atoms
    >>> committee_disagreement(None, f, np.array([2])).tolist()
    [1.0]
    """
    if disagreement == "energy":
        e = np.asarray(energies, dtype=np.float64) / np.asarray(n_atoms, dtype=np.float64)
        return e.std(axis=0)
    scores = np.zeros(len(forces))
    for s, f in enumerate(forces):
        f = np.asarray(f, dtype=np.float64)
        sigma = np.sqrt(((f - f.mean(axis=0)) ** 2).sum(axis=-1).mean(axis=0))  # (n_atoms_i,)
        if free is not None:
            sigma = sigma[free[s]]
        if sigma.size == 0:
            continue
        scores[s] = sigma.max() if disagreement == "force_max" else sigma.mean()
    return scores


class CommitteeSelector(BaseEstimator):
    """Query-by-committee selection: top-B structures by disagreement of K fine-tuned models.

    Parameters
    ----------
    regressor : estimator
        A scikit-learn regressor on lists of ``ase.Atoms`` (e.g.
        :class:`skntk.finetune.MLIPRegressor`) with a ``random_state`` parameter,
        ``fit(list_of_labelled_atoms)`` and ``predict(X, return_forces=False)`` returning energies
        (ndarray of shape (n,), eV) or, with ``return_forces=True``, ``(energies, forces)`` with
        forces a list of (n_atoms_i, 3) arrays in eV/Å.
    n_members : int, default=4
        Committee size K (at least 2); :meth:`fit` costs K fine-tunings.
    bootstrap : bool, default=True
        Fit each member on a bootstrap resample (with replacement, same size) of the labelled
        set; otherwise on the full set (members then differ by their seed only).
    disagreement : {"force_max", "force_mean", "energy"}, default="force_max"
        ``"force_max"``: max over free atoms of the per-atom force deviation σ_i (DP-GEN's model
        deviation, eV/Å); ``"force_mean"``: its mean over free atoms; ``"energy"``: standard
        deviation over members of the energy per atom (eV/atom).
    n_to_select : int, float or None, default=None
        Default budget of :meth:`select`: a count, a fraction of the candidates, or half of them.
    random_state : int, RandomState instance or None, default=None
        Draws the members' seeds and bootstrap resamples.

    Attributes
    ----------
    members_ : list of estimator of length n_members
        The fitted clones.
    member_seeds_ : ndarray of int of shape (n_members,)
        ``random_state`` given to each clone.
    bootstrap_indices_ : list of ndarray of int
        Indices into the labelled set that each member was fitted on.
    fit_time_ : float
        Seconds spent fitting all members together.
    n_train_ : int
        Size of the labelled set.
    scores_ : ndarray of shape (n_candidates,)
        Disagreement of every candidate of the last :meth:`select`.
    selected_idx_ : ndarray of int of shape (n_to_select,)
        Indices into the last ``X`` given to :meth:`select`, in selection order.

    Notes
    -----
    σ_i = sqrt(mean_k ‖F_k,i − mean_k F_k,i‖²). Only free atoms count for the force criteria:
    atoms marked 1 in OC20's ``fixed`` array or held by an ASE ``FixAtoms`` constraint are
    ignored, and a structure without free atoms scores 0.
    """

    _parameter_constraints: dict = {
        "regressor": [HasMethods(["fit", "predict"])],
        "n_members": [Interval(Integral, 2, None, closed="left")],
        "bootstrap": ["boolean"],
        "disagreement": [StrOptions({"force_max", "force_mean", "energy"})],
        "n_to_select": [Interval(Integral, 1, None, closed="left"),
                        Interval(RealNotInt, 0, 1, closed="neither"), None],
        "random_state": ["random_state"],
    }

    def __init__(self, regressor, *, n_members=4, bootstrap=True, disagreement="force_max",
                 n_to_select=None, random_state=None):
        self.regressor = regressor
        self.n_members = n_members
        self.bootstrap = bootstrap
        self.disagreement = disagreement
        self.n_to_select = n_to_select
        self.random_state = random_state

    def fit(self, X, y=None):
        """Fine-tune ``n_members`` clones of the regressor on (resamples of) ``X``.

        Parameters
        ----------
        X : list of ase.Atoms of length n_labelled
            Labelled structures (energies and forces, as the regressor reads them).
        y : None
            Ignored (labels travel with the structures).

        Returns
        -------
        self : CommitteeSelector
        """
        validate_params(self)
        X = validate_structures(X, name="X")
        if "random_state" not in self.regressor.get_params(deep=False):
            raise ValueError(
                f"regressor {type(self.regressor).__name__} has no random_state parameter; the "
                "committee members need one seed each."
            )
        rng = check_random_state(self.random_state)
        n = len(X)
        seeds = rng.randint(np.iinfo(np.int32).max, size=self.n_members)
        boot = [rng.randint(n, size=n) if self.bootstrap else np.arange(n)
                for _ in range(self.n_members)]
        members = []
        t0 = time.perf_counter()
        for seed, idx in zip(seeds, boot, strict=True):
            member = clone(self.regressor).set_params(random_state=int(seed))
            members.append(member.fit([X[i] for i in idx]))
        self.fit_time_ = time.perf_counter() - t0
        self.members_ = members
        self.member_seeds_ = seeds
        self.bootstrap_indices_ = boot
        self.n_train_ = n
        return self

    def _predict_member(self, k, member, X, offset, with_forces):
        """Energies (n,) and forces (list or None) of one member on a chunk, checked."""
        name = f"committee member {k} ({type(member).__name__})"
        out = member.predict(X, return_forces=True) if with_forces else member.predict(X)
        energies, forces = out if with_forces else (out, None)
        energies = np.asarray(energies, dtype=np.float64)
        if energies.shape != (len(X),):
            raise ValueError(f"{name} predicted energies of shape {energies.shape} for "
                             f"{len(X)} structures.")
        bad = ~np.isfinite(energies)
        if bad.any():
            s = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{name} predicted a non-finite energy for structure {offset + s} "
                             f"({X[s].get_chemical_formula()}).")
        if not with_forces:
            return energies, None
        if len(forces) != len(X):
            raise ValueError(f"{name} predicted forces for {len(forces)} of {len(X)} structures.")
        checked = []
        for s, (f, a) in enumerate(zip(forces, X, strict=True)):
            f = np.asarray(f, dtype=np.float64)
            if f.shape != (len(a), 3):
                raise ValueError(f"{name} predicted forces of shape {f.shape} for structure "
                                 f"{offset + s} ({a.get_chemical_formula()}); expected "
                                 f"({len(a)}, 3).")
            if not np.all(np.isfinite(f)):
                raise ValueError(f"{name} predicted non-finite forces for structure "
                                 f"{offset + s} ({a.get_chemical_formula()}).")
            checked.append(f)
        return energies, checked

    def score_samples(self, X):
        """Committee disagreement of every structure of ``X``.

        Parameters
        ----------
        X : list of ase.Atoms of length n_structures
            Candidates (labels, if any, are ignored).

        Returns
        -------
        scores : ndarray of shape (n_structures,)
            eV/Å for ``"force_max"``/``"force_mean"``, eV/atom for ``"energy"``; larger means
            more disagreement.
        """
        check_is_fitted(self)
        return self._score(validate_structures(X, name="X"))

    def _score(self, X):
        with_forces = self.disagreement != "energy"
        scores = np.empty(len(X))
        for start in range(0, len(X), _PREDICT_CHUNK):
            chunk = X[start:start + _PREDICT_CHUNK]
            preds = [self._predict_member(k, m, chunk, start, with_forces)
                     for k, m in enumerate(self.members_)]
            energies = np.stack([e for e, _ in preds])  # (K, n_chunk)
            forces = free = None
            if with_forces:
                forces = [np.stack([f[s] for _, f in preds]) for s in range(len(chunk))]
                free = [free_atoms(a) for a in chunk]
            n_atoms = np.array([len(a) for a in chunk])
            scores[start:start + len(chunk)] = committee_disagreement(
                energies, forces, n_atoms, free, disagreement=self.disagreement)
        return scores

    def select(self, X, n_to_select=None):
        """The ``n_to_select`` structures of ``X`` with the largest disagreement.

        Parameters
        ----------
        X : list of ase.Atoms of length n_structures
            Candidate pool.
        n_to_select : int, float or None, default=None
            Overrides the ``n_to_select`` parameter: a count, a fraction of the candidates, or
            ``None`` for the parameter's value (half the candidates when that is ``None`` too).

        Returns
        -------
        selected_idx : ndarray of int of shape (n_to_select,)
            Indices into ``X``, most disagreement first (ties: lower index first). Also stored as
            ``selected_idx_``; all scores as ``scores_``.
        """
        check_is_fitted(self)
        X = validate_structures(X, name="X")
        n = resolve_n_to_select(self.n_to_select if n_to_select is None else n_to_select,
                                len(X))
        scores = self._score(X)
        idx = np.argsort(-scores, kind="stable")[:n].astype(np.int64)
        self.scores_ = scores
        self.selected_idx_ = idx
        return idx

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.target_tags.required = False
        tags.non_deterministic = self.random_state is None
        return tags
