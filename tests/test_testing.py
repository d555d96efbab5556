"""Tests of skntk.testing: the strategies generate what they promise, and the checks catch
featurisers and models that break an invariant, naming it."""

import numpy as np
import pytest
import torch

pytest.importorskip("hypothesis", reason="needs the test extra: pip install skntk[test]")

from hypothesis import given, settings  # noqa: E402

from skntk.atoms import neighbor_pairs, validate_structures  # noqa: E402
from skntk.blocks import FeatureBlocks  # noqa: E402
from skntk.models.builtin import BuiltinMLIP  # noqa: E402
from skntk.testing import (  # noqa: E402
    atoms,
    check_featurizer,
    check_mlip,
    permutations,
    random_structures,
    rigid_motions,
)
from skntk.transformers import ForceNTKTransformer  # noqa: E402

FEW = settings(max_examples=15, deadline=None)


@pytest.fixture(scope="module")
def model():
    return BuiltinMLIP([1, 6, 8], cutoff=3.0, n_hidden=8, n_basis=4, n_blocks=2, n_readout=4,
                       dtype=torch.float64, random_state=0)


# -- strategies --------------------------------------------------------------------------------
@FEW
@given(atoms(species=(1, 6, 8), n_atoms=(1, 6), min_distance=1.2))
def test_atoms_respect_min_distance(a):
    i, _, _ = neighbor_pairs(a.positions, a.cell.array, a.pbc, 1.2 - 1e-9)
    assert len(i) == 0  # periodic images and an atom's own images included
    assert set(a.numbers.tolist()) <= {1, 6, 8} and 1 <= len(a) <= 6
    validate_structures([a], species={1, 6, 8})


@FEW
@given(atoms(periodic=True, cell="triclinic"))
def test_triclinic_cells(a):
    assert a.pbc.any() and a.cell.rank == 3
    assert not np.allclose(a.cell.angles(), 90.0)


@FEW
@given(atoms(periodic=True, cell="orthorhombic"))
def test_orthorhombic_cells(a):
    assert a.pbc.any()
    np.testing.assert_allclose(a.cell.angles(), 90.0)


@FEW
@given(atoms(periodic=(True, False, True), n_atoms=3), atoms(periodic=False))
def test_fixed_mixed_pbc_and_molecules(slab, mol):
    assert slab.pbc.tolist() == [True, False, True]
    assert not mol.pbc.any() and mol.cell.rank == 0


def test_random_structures_cover_molecule_and_both_cells():
    mol, ortho, tri = random_structures((1, 8))
    assert not mol.pbc.any()
    assert ortho.pbc.all() and np.allclose(ortho.cell.angles(), 90.0)
    assert tri.pbc.tolist() == [True, True, False] and not np.allclose(tri.cell.angles(), 90.0)
    validate_structures([mol, ortho, tri], species={1, 8})


