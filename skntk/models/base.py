"""The MLIP protocol: what skntk needs of an interatomic potential, and nothing about NTKs.

A handle wraps one ``torch.nn.Module`` and answers, for a list of ``ase.Atoms``:

- ``collate(atoms, device)``: its own batch object (e.g. :class:`BackendBatch`) exposing
  ``ptr``, a LongTensor of shape (n_structures + 1,) of atom offsets, atoms in the order of each
  ``Atoms`` object;
- ``energy_and_forces(batch, create_graph=...)``: total energies (n_structures,) in eV and forces
  (n_atoms_total, 3) in eV/Å, differentiable with respect to the module's parameters when
  ``create_graph=True`` (the force NTK needs ∂F/∂θ), detached otherwise;
- ``energy(batch)``: total energies, differentiable with respect to the parameters;
- ``embeddings(batch)``: invariant per-atom features (n_atoms_total, n_embedding), if it declares
  ``"embeddings"`` in :attr:`MLIP.implemented_properties`;
- ``parameters(subset)``: the named parameters of a subset (``"readout"``, ``"last_block"``,
  ``"all"``, or a list of ``fnmatch`` patterns over parameter names).

:class:`MLIP` does the steps every backend shares, as ASE's ``Calculator.get_property`` does for
``calculate``: ``collate`` validates the structures once, resolves the device, builds ``ptr`` and
calls the backend's ``_graphs(atoms, device)`` hook; ``energy_and_forces`` and ``energy`` call its
``_forward(batch, forces=, create_graph=)`` hook and detach the outputs when no graph is wanted;
``_adopt`` records where a borrowed network was before moving it and ``restore_module`` puts it
back. A new backend is those two hooks, its attributes (``module``, ``cutoff``, ``species``,
``subset_patterns``) and, optionally, ``embeddings``, ``_reference_table`` and ``save``
(docs/adding_a_backend.md). Helpers the backends share live in :mod:`skntk.models._util`.

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
from abc import ABC
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from skntk.atoms import as_atoms_list, validate_structures
from skntk.models._util import (
    Placement,
    atom_ptr,
    resolve_device,
)

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


@contextlib.contextmanager
def deterministic_on_cpu(device) -> Iterator[None]:
    """torch's deterministic algorithms for the block when ``device`` is the CPU, restored after.

    With several CPU threads the accumulations of a message-passing backward (``index_put`` with
    ``accumulate=True``, behind gather-by-edge indexing) add in an order that varies from run to
    run: the same structures gave float32 NTK rows differing in the 7th digit in two calls of one
    process (SevenNet-0, 24 OC20 slabs, 2 threads). Deterministic algorithms make every call
    agree bit for bit at the same thread count. ``warn_only=True``: an operation with no
    deterministic CPU kernel warns instead of failing. On CUDA nothing changes (it would need
    ``CUBLAS_WORKSPACE_CONFIG``; docs/scale.md).
    """
    if torch.device(device).type != "cpu":
        yield
        return
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=not enabled or warn_only)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


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
    """Base class of model handles: the shared steps, with hooks a backend fills in.

    A backend subclasses this and implements :meth:`_graphs` (structures -> the network's
    input) and :meth:`_forward` (batch -> energies and forces); :meth:`collate`,
    :meth:`energy_and_forces` and :meth:`energy` do the rest (validation, device, ``ptr``,
    detaching). Handles written against the older protocol, overriding ``collate`` and
    ``energy`` or ``energy_and_forces`` directly, keep working.

    A backend built around a user's network calls :meth:`_adopt`, which moves the network in
    place (``.to(device, dtype)``, ``.eval()``: every call needs it there) after recording where
    it was; :meth:`restore_module` (or leaving a ``with handle:`` block) puts it back.

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
    #: Peak working memory of exact/forward force rows per neighbour edge, in bytes: what
    #: :class:`~skntk.transformers.ForceNTKTransformer` checks before featurising. SevenNet-0's
    #: measured value (docs/backends.md) unless a backend measured its own.
    force_row_bytes_per_edge: float = 3.0e5
    #: File name :func:`skntk.al.config.run_config` saves a fine-tuned handle under (its format).
    model_filename: str = "model.pt"
    #: Why the backend's network runs only in float32 (``None``: any dtype); :meth:`_wrap`
    #: refuses another dtype with it.
    float32_only: str | None = None

    module: torch.nn.Module
    cutoff: float
    species: frozenset[int] | None = None
    #: The name or file :func:`skntk.models.load` loaded the handle from (``None`` otherwise):
    #: parallel workers load the model themselves from it (:func:`skntk.parallel.featurize`).
    source: str | None = None

    # -- scikit-learn: clone returns the same handle, GridSearchCV never deep-copies a network.
    def __sklearn_clone__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    # -- the template: validate once, build ``ptr``, call the hooks ---------------------------
    def collate(self, atoms: Sequence, device: torch.device | str | None = None):
        """Batch of ``atoms`` on ``device`` (default: the handle's device); exposes ``ptr``.

        The steps every backend shares: :meth:`validate` the structures once
        (:func:`skntk.atoms.validate_structures`: a non-empty list of well-formed ``ase.Atoms``
        whose elements the model covers), resolve ``device``
        (``"auto"``: CUDA when present), build the backend's input with the :meth:`_graphs`
        hook and the atom offsets ``ptr``.

        Parameters
        ----------
        atoms : ase.Atoms or list of ase.Atoms of length n_structures
        device : str or torch.device or None, default=None

        Returns
        -------
        batch : BackendBatch or skntk.atoms.AtomsBatch
            ``BackendBatch(data=self._graphs(atoms, device), ptr=...)``; when :meth:`_graphs`
            returns skntk's own :class:`~skntk.atoms.AtomsBatch` (which carries ``ptr``), that.
        """
        from skntk.atoms import AtomsBatch

        atoms = self.validate(atoms)
        device = self._default_device() if device is None else resolve_device(device)
        data = self._graphs(atoms, device)
        if isinstance(data, AtomsBatch):
            return data
        return BackendBatch(data=data, ptr=atom_ptr(atoms, device))

    def validate(self, atoms) -> list:
        """The validated ``list[ase.Atoms]``: :func:`skntk.atoms.validate_structures` against
        :attr:`species`, errors naming ``X[i]`` and the model (a path or a single ``Atoms`` also
        works). A backend may override it (a hook with a default)."""
        return validate_structures(as_atoms_list(atoms), species=self.species,
                                   model_name=getattr(self, "name", None) or type(self).__name__)

    def _graphs(self, atoms: list, device: torch.device):
        """Hook: the network's input for validated ``atoms`` on ``device`` (a graph batch, a list
        of graphs, or a :class:`skntk.atoms.AtomsBatch` from :func:`skntk.atoms.collate`)."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement _graphs(atoms, device) (or collate)."
        )

    def _forward(self, batch, *, forces: bool, create_graph: bool):
        """Hook: ``(energy, forces)`` of a batch made by :meth:`collate`.

        Parameters
        ----------
        batch : BackendBatch or AtomsBatch
        forces : bool
            Whether forces are wanted (``False``: return ``(energy, None)``, the energy still
            differentiable with respect to the parameters).
        create_graph : bool
            Whether the forces must stay differentiable with respect to the parameters.

        Returns
        -------
        energy : Tensor of shape (n_structures,)
            Total energies in eV.
        forces : Tensor of shape (n_atoms_total, 3) or None
            Forces in eV/Å. On an :class:`~skntk.atoms.AtomsBatch` a backend may return
            ``None``: the template then differentiates the energy with respect to
            ``batch.positions`` (which it made a leaf requiring grad before the call).
        """
        raise NotImplementedError(
            f"{type(self).__name__} must implement _forward(batch, forces=, create_graph=)."
        )

    def _default_device(self) -> torch.device:
        device = getattr(self, "device", None)
        if device is not None:
            return torch.device(device)
        module = getattr(self, "module", None)
        if isinstance(module, torch.nn.Module):
            for t in module.parameters():
                return t.device
        return torch.device("cpu")

    def energy_and_forces(self, batch, *, create_graph: bool = False):
        """Energies (n_structures,) in eV and forces (n_atoms_total, 3) in eV/Å.

        Calls the :meth:`_forward` hook; with ``create_graph=False`` both outputs are detached,
        with ``create_graph=True`` both stay differentiable with respect to the parameters (the
        force NTK needs ∂F/∂θ). Handles without the hook that override :meth:`energy` get
        forces by differentiating it with respect to ``batch.positions`` (made a leaf requiring
        grad if it is not one already).
        """
        from skntk.atoms import AtomsBatch

        has_forward = _overrides(self, "_forward")
        if not has_forward and not _overrides(self, "energy"):
            raise NotImplementedError(
                f"{type(self).__name__} must implement energy(batch) or energy_and_forces(batch), "
                "or the hook _forward(batch, forces=, create_graph=)."
            )
        on_positions = isinstance(batch, AtomsBatch) or not has_forward
        if on_positions and not batch.positions.requires_grad:
            batch.positions = batch.positions.detach().requires_grad_(True)
        if not has_forward:  # a handle built on energy(batch) alone
            pos = batch.positions
            energy = self.energy(batch)
            return energy, forces_from_energy(energy, pos, create_graph=create_graph)
        energy, forces = self._forward(batch, forces=True, create_graph=create_graph)
        if forces is None:
            if not isinstance(batch, AtomsBatch):
                raise TypeError(f"{type(self).__name__}._forward returned no forces for a "
                                f"{type(batch).__name__}; only an AtomsBatch has positions to "
                                "differentiate.")
            forces = forces_from_energy(energy, batch.positions, create_graph=create_graph)
        if not create_graph:
            energy, forces = energy.detach(), forces.detach()
        return energy, forces

    def energy(self, batch) -> torch.Tensor:
        """Energies (n_structures,) in eV, differentiable with respect to the parameters: the
        :meth:`_forward` hook without forces (or, without the hook, the energies of
        :meth:`energy_and_forces`)."""
        if _overrides(self, "_forward"):
            return self._forward(batch, forces=False, create_graph=True)[0]
        if not _overrides(self, "energy_and_forces"):
            raise NotImplementedError(
                f"{type(self).__name__} must implement energy(batch) or energy_and_forces(batch), "
                "or the hook _forward(batch, forces=, create_graph=)."
            )
        return self.energy_and_forces(batch, create_graph=False)[0]

    # -- the borrowed network ------------------------------------------------------------------
    def _wrap(self, module: torch.nn.Module, *, name: str, device, dtype, cutoff: float,
              species) -> None:
        """What a backend's ``__init__`` around a borrowed network shares: refuse a dtype other
        than float32 where :attr:`float32_only` says why, set ``name``, ``device`` (resolved),
        ``dtype`` (``None``: the network's), ``cutoff`` (Å) and ``species`` (atomic numbers),
        then :meth:`_adopt` the network there."""
        if self.float32_only is not None and dtype != torch.float32:
            backend = type(self).__name__.removesuffix("MLIP")
            raise ValueError(f"dtype={dtype} is not supported by the {backend} backend: "
                             f"{self.float32_only}; use dtype=torch.float32.")
        self.name = name
        self.device = resolve_device(device)
        self.dtype = next(module.parameters()).dtype if dtype is None else dtype
        self.cutoff = float(cutoff)
        self.species = frozenset(int(z) for z in species)
        self._adopt(module, device=self.device, dtype=self.dtype)

    def _adopt(self, module: torch.nn.Module, *, device=None, dtype=None,
               eval: bool = True) -> None:
        """Make ``module`` this handle's network: record its placement (devices, dtypes,
        train/eval modes), then move it to ``device`` / ``dtype`` and, with ``eval``, switch it
        to eval mode, in place (inference needs it; :meth:`restore_module` undoes it)."""
        self.module = module
        self._placement = Placement.record(module)
        if eval:
            module.eval()
        if device is not None or dtype is not None:
            module.to(device=device, dtype=dtype)

    def restore_module(self) -> torch.nn.Module:
        """Give the network back as it was handed over: put it back on the devices and dtypes,
        and in the train/eval modes, it had when this handle was built; returns it.

        A handle built around a network moves it in place (to its ``device`` and ``dtype``, in
        eval mode), because every call needs it there. This undoes that, keeping the current
        weights (converted back). Use it when you are done with the handle (the handle's
        ``device`` attribute is not updated, so re-wrap the network to use it again), or use
        the handle as a context manager: ``with SevenNetMLIP(net) as model: ...`` restores on
        exit. A handle that built its own network, or a :meth:`copy`, has nothing to restore.

        Returns
        -------
        module : torch.nn.Module
            :attr:`module`.
        """
        placement = self.__dict__.get("_placement")
        if placement is not None:
            placement.restore(self.module)
        return self.module

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.restore_module()

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
        new.__dict__.pop("_placement", None)  # the copy is skntk's: nothing to give back
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


def _overrides(handle: MLIP, name: str) -> bool:
    """Whether the class of ``handle`` defines ``name`` itself rather than inheriting MLIP's."""
    return getattr(type(handle), name) is not getattr(MLIP, name)
