"""Tests of skntk.selection._base through a tiny subclass."""

import numpy as np
import pytest

from skntk.blocks import FeatureBlocks
from skntk.selection._base import (
    BaseSelector,
    resolve_n_to_select,
    row_indices,
    selection_score,
)


class NormSelector(BaseSelector):
    """Picks the structures with the largest summed squared row norm."""

    def __init__(self, n_to_select=None, *, working_memory=None):
        self.n_to_select = n_to_select
        self.working_memory = working_memory

    def fit(self, X, y=None):
        self._validate_params()
        self._check_X(X, reset=True)
        return self

    def _select(self, X, candidates, n_to_select):
        norms = np.array([np.sum(X.block(i) ** 2) for i in candidates])
        return np.asarray(candidates)[np.argsort(-norms, kind="stable")[:n_to_select]]


@pytest.mark.parametrize("value, n, expected", [
    (None, 10, 5), (None, 1, 1), (None, 3, 1), (3, 10, 3), (0.25, 10, 2), (0.01, 10, 1),
    (10, 10, 10)])
def test_resolve_n_to_select(value, n, expected):
    assert resolve_n_to_select(value, n) == expected


@pytest.mark.parametrize("value, match", [
    (0, "n_to_select must be >= 1; got n_to_select=0"),
    (1.5, "an int >= 1 or a float in \\(0, 1\\); got 1.5"),
    ("all", "got 'all'"),
    (True, "got True"),
    (11, "n_to_select=11 exceeds the 10 candidates in X")])
def test_resolve_n_to_select_errors(value, match):
    with pytest.raises(ValueError, match=match):
        resolve_n_to_select(value, 10)


def test_select_bookkeeping_through_subclass():
    X = FeatureBlocks(np.array([[1.0], [3.0], [2.0], [0.5], [4.0]]), [0, 1, 3, 4, 5])
    sel = NormSelector(2).fit(X)
    # summed squared norms per structure: 1, 9 + 4, 0.25, 16
    assert sel.select(X).tolist() == [3, 1]
    assert sel.selected_idx_.tolist() == [3, 1]
    assert sel.select(X, 1).tolist() == [3]  # select-time override
    assert sel.n_features_in_ == 1


def test_unfitted_select_raises():
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        NormSelector(1).select(np.zeros((2, 1)))


def test_check_X_errors_name_the_problem():
    sel = NormSelector().fit(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="X rows must be numeric"):
        sel.select(FeatureBlocks(np.array([["a"]], dtype=object), [0, 1]))


def test_row_indices():
    off = np.array([0, 2, 2, 5])
    assert row_indices(off, np.array([2, 1, 0])).tolist() == [2, 3, 4, 0, 1]


def test_selection_score_against_plain_ridge():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(20, 3))
    y = rng.normal(size=20) + 5.0
    sel = np.array([0, 3, 5, 7, 9, 11])
    rest = np.setdiff1d(np.arange(20), sel)
    # one target per structure: an unpenalised intercept (rows and targets centred on the fit)
    Xc, yc = X - X[sel].mean(0), y - y[sel].mean()
    c2 = 1.0 / np.mean(np.sum(Xc[sel] ** 2, axis=1))
    w = np.linalg.solve(c2 * Xc[sel].T @ Xc[sel] + 1e-3 * np.eye(3),
                        np.sqrt(c2) * Xc[sel].T @ yc[sel])
    rmse = np.sqrt(np.mean((np.sqrt(c2) * Xc[rest] @ w - yc[rest]) ** 2))
    got = selection_score(FeatureBlocks.from_array(X), y, sel)
    assert isinstance(got, float)
    np.testing.assert_allclose(got, -rmse, rtol=1e-10)
    # a constant offset of y changes nothing; labelled rows join the fit
    np.testing.assert_allclose(selection_score(FeatureBlocks.from_array(X), y - 1e4, sel), got,
                               rtol=1e-8)
    lab = rng.normal(size=(5, 3)), rng.normal(size=5)
    fit_X, fit_y = np.vstack([lab[0], X[sel]]), np.r_[lab[1], y[sel]]
    x_mean, y_mean = fit_X.mean(0), fit_y.mean()
    fit_X = fit_X - x_mean
    c2 = 1.0 / np.mean(np.sum(fit_X**2, axis=1))
    w = np.linalg.solve(c2 * fit_X.T @ fit_X + 1e-3 * np.eye(3),
                        np.sqrt(c2) * fit_X.T @ (fit_y - y_mean))
    rmse = np.sqrt(np.mean((np.sqrt(c2) * (X[rest] - x_mean) @ w + y_mean - y[rest]) ** 2))
    got = selection_score(FeatureBlocks.from_array(X), y, sel,
                          labelled=(FeatureBlocks.from_array(lab[0]), lab[1]))
    np.testing.assert_allclose(got, -rmse, rtol=1e-10)


def test_selection_score_with_joint_blocks_and_per_row_targets():
    rng = np.random.default_rng(1)
    X = FeatureBlocks(rng.normal(size=(12, 3)), [0, 4, 8, 12], kind="joint")
    energies = rng.normal(size=3)
    s_e = selection_score(X, energies, np.array([0, 1]))
    ref = selection_score(FeatureBlocks.from_array(X.rows[[0, 4, 8]]), energies, np.array([0, 1]))
    assert s_e == ref  # only the energy rows enter
    per_row = [rng.normal(size=4) for _ in range(3)]
    assert np.isfinite(selection_score(X, np.array(per_row, dtype=object), np.array([2])))
    with pytest.raises(ValueError, match=r"y\[1\] has 3 targets; structure 1 of X has 4 rows"):
        selection_score(X, [np.zeros(4), np.zeros(3), np.zeros(4)], np.array([0]))
    force = FeatureBlocks(rng.normal(size=(6, 3)), [0, 3, 6], kind="force")
    with pytest.raises(ValueError, match="one value per structure but X has multi-row blocks"):
        selection_score(force, np.zeros(2), np.array([0]))
    with pytest.raises(ValueError, match="all 3 structures were selected"):
        selection_score(X, energies, np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="y has 2 values; X has 3 structures"):
        selection_score(X, np.zeros(2), np.array([0]))


def test_selection_layer_imports_no_model_code():
    """docs/design.md, "Layers and data flow": selection/ sees features only; it must not import
    torch.nn or skntk.models."""
    import ast
    from pathlib import Path

    import skntk.selection

    root = Path(skntk.selection.__file__).parent
    files = sorted(root.glob("*.py"))
    assert len(files) >= 6
    for path in files:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert not name.startswith(("torch", "skntk.models")), f"{path.name} imports {name}"
