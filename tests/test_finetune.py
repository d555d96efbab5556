"""Tests of skntk.finetune: MLIPRegressor and refit_reference_energies on tiny EMT problems."""

import warnings

import numpy as np
import pytest
import torch
from ase.build import bulk, fcc111
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from skntk.finetune import (
    MLIPRegressor,
    predict_energies,
    predict_energies_forces,
    refit_reference_energies,
)
from skntk.models.builtin import BuiltinMLIP
from tests.builders import cu_slabs, emt_label, tiny_builtin

CU, PT = 29, 78


def small_model(species=(CU,)):
    return tiny_builtin(species, n_hidden=16)


def cupt_slabs(n, seed, n_pt=None):
    """Cu/Pt slabs of varied composition (``n_pt`` Pt atoms each, or k % 7 when None)."""
    rng = np.random.default_rng(seed)
    frames = []
    for k in range(n):
        a = fcc111("Cu", (2, 2, 2), vacuum=4.0)
        m = (k % 7) if n_pt is None else n_pt
        numbers = a.numbers.copy()
        numbers[rng.choice(len(a), size=m, replace=False)] = PT
        a.numbers = numbers
        a.rattle(0.05, seed=seed * 1000 + k)
        frames.append(emt_label(a))
    return frames


def label_energy(a):
    return float(a.calc.results["energy"])


def label_forces(a):
    return np.asarray(a.calc.results["forces"], float)


def counts(frames, elements):
    return np.array([[np.sum(a.numbers == z) for z in elements] for a in frames], float)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny networks: one thread is fastest and avoids oversubscribing a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def cu_data():
    return cu_slabs(15, 0), cu_slabs(6, 1)


# -- fine-tuning helps --------------------------------------------------------------------------
def test_finetuning_lowers_validation_loss_and_test_force_error(cu_data):
    train, test = cu_data
    model = small_model()
    reg = MLIPRegressor(model, parameters="all", epochs=15, learning_rate=1e-2, batch_size=4,
                        random_state=0).fit(train)
    h = reg.history_
    assert [e["epoch"] for e in h] == list(range(len(h))) and 2 <= len(h) <= 16
    assert all(np.isfinite(e["train_loss"]) and np.isfinite(e["val_loss"]) for e in h)
    assert reg.best_epoch_ > 0
    assert h[reg.best_epoch_]["val_loss"] < h[0]["val_loss"]
    assert h[reg.best_epoch_]["val_loss"] == min(e["val_loss"] for e in h)

    # held-out force MAE, computed plainly with both networks
    pre_f = [_calc_forces(a, model.calculator()) for a in test]
    pre_mae = np.mean(np.concatenate([np.abs(f - label_forces(a)).ravel()
                                      for a, f in zip(test, pre_f, strict=True)]))
    ft_f = reg.predict_forces(test)
    ft_mae = np.mean(np.concatenate([np.abs(f - label_forces(a)).ravel()
                                     for a, f in zip(test, ft_f, strict=True)]))
    assert ft_mae < 0.7 * pre_mae
    assert reg.score(test) == pytest.approx(-ft_mae, rel=1e-12)

    # the kept weights are those of the best epoch: recompute the validation loss of model_ on
    # the held-out split (one batch of 3 structures: per-atom energy MSE + force MSE)
    rng = np.random.RandomState(0)
    rng.randint(np.iinfo(np.int32).max)
    val = np.sort(rng.permutation(len(train))[:3])
    vf = [train[i] for i in val]
    e_pred, f_pred = predict_energies_forces(reg.model_, vf)
    le = np.mean([((e - label_energy(a)) / len(a)) ** 2 for e, a in zip(e_pred, vf, strict=True)])
    lf = np.mean(np.concatenate([(f - label_forces(a)).ravel() ** 2
                                 for f, a in zip(f_pred, vf, strict=True)]))
    assert le + lf == pytest.approx(h[reg.best_epoch_]["val_loss"], rel=1e-4)


def _calc_forces(a, calc):
    b = a.copy()
    b.calc = calc
    return b.get_forces()


