"""Tests of ForceNTKTransformer and EmbeddingTransformer."""

import numpy as np
import pytest
import torch
from ase.build import molecule
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.utils import estimator_checks as ec

from skntk import ntk
from skntk.blocks import FeatureBlocks
from skntk.models.builtin import BuiltinMLIP
from skntk.testing import check_featurizer
from skntk.transformers import EmbeddingTransformer, ForceNTKTransformer


@pytest.fixture(scope="module")
def model():
    return BuiltinMLIP([1, 6, 7, 8], cutoff=3.0, n_hidden=8, n_basis=4, n_blocks=2, n_readout=4,
                       dtype=torch.float64, random_state=0)


@pytest.fixture(scope="module")
def X():
    out = [molecule("H2O"), molecule("CH3OH"), molecule("NH3")]
    for k, a in enumerate(out):
        a.rattle(0.03, seed=k)
    return out


@pytest.mark.parametrize("Est", [ForceNTKTransformer, EmbeddingTransformer])
@pytest.mark.parametrize("check", [
    ec.check_no_attributes_set_in_init, ec.check_parameters_default_constructible,
    ec.check_get_params_invariance, ec.check_set_params, ec.check_estimator_cloneable,
    ec.check_estimator_repr, ec.check_valid_tag_types,
    ec.check_do_not_raise_errors_in_init_or_set_params,
])
def test_sklearn_checks_without_numeric_input(Est, check, model):
    check(Est.__name__, Est(model))


@pytest.mark.parametrize("make", [
    lambda m: ForceNTKTransformer(m, kind="energy", n_features=16),
    lambda m: ForceNTKTransformer(m, kind="force", force_rows="exact", n_features=16),
    lambda m: ForceNTKTransformer(m, kind="joint", force_rows="exact", n_features=16,
                                  energy_weight=2.0, parameters="last_block"),
    lambda m: ForceNTKTransformer(m, kind="joint", force_rows="forward", n_features=8),
    # probes: invariants on the exact route, the probe rows in expectation
    lambda m: ForceNTKTransformer(m, kind="joint", force_rows="probes", n_probes=4,
                                  n_features=16),
    lambda m: EmbeddingTransformer(m),
], ids=["energy", "force-exact", "joint-exact", "joint-forward", "joint-probes", "embedding"])
@pytest.mark.parametrize("structures", ["generated", "given"])
def test_featurizer_invariants(make, structures, model, X):
    """skntk.testing.check_featurizer: rigid motions, lattice shifts, permutations, PSD Gram,
    determinism, clone, errors — on generated cells and on the molecules of X."""
    check_featurizer(make(model), None if structures == "generated" else X)


@pytest.mark.parametrize("Est", [ForceNTKTransformer, EmbeddingTransformer])
def test_clone_keeps_model_tags_and_not_fitted(Est, model, X):
    est = Est(model)
    c = clone(est)
    assert c.model is model and c is not est
    assert est.__sklearn_tags__().input_tags.two_d_array is False
    assert "BuiltinMLIP" in repr(est)
    with pytest.raises(NotFittedError):
        est.transform(X)


def test_kinds_layout_and_joint_consistency(model, X):
    kw = dict(model=model, n_features=16, random_state=0, force_rows="exact")
    Ge = ForceNTKTransformer(kind="energy", **kw).fit(X).transform(X)
    Gf = ForceNTKTransformer(kind="force", **kw).fit(X).transform(X)
    Gj = ForceNTKTransformer(kind="joint", energy_weight=2.0, force_weight=0.5, **kw).fit(X)
    Gj = Gj.transform(X)
    assert isinstance(Ge, FeatureBlocks) and Ge.kind == "energy" and len(Ge) == 3
    assert Gf.kind == "force" and Gf.n_rows_per_structure.tolist() == [9, 18, 12]
    assert Gj.kind == "joint" and Gj.n_rows_per_structure.tolist() == [10, 19, 13]
    assert Ge.rows.dtype == np.float64 and Ge.n_features == 16
    for i in range(3):
        np.testing.assert_allclose(Gj.block(i)[0], 2.0 * Ge.block(i)[0], rtol=1e-10)
        np.testing.assert_allclose(Gj.block(i)[1:], 0.5 * Gf.block(i), rtol=1e-10, atol=1e-14)


