"""SevenNet-0 backend: the contract (skntk.testing.check_mlip, against SevenNet's own ASE
calculator), its parameter subsets and NTK features."""

import pytest
import torch

pytest.importorskip("sevenn", reason="needs the sevennet extra: pip install skntk[sevennet]")

from skntk.models import load  # noqa: E402
from skntk.models.sevennet import SevenNetMLIP  # noqa: E402
from skntk.testing import check_featurizer, check_mlip, tiny_structures  # noqa: E402

pytestmark = [pytest.mark.sevennet,
              pytest.mark.filterwarnings("ignore::UserWarning")]


@pytest.fixture(scope="module")
def model():
    return load("sevennet-0", device="cpu")


@pytest.fixture(scope="module")
def atoms():
    return tiny_structures()


def test_handle_declares_model(model):
    assert isinstance(model, SevenNetMLIP)
    assert model.cutoff == 5.0 and model.n_embedding == 128
    assert len(model.species) == 89 and {1, 6, 8, 29} <= model.species
    sizes = {s: sum(p.numel() for _, p in model.parameters(s))
             for s in ("readout", "last_block", "all")}
    assert sizes["readout"] == 8256
    assert sizes["readout"] < sizes["last_block"] < sizes["all"]
    assert sizes["all"] == sum(p.numel() for p in model.module.parameters() if p.requires_grad)
    last = model.parameters("last_block")
    assert last and all(n.startswith("4_") and p.requires_grad for n, p in last)
    frozen = [n for n, p in model.module.named_parameters()
              if n.startswith("4_") and not p.requires_grad]
    assert frozen == ["4_convolution.denominator"]  # a constant, kept out of the subset


def test_backend_contract(model, atoms):
    """SevenNet's own calculator, F = -dE/dR, ∂θ by finite differences, rotations, embeddings,
    subsets, the force head's eval mode restored, the unknown-element error (Po)."""
    from sevenn.calculator import SevenNetCalculator

    check_mlip(model, atoms, reference=SevenNetCalculator("7net-0", device="cpu"),
               # the readout is bilinear in θ: along a line E and F are quadratic and central
               # differences are exact for any step, so a large step beats float32 rounding
               subsets={"readout": 0.5, ("4_self_interaction_2.*",): 3e-2},
               unknown_element=84)


def test_float64_rejected(model):
    with pytest.raises(ValueError, match="dtype=torch.float64 is not supported"):
        SevenNetMLIP(model.module, device="cpu", dtype=torch.float64)


def test_ntk_and_embedding_features(model, atoms):
    from skntk.transformers import EmbeddingTransformer, ForceNTKTransformer
    from tests.models.test_protocol_extras import check_ntk_rows

    blocks = check_ntk_rows(model, atoms[:1])  # the molecule: keeps CI time low
    assert blocks.kind == "joint" and blocks.rows.shape[0] == 1 + 3 * 5
    check_featurizer(ForceNTKTransformer(model, kind="joint", parameters="readout",
                                         force_rows="exact", n_features=32), atoms[:1],
                     rtol=1e-4)
    check_featurizer(EmbeddingTransformer(model), atoms, rtol=1e-4)


def test_force_row_routes_and_batch_independence(model, atoms):
    """forward = exact, probes = Zᵀ exact / √s, CountSketch = unsketched @ R, and rows that do
    not depend on the batch (one graph per structure or shared graphs)."""
    from tests.models.test_protocol_extras import check_routes

    check_routes(model, atoms[:2], "readout", rtol=2e-4)


def test_peak_memory_of_a_500_atom_cell_stays_within_4_gib():
    """Energy rows of every parameter (P = 842,440, CountSketch, working_memory=512 MiB) of a
    500-atom Cu cell in a fresh process: peak RSS (ru_maxrss, model and interpreter included)
    below 4 GiB, rows finite."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import resource, numpy as np, torch
        from ase.build import bulk
        from skntk.models import load
        from skntk.transformers import ForceNTKTransformer
        torch.set_num_threads(1)
        a = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((5, 5, 5))
        a.rattle(0.05, seed=0)
        assert len(a) == 500
        est = ForceNTKTransformer(load("sevennet-0", device="cpu"), kind="energy",
                                  parameters="all", n_features=256, working_memory=512,
                                  device="cpu", random_state=0).fit([a])
        G = est.transform([a])
        assert np.isfinite(G.rows).all() and G.rows.shape == (1, 256)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    peak = int(out.stdout.strip().splitlines()[-1])
    assert peak < 4 * 2 ** 30, f"peak RSS {peak / 2 ** 30:.2f} GiB"
