"""Tests of skntk.al.committee.CommitteeSelector and RandomSelector on lists of Atoms."""

import numpy as np
import pytest
from ase import Atoms
from ase.build import fcc111
from ase.calculators.emt import EMT
from ase.constraints import FixAtoms
from sklearn.base import BaseEstimator, clone
from sklearn.exceptions import NotFittedError

from skntk._sklearn_compat import InvalidParameterError
from skntk.al.committee import CommitteeSelector
from skntk.blocks import FeatureBlocks
from skntk.selection.baselines import RandomSelector
from tests.builders import tiny_builtin


class FakeRegressor(BaseEstimator):
    """Deterministic stand-in for MLIPRegressor: predictions depend on seed and train set."""

    def __init__(self, scale=1.0, random_state=None, nan_for=None):
        self.scale = scale
        self.random_state = random_state
        self.nan_for = nan_for

    def fit(self, X, y=None):
        self.train_ids_ = [int(a.info["id"]) for a in X]
        rng = np.random.default_rng([int(self.random_state), *self.train_ids_])
        self.w_ = rng.normal(size=3)
        self.b_ = rng.normal(size=3)
        self.mu_ = rng.normal()
        return self

    def predict(self, X, return_forces=False):
        energies = np.array([self.scale * (self.mu_ * len(a) + np.sin(a.positions @ self.w_).sum())
                             for a in X])
        if self.nan_for is not None:
            energies[[i for i, a in enumerate(X) if a.info["id"] == self.nan_for]] = np.nan
        if not return_forces:
            return energies
        forces = [self.scale * np.sin(a.positions * self.w_ + self.b_) for a in X]
        return energies, forces


class NoSeedRegressor(BaseEstimator):
    def fit(self, X, y=None):
        return self

    def predict(self, X):
        return np.zeros(len(X))