def test_matches_ntk_module_and_normalize(model, X):
    t = ForceNTKTransformer(model, n_features=None, normalize=None, parameters="readout",
                            random_state=0).fit()
    G = t.transform(X).rows
    named = model.parameters("readout")
    for _, p in named:
        p.requires_grad_(True)
    params = [p for _, p in named]
    ref = ntk.energy_rows(model, model.collate(X), params,
                          ntk.ParameterSketch([p.shape for p in params], None, 0))
    np.testing.assert_allclose(G, ref.detach().numpy(), rtol=1e-12)
    assert t.n_features_out_ == t.n_params_ == sum(p.numel() for p in params)
    Gn = t.set_params(normalize="atoms").fit().transform(X).rows
    np.testing.assert_allclose(Gn * np.array([[3], [6], [4]]), G, rtol=1e-12)


def test_deterministic_and_batch_independent(model, X):
    kw = dict(kind="joint", n_features=8, force_rows="probes", n_probes=3, random_state=4)
    a = ForceNTKTransformer(model, batch_size=1, **kw).fit().transform(X)
    b = ForceNTKTransformer(model, batch_size=3, **kw).fit().transform(X)
    c = ForceNTKTransformer(model, batch_size=3, **{**kw, "random_state": 5}).fit().transform(X)
    np.testing.assert_array_equal(a.rows, ForceNTKTransformer(model, batch_size=1, **kw).fit()
                                  .transform(X).rows)
    np.testing.assert_allclose(a.rows, b.rows, rtol=1e-12)
    assert not np.allclose(a.rows, c.rows)
    assert a.kind == "plain" and a.n_rows_per_structure.tolist() == [4, 4, 4]


def test_forward_route_matches_exact(model, X):
    kw = dict(kind="force", n_features=6, parameters="last_block", random_state=1)
    ex = ForceNTKTransformer(model, force_rows="exact", **kw).fit().transform(X)
    fw = ForceNTKTransformer(model, force_rows="forward", **kw).fit().transform(X)
    np.testing.assert_allclose(fw.rows, ex.rows, atol=1e-12)


def test_auto_route_from_fit_structures(model, X):
    t = ForceNTKTransformer(model, kind="force", force_rows="auto", n_probes=8)
    assert t.fit([molecule("H2O")]).force_rows_ == "exact"  # 3N = 9 <= 32
    assert t.fit(X + [molecule("C6H6")]).force_rows_ == "probes"  # 36 > 32
    assert t.fit().force_rows_ == "probes"
    # forward-over-reverse costs ~1.5 d VJPs per structure whatever N: cheapest for tiny d
    t.set_params(n_features=4)
    assert t.fit(X + [molecule("C6H6")]).force_rows_ == "forward"  # 6 <= min(36, 32)
    assert t.fit([molecule("H2O")]).force_rows_ == "forward"  # 6 < 9
    t.set_params(n_features=16)
    assert t.fit([molecule("H2O")]).force_rows_ == "exact"  # 9 < 24
    assert t.fit(X + [molecule("C6H6")]).force_rows_ == "forward"  # 24 <= 32 < 36


