"""Tests of skntk.uncertainty: ForceUncertainty, its calculator and its MD observer.

Tiny built-in model (float64), methanol frames labelled by EMT; everything runs in seconds.
"""

import itertools
import math
import warnings

import joblib
import numpy as np
import pytest
import torch
from ase import units
from ase.build import molecule
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.md.verlet import VelocityVerlet
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.utils import estimator_checks as ec

import skntk
from skntk.finetune import MLIPRegressor, predict_energies_forces
from skntk.transformers import ForceNTKTransformer
from skntk.uncertainty import (
    ForceUncertainty,
    UncertaintyCalculator,
    UncertaintyObserver,
    UncertaintyThresholdExceeded,
    conformal_quantile,
)
from tests.builders import emt_label, tiny_builtin

SIGMA2 = 1e-3
FIXTURES = [HealthCheck.function_scoped_fixture]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_model(seed=0):
    return tiny_builtin((1, 6, 7, 8), cutoff=3.0, n_basis=4, n_readout=4, dtype=torch.float64,
                        random_state=seed)


def frames(n, seed, name="CH3OH", amp=(0.02, 0.12)):
    """``n`` rattled copies of a molecule, rattle amplitudes spread over ``amp`` (Å)."""
    out = []
    for k, s in enumerate(np.linspace(*amp, n)):
        a = molecule(name)
        a.rattle(float(s), seed=seed * 1000 + k)
        out.append(emt_label(a))
    return out


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture(scope="module")
def data():
    return {"train": frames(6, 0, amp=(0.02, 0.05)), "cal": frames(14, 1),
            "test": frames(4, 2)}


def energy_feat(model):
    return ForceNTKTransformer(model, kind="energy", n_features=16, random_state=0)


def exact_feat(model):
    return ForceNTKTransformer(model, kind="force", force_rows="exact", n_features=16,
                               random_state=0)


@pytest.fixture(scope="module")
def fitted(model, data):
    return ForceUncertainty(energy_feat(model), model=model, sigma2=SIGMA2).fit(
        data["train"], data["cal"])


@pytest.fixture(scope="module")
def fitted_atoms(model, data):
    return ForceUncertainty(exact_feat(model), model=model, sigma2=SIGMA2).fit(
        data["train"], data["cal"])


# -- plain reference implementations --------------------------------------------------------------
def reference_pv(feat, train, X):
    """Kernel-space GP posterior variance per row, ``K_xx − K_xT (K_TT + σ² I)⁻¹ K_Tx`` with the
    kernel scaled so that the mean train diagonal is 1, averaged over each structure's rows."""
    T = feat.transform(train)
    G = feat.transform(X)
    c2 = T.n_rows / np.sum(T.rows**2)
    Ktt = c2 * T.rows @ T.rows.T
    out = []
    for i in range(len(X)):
        g = G.rows[G.offsets[i]:G.offsets[i + 1]]
        kxt = c2 * g @ T.rows.T
        S = c2 * g @ g.T - kxt @ np.linalg.solve(Ktt + SIGMA2 * np.eye(len(Ktt)), kxt.T)
        out.append(np.trace(S) / len(g))
    return np.array(out)


def reference_nnls_log_fit(D, e):
    """``min ‖D β − log e‖²`` with the slopes (columns 1..) non-negative, by enumerating active
    sets with ``np.linalg.lstsq``; returns β and ``s² = RSS / (n − p)``."""
    y = np.log(e)
    best = None
    p = D.shape[1]
    for free in itertools.product([True, False], repeat=p - 1):
        cols = [0] + [j + 1 for j in range(p - 1) if free[j]]
        beta_sub = np.linalg.lstsq(D[:, cols], y, rcond=None)[0]
        if np.any(beta_sub[1:] < 0):
            continue
        beta = np.zeros(p)
        beta[cols] = beta_sub
        rss = float(np.sum((y - D @ beta) ** 2))
        if best is None or rss < best[1] - 1e-12:
            best = (beta, rss)
    return best[0], best[1] / (D.shape[0] - p)


