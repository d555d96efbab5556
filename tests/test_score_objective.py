"""SelectionPipeline.score: linearised fine-tuning on residuals of the pretrained model.

Data: tests/data/ethanol_40.extxyz, 40 frames of the BOTNet ethanol training set (MIT licence,
see tests/data/README.md); energies near -4209.5 eV, spread 0.66 eV.
"""

from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
from ase.calculators.singlepoint import SinglePointCalculator
from sklearn.model_selection import GridSearchCV, KFold

from skntk.blocks import FeatureBlocks
from skntk.pipeline import SelectionPipeline, make_pv_lcmd_pipeline
from skntk.selection._scoring import fit_composition_offsets, ridge_rmse
from skntk.selection.lcmd import LCMDSelector
from skntk.selection.pv import ChunkedPosteriorVarianceSelector
from skntk.transformers import ForceNTKTransformer
from tests.builders import tiny_builtin

DATA = Path(__file__).parent / "data" / "ethanol_40.extxyz"
GRID = {"pv__sigma2": [1e-6, 1e-4, 1e-2, 1.0]}

_FEATURES = {}


class CachedNTK(ForceNTKTransformer):
    """ForceNTKTransformer that remembers each structure's rows (keeps the grid searches fast;
    rows are per structure, so caching them changes nothing)."""

    def transform(self, X):
        params = (self.kind, self.n_features, self.sketch, self.random_state, self.force_rows)

        def key(a):
            return params + (a.numbers.tobytes(), a.positions.tobytes())

        missing = [a for a in X if key(a) not in _FEATURES]
        if missing:
            G = super().transform(missing)
            for i, a in enumerate(missing):
                _FEATURES[key(a)] = G[i]
        return FeatureBlocks.concatenate([_FEATURES[key(a)] for a in X])


@pytest.fixture(scope="module")
def frames():
    return ase.io.read(DATA, ":")


@pytest.fixture(scope="module")
def model():
    return tiny_builtin(n_hidden=16)


def make_pipe(model, **kw):
    # the Gaussian sketch these assertions were first measured with: with CountSketch rows of
    # this 32-column slice the new objective also prefers the smallest sigma2 of the grid, which
    # would tie with the constant objective's first-index choice
    ntk = CachedNTK(model, kind="joint", force_rows="exact", n_features=32, sketch="gaussian",
                    random_state=0)
    return make_pv_lcmd_pipeline(ntk, n_to_select=4, shortlist_size=10, **kw)


def relabel(frames, shift):
    """Copies whose energies are shifted by ``shift(atoms)`` eV (forces unchanged)."""
    out = []
    for a in frames:
        b = a.copy()
        b.calc = SinglePointCalculator(b, energy=a.get_potential_energy() + shift(a),
                                       forces=a.get_forces())
        out.append(b)
    return out


def old_objective(est, X, y=None):
    """The previous default: zero-mean ridge on raw total energies of the selected structures."""
    energies = np.array([a.get_potential_energy() for a in X])
    idx, upstream = est._select_chain(X)
    rest = np.setdiff1d(np.arange(len(X)), idx)
    rows = upstream.rows[upstream.offsets[:-1]]  # energy rows of the joint blocks
    return ridge_rmse(rows[idx], energies[idx], rows[rest], energies[rest])


