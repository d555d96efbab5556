"""The backend template of skntk.models.base: a new backend is its hooks only.

A Lennard-Jones pair potential (a torch module with two parameters) becomes an MLIP handle with
``_graphs`` and ``_forward`` alone; the base class validates, builds ``ptr``, differentiates the
forces and detaches, and the handle then works with ForceNTKTransformer and MLIPRegressor.
"""

import math

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.calculators.lj import LennardJones as ASELennardJones
from ase.calculators.singlepoint import SinglePointCalculator

from skntk import ForceNTKTransformer
from skntk.atoms import AtomsBatch, collate
from skntk.finetune import MLIPRegressor
from skntk.models import BackendBatch
from skntk.models._util import resolve_device
from skntk.models.base import MLIP

EPS, SIGMA, RC = 0.0103, 3.40, 7.0  # argon-like, eV and Å


class LennardJonesNet(torch.nn.Module):
    """``E = Σ_{i<j} 4ε[(σ/r)¹² - (σ/r)⁶] - e(r_c)`` for ``r < r_c``; ε, σ stored as logs."""

    def __init__(self, epsilon=EPS, sigma=SIGMA, cutoff=RC):
        super().__init__()
        self.log_epsilon = torch.nn.Parameter(torch.tensor(math.log(epsilon), dtype=torch.float64))
        self.log_sigma = torch.nn.Parameter(torch.tensor(math.log(sigma), dtype=torch.float64))
        self.cutoff = float(cutoff)

    def forward(self, batch: AtomsBatch) -> torch.Tensor:
        r = batch.edge_vectors(batch.positions).norm(dim=1)  # [n_edges], each pair twice
        eps, sigma = self.log_epsilon.exp(), self.log_sigma.exp()
        sr6, sc6 = (sigma / r) ** 6, (sigma / self.cutoff) ** 6
        pair = 4 * eps * (sr6 ** 2 - sr6) - 4 * eps * (sc6 ** 2 - sc6)  # [n_edges]
        out = torch.zeros(batch.n_structures, dtype=pair.dtype, device=pair.device)
        return out.index_add(0, batch.batch[batch.edge_index[0]], 0.5 * pair)  # [n_structures]


class LennardJonesMLIP(MLIP):
    """The whole backend: attributes, ``_graphs`` and ``_forward``."""

    subset_patterns = {"readout": ("log_epsilon",), "last_block": ("log_sigma",), "all": ("*",)}
    default_subset = "all"
    functional = True

    def __init__(self, module, *, device="cpu", dtype=None):
        self.device = resolve_device(device)
        self.cutoff = module.cutoff
        self._adopt(module, device=self.device, dtype=dtype)

    def _graphs(self, atoms, device):
        return collate(atoms, self.cutoff, device=device, validate=False)

    def _forward(self, batch, *, forces, create_graph):
        return self.module(batch), None  # forces: -dE/dR by the template


def _cluster(n, seed):
    rng = np.random.default_rng(seed)
    pos = [np.zeros(3)]
    while len(pos) < n:  # no two atoms closer than 3.2 Å
        p = rng.uniform(-4.5, 4.5, 3)
        if min(np.linalg.norm(p - q) for q in pos) > 3.2:
            pos.append(p)
    return Atoms(f"Ar{n}", positions=pos)


def _labelled(atoms, epsilon, sigma):
    out = []
    for a in atoms:
        b = a.copy()
        b.calc = ASELennardJones(epsilon=epsilon, sigma=sigma, rc=RC)
        e, f = b.get_potential_energy(), b.get_forces()
        b.calc = SinglePointCalculator(b, energy=e, forces=f)
        out.append(b)
    return out


@pytest.fixture
def model():
    return LennardJonesMLIP(LennardJonesNet())