def true_force_mae(model, X):
    _, fhat = predict_energies_forces(model, X)
    return np.array([np.abs(f - a.get_forces()).mean() for f, a in zip(fhat, X, strict=True)])


# -- the calibration map and the conformal bound --------------------------------------------------
def test_calibration_map_matches_reference(fitted, model, data):
    cal, test = data["cal"], data["test"]
    feat = fitted.featurizer_
    pv = reference_pv(feat, data["train"], cal)
    _, fhat = predict_energies_forces(model, cal)
    fmag = np.array([np.linalg.norm(f, axis=1).mean() for f in fhat])
    err = true_force_mae(model, cal)
    D = np.column_stack([np.ones(len(cal)), np.log(pv), np.log(fmag)])
    beta, s2 = reference_nnls_log_fit(D, err)
    np.testing.assert_allclose(fitted.calibration_errors_, err, rtol=1e-10)
    np.testing.assert_allclose(fitted.coef_, beta, rtol=1e-6, atol=1e-8)
    assert fitted.residual_var_ == pytest.approx(s2, rel=1e-6)
    pred_cal = np.exp(D @ beta + s2 / 2)
    np.testing.assert_allclose(fitted.calibration_predictions_, pred_cal, rtol=1e-6)
    # new structures: same map of their own PV and |F|
    pv_t = reference_pv(feat, data["train"], test)
    _, fhat_t = predict_energies_forces(model, test)
    fmag_t = np.array([np.linalg.norm(f, axis=1).mean() for f in fhat_t])
    expected = np.exp(beta[0] + beta[1] * np.log(pv_t) + beta[2] * np.log(fmag_t) + s2 / 2)
    np.testing.assert_allclose(fitted.predict(test), expected, rtol=1e-6)
    # the 90 % bound: the ceil((n + 1) 0.9)-th smallest score, by hand
    scores = sorted(err / pred_cal)
    n = len(scores)
    q = scores[math.ceil((n + 1) * 0.9) - 1]
    np.testing.assert_allclose(fitted.predict_interval(test, coverage=0.9), q * expected,
                               rtol=1e-6)


def test_log_fit_clips_a_negative_slope_to_zero():
    """A monotone map: a slope the data would make negative is 0, and the rest is the least
    squares fit without that input."""
    from skntk.uncertainty import _fit_log_map

    rng = np.random.default_rng(0)
    x1, x2 = rng.normal(size=50), rng.normal(size=50)
    D = np.column_stack([np.ones(50), x1, x2])
    e = np.exp(0.3 + 0.8 * x1 - 0.5 * x2 + 0.01 * rng.normal(size=50))
    coef, s2 = _fit_log_map(D, e)
    ref, ref_s2 = reference_nnls_log_fit(D, e)
    assert coef[2] == 0.0
    np.testing.assert_allclose(coef, ref, atol=1e-9)
    assert s2 == pytest.approx(ref_s2)
    plain = np.linalg.lstsq(D[:, :2], np.log(e), rcond=None)[0]
    np.testing.assert_allclose(coef[:2], plain, atol=1e-9)


def test_a_flat_map_warns_that_it_does_not_rank(fitted, data):
    """Errors that fall as both inputs grow: every slope clips to 0, every prediction is the
    same, and the user is told (a constant error bar bounds but does not rank)."""
    est = clone(fitted).fit_posterior(data["train"])
    rng = np.random.default_rng(0)
    log_pv, log_f = rng.normal(size=20), rng.normal(size=20)
    falling = np.exp(-0.5 - 0.7 * log_pv - 0.4 * log_f + 0.05 * rng.normal(size=20))
    with pytest.warns(UserWarning, match=r"20 calibration structures show no increase of the "
                      r"force error with log PV or log \|F̂\|.*does not rank"):
        est.calibrate_pairs(log_pv, log_f, falling)
    assert np.all(est.coef_[1:] == 0)
    pred = est.predict(data["test"])
    np.testing.assert_allclose(pred, pred[0])
    rising = np.exp(-0.5 + 0.7 * log_pv + 0.05 * rng.normal(size=20))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a map with a positive slope ranks: no warning
        est.calibrate_pairs(log_pv, log_f, rising)
    assert est.coef_[1] > 0


