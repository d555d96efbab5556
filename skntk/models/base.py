"""The MLIP protocol: what skntk needs of an interatomic potential, and nothing about NTKs.

A backend wraps one ``torch.nn.Module`` and answers, for a list of validated ``ase.Atoms``:

- ``collate(atoms, device)``: its own batch object (any type) exposing ``ptr``, a LongTensor of
  shape (n_structures + 1,) of atom offsets, atoms in the order of each ``Atoms`` object;
- ``energy_and_forces(batch, create_graph=...)``: total energies (n_structures,) in eV and forces
  (n_atoms_total, 3) in eV/Å, differentiable with respect to the module's parameters when
  ``create_graph=True`` (the force NTK needs ∂F/∂θ);
- ``embeddings(batch)``: invariant per-atom features (n_atoms_total, n_embedding), if it declares
  ``"embeddings"`` in :attr:`MLIP.implemented_properties`;
- ``parameters(subset)``: the named parameters of a subset (``"readout"``, ``"last_block"``,
  ``"all"``, or a list of ``fnmatch`` patterns over parameter names).

Like an ASE calculator, a backend declares what it supports in class attributes
(:attr:`implemented_properties`, :attr:`parameter_subsets`) so callers check a declaration
instead of catching a failure later. The handle is never deep-copied by :func:`sklearn.clone`.
"""

from __future__ import annotations

import fnmatch
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch


class MLIP(ABC):
    """Base class of model handles.

    Attributes
    ----------
    module : torch.nn.Module
        The wrapped network (never copied).
    cutoff : float
        Interaction cutoff in Å.
    species : frozenset of int or None
        Atomic numbers the model covers; ``None`` means any.
    implemented_properties : tuple of str
        Subset of ``("energy", "forces", "embeddings")``.
    parameter_subsets : tuple of str
        Named parameter subsets :meth:`parameters` understands (patterns are always accepted).
    """

    implemented_properties: tuple[str, ...] = ("energy", "forces")
    parameter_subsets: tuple[str, ...] = ("readout", "last_block", "all")
    #: fnmatch patterns of parameter names for each named subset; backends fill this in.
    subset_patterns: dict[str, tuple[str, ...]] = {"all": ("*",)}

    module: torch.nn.Module
    cutoff: float
    species: frozenset[int] | None = None

    # -- scikit-learn: clone returns the same handle, GridSearchCV never deep-copies a network.
    def __sklearn_clone__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    @abstractmethod
    def collate(self, atoms: Sequence, device: torch.device | str = "cpu"):
        """Batch for ``atoms`` (validated ``list[ase.Atoms]``) on ``device``; exposes ``ptr``."""

    @abstractmethod
    def energy_and_forces(self, batch, *, create_graph: bool = False):
        """Energies (n_structures,) in eV and forces (n_atoms_total, 3) in eV/Å."""

    def energy(self, batch) -> torch.Tensor:
        """Energies (n_structures,) in eV; default drops the forces."""
        return self.energy_and_forces(batch, create_graph=False)[0]

    def embeddings(self, batch) -> torch.Tensor:
        """Invariant per-atom features of shape (n_atoms_total, n_embedding)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement embeddings.")

    def parameters(self, subset="readout") -> list[tuple[str, torch.nn.Parameter]]:
        """Named trainable parameters of ``subset`` (a name in :attr:`parameter_subsets` or a
        list of fnmatch patterns), in the module's order."""
        if isinstance(subset, str):
            if subset not in self.subset_patterns:
                raise ValueError(
                    f"parameters={subset!r} is not a subset of {type(self).__name__}; "
                    f"expected one of {sorted(self.subset_patterns)} or a list of name patterns."
                )
            patterns = self.subset_patterns[subset]
        else:
            patterns = tuple(subset)
        named = [(n, p) for n, p in self.module.named_parameters()
                 if any(fnmatch.fnmatchcase(n, pat) for pat in patterns)]
        if subset == "all" or not isinstance(subset, str):
            named = [(n, p) for n, p in named if p.requires_grad] or named
        if not named:
            names = [n for n, _ in self.module.named_parameters()][:8]
            raise ValueError(
                f"parameters={subset!r} matches no parameter of {type(self).__name__}; "
                f"names look like {names}."
            )
        return named

    def __repr__(self) -> str:
        return f"{type(self).__name__}(cutoff={self.cutoff})"
