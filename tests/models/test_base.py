"""Tests of the MLIP protocol (skntk.models.base) through tiny subclasses."""

import copy

import numpy as np
import pytest
import torch
from ase.build import molecule
from sklearn.base import clone

from skntk.atoms import collate
from skntk.models.base import MLIP, forces_from_energy, module_state, replaced_parameters


class PairNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.k = torch.nn.Parameter(torch.tensor(2.0, dtype=torch.float64))
        self.readout = torch.nn.Linear(1, 1).double()


class HarmonicPairs(MLIP):
    """E = Σ_{i<j} k (r_ij - 1)² over pairs within the cutoff; implements energy() only."""

    subset_patterns = {"readout": ("readout.*",), "last_block": ("k",), "all": ("*",)}
    cutoff = 3.0

    def __init__(self):
        self.module = PairNet()

    def collate(self, atoms, device="cpu"):
        return collate(atoms, self.cutoff, device=device)

    def energy(self, batch):
        r = batch.edge_vectors(batch.positions).norm(dim=1)
        e_pair = 0.5 * self.module.k * (r - 1.0) ** 2  # both directions listed
        i = batch.edge_index[0]
        return torch.zeros(batch.n_structures, dtype=r.dtype).index_add(0, batch.batch[i], e_pair)


class OnlyEF(HarmonicPairs):
    """Implements energy_and_forces only (energy comes from the default)."""

    energy = MLIP.energy

    def energy_and_forces(self, batch, *, create_graph=False):
        pos = batch.positions.detach().requires_grad_(True)
        batch.positions = pos
        e = HarmonicPairs.energy(self, batch)
        return e, forces_from_energy(e, pos, create_graph=create_graph)


class Nothing(MLIP):
    cutoff = 1.0

    def collate(self, atoms, device="cpu"):
        return collate(atoms, self.cutoff)


def test_default_forces_match_analytic_pair_forces():
    m = HarmonicPairs()
    a = molecule("H2O")
    b = m.collate([a])
    E, F = m.energy_and_forces(b)
    pos = a.positions
    F_ref = np.zeros_like(pos)
    for i in range(3):
        for j in range(3):
            d = pos[j] - pos[i]
            r = np.linalg.norm(d)
            if i != j and r < 3.0:
                F_ref[i] += 2 * 2.0 * (r - 1.0) * d / r  # 2k(r - 1) d / r with k = 2
    np.testing.assert_allclose(F.detach().numpy(), F_ref, atol=1e-12)
    assert E.shape == (1,)


def test_energy_default_from_energy_and_forces_and_missing_both():
    b = collate([molecule("H2O")], 3.0)
    assert torch.allclose(OnlyEF().energy(b), HarmonicPairs().energy(b))
    with pytest.raises(NotImplementedError, match="must implement energy"):
        Nothing().energy(b)
    with pytest.raises(NotImplementedError, match="must implement energy"):
        Nothing().energy_and_forces(b)


def test_forces_from_energy_unused_positions_gives_zeros():
    R = torch.zeros(2, 3, requires_grad=True)
    E = torch.ones(1, requires_grad=True) * 3.0
    assert torch.equal(forces_from_energy(E, R), torch.zeros(2, 3))


def test_parameter_subsets_patterns_and_errors():
    m = HarmonicPairs()
    assert [n for n, _ in m.parameters("readout")] == ["readout.weight", "readout.bias"]
    assert [n for n, _ in m.parameters("all")] == ["k", "readout.weight", "readout.bias"]
    assert [n for n, _ in m.parameters(["*bias", "k"])] == ["k", "readout.bias"]
    with pytest.raises(ValueError, match="'nope' is not a subset of HarmonicPairs"):
        m.parameters("nope")
    with pytest.raises(ValueError, match="matches no parameter"):
        m.parameters(["zzz*"])


def test_clone_and_deepcopy_return_the_handle():
    m = HarmonicPairs()
    assert clone(m) is m
    assert copy.deepcopy(m) is m
    assert copy.deepcopy({"model": m})["model"] is m


def test_replaced_parameters_restores_objects_and_order():
    m = PairNet()
    before = list(m.named_parameters())
    with replaced_parameters(m, {"k": torch.tensor(5.0, dtype=torch.float64)}):
        assert float(m.k) == 5.0
    after = list(m.named_parameters())
    assert [n for n, _ in after] == [n for n, _ in before]
    assert all(p is q for (_, p), (_, q) in zip(before, after, strict=True))
    with pytest.raises(KeyError, match="not parameters"):
        with replaced_parameters(m, {"zz": torch.zeros(1)}):
            pass
    with pytest.raises(ValueError, match="has shape"):
        with replaced_parameters(m, {"k": torch.zeros(2)}):
            pass
    assert m.k is before[0][1]