def test_conformal_quantile_by_hand():
    s = [0.5, 2.0, 1.0, 3.0, 1.5, 0.7, 2.5, 0.9, 1.2, 4.0]
    # n = 10, coverage 0.9: ceil(11 * 0.9) = 10th smallest; 0.8: ceil(8.8) = 9th
    assert conformal_quantile(s, 0.9) == 4.0
    assert conformal_quantile(s, 0.8) == 3.0
    assert conformal_quantile(s, 0.5) == 1.5  # ceil(5.5) = 6th
    assert conformal_quantile(s, 0.95) == math.inf  # ceil(10.45) = 11 > n
    with pytest.raises(ValueError, match="coverage must be in"):
        conformal_quantile(s, 1.0)


@pytest.mark.parametrize("n, coverage", [(9, 0.9), (19, 0.9), (30, 0.8)])
def test_conformal_coverage_on_exchangeable_data(n, coverage):
    """Scores drawn i.i.d. (exchangeable): the bound covers a new score with probability
    ceil((n + 1) c) / (n + 1), which is >= c and < c + 1 / (n + 1)."""
    rng = np.random.default_rng(1)
    trials = 20000
    cal = rng.lognormal(size=(trials, n))
    new = rng.lognormal(size=trials)
    k = math.ceil((n + 1) * coverage)
    q = np.array([conformal_quantile(row, coverage) for row in cal[:200]])
    np.testing.assert_array_equal(q, np.sort(cal[:200], axis=1)[:, k - 1])
    covered = new <= np.sort(cal, axis=1)[:, k - 1]
    expected = k / (n + 1)
    assert expected >= coverage
    assert abs(covered.mean() - expected) < 4 * math.sqrt(expected * (1 - expected) / trials)


def test_predict_interval_warns_when_too_few_for_the_coverage(fitted, data):
    with pytest.warns(UserWarning, match="coverage=0.95 needs at least 19 calibration"):
        upper = fitted.predict_interval(data["test"], coverage=0.95)
    assert np.all(np.isinf(upper))
    with pytest.warns(UserWarning, match="coverage=0.94 needs at least 16 calibration"):
        fitted.predict_interval(data["test"], coverage=0.94)  # n = 14
    assert conformal_quantile(np.arange(9.0), 0.9) == 8.0  # 9 scores suffice for 90 %


def test_energy_error_per_atom(fitted, data):
    e = fitted.predict_energy(data["test"])
    assert e.shape == (4,) and np.all(e > 0) and fitted.energy_coef_.shape == (3,)


@pytest.mark.parametrize("inputs, n_coef", [("pv", 2), ("force", 2), ("pv+force", 3)])
def test_inputs(model, data, inputs, n_coef):
    est = ForceUncertainty(energy_feat(model), model=model, inputs=inputs).fit(
        data["train"], data["cal"])
    assert est.coef_.shape == (n_coef,) and np.all(est.coef_[1:] >= 0)
    assert (est.posterior_ is None) == (inputs == "force")
    pred = est.predict(data["test"])
    assert pred.shape == (4,) and np.all(np.isfinite(pred)) and np.all(pred > 0)


def test_default_featurizer_and_export(model, data):
    assert skntk.ForceUncertainty is ForceUncertainty and "ForceUncertainty" in skntk.__all__
    est = ForceUncertainty(model=model).fit(data["train"], data["cal"])
    assert est.featurizer_.kind == "energy" and est.featurizer_.model_ is model
    # a featuriser without a model gets the judged one
    est = ForceUncertainty(ForceNTKTransformer(n_features=8), model=model).fit(
        data["train"], data["cal"])
    assert est.featurizer_.model_ is model
    # a featuriser's model is the judged one when model=None
    est = ForceUncertainty(energy_feat(model)).fit(data["train"], data["cal"])
    assert est.model_ is model