def test_energies_and_forces_match_ase_lennard_jones(model):
    atoms = [_cluster(n, seed) for n, seed in [(3, 0), (5, 1), (4, 2)]]
    batch = model.collate(atoms)
    assert isinstance(batch, AtomsBatch)
    assert batch.ptr.tolist() == [0, 3, 8, 12]
    energy, forces = model.energy_and_forces(batch)
    ref = _labelled(atoms, EPS, SIGMA)
    np.testing.assert_allclose(energy.numpy(), [a.get_potential_energy() for a in ref],
                               rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(forces.numpy(), np.concatenate([a.get_forces() for a in ref]),
                               rtol=1e-8, atol=1e-12)
    assert not energy.requires_grad and not forces.requires_grad  # detached by the template


def test_dimer_minimum_and_graph_for_parameter_derivatives(model):
    r_min = 2 ** (1 / 6) * SIGMA
    dimer = Atoms("Ar2", positions=[[0, 0, 0], [0, 0, r_min]])
    e, f = model.energy_and_forces(model.collate([dimer]), create_graph=True)
    shift = 4 * EPS * ((SIGMA / RC) ** 12 - (SIGMA / RC) ** 6)
    assert float(e.detach()) == pytest.approx(-EPS - shift, rel=1e-10)
    np.testing.assert_allclose(f.detach().numpy(), 0.0, atol=1e-12)
    assert f.requires_grad  # ∂F/∂θ exists for the force NTK
    assert model.energy(model.collate([dimer])).requires_grad


def test_template_validates_once_with_named_errors(model):
    with pytest.raises(ValueError, match="X contains no structures"):
        model.collate([])
    with pytest.raises(TypeError, match=r"X\[1\] is a str, not an ase.Atoms"):
        model.collate([_cluster(2, 0), "Ar2"])
    model.species = frozenset({18})
    with pytest.raises(ValueError, match=r"X\[0\] \(He\) contains He \(Z=2\), which "
                                         r"LennardJonesMLIP does not cover"):
        model.collate([Atoms("He")])


def test_backend_batch_wrapping_and_missing_hooks():
    class Wrapped(LennardJonesMLIP):  # a backend whose input is not skntk's own batch
        def _graphs(self, atoms, device):
            return {"batch": collate(atoms, self.cutoff, device=device, validate=False)}

        def _forward(self, batch, *, forces, create_graph):
            data = batch.data["batch"]
            pos = data.positions.detach().requires_grad_(forces)
            data.positions = pos
            e = self.module(data)
            if not forces:
                return e, None
            (g,) = torch.autograd.grad(e.sum(), pos, create_graph=create_graph)
            return e, -g

    atoms = [_cluster(3, 0), _cluster(4, 1)]
    w = Wrapped(LennardJonesNet())
    batch = w.collate(atoms, "cpu")
    assert isinstance(batch, BackendBatch) and batch.ptr.tolist() == [0, 3, 7]
    ref = LennardJonesMLIP(LennardJonesNet())
    for a, b in zip(w.energy_and_forces(batch), ref.energy_and_forces(ref.collate(atoms)),
                    strict=True):
        torch.testing.assert_close(a, b)

    class Hookless(MLIP):
        cutoff = 1.0

    with pytest.raises(NotImplementedError, match=r"must implement _graphs\(atoms, device\)"):
        Hookless().collate([_cluster(2, 0)])
    with pytest.raises(NotImplementedError, match="_forward"):
        Hookless().energy_and_forces(None)


def test_restore_module_gives_the_network_back():
    net = LennardJonesNet()
    net.train()
    with LennardJonesMLIP(net, dtype=torch.float32) as model:
        assert net.log_sigma.dtype == torch.float32 and not net.training  # moved for inference
        model.collate([_cluster(2, 0)])
        with torch.no_grad():
            net.log_epsilon.fill_(math.log(0.02))  # changed through the handle
    assert net.log_sigma.dtype == torch.float64 and net.training
    assert math.exp(float(net.log_epsilon)) == pytest.approx(0.02, rel=1e-6)  # weights kept
    copy = LennardJonesMLIP(net).copy()
    copy.module.train()
    assert copy.restore_module() is copy.module and copy.module.training  # a copy: nothing to do


def test_works_with_force_ntk_transformer(model):
    atoms = [_cluster(n, seed) for n, seed in [(3, 0), (4, 1), (5, 2)]]
    ntk = ForceNTKTransformer(model, kind="joint", parameters="all", n_features=2,
                              force_rows="exact", random_state=0).fit(atoms)
    blocks = ntk.transform(atoms)
    assert blocks.offsets.tolist() == [0, 10, 23, 39]  # 1 + 3N rows per structure
    rows = blocks.rows
    assert rows.shape == (39, 2) and np.isfinite(rows).all()
    for i in range(3):  # translation invariance: force rows sum to zero over atoms
        force = blocks.block(i)[1:].reshape(-1, 3, 2)
        np.testing.assert_allclose(force.sum(0), 0.0, atol=1e-8 * np.abs(force).max())


def test_works_with_mlip_regressor():
    train = _labelled([_cluster(n, s) for n, s in [(3, 0), (4, 1), (5, 2), (4, 3), (3, 4)]],
                      epsilon=0.015, sigma=3.3)
    model = LennardJonesMLIP(LennardJonesNet())
    before = [p.detach().clone() for p in model.module.parameters()]
    reg = MLIPRegressor(model, parameters="all", epochs=40, learning_rate=0.01, batch_size=5,
                        validation_fraction=0.0, refit_shifts=False, device="cpu",
                        random_state=0).fit(train)
    assert isinstance(reg.model_, LennardJonesMLIP) and reg.model_.module is not model.module
    for p, q in zip(model.module.parameters(), before, strict=True):
        torch.testing.assert_close(p.detach(), q)  # the input handle is untouched
    losses = [h["train_loss"] for h in reg.history_]
    assert min(losses) < 0.5 * losses[0]
    sigma = math.exp(float(reg.model_.module.log_sigma))
    assert abs(sigma - 3.3) < abs(SIGMA - 3.3)  # moved towards the labels' σ