def test_input_model_untouched(cu_data):
    train, _ = cu_data
    model = small_model()
    before = {k: v.detach().clone() for k, v in model.module.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.module.named_parameters()}
    refs = model.reference_energies()
    reg = MLIPRegressor(model, parameters="all", epochs=3, learning_rate=1e-2,
                        random_state=0).fit(train)
    after = model.module.state_dict()
    assert set(after) == set(before)
    for k, v in before.items():
        assert after[k].dtype == v.dtype, k
        assert torch.equal(after[k], v), k
    assert {n: p.requires_grad for n, p in model.module.named_parameters()} == flags
    assert model.reference_energies() == refs
    assert reg.model_ is not model and reg.model_.module is not model.module
    # the fine-tuned copy really changed (shift refit, and training kept some epoch > 0)
    assert reg.model_.reference_energies()[CU] != refs[CU]
    changed = [k for k, v in reg.model_.module.state_dict().items()
               if not torch.equal(v, before[k])]
    assert "shifts" in changed
    if reg.best_epoch_ > 0:
        assert any(k.startswith(("readout", "blocks", "embedding")) for k in changed)


def test_clone_and_params():
    model = small_model()
    reg = MLIPRegressor(model, parameters="all", epochs=7, learning_rate=3e-3, random_state=4)
    c = clone(reg)
    assert c.model is reg.model is model
    assert c.get_params() == reg.get_params()
    again = MLIPRegressor(**reg.get_params())
    assert again.get_params() == reg.get_params()
    assert reg.set_params(epochs=2, batch_size=3) is reg
    assert reg.get_params()["epochs"] == 2 and reg.get_params()["batch_size"] == 3
    assert reg.get_params()["model"] is model
    with pytest.raises(NotFittedError):
        c.predict(cu_slabs(1, 3))
    fitted = MLIPRegressor(model, epochs=1, random_state=0).fit(cu_slabs(3, 5))
    c2 = clone(fitted)
    assert not hasattr(c2, "model_") and c2.model is model


def test_determinism_and_seed_dependence(cu_data):
    train, test = cu_data
    model = small_model()

    def fit(seed):
        return MLIPRegressor(model, parameters="all", epochs=3, learning_rate=1e-2,
                             random_state=seed).fit(train)

    a, b, c = fit(0), fit(0), fit(1)
    ea, fa = a.predict(test, return_forces=True)
    eb, fb = b.predict(test, return_forces=True)
    assert np.array_equal(ea, eb)
    assert all(np.array_equal(x, y) for x, y in zip(fa, fb, strict=True))
    strip = [[(e["train_loss"], e["val_loss"]) for e in r.history_] for r in (a, b, c)]
    assert strip[0] == strip[1]
    assert a.reference_shifts_ == b.reference_shifts_
    # another seed holds out other structures: epoch-0 losses (before any training) differ
    assert strip[2][0] != strip[0][0]


def test_train_and_validation_indices_partition_the_structures(cu_data):
    """The split fit makes is stored (ForceUncertainty.from_regressor calibrates on it)."""
    train, _ = cu_data
    reg = MLIPRegressor(small_model(), epochs=0, validation_fraction=0.2,
                        random_state=0).fit(train)
    tr, val = reg.train_indices_, reg.validation_indices_
    assert len(val) == 3 and len(tr) == 12
    assert sorted(tr.tolist() + val.tolist()) == list(range(15))
    assert np.all(np.diff(tr) > 0) and np.all(np.diff(val) > 0)
    one = MLIPRegressor(small_model(), epochs=0, random_state=0).fit(train[:1])
    assert one.train_indices_.tolist() == [0] and one.validation_indices_.size == 0