# -- per atom -------------------------------------------------------------------------------------
def test_per_atom_errors(fitted_atoms, data):
    test = data["test"]
    err, atoms_err = fitted_atoms.predict(test, return_atoms=True)
    assert fitted_atoms.per_atom_ and fitted_atoms.atom_coef_.shape == (3,)
    assert [len(a) for a in atoms_err] == [len(a) for a in test]
    assert all(np.all(a > 0) for a in atoms_err)
    np.testing.assert_allclose(err, fitted_atoms.predict(test))


def test_predict_reuses_the_models_forces_when_given(fitted_atoms, model, data):
    from skntk.finetune import predict_energies_forces

    test = data["test"]
    e, f = predict_energies_forces(model, test)
    err, atoms_err = fitted_atoms.predict(test, return_atoms=True)
    err2, atoms_err2 = fitted_atoms.predict(test, return_atoms=True, forces=f, energies=e)
    np.testing.assert_array_equal(err2, err)  # the same numbers, without running the model
    for a, b in zip(atoms_err2, atoms_err, strict=True):
        np.testing.assert_array_equal(a, b)
    # other forces give another error bar: they are used, not recomputed
    assert not np.array_equal(fitted_atoms.predict(test, forces=[3 * x for x in f], energies=e),
                              err)
    with pytest.raises(ValueError, match="forces and energies together"):
        fitted_atoms.predict(test, forces=f)
    with pytest.raises(ValueError, match="3 forces and 4 energies given for 4 structures"):
        fitted_atoms.predict(test, forces=f[:3], energies=e)
    with pytest.raises(ValueError, match=r"forces\[1\] has shape \(5, 3\); structure 1 "
                                         r"\(CH4O\) needs \(6, 3\)"):
        fitted_atoms.predict(test, forces=[f[0], f[1][:5]] + f[2:], energies=e)


def test_map_inputs_then_predict_from_inputs_is_predict(fitted_atoms, fitted, model, data):
    """predict's two public halves: the inputs (log PV from the reference posterior formula,
    log mean |F̂| over free atoms written plainly), then the map; per-atom output refused where
    the rows have no per-atom layout, and unseen elements refused by map_inputs too."""
    test = data["test"]
    inputs = fitted_atoms.map_inputs(test)
    err, atoms_err = fitted_atoms.predict_from_inputs(inputs, return_atoms=True)
    ref_err, ref_atoms = fitted_atoms.predict(test, return_atoms=True)
    np.testing.assert_array_equal(err, ref_err)
    for a, b in zip(atoms_err, ref_atoms, strict=True):
        np.testing.assert_array_equal(a, b)
    _, f = predict_energies_forces(model, test)
    np.testing.assert_allclose(inputs["log_f"],
                               np.log([np.linalg.norm(x, axis=1).mean() for x in f]), rtol=1e-10)
    pv = reference_pv(fitted_atoms.featurizer_, data["train"], test)
    np.testing.assert_allclose(np.exp(inputs["log_pv"]), pv, rtol=1e-5)
    with pytest.raises(ValueError, match="return_atoms=True needs per-atom rows.*rows of kind "
                                         "'energy', which have no per-atom layout"):
        fitted.predict_from_inputs(fitted.map_inputs(test), return_atoms=True)
    with pytest.raises(ValueError, match=r"X\[0\] \(H3N\) contains N \(Z=7\), which the "
                       r"posterior never saw"):
        fitted.map_inputs([molecule("NH3")])


def test_joint_exact_rows_are_per_atom(model, data):
    feat = ForceNTKTransformer(model, kind="joint", force_rows="exact", n_features=16,
                               random_state=0)
    est = ForceUncertainty(feat, model=model).fit(data["train"], data["cal"])
    _, atoms_err = est.predict(data["test"][:1], return_atoms=True)
    assert atoms_err[0].shape == (6,)


