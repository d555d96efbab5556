"""The MLIP protocol: what skntk needs of an interatomic potential, and nothing about NTKs.

A backend wraps one ``torch.nn.Module`` and answers, for a list of validated ``ase.Atoms``:

- ``collate(atoms, device)``: its own batch object (e.g. :class:`BackendBatch`) exposing
  ``ptr``, a LongTensor of shape (n_structures + 1,) of atom offsets, atoms in the order of each
  ``Atoms`` object;
- ``energy_and_forces(batch, create_graph=...)``: total energies (n_structures,) in eV and forces
  (n_atoms_total, 3) in eV/Å, differentiable with respect to the module's parameters when
  ``create_graph=True`` (the force NTK needs ∂F/∂θ);
- ``embeddings(batch)``: invariant per-atom features (n_atoms_total, n_embedding), if it declares
  ``"embeddings"`` in :attr:`MLIP.implemented_properties`;
- ``parameters(subset)``: the named parameters of a subset (``"readout"``, ``"last_block"``,
  ``"all"``, or a list of ``fnmatch`` patterns over parameter names).

Every handle also offers (built on the backend's hooks): per-element reference energies
(:meth:`MLIP.reference_energies`, :meth:`MLIP.set_reference_energies`), an independent deep copy
(:meth:`MLIP.copy`), saving in the backend's own file format (:meth:`MLIP.save`, read back by
:func:`skntk.models.load`) and an ASE calculator (:meth:`MLIP.calculator`).

Like an ASE calculator, a backend declares what it supports in class attributes
(:attr:`implemented_properties`, :attr:`parameter_subsets`) so callers check a declaration
instead of catching a failure later. The handle is never deep-copied by :func:`sklearn.clone`.
"""

from __future__ import annotations

import contextlib
import copy as _copy
import fnmatch
import pathlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

__all__ = ["BackendBatch", "MLIP", "forces_from_energy", "replaced_parameters", "module_state"]


def forces_from_energy(energy: torch.Tensor, positions: torch.Tensor, *,
                       create_graph: bool = False) -> torch.Tensor:
    """Forces ``F = -dE/dR`` by autograd.

    Parameters
    ----------
    energy : Tensor of shape (n_structures,)
        Total energies in eV, computed from ``positions``.
    positions : Tensor of shape (n_atoms, 3)
        Positions in Å (``requires_grad=True``).
    create_graph : bool, default=False
        Keep the graph so the forces can be differentiated again (e.g. with respect to parameters).

    Returns
    -------
    forces : Tensor of shape (n_atoms, 3)
        Forces in eV/Å (zeros for atoms the energy does not depend on).

    Examples
    --------
    >>> R = torch.tensor([[0.0, 0, 0], [0, 0, 2.0]], requires_grad=True)
    >>> E = ((R[1] - R[0]).norm() - 1.0).pow(2).reshape(1)
    >>> forces_from_energy(E, R)[:, 2].tolist()
    [2.0, -2.0]
    """
    (grad,) = torch.autograd.grad(energy.sum(), positions, create_graph=create_graph,
                                  allow_unused=True)
    if grad is None:  # energy independent of positions (e.g. isolated atoms)
        return torch.zeros_like(positions)
    return -grad


def _owner(module: torch.nn.Module, name: str):
    *path, leaf = name.split(".")
    return (module.get_submodule(".".join(path)) if path else module), leaf


@contextlib.contextmanager
def replaced_parameters(module: torch.nn.Module, tensors: dict) -> Iterator[None]:
    """Temporarily replace named parameters of ``module`` by plain tensors.

    Used to evaluate a network at ``θ + ε v`` or with forward-mode dual tensors without touching
    the stored parameters; the original :class:`torch.nn.Parameter` objects are put back (in
    their original order) in a ``finally`` block.

    Parameters
    ----------
    module : torch.nn.Module
    tensors : dict of str to Tensor
        Parameter name (as in ``named_parameters``) to replacement of the same shape.

    Examples
    --------
    >>> lin = torch.nn.Linear(1, 1)
    >>> with replaced_parameters(lin, {"weight": torch.ones(1, 1), "bias": torch.zeros(1)}):
    ...     lin(torch.tensor([[3.0]])).item()
    3.0
    >>> isinstance(lin.weight, torch.nn.Parameter)
    True
    """
    originals = dict(module.named_parameters())
    unknown = sorted(set(tensors) - set(originals))
    if unknown:
        raise KeyError(f"{unknown} are not parameters of {type(module).__name__}.")
    try:
        for name, t in tensors.items():
            if tuple(t.shape) != tuple(originals[name].shape):
                raise ValueError(f"replacement for {name!r} has shape {tuple(t.shape)}; the "
                                 f"parameter has {tuple(originals[name].shape)}.")
            mod, leaf = _owner(module, name)
            mod._parameters[leaf] = t
        yield
    finally:
        for name in tensors:
            mod, leaf = _owner(module, name)
            mod._parameters[leaf] = originals[name]


