"""MACE backend on a tiny MACE built from scratch, saved to a .model file and loaded by path.

Runs in its own virtualenv (``make test-mace``): mace-torch pins e3nn==0.4.4, sevenn needs
e3nn>=0.5. No weights are downloaded.
"""

import os

import numpy as np
import pytest
import torch

mace = pytest.importorskip("mace", reason="needs the mace extra (own venv): make test-mace")

from skntk.models import load  # noqa: E402
from skntk.models.mace import MACEMLIP  # noqa: E402
from skntk.testing import check_featurizer, check_mlip, tiny_structures  # noqa: E402

pytestmark = [pytest.mark.mace, pytest.mark.filterwarnings("ignore::UserWarning")]


def build_tiny_mace(seed=0):
    """A 2-layer ScaleShiftMACE for H, C, O, Cu with random weights, float64."""
    from e3nn import o3
    from mace import modules
    from mace.tools import torch_tools

    with torch_tools.default_dtype(torch.float64), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        block = modules.interaction_classes["RealAgnosticResidualInteractionBlock"]
        model = modules.ScaleShiftMACE(
            r_max=4.0, num_bessel=4, num_polynomial_cutoff=5, max_ell=2,
            interaction_cls=block, interaction_cls_first=block, num_interactions=2,
            num_elements=4, hidden_irreps=o3.Irreps("8x0e+8x1o"), MLP_irreps=o3.Irreps("8x0e"),
            atomic_energies=np.array([-0.5, -1.5, -2.0, -3.0]),  # small: FD rounding
            avg_num_neighbors=4.0, atomic_numbers=[1, 6, 8, 29], correlation=2,
            gate=torch.nn.functional.silu, atomic_inter_scale=1.3, atomic_inter_shift=0.1)
    return model


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("mace") / "tiny.model"
    torch.save(build_tiny_mace(), path)
    return path


@pytest.fixture(scope="module")
def model(model_path):
    return load(str(model_path), device="cpu")


@pytest.fixture(scope="module")
def atoms():
    return tiny_structures()


def test_loaded_from_file(model, model_path):
    assert isinstance(model, MACEMLIP)
    assert model.cutoff == 4.0 and model.species == frozenset({1, 6, 8, 29})
    assert model.dtype == torch.float64
    assert model.name == "tiny.model"
    sizes = {s: sum(p.numel() for _, p in model.parameters(s))
             for s in ("readout", "last_block", "all")}
    assert 0 < sizes["readout"] < sizes["all"] and 0 < sizes["last_block"] < sizes["all"]
    assert all(n.startswith("readouts.") for n, _ in model.parameters("readout"))


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ValueError, match="MACE model file .*nope.model.* does not exist"):
        load(str(tmp_path / "nope.model"))


def test_skntk_does_not_set_weights_only_variable(model):
    # the variable comes from `import mace`; skntk code never writes it
    import skntk.models.mace as backend

    src = open(backend.__file__).read()
    assert "os.environ[_ENV] =" not in src and "setdefault(_ENV" not in src
    assert os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD") == "1"  # mace's doing


def test_backend_contract(model, model_path, atoms):
    """MACE's own calculator, F = -dE/dR, ∂θ by finite differences (readout and last block),
    rotations, embeddings (16 = 8 invariants x 2 layers), subsets, state, the unknown-element
    error (N)."""
    from mace.calculators import MACECalculator

    assert model.n_embedding == 16
    calc = MACECalculator(model_paths=str(model_path), device="cpu", default_dtype="float64")
    check_mlip(model, atoms, reference=calc, subsets={"readout": 1e-4, "last_block": 1e-4},
               unknown_element=7)


def test_ntk_and_embedding_features(model, atoms):
    from skntk.transformers import EmbeddingTransformer, ForceNTKTransformer
    from tests.models.test_protocol_extras import check_ntk_rows

    blocks = check_ntk_rows(model, atoms, "last_block", rtol=1e-9)
    assert blocks.kind == "joint" and blocks.rows.shape[0] == 2 * (1 + 3 * 5)
    check_featurizer(ForceNTKTransformer(model, kind="joint", parameters="last_block",
                                         force_rows="exact", n_features=32), atoms)
    check_featurizer(EmbeddingTransformer(model), atoms)


def test_force_row_routes_and_batch_independence(model, atoms):
    """probes = Zᵀ exact / √s, CountSketch = unsketched @ R, rows independent of the batch. The
    forward route is refused: forward-over-reverse through MACE gives wrong force rows."""
    from skntk.transformers import ForceNTKTransformer
    from tests.models.test_protocol_extras import check_routes

    check_routes(model, atoms, "last_block", rtol=1e-8)
    assert not model.supports_torch_func
    with pytest.raises(ValueError, match="forward-mode AD"):
        ForceNTKTransformer(model, kind="force", force_rows="forward").fit(atoms)


# -- reference energies, copies, saving, ASE calculator (checks shared with other backends) ---
def test_reference_energies_are_e0s(model, atoms):
    from tests.models.test_protocol_extras import check_reference_energies

    assert model.reference_energies() == {1: -0.5, 6: -1.5, 8: -2.0, 29: -3.0}
    check_reference_energies(model, atoms, atol=1e-10, missing_z=7)


def test_copy_is_independent_and_identical(model, atoms):
    from tests.models.test_protocol_extras import check_copy

    check_copy(model, atoms, atol=1e-12)


@pytest.mark.parametrize("filename", ["saved.model", "saved.pt"])  # .pt: found by content
def test_save_load_round_trip(model, atoms, tmp_path, filename):
    from mace.calculators import MACECalculator

    from tests.models.test_protocol_extras import check_save_load, evaluate

    twin, path = check_save_load(model, atoms, tmp_path / filename, atol=1e-12)
    own = torch.load(path, map_location="cpu", weights_only=False)  # MACE's format
    assert type(own) is type(model.module)
    e, f = evaluate(twin, atoms)
    calc = MACECalculator(model_paths=str(path), device="cpu", default_dtype="float64")
    mol = atoms[0].copy()
    mol.calc = calc
    np.testing.assert_allclose(mol.get_potential_energy(), e[0], rtol=1e-12)
    np.testing.assert_allclose(mol.get_forces(), f[:len(mol)], atol=1e-10)


def test_ase_calculator(model, atoms):
    from tests.models.test_protocol_extras import check_calculator

    check_calculator(model, atoms, atol=1e-12)