def test_module_state_restores_everything_even_on_error():
    m = PairNet()
    m.readout.weight.requires_grad_(False)
    w = m.readout.weight.detach().clone()
    m.train(True)
    with pytest.raises(RuntimeError, match="boom"):
        with module_state(m, dtype=torch.float32, train=False, requires_grad={"k"}):
            assert m.readout.weight.dtype == torch.float32 and not m.training
            assert m.k.requires_grad and not m.readout.bias.requires_grad
            raise RuntimeError("boom")
    assert m.training and m.readout.weight.dtype == torch.float64
    assert not m.readout.weight.requires_grad and m.readout.bias.requires_grad
    assert torch.equal(m.readout.weight, w)  # lossless float64 round trip


def test_supports_torch_func_declaration():
    assert HarmonicPairs().supports_torch_func is False

    class F(HarmonicPairs):
        functional = True

    assert F().supports_torch_func is True


def test_default_subset_resolves_to_the_declared_one():
    from skntk.models.builtin import BuiltinMLIP

    model = BuiltinMLIP([1, 8], n_hidden=4, n_blocks=1)
    assert [n for n, _ in model.parameters("default")] == \
        [n for n, _ in model.parameters(model.default_subset)]

    class LastBlockDefault(BuiltinMLIP):
        default_subset = "last_block"

    other = LastBlockDefault([1, 8], n_hidden=4, n_blocks=1)
    assert [n for n, _ in other.parameters("default")] == \
        [n for n, _ in other.parameters("last_block")]
    assert [n for n, _ in other.parameters("default")] != \
        [n for n, _ in other.parameters("readout")]


def test_module_state_restores_buffers_replaced_by_to():
    """``.to(dtype)`` replaces buffer objects; module_state must put the originals back."""
    import torch

    from skntk.models.base import module_state

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 1)
            self.register_buffer("shift", torch.tensor([1.25], dtype=torch.float64))

    net = Net()
    with module_state(net, dtype=torch.float32):
        assert net.shift.dtype == torch.float32
    assert net.shift.dtype == torch.float64
    assert net.shift.item() == 1.25


def test_deterministic_on_cpu_sets_and_restores_the_flags():
    from skntk.models.base import deterministic_on_cpu

    assert not torch.are_deterministic_algorithms_enabled()
    with pytest.raises(RuntimeError, match="boom"):
        with deterministic_on_cpu("cpu"):
            assert torch.are_deterministic_algorithms_enabled()
            assert torch.is_deterministic_algorithms_warn_only_enabled()  # never fails a model
            raise RuntimeError("boom")
    assert not torch.are_deterministic_algorithms_enabled()
    with deterministic_on_cpu(torch.device("cuda")):  # only the device's type is read
        assert not torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # a user's strict setting is kept, and restored
    try:
        with deterministic_on_cpu("cpu"):
            assert not torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


def test_rows_fine_tuning_and_predictions_run_deterministically(monkeypatch):
    """Every forward that a backward follows (NTK rows, fine-tuning, forces) runs with
    deterministic algorithms: multi-threaded CPU accumulations in a backward otherwise vary from
    call to call. Forwards without a graph (energies only) accumulate nothing."""
    from skntk.finetune import MLIPRegressor
    from skntk.models.predict import predict_energies_forces
    from skntk.transformers import ForceNTKTransformer
    from tests.builders import emt_label, molecules, tiny_builtin

    model = tiny_builtin((1, 6, 8), dtype=torch.float64)
    seen = []  # (deterministic, grad enabled) of every forward
    forward = type(model)._forward

    def spy(self, *args, **kwargs):
        seen.append((torch.are_deterministic_algorithms_enabled(), torch.is_grad_enabled()))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "_forward", spy)
    X = [emt_label(a) for a in molecules(4)]
    ForceNTKTransformer(model, kind="joint", n_features=8, random_state=0).fit(X).transform(X)
    n_rows = len(seen)
    predict_energies_forces(model, X)
    n_pred = len(seen)
    MLIPRegressor(model, epochs=1, batch_size=2, random_state=0).fit(X)
    assert 0 < n_rows < n_pred < len(seen) - 4
    with_grad = [det for det, grad in seen if grad]
    assert len(with_grad) >= len(seen) - 2 and all(with_grad), seen
    assert not torch.are_deterministic_algorithms_enabled()