# -- reference-energy refit -----------------------------------------------------------------------
def test_refit_recovers_per_element_offsets():
    frames = cupt_slabs(10, 2)
    elements = [CU, PT]
    C = counts(frames, elements)
    assert np.linalg.matrix_rank(C) == 2
    offsets = np.array([0.37, -1.2])
    energies = np.array([label_energy(a) for a in frames])
    shifted = energies + C @ offsets

    model = small_model((PT, CU))
    refs0 = model.reference_energies()
    e0, f0 = predict_energies_forces(model, frames)
    np.testing.assert_allclose(predict_energies(model, frames), e0, rtol=1e-12)
    m1, m2 = model.copy(), model.copy()
    d1 = refit_reference_energies(m1, frames, energies)
    d2 = refit_reference_energies(m2, frames, shifted, predicted=e0)
    assert model.reference_energies() == refs0  # refit on copies only
    r1, r2 = m1.reference_energies(), m2.reference_energies()
    assert set(d1) == {CU, PT}
    for k, z in enumerate(elements):
        assert r1[z] - refs0[z] == pytest.approx(d1[z], rel=1e-12, abs=1e-12)
        assert r2[z] - refs0[z] == pytest.approx(d2[z], rel=1e-12, abs=1e-12)
        assert r2[z] - r1[z] == pytest.approx(offsets[k], rel=2e-5)

    # the documented ridge solve, by augmented least squares (an independent route)
    resid = energies - e0
    lam = 1e-6 * np.trace(C.T @ C) / 2
    aug = np.vstack([C, np.sqrt(lam) * np.eye(2)])
    ref_delta = np.linalg.lstsq(aug, np.concatenate([resid, np.zeros(2)]), rcond=None)[0]
    np.testing.assert_allclose([d1[z] for z in elements], ref_delta, rtol=1e-9, atol=1e-9)

    # only the per-element shifts move: energies change by C @ delta, forces do not
    e1, f1 = predict_energies_forces(m1, frames)
    np.testing.assert_allclose(e1 - e0, C @ ref_delta, rtol=1e-9, atol=1e-6)
    for x, y in zip(f0, f1, strict=True):
        np.testing.assert_array_equal(x, y)
    # and they fit the labels (up to what the network's residual shape cannot explain)
    assert np.mean(np.abs(e1 - energies)) < np.mean(np.abs(e0 - energies))


def test_refit_collinear_compositions_min_norm():
    frames = cupt_slabs(6, 3, n_pt=2)  # all Cu6Pt2: counts of rank 1
    elements = [CU, PT]
    C = counts(frames, elements)
    assert np.linalg.matrix_rank(C) == 1
    c = C[0]
    energies = np.array([label_energy(a) for a in frames])
    model = small_model((PT, CU))
    e0, _ = predict_energies_forces(model, frames)
    m = model.copy()
    d = refit_reference_energies(m, frames, energies)
    delta = np.array([d[z] for z in elements])
    assert np.all(np.isfinite(delta))
    # min-norm change: proportional to the composition vector
    assert delta[0] / delta[1] == pytest.approx(c[0] / c[1], rel=1e-9)
    # fitted energies match the labels' mean offset (ridge 1e-6 relative)
    e1, _ = predict_energies_forces(m, frames)
    mean_r = np.mean(energies - e0)
    assert abs(np.mean(energies - e1)) <= 1e-5 * abs(mean_r) + 1e-8
    # an offset added to the labels moves the references by its projection on c
    offsets = np.array([0.37, -1.2])
    m2 = model.copy()
    d2 = refit_reference_energies(m2, frames, energies + C @ offsets, predicted=e0)
    change = np.array([d2[z] - d[z] for z in elements])
    np.testing.assert_allclose(change, c * (c @ offsets) / (c @ c), rtol=1e-5)


def test_unlabelled_elements_keep_reference_and_warn():
    model = small_model((PT, CU))
    refs = model.reference_energies()
    reg = MLIPRegressor(model, epochs=1, random_state=0).fit(cu_slabs(5, 4))
    assert reg.elements_ == frozenset({CU})
    assert set(reg.reference_shifts_) == {CU}
    new = reg.model_.reference_energies()
    assert new[PT] == refs[PT]
    assert new[CU] == pytest.approx(refs[CU] + reg.reference_shifts_[CU], rel=1e-12)
    mixed = cupt_slabs(2, 5, n_pt=3)
    with pytest.warns(UserWarning, match="Pt"):
        e = reg.predict(mixed)
    assert e.shape == (2,) and np.all(np.isfinite(e))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reg.predict(cu_slabs(2, 6))  # only labelled elements: no warning
    # without the refit there is nothing to warn about
    plain = MLIPRegressor(model, epochs=0, refit_shifts=False, random_state=0).fit(cu_slabs(3, 4))
    assert plain.reference_shifts_ == {}
    assert plain.model_.reference_energies() == refs
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain.predict(mixed)


