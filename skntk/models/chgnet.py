"""CHGNet backend: CHGNet 0.3.0 (shipped inside the ``chgnet`` wheel).

Optional extra: ``pip install skntk[chgnet]`` (``chgnet==0.4.2``). Nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from pathlib import Path

import numpy as np
import torch

from skntk.models._util import require
from skntk.models.base import MLIP, BackendBatch

logger = logging.getLogger(__name__)

__all__ = ["CHGNetMLIP", "periodic_copy"]


def periodic_copy(atoms, cutoff: float, *, index: int = 0):
    """The fully periodic structure CHGNet sees for ``atoms``.

    CHGNet works on pymatgen ``Structure`` objects, which are periodic in three directions.

    - A structure periodic in all directions is returned unchanged (a copy).
    - A structure with ``pbc`` all False (a molecule) is put in an orthorhombic box whose sides
      are the extent of the atoms plus ``cutoff + 2`` Å, so no atom sees a periodic image.
    - A structure periodic in some directions (a slab) keeps its cell; each non-periodic cell
      vector must leave a vacuum gap of at least ``cutoff`` Å, else a ValueError is raised.

    Parameters
    ----------
    atoms : ase.Atoms
    cutoff : float
        Interaction cutoff in Å (6 for CHGNet 0.3.0).
    index : int, default=0
        Position of ``atoms`` in the caller's list, used in error messages.

    Returns
    -------
    boxed : ase.Atoms
        A copy with ``pbc=True`` and a cell in Å.
    """
    at = atoms.copy()
    at.calc = None
    pbc = np.asarray(at.pbc, dtype=bool)
    if pbc.all():
        if abs(at.cell.volume) < 1e-8:
            raise ValueError(
                f"X[{index}] ({at.get_chemical_formula()}) has pbc=True but a zero cell.")
        return at
    if not pbc.any():
        pos = at.positions
        extent = pos.max(0) - pos.min(0)
        side = extent + cutoff + 2.0
        at.cell = np.diag(side)
        at.positions = pos - pos.min(0) + 1.0
        at.pbc = True
        return at
    cell = np.asarray(at.cell)
    if abs(np.linalg.det(cell)) < 1e-8:
        raise ValueError(
            f"X[{index}] ({at.get_chemical_formula()}) is periodic along {pbc.tolist()} but its "
            "cell is singular; give the non-periodic direction a vacuum cell vector."
        )
    recip = np.linalg.inv(cell).T  # rows: reciprocal vectors (without 2π)
    for ax in np.flatnonzero(~pbc):
        normal = recip[ax] / np.linalg.norm(recip[ax])
        height = 1.0 / np.linalg.norm(recip[ax])
        proj = at.positions @ normal
        gap = height - (proj.max() - proj.min())
        if gap < cutoff:
            raise ValueError(
                f"X[{index}] ({at.get_chemical_formula()}) is not periodic along cell vector {ax} "
                f"but leaves only {gap:.2f} Å of vacuum there; CHGNet needs at least the cutoff "
                f"({cutoff} Å) so periodic images do not interact."
            )
    at.pbc = True
    return at


class CHGNetMLIP(MLIP):
    """Handle of a CHGNet network, e.g. the pretrained CHGNet 0.3.0.

    CHGNet predicts an energy per atom (its readout averages site energies and adds the frozen
    per-element ``AtomRef`` composition energy); this handle returns total energies, the
    per-atom prediction times the number of atoms N, as the CHGNet ASE calculator does. Forces
    are ``-∂E/∂R`` and CHGNet always builds them with ``create_graph``, so ``∂F/∂θ`` works as
    shipped. Molecules are put in a big periodic box (:func:`periodic_copy`). Several
    structures are batched into one forward.

    Parameter subsets (fnmatch patterns over ``module.named_parameters()``):

    - ``"readout"``: ``mlp.*`` (12,545 parameters for 0.3.0, a gated MLP on site features).
    - ``"last_block"``: the last atom convolution and the readout normalisation (37,504).
    - ``"all"``: every trainable parameter that enters the energy (the magnetic-moment head
      ``site_wise`` and the frozen ``composition_model`` are left out).

    Parameters
    ----------
    module : chgnet.model.CHGNet
        The network, moved to ``device`` / ``dtype`` and set to eval mode in place;
        :meth:`restore_module` (or leaving ``with handle:``) puts it back as it was.
    device : str or torch.device, default="auto"
    dtype : torch.dtype, default=torch.float32
        Only float32 is supported (CHGNet builds its graphs in float32).
    name : str, default="chgnet"

    Attributes
    ----------
    module : CHGNet
    cutoff : float
        Atom-graph cutoff in Å (6 for 0.3.0; angles use bonds shorter than 3 Å).
    species : frozenset of int
        Atomic numbers 1-94 (CHGNet's embedding table; 89 appear in its training data).
    n_embedding : int
        Width of :meth:`embeddings` (64 for 0.3.0).
    """

    implemented_properties = ("energy", "forces", "embeddings")
    model_filename = "model.pth.tar"
    float32_only = "CHGNet builds its graph and composition features in float32"
    #: Subset with the highest effective rank of energy-gradient features on 300 real frames
    #: (OC20 + 3BPA; docs/backends.md).
    default_subset = "all"
    #: Forward-mode AD works through the network: the forward-over-reverse route
    #: (``force_rows="forward"``) equals the reverse-mode exact rows (tests/models).
    functional = True

    def __init__(self, module, *, device="auto", dtype=torch.float32, name="chgnet"):
        require("chgnet", "chgnet")
        n_z = int(module.atom_embedding.embedding.num_embeddings) \
            if hasattr(module.atom_embedding, "embedding") else 94
        self._wrap(module, name=name, device=device, dtype=dtype,
                   cutoff=module.graph_converter.atom_graph_cutoff, species=range(1, n_z + 1))
        last = len(module.atom_conv_layers) - 1
        readout = ("mlp.*",)
        skip = {"site_wise", "composition_model"}
        top = tuple(f"{n}.*" for n, _ in module.named_children() if n not in skip)
        self.subset_patterns = {
            "readout": readout,
            "last_block": tuple(
                n for n, p in module.named_parameters() if p.requires_grad
                and n.startswith((f"atom_conv_layers.{last}.", "readout_norm."))),
            "all": top,
        }
        self.n_embedding = int(module.atom_embedding.embedding.embedding_dim)

    @classmethod
    def from_pretrained(cls, name="0.3.0", *, device="auto", dtype=torch.float32):
        """Load pretrained CHGNet weights shipped with ``chgnet`` (``"0.3.0"``); no download."""
        require("chgnet", "chgnet")
        from chgnet.model import CHGNet

        with contextlib.redirect_stdout(io.StringIO()):  # CHGNet prints on load
            module = CHGNet.load(model_name=name, use_device="cpu", verbose=False)
        return cls(module, device=device, dtype=dtype, name=f"chgnet-{name}")

    @classmethod
    def from_file(cls, path, *, device="auto", dtype=torch.float32):
        """Load a CHGNet state file (``CHGNet.from_file`` format, e.g. written by :meth:`save`
        or CHGNet's trainer). A pickle read with ``weights_only=False``: only load files you
        trust."""
        require("chgnet", "chgnet")
        from chgnet.model import CHGNet

        with contextlib.redirect_stdout(io.StringIO()):  # CHGNet prints on load
            module = CHGNet.from_file(os.fspath(path))
        return cls(module, device=device, dtype=dtype, name=os.path.basename(os.fspath(path)))

    # -- reference energies and persistence ------------------------------------------------
    def _reference_table(self):
        """``composition_model.fc.weight`` (1, 94): the AtomRef energy of element Z (eV per
        atom) sits at ``[0, Z - 1]``. CHGNet's per-atom energy adds ``Σ_Z w_Z n_Z / N``, so the
        total energy (× N) adds ``Σ_Z w_Z n_Z``."""
        fc = getattr(self.module.composition_model, "fc", None)
        if fc is None:
            return None, {}
        weight = fc.weight
        return weight, {z: (0, z - 1) for z in sorted(self.species) if z <= weight.shape[1]}

    def save(self, path) -> Path:
        """Write a CHGNet state file (``{"model": {"state_dict", "model_args"}}``, what
        ``CHGNet.from_file`` reads) with the current weights; returns the path."""
        path = Path(path)
        state = {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}
        torch.save({"model": {"state_dict": state,
                              "model_args": dict(self.module.model_args)}}, path)
        return path

    # -- protocol -------------------------------------------------------------------------
    # -- hooks ----------------------------------------------------------------------------
    def _graphs(self, atoms, device) -> list:
        """CHGNet crystal graphs of ``atoms`` on ``device`` (molecules boxed, see
        :func:`periodic_copy`); an atom with no neighbour is refused, naming ``X[i]``."""
        from pymatgen.io.ase import AseAtomsAdaptor

        adaptor = AseAtomsAdaptor()
        graphs = []
        for i, at in enumerate(atoms):
            boxed = periodic_copy(at, self.cutoff, index=i)
            structure = adaptor.get_structure(boxed)
            msg = (f"X[{i}] ({at.get_chemical_formula()}) has an atom with no neighbour within "
                   f"{self.cutoff} Å; CHGNet cannot describe isolated atoms.")
            try:
                graph = self.module.graph_converter(structure)
            except ValueError as exc:
                if "isolated atom" not in str(exc):
                    raise
                raise ValueError(msg) from exc
            if graph.atom_graph.numel() == 0 or \
                    torch.unique(graph.atom_graph.reshape(-1, 2)[:, 0]).numel() < len(at):
                raise ValueError(msg)
            graphs.append(graph.to(device))
        return graphs

    def _run(self, batch: BackendBatch, task: str, **kwargs):
        n_atoms = (batch.ptr[1:] - batch.ptr[:-1]).to(self.dtype)
        out = self.module(batch.data, task=task, **kwargs)
        energy = out["e"].reshape(-1)
        if self.module.is_intensive:
            energy = energy * n_atoms
        return energy, out

    def _forward(self, batch: BackendBatch, *, forces: bool, create_graph: bool):
        """Total energies (n_structures,) in eV (CHGNet's per-atom energy times N) and forces
        (n_atoms_total, 3) in eV/Å (CHGNet always builds them with a graph)."""
        if not forces:
            return self._run(batch, "e")[0], None
        energy, out = self._run(batch, "ef")
        return energy, torch.cat(list(out["f"]), dim=0)

    def embeddings(self, batch: BackendBatch) -> torch.Tensor:
        """CHGNet's invariant atom features before the last atom convolution.

        Returns
        -------
        h : torch.Tensor of shape (n_atoms_total, 64)
        """
        _, out = self._run(batch, "e", return_atom_feas=True)
        return torch.cat(list(out["atom_fea"]), dim=0)

    def __repr__(self) -> str:
        return f"CHGNetMLIP(name={self.name!r}, cutoff={self.cutoff}, device={str(self.device)!r})"