@contextlib.contextmanager
def module_state(module: torch.nn.Module, *, device=None, dtype=None, train: bool = False,
                 requires_grad=None) -> Iterator[torch.nn.Module]:
    """Put ``module`` on ``device``/``dtype``, in train/eval mode, with chosen ``requires_grad``
    flags, and restore all of it exactly in ``finally``.

    ``.to()``, ``.eval()`` and ``requires_grad_()`` act in place, so a caller that borrows a user's
    network must undo them; the original parameter storage is kept, so a float64 → float32 → float64
    round trip is lossless.

    Parameters
    ----------
    module : torch.nn.Module
    device : str or torch.device or None, default=None
        Target device (``None``: unchanged).
    dtype : torch.dtype or None, default=None
        Target floating dtype (``None``: unchanged).
    train : bool, default=False
        Training mode during the block.
    requires_grad : collection of str or None, default=None
        Names of parameters that should require grad during the block (all others do not);
        ``None`` leaves the flags unchanged.

    Examples
    --------
    >>> lin = torch.nn.Linear(2, 1).double()
    >>> with module_state(lin, dtype=torch.float32, requires_grad={"bias"}):
    ...     lin.weight.dtype, lin.weight.requires_grad
    (torch.float32, False)
    >>> lin.weight.dtype, lin.weight.requires_grad, lin.training
    (torch.float64, True, True)
    """
    params = dict(module.named_parameters())
    buffers = dict(module.named_buffers())
    saved_data = {n: p.data for n, p in params.items()}
    saved_buf = dict(buffers)  # ``.to()`` replaces buffer objects: put the originals back
    saved_flags = {n: p.requires_grad for n, p in params.items()}
    saved_modes = {name: m.training for name, m in module.named_modules()}
    try:
        if device is not None or dtype is not None:
            module.to(device=device, dtype=dtype)
        module.train(train)
        if requires_grad is not None:
            wanted = set(requires_grad)
            for n, p in params.items():
                p.requires_grad_(n in wanted)
        yield module
    finally:
        for n, p in params.items():
            p.data = saved_data[n]
            p.requires_grad_(saved_flags[n])
        for n, b in saved_buf.items():
            owner, leaf = _owner(module, n)
            owner._buffers[leaf] = b
        for name, m in module.named_modules():
            if name in saved_modes:
                m.training = saved_modes[name]