@pytest.mark.parametrize("feat, what", [
    (lambda m: ForceNTKTransformer(m, kind="joint", force_rows="probes", n_probes=2,
                                   n_features=16), "joint rows by force_rows='probes'"),
    (energy_feat, "rows of kind 'energy'"),
])
def test_per_atom_refused_without_per_atom_rows(model, data, feat, what):
    est = ForceUncertainty(feat(model), model=model).fit(data["train"], data["cal"])
    with pytest.raises(ValueError, match=r"return_atoms=True needs per-atom rows: a featuriser "
                       r"with kind='force' or 'joint' and force_rows='exact'.*" + what):
        est.predict(data["test"], return_atoms=True)


# -- refusals -------------------------------------------------------------------------------------
def test_refuses_a_small_calibration_set(model, data):
    with pytest.raises(ValueError, match=r"calibration_atoms has 9 structures; ForceUncertainty "
                       r"needs at least min_calibration=10"):
        ForceUncertainty(model=model).fit(data["train"], data["cal"][:9])
    with pytest.raises(ValueError, match="ForceUncertainty.fit needs calibration_atoms"):
        ForceUncertainty(model=model).fit(data["train"])
    # the minimum is a parameter (at least 4)
    ForceUncertainty(model=model, min_calibration=5).fit(data["train"], data["cal"][:5])
    with pytest.raises(ValueError, match="min_calibration"):
        ForceUncertainty(model=model, min_calibration=3).fit(data["train"], data["cal"])


def test_refuses_a_featurizer_of_another_model(model, data):
    other = make_model(seed=1)
    with pytest.raises(ValueError, match=r"the featuriser computes features of another model "
                       r"than the one being judged \(BuiltinMLIP with weights [0-9a-f]{12}"):
        ForceUncertainty(energy_feat(other), model=model).fit(data["train"], data["cal"])
    # a distinct handle with identical weights is the same model
    twin = make_model(seed=0)
    ForceUncertainty(energy_feat(twin), model=model).fit(data["train"], data["cal"])


def test_refuses_elements_the_posterior_never_saw(fitted, model, data):
    X = data["test"][:2] + [emt_label(molecule("NH3"))]
    with pytest.raises(ValueError, match=r"X\[2\] \(H3N\) contains N \(Z=7\), which the "
                       r"posterior never saw \(its training structures contain Z=\[1, 6, 8\]\)"):
        fitted.predict(X)
    cal = data["cal"][:11] + [emt_label(molecule("NH3"))]
    with pytest.raises(ValueError, match=r"calibration_atoms\[11\] \(H3N\) contains N"):
        ForceUncertainty(energy_feat(model)).fit(data["train"], cal)


def test_refuses_unlabelled_calibration(model, data):
    cal = list(data["cal"])
    no_f = cal[3].copy()
    no_f.calc = SinglePointCalculator(no_f, energy=-1.0)
    with pytest.raises(ValueError, match=r"calibration_atoms\[3\] \(CH4O\) has no force label"):
        ForceUncertainty(energy_feat(model)).fit(data["train"], cal[:3] + [no_f] + cal[4:])
    with pytest.raises(ValueError, match=r"calibration_atoms\[0\] \(CH4O\) has no energy label"):
        ForceUncertainty(energy_feat(model)).fit(data["train"], [cal[0].copy()] + cal[1:])


def test_refuses_without_a_model(data):
    with pytest.raises(ValueError, match="needs the model being judged: pass model="):
        ForceUncertainty().fit(data["train"], data["cal"])


def test_not_fitted(model, data):
    with pytest.raises(NotFittedError):
        ForceUncertainty(model=model).predict(data["test"])
    with pytest.raises(NotFittedError):
        ForceUncertainty(model=model).calculator()