def test_score_equals_a_plain_reimplementation(frames, model):
    train, pool = frames[:10], frames[10:30]
    pipe = make_pipe(model).fit(train)
    got = pipe.score(pool)
    idx = pipe.selected_idx_
    rest = np.setdiff1d(np.arange(len(pool)), idx)
    fit_atoms = train + [pool[i] for i in idx]
    rest_atoms = [pool[i] for i in rest]

    ntk = ForceNTKTransformer(model, kind="joint", force_rows="exact", n_features=32,
                              sketch="gaussian", random_state=0).fit(train)

    def rows_targets(atoms, offset):
        G, X, y = ntk.transform(atoms), [], []
        for i, a in enumerate(atoms):
            batch = model.collate([a])
            with torch.enable_grad():
                e0, f0 = model.energy_and_forces(batch)
            r_e = a.get_potential_energy() - float(e0.detach()[0]) - offset
            r_f = a.get_forces() - f0.detach().double().numpy()
            X.append(G.block(i))
            y.append(np.r_[r_e / len(a), r_f.reshape(-1)])  # eV/atom, then eV/Å (atom-major)
        return np.vstack(X), np.concatenate(y)

    # every frame is C2H6O: the composition offset is the mean residual of the fit structures
    res = []
    for a in fit_atoms:
        with torch.enable_grad():
            e0, _ = model.energy_and_forces(model.collate([a]))
        res.append(a.get_potential_energy() - float(e0.detach()[0]))
    offset = np.mean(res)
    G_fit, y_fit = rows_targets(fit_atoms, offset)
    G_rest, y_rest = rows_targets(rest_atoms, offset)
    c2 = G_fit.shape[0] / np.sum(G_fit**2)
    w = np.linalg.solve(c2 * G_fit.T @ G_fit + 1e-3 * np.eye(G_fit.shape[1]),
                        np.sqrt(c2) * G_fit.T @ y_fit)
    ref = -np.sqrt(np.mean((np.sqrt(c2) * G_rest @ w - y_rest) ** 2))
    assert isinstance(got, float)
    np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_objective_ignores_energy_references_old_one_did_not(frames, model):
    train, pool = frames[:10], frames[10:30]
    base = make_pipe(model).fit(train).score(pool)
    old = old_objective(make_pipe(model).fit(train), pool)
    per_atom = lambda a: -2.5 * len(a)  # noqa: E731
    per_element = lambda a: float(np.sum(np.select(  # noqa: E731
        [a.numbers == 1, a.numbers == 6], [-13.6, -1029.0], -2041.0)))
    for shift in (per_atom, per_element):
        tr, po = relabel(train, shift), relabel(pool, shift)
        np.testing.assert_allclose(make_pipe(model).fit(tr).score(po), base, rtol=1e-8)
        assert abs(old_objective(make_pipe(model).fit(tr), po) - old) > 1e-3


def test_grid_search_picks_differently_from_old_and_constant_objectives(frames, model):
    def search(data, scoring=None):
        grid = GridSearchCV(make_pipe(model), GRID, cv=KFold(2), scoring=scoring,
                            error_score="raise")
        return grid.fit(data)

    new = search(frames)
    scores = new.cv_results_["mean_test_score"]
    assert np.all(np.isfinite(scores)) and np.ptp(scores) > 0  # it discriminates
    shifted = search(relabel(frames, lambda a: 3.7 * len(a)))
    np.testing.assert_allclose(shifted.cv_results_["mean_test_score"], scores, rtol=1e-8)
    old = search(frames, old_objective)
    constant = search(frames, lambda est, X, y=None: 0.0)
    assert constant.best_params_ == {"pv__sigma2": GRID["pv__sigma2"][0]}  # ties: the first
    assert new.best_params_ != constant.best_params_
    assert new.best_params_ != old.best_params_
    # the old objective moves with the energy reference, the new one does not
    old_shifted = search(relabel(frames, lambda a: 3.7 * len(a)), old_objective)
    assert not np.allclose(old_shifted.cv_results_["mean_test_score"],
                           old.cv_results_["mean_test_score"], rtol=1e-4)


def test_array_path_is_invariant_to_a_constant_in_y():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(80, 4))
    y = np.tanh(X @ [1.0, -2.0, 0.5, 0.0]) + 0.1 * X[:, 3] ** 2
    grid = {"pv__sigma2": [1e-4, 1e-2, 1.0], "pv__shortlist_size": [10, 20]}

    def search(target):
        pipe = make_pv_lcmd_pipeline(n_to_select=5)
        return GridSearchCV(pipe, grid, cv=KFold(2), error_score="raise").fit(X, target)

    a, b = search(y), search(y + 1e4)
    assert a.best_params_ == b.best_params_
    np.testing.assert_allclose(a.cv_results_["mean_test_score"],
                               b.cv_results_["mean_test_score"], rtol=1e-6)


def test_scoring_callable_gets_labelled_plus_selected_and_the_rest(frames, model):
    seen = {}

    def scoring(train_atoms, rest_atoms):
        seen["train"], seen["rest"] = train_atoms, rest_atoms
        return -1.5

    train, pool = frames[:5], frames[5:17]
    pipe = make_pipe(model, scoring=scoring).fit(train)
    assert pipe.score(pool) == -1.5
    idx = pipe.selected_idx_
    assert seen["train"][:5] == train
    assert seen["train"][5:] == [pool[i] for i in idx]
    assert seen["rest"] == [pool[i] for i in range(len(pool)) if i not in set(idx.tolist())]
    assert pipe.get_params()["scoring"] is scoring