@dataclass
class BackendBatch:
    """A backend's own collated input, with the atom offsets skntk needs.

    Attributes
    ----------
    data : object
        What the backend's network consumes (a ``torch_geometric`` batch for SevenNet and MACE,
        a list of ``CrystalGraph`` for CHGNet).
    ptr : torch.LongTensor of shape (n_structures + 1,)
        Atom offsets of each structure.
    """

    data: object
    ptr: torch.Tensor

    def __len__(self) -> int:
        return int(self.ptr.numel() - 1)


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
    #: The subset ``parameters("default")`` means: chosen per backend by measured effective rank of
    #: the energy-gradient features on real frames (docs/backends.md).
    default_subset: str = "readout"
    #: Whether a vmapped (``is_grads_batched``) second-order backward is cheap on the CPU; force
    #: rows loop over outputs otherwise (always vmapped on CUDA).
    batched_double_backward: bool = False
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

    def energy_and_forces(self, batch, *, create_graph: bool = False):
        """Energies (n_structures,) in eV and forces (n_atoms_total, 3) in eV/Å.

        The default differentiates :meth:`energy` with respect to ``batch.positions`` (made a
        leaf requiring grad if it is not one already). Backends override either this method or
        :meth:`energy` (or both).
        """
        if type(self).energy is MLIP.energy:
            raise NotImplementedError(
                f"{type(self).__name__} must implement energy(batch) or energy_and_forces(batch)."
            )
        pos = batch.positions
        if not pos.requires_grad:
            batch.positions = pos = pos.detach().requires_grad_(True)
        energy = self.energy(batch)
        return energy, forces_from_energy(energy, pos, create_graph=create_graph)

    def energy(self, batch) -> torch.Tensor:
        """Energies (n_structures,) in eV; the default drops the forces of
        :meth:`energy_and_forces`."""
        if type(self).energy_and_forces is MLIP.energy_and_forces:
            raise NotImplementedError(
                f"{type(self).__name__} must implement energy(batch) or energy_and_forces(batch)."
            )
        return self.energy_and_forces(batch, create_graph=False)[0]

    @property
    def supports_torch_func(self) -> bool:
        """Whether forward-mode AD through the network works (forward-over-reverse NTK route).

        Backends whose operations lack forward-mode derivatives (custom CUDA kernels, in-place
        tricks) set the class attribute ``functional = False``.
        """
        return bool(getattr(type(self), "functional", False))

    def embeddings(self, batch) -> torch.Tensor:
        """Invariant per-atom features of shape (n_atoms_total, n_embedding)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement embeddings.")

    def parameters(self, subset="readout") -> list[tuple[str, torch.nn.Parameter]]:
        """Named trainable parameters of ``subset`` (a name in :attr:`parameter_subsets` or a
        list of fnmatch patterns; ``"default"`` is :attr:`default_subset`), in the module's
        order."""
        if isinstance(subset, str) and subset == "default":
            subset = self.default_subset
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

    # -- reference energies, copies, files, ASE -----------------------------------------------
    def _reference_table(self) -> tuple[torch.Tensor | None, dict[int, tuple]]:
        """Where the per-element reference energies live: a tensor of the module and, for each
        atomic number Z, the index of its reference (eV per atom) in that tensor.

        Backends override this; the default has no references.
        """
        return None, {}

    def reference_energies(self) -> dict[int, float]:
        """Per-element reference energies the network adds to each structure's energy.

        ``E = Σ_i ref[Z_i] + (rest)`` for every structure (the built-in shifts, SevenNet's
        ``rescale_atomic_energy.shift``, CHGNet's ``AtomRef``, MACE's ``E0``).

        Returns
        -------
        refs : dict of int to float
            Atomic number Z to its reference energy in eV per atom, for every Z of
            :attr:`species` that the network has a reference slot for (sorted by Z; empty when
            the network has none).
        """
        table, index = self._reference_table()
        if table is None:
            return {}
        values = table.detach().to("cpu", torch.float64)
        return {z: float(values[index[z]]) for z in sorted(index)}

    def set_reference_energies(self, refs: Mapping[int, float]) -> None:
        """Set the reference energies of the given elements in place on :attr:`module`.

        Other elements are unchanged; values are stored in the module's dtype and device.

        Parameters
        ----------
        refs : mapping of int to float
            Atomic number Z to its new reference energy in eV per atom.

        Raises
        ------
        ValueError
            If an element has no reference slot in the network (the message names it).
        """
        table, index = self._reference_table()
        refs = {int(z): float(v) for z, v in dict(refs).items()}
        missing = sorted(set(refs) - set(index))
        if missing:
            from ase.data import chemical_symbols

            names = ", ".join(f"{chemical_symbols[z] if 0 < z < len(chemical_symbols) else '?'} "
                              f"(Z={z})" for z in missing)
            raise ValueError(
                f"{type(self).__name__} has no reference energy for {names}; it has "
                f"{len(index)} per-element references"
                + (f" (Z={min(index)}..{max(index)})." if index else ".")
            )
        with torch.no_grad():
            for z, v in refs.items():
                table[index[z]] = v

    def copy(self) -> MLIP:
        """A new handle of the same class wrapping a deep copy of :attr:`module`.

        The copy is independent (changing its parameters leaves this handle's network alone)
        and predicts exactly what this handle does. (``copy.deepcopy(handle)`` returns the
        handle itself on purpose, so scikit-learn never copies a network behind your back.)

        Returns
        -------
        model : MLIP
        """
        new = _copy.copy(self)
        new.__dict__.update({k: v.copy() for k, v in self.__dict__.items()
                             if isinstance(v, (dict, list, set))})
        new.module = _copy.deepcopy(self.module)
        return new

    def save(self, path) -> pathlib.Path:
        """Write the network to ``path`` in the backend's own format (read back by
        :func:`skntk.models.load`); returns the path as a :class:`pathlib.Path`."""
        raise NotImplementedError(f"{type(self).__name__} does not implement save.")

    def calculator(self):
        """An ASE calculator (:class:`skntk.models.calculator.MLIPCalculator`) for this handle.

        Returns
        -------
        calc : ase.calculators.calculator.Calculator
            Implements ``energy``, ``free_energy`` (eV) and ``forces`` (eV/Å).
        """
        from skntk.models.calculator import MLIPCalculator

        return MLIPCalculator(self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(cutoff={self.cutoff})"