# -- scikit-learn conventions, persistence --------------------------------------------------------
@pytest.mark.parametrize("check", [
    ec.check_no_attributes_set_in_init, ec.check_parameters_default_constructible,
    ec.check_get_params_invariance, ec.check_set_params, ec.check_estimator_cloneable,
    ec.check_estimator_repr, ec.check_valid_tag_types,
    ec.check_do_not_raise_errors_in_init_or_set_params,
])
def test_sklearn_checks_without_numeric_input(check, model):
    check("ForceUncertainty", ForceUncertainty(energy_feat(model), model=model))


def test_clone_and_params(fitted, model):
    c = clone(fitted)
    params = c.get_params(deep=False)
    assert params["model"] is model and set(params) == {
        "featurizer", "model", "inputs", "sigma2", "min_calibration", "batch_size",
        "working_memory"}
    assert not hasattr(c, "coef_")
    assert c.get_params()["featurizer__n_features"] == 16
    c.set_params(inputs="pv", featurizer__n_features=8)
    assert c.inputs == "pv" and fitted.inputs == "pv+force"
    assert fitted.featurizer.n_features == 16


def test_fit_leaves_parameters_unchanged(model, data):
    feat = energy_feat(model)
    est = ForceUncertainty(feat, model=model)
    est.fit(data["train"], data["cal"])
    assert est.featurizer is feat and not hasattr(feat, "sketch_")


def test_joblib_round_trip(fitted_atoms, data, tmp_path):
    path = tmp_path / "unc.joblib"
    joblib.dump(fitted_atoms, path)
    again = joblib.load(path)
    test = data["test"]
    np.testing.assert_array_equal(again.predict(test), fitted_atoms.predict(test))
    np.testing.assert_array_equal(again.predict_interval(test), fitted_atoms.predict_interval(test))
    a1, a2 = again.predict(test, return_atoms=True)[1], fitted_atoms.predict(test,
                                                                             return_atoms=True)[1]
    for x, y in zip(a1, a2, strict=True):
        np.testing.assert_array_equal(x, y)


# -- MLIPRegressor integration --------------------------------------------------------------------
@pytest.fixture(scope="module")
def regressor_data():
    X = frames(14, 5, amp=(0.02, 0.1))
    reg = MLIPRegressor(make_model(), epochs=1, validation_fraction=0.75, random_state=0).fit(X)
    return reg, X


def test_from_regressor(regressor_data, data):
    reg, X = regressor_data
    assert len(reg.validation_indices_) == 10 and len(reg.train_indices_) == 4
    est = ForceUncertainty.from_regressor(reg, atoms=X, featurizer=None, inputs="pv")
    assert est.model_ is reg.model_ and est.n_train_ == 4 and est.n_calibration_ == 10
    val = [X[i] for i in reg.validation_indices_]
    np.testing.assert_allclose(est.calibration_errors_, true_force_mae(reg.model_, val))
    direct = ForceUncertainty(model=reg.model_, inputs="pv").fit(
        [X[i] for i in reg.train_indices_], val)
    np.testing.assert_allclose(est.predict(data["test"]), direct.predict(data["test"]))
    # explicit calibration structures replace the validation split
    est = ForceUncertainty.from_regressor(reg, data["cal"], atoms=X)
    assert est.n_calibration_ == len(data["cal"])


def test_from_regressor_refusals(regressor_data, model):
    reg, X = regressor_data
    with pytest.raises(ValueError, match="from_regressor needs atoms=: the structures passed "
                       "to reg.fit"):
        ForceUncertainty.from_regressor(reg)
    with pytest.raises(ValueError, match="atoms has 13 structures; the regressor was fitted "
                       "on 14"):
        ForceUncertainty.from_regressor(reg, atoms=X[:13])
    with pytest.raises(ValueError, match=r"validation split has 10 structures; calibration "
                       r"needs at least min_calibration=12"):
        ForceUncertainty.from_regressor(reg, atoms=X, min_calibration=12)
    with pytest.raises(ValueError, match="another model than the one being judged"):
        ForceUncertainty.from_regressor(reg, atoms=X, featurizer=energy_feat(model))


