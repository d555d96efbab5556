"""Tests of skntk.pipeline: SelectionPipeline and the PV-shortlist -> LCMD chain."""

import pickle

import numpy as np
import pytest
from sklearn.base import BaseEstimator, TransformerMixin, clone
from sklearn.linear_model import Ridge
from sklearn.model_selection import GridSearchCV, KFold
from sklearn.preprocessing import StandardScaler

from skntk.blocks import FeatureBlocks
from skntk.pipeline import SelectionPipeline, make_pv_lcmd_pipeline
from skntk.selection._base import selection_score
from skntk.selection.baselines import RandomSelector
from skntk.selection.lcmd import LCMDSelector
from skntk.selection.pv import ChunkedPosteriorVarianceSelector


class Packer(TransformerMixin, BaseEstimator):
    """Stand-in for an NTK transformer: list of per-structure row blocks -> joint blocks."""

    def fit(self, X, y=None):
        self.n_seen_ = len(X)
        return self

    def transform(self, X):
        rows = np.concatenate(list(X))
        offsets = np.concatenate([[0], np.cumsum([len(b) for b in X])])
        return FeatureBlocks(rows, offsets, kind="joint")


def make_structures(rng, n, d=4):
    # joint rows: 1 energy row + 3N force rows, N in {1, 2}
    return [rng.normal(size=(1 + 3 * int(rng.integers(1, 3)), d)) for _ in range(n)]


def posterior_features_reference(train_rows, rows, sigma2):
    """Psi = sigma c G L^-T with A = c^2 sum G^T G + sigma2 I, written out."""
    c2 = 1.0 / np.mean(np.sum(train_rows**2, axis=1))
    A = c2 * train_rows.T @ train_rows + sigma2 * np.eye(train_rows.shape[1])
    L = np.linalg.cholesky(A)
    return np.sqrt(sigma2 * c2) * np.linalg.solve(L, rows.T).T


def test_fit_gives_lcmd_posterior_train_centres():
    rng = np.random.default_rng(0)
    train = make_structures(rng, 6)
    pipe = make_pv_lcmd_pipeline(Packer(), n_to_select=3, shortlist_size=5, sigma2=0.05)
    pipe.fit(train)
    T = Packer().transform(train)
    psi = posterior_features_reference(T.rows, T.rows, 0.05)
    blocks = [psi[T.offsets[i]:T.offsets[i + 1]] for i in range(6)]
    K = np.array([[np.sum((a @ b.T) ** 2) for b in blocks] for a in blocks])
    centres = pipe["lcmd"].centres_
    assert centres.shape[0] == 6
    np.testing.assert_allclose(centres @ centres.T, K, rtol=1e-9)


def test_select_equals_manual_chain_and_respects_shortlist():
    rng = np.random.default_rng(1)
    train, pool = make_structures(rng, 5), make_structures(rng, 40)
    pipe = make_pv_lcmd_pipeline(Packer(), n_to_select=4, shortlist_size=10, sigma2=0.05)
    idx = pipe.fit(train).select(pool)
    T, P = Packer().transform(train), Packer().transform(pool)
    pv = ChunkedPosteriorVarianceSelector(0.05).fit(T)
    shortlist = np.argsort(-pv.score_samples(P), kind="stable")[:10]
    assert len(set(idx.tolist())) == 4 and set(idx.tolist()) <= set(shortlist.tolist())
    sub = pv.transform(P)[shortlist]
    manual = LCMDSelector(4).fit(pv.transform(T)).select(sub)
    assert idx.tolist() == shortlist[manual].tolist()
    assert pipe.selected_idx_.tolist() == idx.tolist()
    assert pipe.select(pool, 2).tolist() == idx[:2].tolist()  # greedy: a prefix


def test_works_with_any_upstream_transformer_on_arrays():
    rng = np.random.default_rng(2)
    pipe = SelectionPipeline([("scale", StandardScaler()),
                              ("pv", ChunkedPosteriorVarianceSelector(shortlist_size=15)),
                              ("lcmd", LCMDSelector(5))])
    idx = pipe.fit(rng.normal(size=(10, 3))).select(rng.normal(size=(60, 3)))
    assert len(set(idx.tolist())) == 5


