"""CHGNet 0.3.0 backend: the contract (skntk.testing.check_mlip, against CHGNet's own ASE
calculator), molecules in boxes, and NTK features."""

import numpy as np
import pytest
import torch

pytest.importorskip("chgnet", reason="needs the chgnet extra: pip install skntk[chgnet]")

from ase import Atoms  # noqa: E402

from skntk.models import load  # noqa: E402
from skntk.models.chgnet import CHGNetMLIP, periodic_copy  # noqa: E402
from skntk.testing import check_featurizer, check_mlip, tiny_structures  # noqa: E402

pytestmark = [pytest.mark.chgnet, pytest.mark.filterwarnings("ignore::UserWarning")]


@pytest.fixture(scope="module")
def model():
    return load("chgnet-0.3.0", device="cpu")


@pytest.fixture(scope="module")
def atoms():
    return tiny_structures()


def test_handle_declares_model(model):
    assert isinstance(model, CHGNetMLIP)
    assert model.cutoff == 6.0 and model.n_embedding == 64
    assert model.species == frozenset(range(1, 95))
    sizes = {s: sum(p.numel() for _, p in model.parameters(s))
             for s in ("readout", "last_block", "all")}
    assert sizes["readout"] == 12545
    names = {n for n, _ in model.parameters("all")}
    assert not any(n.startswith(("site_wise", "composition_model")) for n in names)
    assert sizes["readout"] < sizes["all"] and sizes["last_block"] < sizes["all"]


def test_backend_contract(model, atoms):
    """CHGNet's own calculator (the molecule in a box), F = -dE/dR, ∂θ by finite differences,
    rotations, embeddings, subsets, state, the unknown-element error (Am)."""
    from chgnet.model.dynamics import CHGNetCalculator

    calc = CHGNetCalculator(model=model.module, use_device="cpu")

    def reference(at):
        boxed = periodic_copy(at, model.cutoff)  # the molecule goes in a box, the slab unchanged
        boxed.calc = calc
        return boxed.get_potential_energy(), boxed.get_forces()

    check_mlip(model, atoms, reference=reference,
               subsets={"readout": 1e-2, ("atom_conv_layers.3.*",): 1e-2}, unknown_element=95)


def test_molecule_box_isolates_images():
    mol = tiny_structures()[0]
    boxed = periodic_copy(mol, 6.0)
    assert boxed.pbc.all() and not mol.pbc.any()
    extent = mol.positions.max(0) - mol.positions.min(0)
    # the gap between periodic images exceeds the cutoff along every axis
    assert np.all(np.diag(boxed.cell) - extent >= 6.0)
    np.testing.assert_allclose(boxed.get_all_distances(), mol.get_all_distances(), atol=1e-12)


def test_thin_vacuum_slab_rejected():
    slab = tiny_structures()[1]
    slab.pbc = [True, True, False]
    slab.cell[2] = [0, 0, 6.0]
    with pytest.raises(ValueError, match=r"X\[3\] \(Cu4O\) is not periodic along cell vector 2"):
        periodic_copy(slab, 6.0, index=3)


def test_float64_rejected(model):
    with pytest.raises(ValueError, match="dtype=torch.float64 is not supported"):
        CHGNetMLIP(model.module, device="cpu", dtype=torch.float64)


def test_isolated_atom_names_structure(model, atoms):
    lone = Atoms("CO", positions=[[0, 0, 0], [0, 0, 9.0]])
    with pytest.raises(ValueError, match=r"X\[2\] \(CO\) has an atom with no neighbour within 6.0"):
        model.collate([*atoms, lone])


def test_ntk_and_embedding_features(model, atoms):
    from skntk.transformers import EmbeddingTransformer, ForceNTKTransformer
    from tests.models.test_protocol_extras import check_ntk_rows

    blocks = check_ntk_rows(model, atoms[:1])  # the molecule: keeps CI time low
    assert blocks.kind == "joint" and blocks.rows.shape[0] == 1 + 3 * 5
    check_featurizer(ForceNTKTransformer(model, kind="joint", parameters="readout",
                                         force_rows="exact", n_features=32), atoms[:1],
                     rtol=1e-4)
    # the structure-level baseline: per-structure means of the per-atom embeddings
    emb = EmbeddingTransformer(model)
    check_featurizer(emb, atoms, rtol=1e-4)
    h = model.embeddings(model.collate(atoms)).detach().numpy()
    X = emb.fit(atoms).transform(atoms)
    ptr = np.cumsum([0] + [len(a) for a in atoms])
    np.testing.assert_allclose(X, [h[a:b].mean(0) for a, b in zip(ptr[:-1], ptr[1:], strict=True)],
                               rtol=1e-5, atol=1e-6)


def test_force_row_routes_and_batch_independence(model, atoms):
    """forward = exact, probes = Zᵀ exact / √s, CountSketch = unsketched @ R, and rows that do
    not depend on the batch (one graph per structure or shared graphs)."""
    from tests.models.test_protocol_extras import check_routes

    check_routes(model, atoms[:2], "readout", rtol=2e-4)