def test_energies_of_compositions_the_labels_do_not_fix_warn():
    """Labels of one composition fix the sum of its elements' references, not each one: predict
    warns for a structure whose element counts are not a combination of the labelled ones (a
    plain rank test written here), and is silent for those that are; score (forces) is silent."""
    model = small_model((PT, CU))
    reg = MLIPRegressor(model, epochs=1, random_state=0).fit(cupt_slabs(5, 3, n_pt=2))
    elements, basis, formulas = reg.compositions_
    assert elements == [CU, PT] and basis.shape == (1, 2) and formulas == ["Cu6Pt2"]
    other = cupt_slabs(3, 7, n_pt=3)  # Cu5Pt3: outside the span of (6, 2)
    same = cupt_slabs(2, 8, n_pt=2)
    for frames, outside in ((other, True), (same, False), (same + other, True)):
        C = np.vstack([counts(cupt_slabs(1, 3, n_pt=2), elements), counts(frames, elements)])
        assert (np.linalg.matrix_rank(C) > 1) == outside  # the reference test
    with pytest.warns(UserWarning, match=r"X\[2\] \(Cu5Pt3\) and 2 more: a composition that is "
                      r"not a combination of the compositions .*\(Cu6Pt2\)"):
        reg.predict(same + other)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reg.predict(same)
        reg.score(same + other)
    two = MLIPRegressor(model, epochs=1, random_state=0).fit(
        cupt_slabs(3, 3, n_pt=2) + cupt_slabs(3, 4, n_pt=3))  # rank 2: every Cu/Pt composition
    assert two.compositions_[1].shape == (2, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        two.predict(cupt_slabs(2, 9, n_pt=1))


# -- fixed atoms ----------------------------------------------------------------------------------
def _with_fixed(frames, garbage, how="array"):
    out = []
    for a in frames:
        fixed = a.get_tags() == 2  # bottom layer of the 2-layer slab
        f = label_forces(a).copy()
        if garbage:
            f[fixed] = 1e3
        b = a.copy()
        if how == "array":
            b.arrays["fixed"] = fixed.astype(int)
        else:
            b.set_constraint(FixAtoms(mask=fixed))
        b.calc = SinglePointCalculator(b, energy=label_energy(a), forces=f)
        out.append(b)
    return out


def test_fixed_atoms_excluded_from_loss_and_score(cu_data):
    train, test = cu_data
    model = small_model()
    kw = dict(parameters="all", epochs=4, learning_rate=1e-2, random_state=0)
    bad = MLIPRegressor(model, **kw).fit(_with_fixed(train, garbage=True))
    good = MLIPRegressor(model, **kw).fit(_with_fixed(train, garbage=False))
    losses = [(e["train_loss"], e["val_loss"]) for e in bad.history_]
    assert np.all(np.isfinite(losses)) and max(max(x) for x in losses) < 100
    # the garbage never enters the loss: the same run as with sensible fixed-atom forces
    assert losses == [(e["train_loss"], e["val_loss"]) for e in good.history_]
    np.testing.assert_array_equal(bad.predict(test), good.predict(test))

    for how in ("array", "constraint"):
        fixed_test = _with_fixed(test, garbage=True, how=how)
        pred = bad.predict_forces(fixed_test)
        err = np.concatenate([np.abs(f - label_forces(a))[a.get_tags() != 2].ravel()
                              for f, a in zip(pred, fixed_test, strict=True)])
        assert err.size == 3 * 4 * len(test)
        assert bad.score(fixed_test) == pytest.approx(-np.mean(err), rel=1e-12)
        assert bad.score(fixed_test) > -10  # not polluted by the 1e3 labels


# -- prediction API -------------------------------------------------------------------------------
def test_predict_shapes_units_and_inputs(tmp_path):
    train = cu_slabs(4, 7)
    test = [emt_label(bulk("Cu", "fcc", a=3.6, cubic=True)), cu_slabs(1, 8)[0]]
    test[0].rattle(0.05, seed=1)
    test[0] = emt_label(test[0])
    reg = MLIPRegressor(small_model(), epochs=2, random_state=0).fit(train)
    e = reg.predict(test)
    assert isinstance(e, np.ndarray) and e.shape == (2,) and e.dtype == np.float64
    e2, f2 = reg.predict(test, return_forces=True)
    np.testing.assert_array_equal(e, e2)
    f = reg.predict_forces(test)
    assert [x.shape for x in f] == [(4, 3), (8, 3)]
    assert all(x.dtype == np.float64 for x in f)
    for x, y in zip(f, f2, strict=True):
        np.testing.assert_array_equal(x, y)
    # the same numbers as the fine-tuned handle's ASE calculator (eV, eV/Å)
    for a, ei, fi in zip(test, e, f, strict=True):
        b = a.copy()
        b.calc = reg.model_.calculator()
        assert b.get_potential_energy() == pytest.approx(ei, rel=1e-6, abs=1e-6)
        np.testing.assert_allclose(b.get_forces(), fi, rtol=1e-5, atol=1e-6)
    # forces are minus the energy gradient: a finite difference along one coordinate
    a = test[1].copy()
    h = 1e-3
    a.positions[0, 2] += h
    ep = reg.predict([a])[0]
    a.positions[0, 2] -= 2 * h
    em = reg.predict([a])[0]
    assert -(ep - em) / (2 * h) == pytest.approx(f[1][0, 2], abs=2e-3)
    s = reg.score(test)
    assert isinstance(s, float) and s < 0
    # one Atoms and a file path are accepted
    assert reg.predict(test[1]).shape == (1,)
    path = tmp_path / "t.extxyz"
    import ase.io

    ase.io.write(path, test, format="extxyz")
    np.testing.assert_allclose(reg.predict(path), e, rtol=1e-6)  # text round trip


def test_unknown_element_raises():
    frames = cu_slabs(3, 9)
    pt = fcc111("Pt", (2, 2, 2), vacuum=4.0)
    frames.append(emt_label(pt))
    with pytest.raises(ValueError, match="Pt"):
        MLIPRegressor(small_model(), epochs=1, random_state=0).fit(frames)
    reg = MLIPRegressor(small_model(), epochs=1, random_state=0).fit(frames[:3])
    with pytest.raises(ValueError, match="Pt"):
        reg.predict(frames[3:])


def test_without_validation_split_kept_weights_never_worse():
    """One structure: no validation split, the training loss decides which weights are kept.

    With a learning rate at which Adam oscillates, the kept weights must still be at least as
    good on the training structure as the refitted pretrained ones (epoch 0)."""
    train = cu_slabs(1, 0)
    a = train[0]

    def loss(reg):
        e, f = reg.predict(train, return_forces=True)
        return ((e[0] - label_energy(a)) / len(a)) ** 2 + np.mean((f[0] - label_forces(a)) ** 2)

    model = small_model()
    base = loss(MLIPRegressor(model, epochs=0, random_state=0).fit(train))
    for lr in (0.0511, 0.0585, 0.0669):
        reg = MLIPRegressor(model, parameters="all", epochs=12, patience=20, learning_rate=lr,
                            random_state=0).fit(train)
        assert np.isnan(reg.history_[0]["val_loss"])
        kept = loss(reg)
        assert kept <= base * (1 + 1e-6), (lr, reg.best_epoch_, kept, base)
        if reg.best_epoch_ == 0:
            assert kept == pytest.approx(base, rel=1e-12)


class _LossyCopyMLIP(BuiltinMLIP):
    """A handle whose copy does not predict what the original does (state outside its weights)."""

    def copy(self):
        new = super().copy()
        with torch.no_grad():
            new.module.readout[-1].bias.add_(0.5)
        return new


def test_fit_refuses_a_copy_that_predicts_differently(cu_data):
    train, _ = cu_data
    model = _LossyCopyMLIP(module=small_model().module)
    with pytest.raises(RuntimeError, match=r"changed its prediction for X\[0\] \(Cu"):
        MLIPRegressor(model, epochs=1, random_state=0).fit(train)