def test_select_only_when_final_step_selects():
    pipe = SelectionPipeline([("scale", StandardScaler()), ("ridge", Ridge())])
    assert not hasattr(pipe, "select")
    assert hasattr(SelectionPipeline([("r", RandomSelector())]), "select")


def test_score_uses_upstream_features():
    rng = np.random.default_rng(3)
    X, y = rng.normal(size=(40, 3)), rng.normal(size=40)
    pipe = SelectionPipeline([("scale", StandardScaler()),
                              ("pv", ChunkedPosteriorVarianceSelector(sigma2=0.3)),
                              ("lcmd", LCMDSelector(6))])
    pipe.fit(X[:10])
    score = pipe.score(X[10:], y[10:])
    upstream = pipe["scale"].transform(X[10:])
    ref = selection_score(FeatureBlocks.from_array(upstream), y[10:], pipe.selected_idx_)
    assert score == ref
    with pytest.raises(ValueError, match="needs targets y"):
        pipe.score(X[10:])
    # labelled targets given to fit join the ridge; a constant offset of y changes nothing
    pipe.fit(X[:10], y[:10])
    score = pipe.score(X[10:], y[10:])
    ref = selection_score(FeatureBlocks.from_array(upstream), y[10:], pipe.selected_idx_,
                          labelled=(FeatureBlocks.from_array(pipe["scale"].transform(X[:10])),
                                    y[:10]))
    assert score == ref
    pipe.fit(X[:10], y[:10] + 50.0)
    np.testing.assert_allclose(pipe.score(X[10:], y[10:] + 50.0), score, rtol=1e-9)


def test_grid_search_over_selector_parameters():
    rng = np.random.default_rng(4)
    structures = make_structures(rng, 30)
    energies = np.array([s[0].sum() for s in structures])
    pipe = make_pv_lcmd_pipeline(Packer(), n_to_select=3, shortlist_size=8)
    grid = GridSearchCV(pipe, {"pv__sigma2": [1e-3, 1e-1], "pv__reduction": ["trace", "max_atom"],
                               "pv__shortlist_size": [5, 8], "lcmd__kernel": ["gram"]},
                        cv=KFold(2), error_score="raise")
    grid.fit(structures, energies)
    assert len(grid.cv_results_["mean_test_score"]) == 8
    assert np.all(np.isfinite(grid.cv_results_["mean_test_score"]))
    assert grid.best_params_["pv__sigma2"] in (1e-3, 1e-1)


def test_clone_and_pickle_fitted_pipeline():
    rng = np.random.default_rng(5)
    train, pool = make_structures(rng, 5), make_structures(rng, 20)
    pipe = make_pv_lcmd_pipeline(Packer(), n_to_select=3, shortlist_size=6).fit(train)
    assert clone(pipe).get_params()["pv__shortlist_size"] == 6
    again = pickle.loads(pickle.dumps(pipe))
    assert again.select(pool).tolist() == pipe.select(pool).tolist()


def test_progress_bars_of_the_selection_stages(capsys):
    """progress_bar=True shows one bar per selector stage (PV over structures, LCMD over picks)
    and changes no pick."""
    from skntk.pipeline import make_pv_lcmd_pipeline

    rng = np.random.default_rng(0)
    train, pool = rng.normal(size=(20, 5)), rng.normal(size=(300, 5))
    quiet = make_pv_lcmd_pipeline(n_to_select=4, shortlist_size=30).fit(train).select(pool)
    capsys.readouterr()
    loud = make_pv_lcmd_pipeline(n_to_select=4, shortlist_size=30, progress_bar=True)
    assert loud.fit(train).select(pool).tolist() == quiet.tolist()
    err = capsys.readouterr().err
    assert "PV scores" in err and "/300" in err and "LCMD" in err and "/4 " in err, err
