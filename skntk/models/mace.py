"""MACE backend: a MACE network from the user's ``.model`` file.

Optional extra: ``pip install skntk[mace]`` (``mace-torch``). mace-torch ships no weights and
skntk never downloads any (MACE-MP / MACE-OFF are fetched at run time by mace and are not used):
give the path of a model file you trust.

.. warning::

   ``import mace`` sets the environment variable ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` for the
   whole process (mace-torch needs it because e3nn 0.4.4 unpickles its constants with
   ``torch.load``). From then on every ``torch.load`` call in the process that does not pass
   ``weights_only`` explicitly unpickles arbitrary objects, i.e. can run code from the file.
   skntk never sets this variable itself and always passes ``weights_only`` explicitly; the
   MACE model file itself is a pickle (a whole ``nn.Module``) and is loaded with
   ``weights_only=False``: only load files from sources you trust. mace-torch pins
   ``e3nn==0.4.4`` while sevenn needs ``e3nn>=0.5``, so MACE lives in its own virtualenv.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from skntk.models._util import require, resolve_device
from skntk.models.base import MLIP, BackendBatch

logger = logging.getLogger(__name__)

__all__ = ["MACEMLIP"]

_ENV = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


def _import_mace():
    """Import mace (before e3nn, which needs mace's environment variable to import at all) and
    warn once if that import switched unsafe pickle loading on for the process."""
    before = os.environ.get(_ENV)
    mace = require("mace", "mace")
    if before is None and os.environ.get(_ENV) is not None and not getattr(
            _import_mace, "_warned", False):
        _import_mace._warned = True
        logger.warning(
            "importing mace set %s=%s for this whole process: torch.load calls that do not pass "
            "weights_only now unpickle arbitrary objects. skntk does not set it; only load "
            "model files you trust.", _ENV, os.environ[_ENV])
    return mace


class MACEMLIP(MLIP):
    """Handle of a MACE network (``MACE`` / ``ScaleShiftMACE``).

    MACE's energy is ``E = Σ_i E0_{Z_i} + Σ_i Σ_layers readout_l(h_i^l)`` (ScaleShiftMACE scales
    and shifts the interaction part); ``E0`` (``atomic_energies_fn``) are frozen per-element
    reference energies. Forces are ``-∂E/∂R`` by autograd; they keep their graph (so ``∂F/∂θ``
    exists) when the network is called with ``training=True``, which this handle does for
    ``create_graph=True`` (no dropout or batch norm is affected). Several structures are batched
    into one forward. The network keeps the dtype of its file (MACE models are usually float64).

    Parameter subsets (fnmatch patterns over ``module.named_parameters()``):

    - ``"readout"``: ``readouts.*`` (the linear readout of every layer and the last layer's
      MLP readout).
    - ``"last_block"``: ``interactions.{L-1}.*`` and ``products.{L-1}.*``.
    - ``"all"``: every parameter with ``requires_grad``.

    Parameters
    ----------
    module : mace.modules.MACE
        The network, moved to ``device`` / ``dtype`` and set to eval mode in place;
        :meth:`restore_module` (or leaving ``with handle:``) puts it back as it was.
    device : str or torch.device, default="auto"
    dtype : torch.dtype or None, default=None
        ``None`` keeps the network's dtype.
    name : str, default="mace"

    Attributes
    ----------
    module : MACE
    cutoff : float
        ``r_max`` in Å.
    species : frozenset of int
        The network's atomic numbers.
    n_embedding : int
        Width of :meth:`embeddings`: invariant features per layer times the number of layers.
    """

    implemented_properties = ("energy", "forces", "embeddings")
    model_filename = "model.model"
    #: Not measured (no pretrained MACE is available offline); the cheapest subset.
    default_subset = "readout"
    #: Not declared: forward-over-reverse through MACE (mace-torch 0.3.16) runs but gives wrong
    #: force rows (up to 5x relative error against the reverse-mode rows on a tiny float64 MACE;
    #: energy rows agree), so ``force_rows="forward"`` is refused (tests/models/test_mace.py).
    functional = False

    def __init__(self, module, *, device="auto", dtype=None, name="mace"):
        _import_mace()
        self._wrap(module, name=name, device=device, dtype=dtype, cutoff=module.r_max,
                   species=module.atomic_numbers)
        n_layers = int(module.num_interactions)
        self.subset_patterns = {
            "readout": ("readouts.*",),
            "last_block": tuple(
                n for n, p in module.named_parameters() if p.requires_grad
                and n.startswith((f"interactions.{n_layers - 1}.", f"products.{n_layers - 1}."))),
            "all": ("*",),
        }
        from e3nn import o3

        irreps = o3.Irreps(str(module.products[0].linear.irreps_out))
        self._l_max = irreps.lmax
        self._n_invariant = irreps.dim // (self._l_max + 1) ** 2
        self._n_layers = n_layers
        self.n_embedding = self._n_invariant * n_layers

    @classmethod
    def from_file(cls, path, *, device="auto", dtype=None):
        """Load a MACE model file (a pickled ``nn.Module``; only load files you trust)."""
        _import_mace()
        map_location = resolve_device(device)
        module = torch.load(os.fspath(path), map_location=map_location, weights_only=False)
        if not isinstance(module, torch.nn.Module) or not hasattr(module, "r_max"):
            raise ValueError(f"{os.fspath(path)!r} does not hold a MACE network "
                             f"(got {type(module).__name__}).")
        return cls(module, device=device, dtype=dtype, name=os.path.basename(os.fspath(path)))

    # -- reference energies and persistence ------------------------------------------------
    def _reference_table(self):
        """``atomic_energies_fn.atomic_energies`` (E0s, eV per atom), in the order of
        ``module.atomic_numbers``; for a multi-head model (n_heads, n_elements), the row of the
        head the handle evaluates (the last one)."""
        e0 = getattr(getattr(self.module, "atomic_energies_fn", None), "atomic_energies", None)
        if e0 is None:
            return None, {}
        zs = [int(z) for z in self.module.atomic_numbers]
        if e0.dim() == 1:
            return e0, {z: i for i, z in enumerate(zs)}
        return e0, {z: (e0.shape[0] - 1, i) for i, z in enumerate(zs)}

    def save(self, path) -> Path:
        """Write the network as a MACE ``.model`` file (``torch.save`` of the whole module, as
        mace does; read back by :func:`skntk.models.load` and ``torch.load``); returns the
        path."""
        path = Path(path)
        torch.save(self.module, path)
        return path

    # -- protocol -------------------------------------------------------------------------
    # -- hooks ----------------------------------------------------------------------------
    def _graphs(self, atoms, device):
        """MACE graphs of ``atoms`` (floats in the handle's dtype), batched on ``device``."""
        _import_mace()
        from mace import data as mace_data
        from mace.tools import torch_geometric, torch_tools, utils

        z_table = utils.AtomicNumberTable([int(z) for z in self.module.atomic_numbers])
        heads = list(getattr(self.module, "heads", None) or ["Default"])
        keyspec = mace_data.KeySpecification(info_keys={}, arrays_keys={})
        graphs = []
        with torch_tools.default_dtype(self.dtype):  # restores the default in finally
            for at in atoms:
                config = mace_data.config_from_atoms(at, key_specification=keyspec,
                                                     head_name=heads[-1])
                graphs.append(mace_data.AtomicData.from_config(
                    config, z_table=z_table, cutoff=self.cutoff, heads=heads))
        data = torch_geometric.Batch.from_data_list(graphs).to(device)
        for key in data.keys:
            val = data[key]
            if torch.is_tensor(val) and val.is_floating_point():
                data[key] = val.to(self.dtype)
        return data

    def _run(self, batch: BackendBatch, *, training: bool, compute_force: bool):
        return self.module(batch.data.clone().to_dict(), training=training,
                           compute_force=compute_force)

    def _forward(self, batch: BackendBatch, *, forces: bool, create_graph: bool):
        """Energies (n_structures,) in eV and forces (n_atoms_total, 3) in eV/Å; MACE keeps the
        force graph when called with ``training=True`` (no dropout or batch norm is affected),
        as is the energy-only call, so that energies stay differentiable."""
        if not forces:
            return self._run(batch, training=True, compute_force=False)["energy"].reshape(-1), None
        out = self._run(batch, training=create_graph, compute_force=True)
        return out["energy"].reshape(-1), out["forces"]

    def embeddings(self, batch: BackendBatch) -> torch.Tensor:
        """Invariant (``0e``) node features of every layer, as ``MACECalculator.get_descriptors``.

        Returns
        -------
        h : torch.Tensor of shape (n_atoms_total, n_embedding)
        """
        from mace.modules.utils import extract_invariant

        out = self._run(batch, training=False, compute_force=False)
        return extract_invariant(out["node_feats"], num_layers=self._n_layers,
                                 num_features=self._n_invariant, l_max=self._l_max)

    def __repr__(self) -> str:
        return f"MACEMLIP(name={self.name!r}, cutoff={self.cutoff}, device={str(self.device)!r})"