def test_batching_rule(model, X):
    """auto: the built-in model (cheap vectorised backward) shares graphs for a shallow subset and
    gives each structure its own graph for a deep one; a backend without it never shares (CPU),
    except for forward-over-reverse; explicit choices pass through. Rows agree either way."""
    fit = dict(X=X)
    t = ForceNTKTransformer(model, kind="energy", parameters="readout", n_features=8,
                            random_state=0)
    assert t.fit(**fit).batching_ == "shared"
    assert t.set_params(parameters="all").fit(**fit).batching_ == "per_structure"
    G = t.transform(X).rows
    np.testing.assert_allclose(t.set_params(batching="shared").fit(**fit).transform(X).rows, G,
                               rtol=1e-10, atol=1e-13)
    try:
        model.batched_double_backward = False
        t.set_params(batching="auto", parameters="readout")
        assert t.fit(**fit).batching_ == "per_structure"
        assert t.set_params(kind="force", force_rows="forward").fit(**fit).batching_ == "shared"
    finally:
        del model.batched_double_backward
    assert t.set_params(batching="per_structure").fit(**fit).batching_ == "per_structure"


def test_working_memory_and_sketch_choice(model, X):
    """working_memory only changes how many unsketched rows are held at once, not the rows; the
    two sketches give different (both unbiased) features, and the Gaussian one is the dense
    product of the unsketched rows."""
    kw = dict(kind="joint", force_rows="exact", n_features=8, random_state=0)
    a = ForceNTKTransformer(model, **kw).fit().transform(X)
    b = ForceNTKTransformer(model, working_memory=1e-4, **kw).fit().transform(X)
    np.testing.assert_allclose(a.rows, b.rows, rtol=1e-12, atol=1e-14)
    g = ForceNTKTransformer(model, sketch="gaussian", **kw).fit()
    Gg = g.transform(X)
    assert not np.allclose(a.rows, Gg.rows)
    full = ForceNTKTransformer(model, **{**kw, "n_features": None}).fit().transform(X)
    np.testing.assert_allclose(full.rows @ g.sketch_.dense().numpy(), Gg.rows, rtol=1e-10,
                               atol=1e-12)
    with pytest.raises(ValueError, match="sketch"):
        ForceNTKTransformer(model, sketch="srht").fit()


def test_model_state_restored_even_on_error(model, X, monkeypatch):
    model.module.train(True)
    flags = {n: p.requires_grad for n, p in model.module.named_parameters()}
    model.module.readout[0].weight.requires_grad_(False)
    flags["readout.0.weight"] = False
    t = ForceNTKTransformer(model, dtype="float32", n_features=4, random_state=0).fit()
    G = t.transform(X)
    assert G.rows.dtype == np.float64
    assert model.module.training and model.dtype == torch.float64
    assert {n: p.requires_grad for n, p in model.module.named_parameters()} == flags

    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(ntk, "energy_rows", boom)
    with pytest.raises(RuntimeError, match="boom"):
        t.transform(X)
    assert model.module.training and model.dtype == torch.float64
    assert {n: p.requires_grad for n, p in model.module.named_parameters()} == flags
    model.module.readout[0].weight.requires_grad_(True)
    model.module.eval()


def test_bad_inputs(model, X, tmp_path):
    with pytest.raises(TypeError, match="raw Linear .* wrap it in an MLIP handle"):
        ForceNTKTransformer(torch.nn.Linear(2, 2)).fit()
    with pytest.raises(ValueError, match="'no-such-model', which is neither a known model name"):
        ForceNTKTransformer("no-such-model").fit()
    path = tmp_path / "m.pt"
    model.save(path)  # a saved model file works as a string parameter, and gives the same rows
    by_path = ForceNTKTransformer(str(path), n_features=8, random_state=0).fit(X).transform(X)
    by_handle = ForceNTKTransformer(model, n_features=8, random_state=0).fit(X).transform(X)
    np.testing.assert_allclose(by_path.rows, by_handle.rows, rtol=1e-10)
    with pytest.raises(ValueError, match="needs a model"):
        ForceNTKTransformer().fit()
    with pytest.raises(ValueError, match="'kind' parameter of ForceNTKTransformer"):
        ForceNTKTransformer(model, kind="stress").fit()
    with pytest.raises(ValueError, match="'nope' is not a subset"):
        ForceNTKTransformer(model, parameters="nope").fit()
    t = ForceNTKTransformer(model, n_features=4).fit()
    from ase import Atoms
    with pytest.raises(ValueError, match=r"X\[1\] \(Au\) contains Au \(Z=79\), which"):
        t.transform([X[0], Atoms("Au")])
    with pytest.raises(TypeError, match="numeric array"):
        t.transform(np.zeros((3, 4)))
    path = model.save(tmp_path / "m.pt")
    t2 = ForceNTKTransformer(str(path), n_features=4, random_state=0).fit()
    np.testing.assert_allclose(t2.transform(X).rows,
                               t.set_params(random_state=0).fit().transform(X).rows, rtol=1e-12)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_cuda_falls_back_to_cpu_with_warning(model):
    with pytest.warns(RuntimeWarning, match="CUDA is not available"):
        t = ForceNTKTransformer(model, device="cuda").fit()
    assert t.device_ == torch.device("cpu")
    assert ForceNTKTransformer(model).fit().device_ == torch.device("cpu")


