"""Helpers every backend shares: optional imports, devices, atom offsets, and
the record of where a borrowed network was before a handle moved it.

This module sits below :mod:`skntk.models.base` and the backends and imports neither (the backends
used to import these from the package ``__init__``, which imports the backends back).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["require", "resolve_device", "atom_ptr", "Placement"]


def require(module: str, extra: str):
    """Import ``module`` or raise an ImportError that says which extra to install.

    Examples
    --------
    >>> require("no_such_pkg_xyz", "demo")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ImportError: This backend needs the 'no_such_pkg_xyz' package, ... pip install skntk[demo]
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"This backend needs the '{module}' package, which could not be imported ({exc}). "
            f"Install it with: pip install skntk[{extra}]"
        ) from exc


def resolve_device(device, *, cuda_fallback=False) -> torch.device:
    """``"auto"`` (or ``None``) -> the first CUDA device when present, else CPU; anything else
    as given (a ``ValueError`` naming it when it is not a device).

    With ``cuda_fallback``, a CUDA device asked for on a machine without CUDA becomes the CPU with
    a ``RuntimeWarning`` (what estimators do with their ``device`` parameter).

    Examples
    --------
    >>> resolve_device("cpu")
    device(type='cpu')
    """
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as err:
        raise ValueError(f"device={device!r} is not a device: expected 'auto', 'cpu', 'cuda' or "
                         f"'cuda:<index>' (a torch device).") from err
    if cuda_fallback and dev.type == "cuda" and not torch.cuda.is_available():
        import warnings

        warnings.warn(f"device={device!r} requested but CUDA is not available; using the CPU.",
                      RuntimeWarning, stacklevel=3)
        return torch.device("cpu")
    return dev


def atom_ptr(atoms: Sequence, device=None) -> torch.Tensor:
    """Atom offsets of ``atoms``: a LongTensor of shape (n_structures + 1,) on ``device``.

    Examples
    --------
    >>> from ase.build import molecule
    >>> atom_ptr([molecule("H2O"), molecule("CH4")]).tolist()
    [0, 3, 8]
    """
    counts = torch.tensor([len(at) for at in atoms], dtype=torch.long)
    ptr = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(counts, 0)])
    return ptr if device is None else ptr.to(device)


@dataclass
class Placement:
    """Where a network's tensors live and which of its submodules train: recorded before a handle
    moves a borrowed network (``.to()``, ``.eval()`` act in place), put back by :meth:`restore`.

    Only placement is restored: the *current* values of parameters and buffers are converted
    back to their recorded device and dtype, so weights changed through the handle (fine-tuning
    in place, :meth:`~skntk.models.base.MLIP.set_reference_energies`) are kept.

    Examples
    --------
    >>> lin = torch.nn.Linear(2, 1).double()
    >>> before = Placement.record(lin)
    >>> _ = lin.eval().to(torch.float32)
    >>> before.restore(lin) is lin
    True
    >>> lin.weight.dtype, lin.training
    (torch.float64, True)
    """

    tensors: dict = field(default_factory=dict)  # name -> (device, dtype) of params and buffers
    modes: dict = field(default_factory=dict)  # submodule name -> training flag

    @classmethod
    def record(cls, module: torch.nn.Module) -> Placement:
        tensors = {n: (t.device, t.dtype) for n, t in module.named_parameters()}
        tensors.update({n: (t.device, t.dtype) for n, t in module.named_buffers()})
        return cls(tensors, {n: m.training for n, m in module.named_modules()})

    def restore(self, module: torch.nn.Module) -> torch.nn.Module:
        with torch.no_grad():
            for n, p in module.named_parameters():
                if n in self.tensors and (p.device, p.dtype) != self.tensors[n]:
                    device, dtype = self.tensors[n]
                    p.data = p.data.to(device=device, dtype=dtype)
            for n, b in list(module.named_buffers()):
                if n in self.tensors and (b.device, b.dtype) != self.tensors[n]:
                    device, dtype = self.tensors[n]
                    *path, leaf = n.split(".")
                    owner = module.get_submodule(".".join(path)) if path else module
                    owner._buffers[leaf] = b.to(device=device, dtype=dtype)
        for n, m in module.named_modules():
            if n in self.modes:
                m.training = self.modes[n]
        return module