def test_from_regressor_cv(data):
    """K-fold refits: each held-out fold is scored by the regressor refitted without it, with
    that refit's own posterior; the final posterior is the original regressor's."""
    from sklearn.model_selection import KFold

    X = frames(10, 6, amp=(0.02, 0.1))
    reg = MLIPRegressor(make_model(), epochs=1, random_state=0).fit(X)
    with pytest.raises(ValueError, match=r"validation split has 2 structures; .* or use cv=5"):
        ForceUncertainty.from_regressor(reg, atoms=X)
    est = ForceUncertainty.from_regressor(reg, atoms=X, cv=2, featurizer=energy_feat(reg.model_))
    assert est.cv_ == 2 and est.n_calibration_ == 10 and est.model_ is reg.model_
    assert est.n_train_ == len(reg.train_indices_) and est.featurizer_.model_ is reg.model_
    errors = []
    for tr, te in KFold(2, shuffle=True, random_state=0).split(np.arange(10)):
        reg_k = clone(reg).fit([X[i] for i in tr])
        errors.extend(true_force_mae(reg_k.model_, [X[i] for i in te]))
    np.testing.assert_allclose(est.calibration_errors_, errors, rtol=1e-10)
    assert np.all(np.isfinite(est.predict(data["test"])))
    with pytest.raises(ValueError, match="cv must be an integer from 2 to the 10 structures"):
        ForceUncertainty.from_regressor(reg, atoms=X, cv=1)
    with pytest.raises(ValueError, match="either calibration_atoms or cv"):
        ForceUncertainty.from_regressor(reg, data["cal"], atoms=X, cv=2)


# -- ASE calculator and MD observer ---------------------------------------------------------------
def test_calculator_results(fitted_atoms, model, data):
    a = data["test"][0].copy()
    a.calc = fitted_atoms.calculator()
    e, f = a.get_potential_energy(), a.get_forces()
    e_ref, f_ref = predict_energies_forces(model, [a])
    assert e == pytest.approx(e_ref[0], rel=1e-12)
    np.testing.assert_allclose(f, f_ref[0], rtol=1e-12, atol=1e-12)
    pred, per_atom = fitted_atoms.predict([a], return_atoms=True)
    assert a.calc.results["force_uncertainty"] == pytest.approx(pred[0], rel=1e-10)
    np.testing.assert_allclose(a.calc.get_property("force_uncertainties", a), per_atom[0],
                               rtol=1e-10)
    assert a.calc.results["uncertainty_fresh"] is True


def test_calculator_every(fitted, data):
    a = data["test"][1].copy()
    calc = fitted.calculator(every=2)
    assert isinstance(calc, UncertaintyCalculator) and "force_uncertainties" not in calc.results
    a.calc = calc
    fresh, values = [], []
    for k in range(4):
        a.positions[0, 0] += 0.01 * (k + 1)
        a.get_forces()
        fresh.append(calc.results["uncertainty_fresh"])
        values.append(calc.results["force_uncertainty"])
        assert "force_uncertainties" not in calc.results  # energy rows: no per-atom values
    assert fresh == [True, False, True, False]
    assert values[1] == values[0] and values[3] == values[2]
    with pytest.raises(ValueError, match="every must be an integer >= 1"):
        fitted.calculator(every=0)


def _md(atoms, observer, steps):
    dyn = VelocityVerlet(atoms, timestep=0.5 * units.fs)
    dyn.attach(observer, interval=1)
    dyn.run(steps)
    return dyn


