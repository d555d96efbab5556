"""MLIPRegressor on every backend: SevenNet-0, CHGNet 0.3.0 (main venv) and MACE (its own venv).

Tiny: three EMT-labelled Cu cells, one epoch. Checks the contract, not accuracy: the user's model is
unchanged, the element reference of Cu absorbs the label offset, the fine-tuned handle saves in its
backend's format and loads back with the same predictions, and its ASE calculator agrees.
"""

import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.calculators.emt import EMT

from skntk.finetune import MLIPRegressor, predict_energies, predict_energies_forces
from skntk.models import load

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def _frames(n=3, offset=-3.0):
    out = []
    for k in range(n):
        a = bulk("Cu", "fcc", a=3.6, cubic=True)
        a.rattle(0.05, seed=k)
        a.calc = EMT()
        e, f = a.get_potential_energy(), a.get_forces()
        from ase.calculators.singlepoint import SinglePointCalculator

        a.calc = SinglePointCalculator(a, energy=e + offset * len(a), forces=f)
        out.append(a)
    return out


def _mace_handle(tmp_path):
    mace_test = pytest.importorskip("tests.models.test_mace")
    path = tmp_path / "tiny.model"
    torch.save(mace_test.build_tiny_mace(), path)
    return load(str(path), device="cpu")


@pytest.fixture(params=["sevennet-0", "chgnet-0.3.0", "mace"])
def handle(request, tmp_path):
    if request.param == "mace":
        pytest.importorskip("mace", reason="needs the mace extra (own venv): make test-mace")
        return _mace_handle(tmp_path)
    pytest.importorskip("sevenn" if "sevennet" in request.param else "chgnet",
                        reason=f"needs the {request.param.split('-')[0]} extra")
    return load(request.param, device="cpu")


def test_finetune_contract(handle, tmp_path):
    frames = _frames()
    before = {k: v.detach().clone() for k, v in handle.module.state_dict().items()}
    refs = handle.reference_energies()
    e_model = predict_energies_forces(handle, frames)[0]
    # energies alone (no backward, as the reference refit uses them) are the same energies
    np.testing.assert_allclose(predict_energies(handle, frames), e_model, rtol=1e-6, atol=1e-6)
    reg = MLIPRegressor(handle, epochs=1, batch_size=2, validation_fraction=0.0,
                        random_state=0).fit(frames)
    # the user's network is untouched
    after = handle.module.state_dict()
    assert set(after) == set(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    assert handle.reference_energies() == refs
    # the Cu reference moved by the mean per-atom residual of the labels (one element)
    e_lab = np.array([a.get_potential_energy() for a in frames])
    n = len(frames[0])
    assert reg.reference_shifts_[29] == pytest.approx(np.mean((e_lab - e_model) / n), rel=1e-4)
    e_pred = reg.predict(frames)
    assert np.max(np.abs(e_pred - e_lab) / n) < 0.3
    # save in the backend's format, load back, same predictions; the ASE calculator agrees
    path = reg.model_.save(tmp_path / {"SevenNetMLIP": "m.pth", "CHGNetMLIP": "m.pth.tar",
                                       "MACEMLIP": "m.model"}[type(handle).__name__])
    again = load(path, device="cpu")
    reg2 = MLIPRegressor(again, epochs=0, refit_shifts=False).fit(frames[:2])
    np.testing.assert_allclose(reg2.predict(frames), e_pred, rtol=0, atol=1e-4)
    atoms = frames[0].copy()
    atoms.calc = reg.model_.calculator()
    assert atoms.get_potential_energy() == pytest.approx(e_pred[0], abs=1e-4)