def test_composition_offsets_fit_references_of_collinear_compositions():
    C = np.array([[2.0, 6.0, 1.0]] * 5 + [[1.0, 4.0, 1.0]] * 3)
    mu = np.array([-1029.0, -13.6, -2041.0])
    np.testing.assert_allclose(C @ fit_composition_offsets(C, C @ mu), C @ mu, atol=1e-4)
    # rank 1 (every frame one molecule): the offsets fit, the solve stays finite
    np.testing.assert_allclose(C[:5] @ fit_composition_offsets(C[:5], C[:5] @ mu), C[:5] @ mu,
                               atol=1e-4)


def test_probe_rows_are_scored_on_their_energy_rows(frames, model):
    train, pool = frames[:8], frames[8:20]
    ntk = CachedNTK(model, kind="joint", force_rows="probes", n_probes=2, n_features=32,
                    random_state=0)
    pipe = make_pv_lcmd_pipeline(ntk, n_to_select=3, shortlist_size=8).fit(train)
    s = pipe.score(pool)
    assert np.isfinite(s) and s < 0
    shifted = make_pv_lcmd_pipeline(ntk, n_to_select=3, shortlist_size=8).fit(
        relabel(train, lambda a: 1.0 * len(a)))
    np.testing.assert_allclose(shifted.score(relabel(pool, lambda a: 1.0 * len(a))), s,
                               rtol=1e-8)
    force_only = CachedNTK(model, kind="force", force_rows="probes", n_probes=2, n_features=32,
                           random_state=0)
    pipe = make_pv_lcmd_pipeline(force_only, n_to_select=3, shortlist_size=8).fit(train)
    with pytest.raises(ValueError, match="cannot relate the rows"):
        pipe.score(pool)


def test_scoring_on_arrays_still_needs_y():
    rng = np.random.default_rng(1)
    pipe = SelectionPipeline([("pv", ChunkedPosteriorVarianceSelector()),
                              ("lcmd", LCMDSelector(3))])
    pipe.fit(rng.normal(size=(10, 3)))
    with pytest.raises(ValueError, match="needs targets y"):
        pipe.score(rng.normal(size=(20, 3)))


def _with_labels(frames, energy=None, forces_nan_at=None):
    out = []
    for i, a in enumerate(frames):
        b = a.copy()
        f = a.get_forces().copy()
        if i == forces_nan_at:
            f[0, 0] = np.nan
        b.calc = SinglePointCalculator(b, energy=a.get_potential_energy(), forces=f)
        out.append(b)
    if energy is not None:
        out[energy[0]].calc.results["energy"] = energy[1]
    return out


def test_score_refuses_a_non_finite_label_naming_it_never_returns_nan(frames, model):
    train = frames[:10]
    pipe = make_pipe(model).fit(train)
    with pytest.raises(ValueError, match=r"X\[5\] \(C2H6O\) has a non-finite energy label"):
        pipe.score(_with_labels(frames[10:30], energy=(5, np.nan)))
    with pytest.raises(ValueError, match=r"X\[3\] \(C2H6O\) has non-finite forces"):
        pipe.score(_with_labels(frames[10:30], forces_nan_at=3))
    y = np.array([a.get_potential_energy() for a in frames[10:30]])
    with pytest.raises(ValueError, match=r"X\[3\] \(C2H6O\) has non-finite forces"):
        pipe.score(_with_labels(frames[10:30], forces_nan_at=3), y)
    y = np.array([a.get_potential_energy() for a in frames[10:30]])
    y[19] = np.inf
    with pytest.raises(ValueError, match=r"y\[19\] is inf"):
        pipe.score(frames[10:30], y)
    # y replaces a non-finite stored energy, and the score is the one of the clean labels
    y[19] = frames[29].get_potential_energy()
    clean = pipe.score(frames[10:30])
    assert np.isfinite(clean)
    assert pipe.score(_with_labels(frames[10:30], energy=(19, np.nan)), y) == clean


def test_score_names_the_pool_structure_without_a_label(frames, model):
    pool = _with_labels(frames[10:30])
    pool[2].calc = None
    pipe = make_pipe(model).fit(frames[:10])
    with pytest.raises(ValueError, match=r"X\[2\] \(C2H6O\) has no energy label"):
        pipe.score(pool)


def test_score_warns_when_the_fit_structures_have_no_labels(frames, model):
    unlabelled = [a.copy() for a in frames[:10]]  # copies carry no calculator: no labels
    pipe = make_pipe(model).fit(unlabelled)
    with pytest.warns(UserWarning, match="the 10 structures given to fit have no energy labels"):
        got = pipe.score(frames[10:30])
    assert np.isfinite(got)