def test_observer_logs_and_stops(fitted, data):
    a = data["test"][2].copy()
    a.calc = fitted.calculator()
    obs = UncertaintyObserver(a.calc, a)
    _md(a, obs, 3)
    assert obs.steps == [0, 1, 2, 3] and all(obs.fresh) and obs.exceeded_at is None
    assert obs.uncertainties[-1] == pytest.approx(fitted.predict([a])[0], rel=1e-10)
    threshold = float(np.median(obs.uncertainties))  # some values above it
    b = data["test"][2].copy()
    b.calc = fitted.calculator()
    flag = UncertaintyObserver(b.calc, b, threshold=threshold)
    _md(b, flag, 3)
    first = int(np.argmax(np.array(flag.uncertainties) > threshold))
    assert flag.exceeded_at == first and len(flag.steps) == 4  # recorded, run went on
    c = data["test"][2].copy()
    c.calc = fitted.calculator()
    stop = UncertaintyObserver(c.calc, c, threshold=threshold, stop=True)
    with pytest.raises(UncertaintyThresholdExceeded, match=r"predicted force error .* eV/Å at "
                       rf"step {first} exceeds the threshold") as info:
        _md(c, stop, 3)
    assert info.value.step == first and info.value.uncertainty > threshold
    assert len(stop.steps) == first + 1


def test_observer_with_the_estimator_and_any_calculator(fitted, data):
    a = data["test"][3].copy()
    a.calc = EMT()
    obs = UncertaintyObserver(fitted, a, threshold=1e-12)
    _md(a, obs, 2)
    assert obs.exceeded_at == 0 and len(obs.uncertainties) == 3
    with pytest.raises(TypeError, match="source must be an UncertaintyCalculator"):
        UncertaintyObserver(EMT(), a)


# -- monotonicity ---------------------------------------------------------------------------------
@settings(max_examples=30, deadline=None, suppress_health_check=FIXTURES)
@given(log_pv=st.floats(-12, 2), log_f=st.floats(-5, 2), dpv=st.floats(0, 5), df=st.floats(0, 5))
def test_predicted_error_never_decreases_with_its_inputs(fitted, log_pv, log_f, dpv, df):
    """The map is monotone: more novelty (PV) or larger forces never lower the predicted error."""
    base = {"log_pv": np.array([log_pv]), "log_f": np.array([log_f])}
    more = {"log_pv": np.array([log_pv + dpv]), "log_f": np.array([log_f + df])}
    assert fitted._predict_from(more)[0] >= fitted._predict_from(base)[0]


@settings(max_examples=6, deadline=None, suppress_health_check=FIXTURES)
@given(seed=st.integers(0, 2**16), scale=st.floats(0.5, 2.0))
def test_predicted_error_along_a_growing_distortion(model, data, seed, scale):
    """Along a rigid path of growing distortion ``x(t) = R(x0 + t u)``, the predicted error
    (``inputs="pv"``) never decreases while the posterior variance does not: ``ê`` is a
    non-decreasing function of PV. PV itself need not grow monotonically with ``t`` (the
    features of a nonlinear network can swing back towards the labelled ones), so the property
    the issue asks for holds exactly only in PV; what is tested beyond that is that ê is ordered
    as PV along the path, and invariant to the rigid motion (rotation) of each frame."""
    est = ForceUncertainty(energy_feat(model), model=model, inputs="pv").fit(
        data["train"], data["cal"])
    rng = np.random.default_rng(seed)
    x0 = data["train"][0]
    u = rng.normal(size=x0.positions.shape)
    u *= scale * 0.05 / np.abs(u).max()
    path, rotated = [], []
    for t in np.linspace(0, 4, 6):
        a = x0.copy()
        a.calc = None
        a.positions = x0.positions + t * u
        path.append(a)
        b = a.copy()
        b.rotate(float(rng.uniform(0, 360)), rng.normal(size=3), center="COM")
        rotated.append(b)
    pred = est.predict(path)
    pv = np.exp(est._inputs(est.model_.validate(path))["log_pv"])
    order = np.argsort(pv, kind="stable")
    assert np.all(np.diff(pred[order]) >= -1e-12 * pred.max())
    np.testing.assert_allclose(est.predict(rotated), pred, rtol=1e-6)