def make_structures(n=8, seed=0):
    """Clusters of different sizes; some with OC20 ``fixed``, some with FixAtoms, one all fixed."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        n_atoms = 2 + i % 4
        a = Atoms(f"Cu{n_atoms}", positions=rng.normal(0, 1.5, (n_atoms, 3)))
        a.info["id"] = i
        if i % 3 == 1:
            a.arrays["fixed"] = (np.arange(n_atoms) == 0).astype(int)
        if i % 3 == 2:
            a.set_constraint(FixAtoms(indices=[n_atoms - 1]))
        out.append(a)
    out[-1].set_constraint(FixAtoms(indices=range(len(out[-1]))))  # no free atoms at all
    return out


def reference_scores(members, X, disagreement):
    """Plain loops: DP-GEN model deviation over free atoms, or std of energy per atom."""
    scores = []
    for a in X:
        fixed = set()
        if "fixed" in a.arrays:
            fixed |= {i for i, v in enumerate(a.arrays["fixed"]) if v == 1}
        for c in a.constraints:
            fixed |= set(c.get_indices().tolist())
        if disagreement == "energy":
            e = [m.predict([a])[0] / len(a) for m in members]
            scores.append(np.std(e))
            continue
        forces = [m.predict([a], return_forces=True)[1][0] for m in members]
        sigmas = []
        for i in range(len(a)):
            if i in fixed:
                continue
            mean = sum(f[i] for f in forces) / len(forces)
            sigmas.append(np.sqrt(sum(np.dot(f[i] - mean, f[i] - mean) for f in forces)
                                  / len(forces)))
        if not sigmas:
            scores.append(0.0)
        else:
            scores.append(max(sigmas) if disagreement == "force_max" else np.mean(sigmas))
    return np.array(scores)


@pytest.mark.parametrize("disagreement", ["force_max", "force_mean", "energy"])
@pytest.mark.parametrize("bootstrap", [True, False])
def test_scores_equal_reference(disagreement, bootstrap):
    train, pool = make_structures(6, seed=1), make_structures(9, seed=2)
    sel = CommitteeSelector(FakeRegressor(), n_members=3, bootstrap=bootstrap,
                            disagreement=disagreement, random_state=0).fit(train)
    scores = sel.score_samples(pool)
    ref = reference_scores(sel.members_, pool, disagreement)
    assert scores.shape == (len(pool),) and scores.dtype == np.float64
    np.testing.assert_allclose(scores, ref, rtol=1e-12, atol=1e-15)
    assert np.all(scores >= 0) and np.all(scores[:-1] > 0)
    if disagreement != "energy":
        assert scores[-1] == 0.0  # every atom fixed


def test_free_atom_masking_changes_force_scores():
    train, pool = make_structures(4), make_structures(6, seed=3)
    sel = CommitteeSelector(FakeRegressor(), n_members=3, random_state=1).fit(train)
    masked = sel.score_samples(pool)
    bare = [Atoms(a.numbers, positions=a.positions) for a in pool]
    unmasked = sel.score_samples(bare)
    constrained = [i for i, a in enumerate(pool) if "fixed" in a.arrays or a.constraints]
    assert constrained and np.all(masked[constrained] <= unmasked[constrained])
    assert np.any(masked[constrained] < unmasked[constrained])


def test_members_seeds_bootstrap_and_determinism():
    train = make_structures(7)
    reg = FakeRegressor(scale=2.0)
    sel = CommitteeSelector(reg, n_members=4, random_state=3).fit(train)
    assert len(sel.members_) == 4 and sel.fit_time_ >= 0 and sel.n_train_ == 7
    assert len(set(sel.member_seeds_.tolist())) == 4
    for m, seed, idx in zip(sel.members_, sel.member_seeds_, sel.bootstrap_indices_, strict=True):
        assert m is not reg and m.random_state == seed and m.scale == 2.0
        assert m.train_ids_ == [train[i].info["id"] for i in idx]
        assert len(idx) == len(train)
    assert not hasattr(reg, "w_")  # the template is never fitted
    assert any(len(set(idx.tolist())) < len(train) for idx in sel.bootstrap_indices_)

    again = CommitteeSelector(reg, n_members=4, random_state=3).fit(train)
    np.testing.assert_array_equal(again.member_seeds_, sel.member_seeds_)
    pool = make_structures(5, seed=4)
    np.testing.assert_array_equal(again.score_samples(pool), sel.score_samples(pool))
    other = CommitteeSelector(reg, n_members=4, random_state=4).fit(train)
    assert not np.array_equal(other.member_seeds_, sel.member_seeds_)

    full = CommitteeSelector(reg, n_members=2, bootstrap=False, random_state=0).fit(train)
    for m in full.members_:
        assert m.train_ids_ == list(range(7))


def test_select_top_b_stable_ties():
    train = make_structures(5)
    base = make_structures(5, seed=7)
    pool = [base[0], base[1], base[0].copy(), base[2], base[1].copy(), base[3]]  # ties
    sel = CommitteeSelector(FakeRegressor(), n_members=3, random_state=0).fit(train)
    idx = sel.select(pool, n_to_select=4)
    scores = sel.score_samples(pool)
    np.testing.assert_array_equal(sel.scores_, scores)
    expected = np.argsort(-scores, kind="stable")[:4]
    np.testing.assert_array_equal(idx, expected)
    np.testing.assert_array_equal(sel.selected_idx_, idx)
    assert idx.dtype == np.int64
    assert scores[0] == scores[2] and scores[1] == scores[4]
    order = idx.tolist()
    for a, b in [(0, 2), (1, 4)]:
        if a in order and b in order:
            assert order.index(a) < order.index(b)
    assert np.all(np.diff(scores[idx]) <= 0)


def test_select_budget():
    train, pool = make_structures(4), make_structures(8, seed=5)
    sel = CommitteeSelector(FakeRegressor(), n_members=2, n_to_select=3, random_state=0).fit(train)
    assert len(sel.select(pool)) == 3
    assert len(sel.select(pool, n_to_select=0.5)) == 4
    sel.set_params(n_to_select=None)
    assert len(sel.select(pool)) == 4
    with pytest.raises(ValueError, match="exceeds the 8"):
        sel.select(pool, n_to_select=9)
    with pytest.raises(ValueError, match="n_to_select must be >= 1"):
        sel.select(pool, n_to_select=0)
    with pytest.raises(ValueError, match="n_to_select must be None"):
        sel.select(pool, n_to_select=1.5)
    with pytest.raises(ValueError, match="no structures"):
        sel.select([])


def test_validation_and_errors():
    train, pool = make_structures(4), make_structures(3, seed=1)
    with pytest.raises(NotFittedError):
        CommitteeSelector(FakeRegressor()).score_samples(pool)
    with pytest.raises(NotFittedError):
        CommitteeSelector(FakeRegressor()).select(pool)
    with pytest.raises(InvalidParameterError, match="n_members"):
        CommitteeSelector(FakeRegressor(), n_members=1).fit(train)
    with pytest.raises(InvalidParameterError, match="disagreement"):
        CommitteeSelector(FakeRegressor(), disagreement="forces").fit(train)
    with pytest.raises(ValueError, match="no random_state parameter"):
        CommitteeSelector(NoSeedRegressor()).fit(train)
    with pytest.raises(TypeError, match=r"X\[1\] is a str"):
        CommitteeSelector(FakeRegressor()).fit([train[0], "Cu"])
    bad = CommitteeSelector(FakeRegressor(nan_for=1), n_members=2, random_state=0).fit(train)
    with pytest.raises(ValueError, match=r"member 0 .*non-finite energy for structure 1"):
        bad.score_samples(pool)
    sel = CommitteeSelector(FakeRegressor(), n_members=2, random_state=0)
    cloned = clone(sel)
    assert cloned.get_params()["n_members"] == 2 and cloned.regressor is not sel.regressor


# -- RandomSelector on structures ------------------------------------------------------------------
def test_random_selector_accepts_atoms_lists():
    pool = make_structures(10)
    sel = RandomSelector(n_to_select=4, random_state=0).fit(make_structures(3))
    assert sel.n_train_ == 3 and not hasattr(sel, "n_features_in_")
    idx = sel.select(pool)
    assert idx.dtype == np.int64 and len(set(idx.tolist())) == 4 and idx.max() < 10
    np.testing.assert_array_equal(sel.selected_idx_, idx)
    # only the length matters: the same picks as for an array with as many rows
    ref = RandomSelector(n_to_select=4, random_state=0).fit(np.zeros((3, 2)))
    np.testing.assert_array_equal(ref.select(np.zeros((10, 2))), idx)
    np.testing.assert_array_equal(sel.select(tuple(pool)), idx)
    np.testing.assert_array_equal(sel.select(np.array(pool + [Atoms("H")], dtype=object)[:-1]),
                                  idx)
    assert sel.select(pool[0], n_to_select=1).tolist() == [0]  # one Atoms = one structure
    with pytest.raises(ValueError, match="exceeds the 10"):
        sel.select(pool, n_to_select=11)
    # array behaviour unchanged: fitted on arrays, the width is still checked
    arr = RandomSelector(n_to_select=2, random_state=0).fit(np.zeros((3, 2)))
    with pytest.raises(ValueError, match="features"):
        arr.select(np.zeros((5, 3)))
    assert len(arr.select(pool)) == 2
    fb = FeatureBlocks(np.zeros((6, 2)), np.array([0, 2, 4, 6]))
    assert len(arr.select(fb)) == 2
    refit = RandomSelector(random_state=0).fit(np.zeros((3, 2))).fit(pool)
    assert not hasattr(refit, "n_features_in_")
    with pytest.raises(ValueError):
        RandomSelector().fit([])


# -- integration with MLIPRegressor ----------------------------------------------------------------
def emt_frames(n, seed):
    frames = []
    for k in range(n):
        a = fcc111("Cu", size=(2, 2, 2), vacuum=4.0) if k % 2 else Atoms(
            "Cu4", positions=[[0, 0, 0], [2.5, 0, 0], [0, 2.5, 0], [0, 0, 2.5]])
        a.rattle(0.1, seed=seed * 100 + k)
        a.calc = EMT()
        a.get_forces()
        frames.append(a)
    return frames


def test_committee_with_mlip_regressor():
    try:
        from skntk.finetune import MLIPRegressor
    except ImportError as exc:  # pragma: no cover - depends on the finetune module
        pytest.skip(f"skntk.finetune.MLIPRegressor not importable: {exc}")

    reg = MLIPRegressor(tiny_builtin((29,), n_hidden=16), epochs=2, random_state=0)
    train, pool = emt_frames(6, 0), emt_frames(5, 1)
    sel = CommitteeSelector(reg, n_members=3, random_state=0).fit(train)
    assert sel.fit_time_ > 0
    preds = [m.predict(pool, return_forces=True) for m in sel.members_]
    assert not np.allclose(preds[0][0], preds[1][0])
    scores = sel.score_samples(pool)
    assert scores.shape == (5,) and np.all(np.isfinite(scores)) and np.all(scores > 0)
    idx = sel.select(pool, n_to_select=2)
    np.testing.assert_array_equal(idx, np.argsort(-scores, kind="stable")[:2])
    energy = CommitteeSelector(reg, n_members=2, disagreement="energy", random_state=0)
    assert np.all(np.isfinite(energy.fit(train).score_samples(pool)))