def test_feature_names_and_progress_bar(model, X):
    t = ForceNTKTransformer(model, n_features=5, progress_bar=True, random_state=0).fit()
    assert t.get_feature_names_out().tolist() == [f"forcentkenergy{i}" for i in range(5)]
    assert t.transform(X).shape == (3, 5)


def test_embedding_transformer(model, X):
    e = EmbeddingTransformer(model, batch_size=2).fit()
    Z = e.transform(X)
    assert Z.shape == (3, 8) and Z.dtype == np.float64
    h = model.embeddings(model.collate([X[1]])).detach().numpy()
    np.testing.assert_allclose(Z[1], h.mean(0), rtol=1e-12)
    rot = X[1].copy()
    rot.rotate(70, "z")
    np.testing.assert_allclose(e.transform([rot])[0], Z[1], atol=1e-10)
    assert e.get_feature_names_out().tolist()[:2] == ["embedding0", "embedding1"]


def test_probe_rows_do_not_depend_on_position_in_X(model, X):
    """Common random probes: a structure's rows are the same wherever it sits in X, so equal
    structures get equal rows and permuting X permutes the blocks."""
    est = ForceNTKTransformer(model, kind="joint", force_rows="probes", n_probes=3,
                              n_features=16, random_state=0).fit(X)
    G = est.transform(X)
    order = np.arange(len(X))[::-1]
    G_perm = est.transform([X[i] for i in order])
    for k, i in enumerate(order):
        np.testing.assert_allclose(G_perm.block(k), G.block(i), rtol=1e-12, atol=1e-12)
    twice = est.transform([X[0], X[0]])
    np.testing.assert_allclose(twice.block(0), twice.block(1), rtol=1e-10, atol=1e-12)


def test_working_memory_sizes_shared_graphs_from_the_first(model, X, monkeypatch):
    """Shared graphs: when the first graph's measured bytes exceed working_memory, the graphs
    after it get fewer atoms (here one structure each); the rows do not change."""
    kw = dict(kind="joint", force_rows="probes", n_probes=2, n_features=8, batching="shared",
              batch_size=2, random_state=0)
    X6 = [a.copy() for a in X + X]
    ref = ForceNTKTransformer(model, **kw).fit().transform(X6).rows
    sizes = []
    real = type(model).collate

    def spy(self, atoms, device=None):
        sizes.append(len(atoms))
        return real(self, atoms, device)

    monkeypatch.setattr(type(model), "collate", spy)
    t = ForceNTKTransformer(model, working_memory=1e-3, **kw).fit()
    rows = t.transform(X6).rows
    assert sizes == [2, 1, 1, 1, 1], sizes
    np.testing.assert_allclose(rows, ref, rtol=1e-10, atol=1e-13)
    sizes.clear()
    ForceNTKTransformer(model, **kw).fit().transform(X6)
    assert sizes == [2, 2, 2], sizes  # 1 GiB: batch_size decides, as before