@settings(max_examples=10, deadline=None)
@given(atoms(species=(1, 6, 8), n_atoms=(2, 5)), rigid_motions(), permutations())
def test_builtin_energy_invariant_under_generated_motions(model, a, motion, perm):
    b = perm.apply(motion.apply(a))
    validate_structures([b])  # moved structures stay valid (lattice shifts keep distances)
    e0 = model.energy_and_forces(model.collate([a]))[0].item()
    e1 = model.energy_and_forces(model.collate([b]))[0].item()
    assert e1 == pytest.approx(e0, abs=1e-9)
    np.testing.assert_allclose(motion.rotation @ motion.rotation.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(motion.rotation) == pytest.approx(1.0)


# -- featurisers that break an invariant ---------------------------------------------------------
class _Rows(ForceNTKTransformer):
    """Energy NTK rows, modified per structure by ``_modify(rows, atoms, position_in_X)``."""

    def transform(self, X):
        G = super().transform(X)
        rows = np.concatenate([self._modify(G.block(i), a, i) for i, a in enumerate(X)])
        return FeatureBlocks(rows, G.offsets, kind=G.kind)


class PositionDependent(_Rows):
    def _modify(self, rows, a, i):  # the centre of mass moves with a translation
        return rows + 0.3 * a.positions.mean(axis=0).sum()


class OrderDependent(_Rows):
    def _modify(self, rows, a, i):  # the element of atom 0: invariant under rigid motions only
        return rows + 0.3 * a.numbers[0]


class NegatedOdd(_Rows):
    def _modify(self, rows, a, i):  # negated depending on the position in X
        return -rows if i % 2 else rows


class Noisy(_Rows):
    def _modify(self, rows, a, i):
        return rows + 1e-3 * np.random.default_rng().standard_normal(rows.shape)


class BiasedProbes(ForceNTKTransformer):
    def transform(self, X):
        G = super().transform(X)
        factor = 3.0 if self.force_rows_ == "probes" else 1.0
        return FeatureBlocks(G.rows * factor, G.offsets, kind=G.kind)


class CopiesInInit(ForceNTKTransformer):
    def __init__(self, model=None, *, kind="energy", n_features=512):
        super().__init__(model, kind=kind, n_features=n_features)
        self.n_features = n_features + 1


@pytest.mark.parametrize("Broken, invariant", [
    (PositionDependent, "kernel invariant under rotation, translation and lattice shifts"),
    (OrderDependent, "kernel invariant under permutation"),
    (NegatedOdd, "PSD Gram across calls"),
    (Noisy, "deterministic for a fixed random_state"),
])
def test_check_featurizer_catches_broken_rows(model, Broken, invariant):
    with pytest.raises(AssertionError, match=rf"{Broken.__name__} fails the invariant "
                                             rf"'{invariant}' on X\[0\] \("):
        check_featurizer(Broken(model, kind="energy", n_features=8))


def test_check_featurizer_catches_biased_probes(model):
    est = BiasedProbes(model, kind="force", force_rows="probes", n_probes=4, n_features=8)
    with pytest.raises(AssertionError, match=r"(?s)'probe rows unbiased \(within 5 standard "
                                             r"deviations\)'.*standard deviations off"):
        check_featurizer(est)
    check_featurizer(ForceNTKTransformer(model, kind="force", force_rows="probes", n_probes=4,
                                         n_features=8))


def test_check_featurizer_catches_clone_mismatch(model):
    with pytest.raises(AssertionError, match="(?s)'clone / get_params round trip'.*n_features"):
        check_featurizer(CopiesInInit(model))


def test_check_featurizer_checks_given_structures_only(model):
    X = random_structures((1, 8), random_state=3)[:2]
    calls = []

    class Spy(ForceNTKTransformer):
        def transform(self, X_):
            calls.extend(sorted(set(a.get_chemical_formula() for a in X_)))
            return super().transform(X_)

    check_featurizer(Spy(model, n_features=8), X, unknown_element=None)
    assert set(calls) == {a.get_chemical_formula() for a in X}


# -- MLIPs that break the contract ---------------------------------------------------------------
class SignFlip(BuiltinMLIP):
    def energy_and_forces(self, batch, *, create_graph=False):
        energy, forces = super().energy_and_forces(batch, create_graph=create_graph)
        return energy, -forces


class LeavesTrainMode(BuiltinMLIP):
    def energy_and_forces(self, batch, *, create_graph=False):
        self.module.train()
        return super().energy_and_forces(batch, create_graph=create_graph)


class AcceptsAnything(BuiltinMLIP):
    def collate(self, atoms, device=None):
        return super().collate([a[[z in self.species for z in a.numbers]] for a in atoms],
                               device)


def _broken(cls):
    m = cls([1, 6, 8], cutoff=3.0, n_hidden=8, n_basis=4, n_blocks=2, n_readout=4,
            dtype=torch.float64, random_state=0)
    m.module.eval()
    return m


@pytest.mark.parametrize("cls, invariant", [
    (SignFlip, r"forces = -dE/dR \(finite differences\)"),
    (LeavesTrainMode, r"state restored after energy_and_forces\(create_graph=False\)"),
    (AcceptsAnything, "error on unknown element"),
])
def test_check_mlip_catches_broken_models(cls, invariant):
    with pytest.raises(AssertionError, match=rf"{cls.__name__} fails the invariant "
                                             rf"'{invariant}' on X\["):
        check_mlip(_broken(cls))


def test_check_mlip_leaves_the_model_alone(model):
    before = {n: p.detach().clone() for n, p in model.module.named_parameters()}
    model.module.train(True)
    check_mlip(model, subsets={"readout": 1e-4, "last_block": 1e-4, ("embedding.*",): 1e-4})
    assert model.module.training
    model.module.eval()
    for n, p in model.module.named_parameters():
        assert torch.equal(p, before[n]), n
