"""SevenNet backend: SevenNet-0 (shipped inside the ``sevenn`` wheel) and other SevenNet networks.

Optional extra: ``pip install skntk[sevennet]`` (``sevenn==0.13.0``). Nothing is downloaded.
"""

from __future__ import annotations

import copy
import datetime
import logging
import os
import re
import uuid
from pathlib import Path

import torch

from skntk.models._util import require
from skntk.models.base import MLIP, BackendBatch

logger = logging.getLogger(__name__)

__all__ = ["SevenNetMLIP"]

_COMPILED_CONSTANT = re.compile(r"\._compiled_[^.]*\._tensor_constant\d+$")


def _e3nn_config(cp) -> dict:
    """The checkpoint's config, saying what ``cp.build_model()`` (no accelerator arguments)
    built: a plain e3nn network, whatever accelerator the checkpoint was trained with."""
    config = cp.config
    config["cuequivariance_config"] = {**config.get("cuequivariance_config", {}), "use": False}
    config["use_flash_tp"] = False
    config["use_oeq"] = False
    return config


class SevenNetMLIP(MLIP):
    """Handle of a SevenNet network (``AtomGraphSequential``), e.g. SevenNet-0.

    The energy of structure x is SevenNet's ``E = Σ_i (s_{Z_i} e_i + μ_{Z_i})`` with ``e_i`` the
    two-layer linear readout of the last block's 128 scalar node features, ``s`` and ``μ`` the
    per-element scale and shift frozen in the checkpoint (``rescale_atomic_energy``). Forces are
    SevenNet's: ``-∂E/∂r_ij`` on the edge vectors, scattered to atoms; they are built with
    ``create_graph`` (so ``∂F/∂θ`` exists) by putting the force head in train mode for that call
    only. Several structures are batched into one forward.

    Parameter subsets (fnmatch patterns over ``module.named_parameters()``):

    - ``"readout"``: ``reduce_input_to_hidden.*``, ``reduce_hidden_to_energy.*`` (8,256 for
      SevenNet-0). They are two linear layers with no nonlinearity between them, so the readout
      energy NTK is a linear kernel on the 128 pooled scalar node features: rank ≤ 128.
    - ``"last_block"``: the last interaction block (prefix ``4_`` in SevenNet-0, 85,505
      parameters); combine with the readout by passing both pattern lists.
    - ``"all"``: every parameter with ``requires_grad`` (the per-element shift and scale are
      frozen buffers-as-parameters and are left out; they carry the composition part of the
      energy, which matters when moving between functionals).

    Parameters
    ----------
    module : sevenn.nn.sequential.AtomGraphSequential
        The network. It is switched to batch mode and eval mode in place and moved to
        ``device`` / ``dtype``; :meth:`restore_module` (or leaving ``with handle:``) puts it
        back as it was.
    device : str or torch.device, default="auto"
    dtype : torch.dtype, default=torch.float32
        Only float32 is supported (SevenNet hard-codes float32 one-hot inputs).
    name : str, default="sevennet"
        Used in error messages.
    config : dict or None, default=None
        The network's SevenNet configuration (``SevenNetCheckpoint.config``), needed by
        :meth:`save`; set by :meth:`from_pretrained` and :meth:`from_checkpoint`.

    Attributes
    ----------
    module : AtomGraphSequential
    cutoff : float
        Neighbour cutoff in Å (5.0 for SevenNet-0).
    species : frozenset of int
        Atomic numbers in the network's type map (89 for SevenNet-0).
    device : torch.device
    config : dict or None
        SevenNet configuration used by :meth:`save`.
    n_embedding : int
        Width of :meth:`embeddings` (128 for SevenNet-0).

    Notes
    -----
    Edge vectors are computed in NumPy (as SevenNet does), so positions are not a torch leaf:
    forces are differentiable with respect to θ, not to positions.
    """

    implemented_properties = ("energy", "forces", "embeddings")
    force_row_bytes_per_edge = 3.0e5  # measured: 500-atom Cu cell, 6.2 GB
    model_filename = "model.pth"
    float32_only = "SevenNet builds its one-hot node inputs in float32"
    #: Subset with the highest effective rank of energy-gradient features on 300 real frames
    #: (OC20 + 3BPA; docs/backends.md): 3-4x the readout's.
    default_subset = "last_block"
    #: Forward-mode AD works through the network: the forward-over-reverse route
    #: (``force_rows="forward"``) equals the reverse-mode exact rows (tests/models).
    functional = True

    def __init__(self, module, *, device="auto", dtype=torch.float32, name="sevennet",
                 config=None):
        require("sevenn", "sevennet")
        if module.type_map is None or not module.cutoff:
            raise ValueError("The SevenNet network has no type_map or cutoff; cannot use it.")
        self._wrap(module, name=name, device=device, dtype=dtype, cutoff=module.cutoff,
                   species=module.type_map)
        self.config = config
        self._was_batch_data = bool(getattr(module, "is_batch_data", True))
        module.set_is_batch_data(True)
        blocks = sorted({int(m.group(1)) for n in module._modules
                         if (m := re.match(r"^(\d+)_", n))})
        readout = ("reduce_input_to_hidden.*", "reduce_hidden_to_energy.*")
        # explicit names: the block also holds frozen constants (``4_convolution.denominator``)
        last = tuple(n for n, p in module.named_parameters()
                     if blocks and n.startswith(f"{blocks[-1]}_") and p.requires_grad)
        self.subset_patterns = {"readout": readout, "last_block": last, "all": ("*",)}
        self.n_embedding = int(module._modules["reduce_input_to_hidden"].linear.irreps_in.dim) \
            if hasattr(module._modules["reduce_input_to_hidden"], "linear") else None

    @classmethod
    def from_pretrained(cls, name="7net-0", *, device="auto", dtype=torch.float32):
        """Load a pretrained SevenNet shipped with ``sevenn`` (``"7net-0"``); no download."""
        require("sevenn", "sevennet")
        from sevenn import util

        if name != "7net-0":
            logger.warning("SevenNet model %r may be fetched from the internet by sevenn.", name)
        cp = util.load_checkpoint(name)
        module = cp.build_model()
        label = "sevennet-0" if name == "7net-0" else name
        return cls(module, device=device, dtype=dtype, name=label, config=_e3nn_config(cp))

    @classmethod
    def from_checkpoint(cls, path, *, device="auto", dtype=torch.float32):
        """Load a SevenNet checkpoint file (as written by sevenn or :meth:`save`).

        The file is a pickle read by sevenn with ``weights_only=False``: only load files you
        trust.
        """
        require("sevenn", "sevennet")
        from sevenn.checkpoint import SevenNetCheckpoint

        cp = SevenNetCheckpoint(os.fspath(path))
        return cls(cp.build_model(), device=device, dtype=dtype,
                   name=os.path.basename(os.fspath(path)), config=_e3nn_config(cp))

    # -- reference energies and persistence ------------------------------------------------
    def _reference_table(self):
        """``rescale_atomic_energy.shift`` (eV per atom), indexed by the type map: SevenNet's
        atomic energy is ``scale[t] e_i + shift[t]`` with ``t = type_map[Z_i]``."""
        rescale = self.module._modules.get("rescale_atomic_energy")
        shift = getattr(rescale, "shift", None)
        n_types = len(self.module.type_map)
        # a scalar shift (Rescale) or a modality-wise one has no per-element slot
        if shift is None or shift.dim() != 1 or shift.numel() != n_types \
                or getattr(rescale, "use_modal_wise_shift", False):
            return None, {}
        return shift, {int(z): int(t) for z, t in self.module.type_map.items()}

    def save(self, path) -> Path:
        """Write a SevenNet checkpoint (the dict ``SevenNetCheckpoint`` reads: ``config``,
        ``model_state_dict``, ...) with the current weights; returns the path.

        Raises
        ------
        ValueError
            If the handle has no SevenNet ``config`` (a bare network wrapped by
            :func:`skntk.models.load`): pass ``config=`` when building the handle.
        """
        import sevenn

        if self.config is None:
            raise ValueError(
                f"{self.name} has no SevenNet config, which a checkpoint needs: wrap the network "
                "with SevenNetMLIP(module, config=checkpoint.config) or load it from a checkpoint."
            )
        config = copy.deepcopy(self.config)
        config["version"] = sevenn.__version__  # the state dict is in this version's layout
        refs = self.reference_energies()
        if refs and isinstance(config.get("shift"), list) and len(config["shift"]) == 119:
            for z, v in refs.items():  # keep the config's per-Z (universal) shift in sync
                config["shift"][z] = v
        path = Path(path)
        torch.save({
            "config": config,
            "epoch": None,
            # a deep-copied e3nn fx module registers its folded constants as buffers
            # (``..._compiled_main_left_right._tensor_constant0``): not weights, and a fresh
            # SevenNet network (strict load) has no such keys
            "model_state_dict": {k: v.detach().cpu().clone()
                                 for k, v in self.module.state_dict().items()
                                 if not _COMPILED_CONSTANT.search(k)},
            "optimizer_state_dict": {},
            "scheduler_state_dict": {},
            "time": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "hash": uuid.uuid4().hex,
        }, path)
        return path

    # -- protocol -------------------------------------------------------------------------
    def restore_module(self):
        """As :meth:`MLIP.restore_module`, and SevenNet's batch mode as it was."""
        module = super().restore_module()
        if "_placement" in self.__dict__:
            module.set_is_batch_data(self._was_batch_data)
        return module

    # -- hooks ----------------------------------------------------------------------------
    def _graphs(self, atoms, device):
        """SevenNet graphs of ``atoms`` (floats in the handle's dtype), batched on ``device``."""
        from sevenn.atom_graph_data import AtomGraphData
        from sevenn.train.dataload import unlabeled_atoms_to_graph
        from torch_geometric.data import Batch

        graphs = []
        for at in atoms:
            g = AtomGraphData.from_numpy_dict(unlabeled_atoms_to_graph(at, self.cutoff))
            for key, val in g.items():
                if torch.is_tensor(val) and val.is_floating_point():
                    g[key] = val.to(self.dtype)
            graphs.append(g)
        return Batch.from_data_list(graphs).to(device)

    def _fresh(self, batch: BackendBatch):
        import sevenn._keys as KEY

        data = batch.data.clone()
        data[KEY.EDGE_VEC] = data[KEY.EDGE_VEC].detach().requires_grad_(True)
        return data

    def _forward(self, batch: BackendBatch, *, forces: bool, create_graph: bool):
        """Energies (n_structures,) in eV and forces (n_atoms_total, 3) in eV/Å.

        Forces are SevenNet's own (double backward through its edge-vector forces when
        ``create_graph``: the force head is put in train mode for that call only). Without
        forces the force head is skipped, which is cheaper.
        """
        import sevenn._keys as KEY

        if not forces:
            return self._run_until(batch, None)[KEY.PRED_TOTAL_ENERGY].reshape(-1), None
        head = self.module._modules["force_output"]
        was_training = head.training
        head.train(create_graph)
        try:
            out = self.module(self._fresh(batch))
        finally:
            head.train(was_training)
        return out[KEY.PRED_TOTAL_ENERGY].reshape(-1), out[KEY.PRED_FORCE]

    def _run_until(self, batch: BackendBatch, stop: str | None):
        import sevenn._keys as KEY

        data = self.module._preprocess(batch.data.clone())
        data[KEY.EDGE_VEC] = data[KEY.EDGE_VEC].detach()
        for name, mod in self.module._modules.items():
            if name == stop:
                break
            if name == "force_output":
                continue
            data = mod(data)
        return data

    def embeddings(self, batch: BackendBatch) -> torch.Tensor:
        """The last block's invariant node features, input of the readout.

        Returns
        -------
        h : torch.Tensor of shape (n_atoms_total, 128)
            Scalar (``0e``) node features for SevenNet-0.
        """
        import sevenn._keys as KEY

        return self._run_until(batch, "reduce_input_to_hidden")[KEY.NODE_FEATURE]

    def __repr__(self) -> str:
        return (f"SevenNetMLIP(name={self.name!r}, cutoff={self.cutoff}, "
                f"device={str(self.device)!r})")
