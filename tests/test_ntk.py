"""Tests of skntk.ntk: every derivative against central finite differences (float64), routes against
each other, the sketch, a linear-in-parameters model in closed form, and kernel invariants."""

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import molecule
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.transform import Rotation

from skntk import ntk
from skntk.atoms import collate
from skntk.models.base import MLIP, replaced_parameters
from skntk.models.builtin import BuiltinMLIP

EPS = 1e-5


@pytest.fixture(scope="module")
def model():
    return BuiltinMLIP([1, 6, 8], cutoff=3.0, n_hidden=6, n_basis=4, n_blocks=2, n_readout=4,
                       dtype=torch.float64, random_state=3)


def structures():
    a, b = molecule("CH3OH"), molecule("H2O")
    a.rattle(0.05, seed=1)
    b.rattle(0.05, seed=2)
    return [a, b]


def subset(model, name="all"):
    named = model.parameters(name)
    for _, p in named:
        p.requires_grad_(True)
    return [n for n, _ in named], [p for _, p in named]


def exact_sketch(params):
    return ntk.ParameterSketch([p.shape for p in params], None, 0)


def energies_forces_at(model, names, params, direction, t, atoms):
    with replaced_parameters(model.module, {n: p.detach() + t * v for n, p, v in
                                            zip(names, params, direction, strict=True)}):
        E, F = model.energy_and_forces(model.collate(atoms))
    return E.detach(), F.detach().reshape(-1)


def test_energy_rows_match_parameter_finite_differences(model):
    X = structures()
    names, params = subset(model)
    G = ntk.energy_rows(model, model.collate(X), params, exact_sketch(params))
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        v = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
        Ep, _ = energies_forces_at(model, names, params, v, EPS, X)
        Em, _ = energies_forces_at(model, names, params, v, -EPS, X)
        vflat = torch.cat([x.reshape(-1) for x in v])
        torch.testing.assert_close(G @ vflat, (Ep - Em) / (2 * EPS), atol=1e-7, rtol=1e-6)


def test_force_rows_match_parameter_finite_differences_of_forces(model):
    X = structures()
    names, params = subset(model)
    J = ntk.force_rows_exact(model, model.collate(X), params, exact_sketch(params))
    assert J.shape == (3 * 9, sum(p.numel() for p in params))
    v = [torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(1))
         for p in params]
    _, Fp = energies_forces_at(model, names, params, v, EPS, X)
    _, Fm = energies_forces_at(model, names, params, v, -EPS, X)
    vflat = torch.cat([x.reshape(-1) for x in v])
    torch.testing.assert_close(J @ vflat, (Fp - Fm) / (2 * EPS), atol=1e-7, rtol=1e-6)


def test_force_rows_are_minus_position_derivative_of_energy_rows(model):
    X = structures()[1:]
    names, params = subset(model, "last_block")
    sk = ntk.ParameterSketch([p.shape for p in params], 7, seed=5)
    J = ntk.force_rows_exact(model, model.collate(X), params, sk)
    for atom in range(3):
        for comp in range(3):
            rows = []
            for s in (+1, -1):
                a = X[0].copy()
                a.positions[atom, comp] += s * EPS
                rows.append(ntk.energy_rows(model, model.collate([a]), params, sk))
            fd = -(rows[0] - rows[1]) / (2 * EPS)
            torch.testing.assert_close(J[3 * atom + comp], fd[0], atol=1e-7, rtol=1e-6)


def test_forward_over_reverse_equals_reverse_over_reverse(model):
    X = structures()
    names, params = subset(model, "last_block")
    sk = ntk.ParameterSketch([p.shape for p in params], 5, seed=2)
    J = ntk.force_rows_exact(model, model.collate(X), params, sk)
    Jf = ntk.force_rows_forward(model, model.collate(X), params, sk, names=names)
    torch.testing.assert_close(Jf, J, atol=1e-12, rtol=1e-10)


def test_probe_rows_are_projections_and_unbiased(model):
    X = structures()
    names, params = subset(model, "readout")
    sk = exact_sketch(params)
    J = ntk.force_rows_exact(model, model.collate(X), params, sk)
    s = 4
    z = ntk.rademacher_probes([6, 3], s, seed=0, structure_ids=[0, 1])
    V = ntk.force_rows_probes(model, model.collate(X), params, sk, z)
    zf = z.reshape(s, -1)
    torch.testing.assert_close(V[:s], zf[:, :18] @ J[:18] / s ** 0.5)
    torch.testing.assert_close(V[s:], zf[:, 18:] @ J[18:] / s ** 0.5)
    # probe Gram (s probes, each scaled 1/√s) -> exact Gram as s grows; means over seeds too
    exact = J[:18].T @ J[:18]
    n_probes = 600
    zs = ntk.rademacher_probes([6, 3], n_probes, seed=7, structure_ids=[0, 1])
    Vs = ntk.force_rows_probes(model, model.collate(X), params, sk, zs)[:n_probes]
    err = (Vs.T @ Vs - exact).norm() / exact.norm()
    assert err < 0.15
    few = torch.stack([
        (lambda V: V.T @ V)(ntk.force_rows_probes(
            model, model.collate(X), params, sk,
            ntk.rademacher_probes([6, 3], s, seed=seed, structure_ids=[0, 1]))[:s])
        for seed in range(40)])
    assert (few.mean(0) - exact).norm() / exact.norm() < 0.3
    assert (few[0] - exact).norm() / exact.norm() > 0.01  # a single seed is noisy


def test_joint_helpers_return_energy_rows(model):
    X = structures()
    _, params = subset(model, "readout")
    sk = exact_sketch(params)
    G = ntk.energy_rows(model, model.collate(X), params, sk, per_atom=True)
    _, Ge = ntk.force_rows_exact(model, model.collate(X), params, sk, with_energy=True,
                                 per_atom=True)
    torch.testing.assert_close(Ge, G)
    z = ntk.rademacher_probes([6, 3], 2, 0, [0, 1])
    _, Gp = ntk.force_rows_probes(model, model.collate(X), params, sk, z, with_energy=True,
                                  per_atom=True)
    torch.testing.assert_close(Gp, G)
    raw = ntk.energy_rows(model, model.collate(X), params, sk)
    torch.testing.assert_close(raw / torch.tensor([[6.0], [3.0]], dtype=raw.dtype), G)


def test_force_rows_sum_to_zero_over_atoms(model):
    X = structures()
    _, params = subset(model)
    J = ntk.force_rows_exact(model, model.collate(X), params, exact_sketch(params))
    per_struct = [J[:18].reshape(6, 3, -1), J[18:].reshape(3, 3, -1)]
    for blk in per_struct:
        assert blk.sum(0).abs().max() < 1e-10 * max(1.0, blk.abs().max())


# -- the sketch ---------------------------------------------------------------------------------

def test_sketch_apply_equals_dense_product_and_blocks_are_seeded():
    shapes = [(5, 3), (7,), (2, 2, 2)]
    sk = ntk.ParameterSketch(shapes, 6, seed=11, block_rows=4, cache_mib=0)
    R = sk.dense()
    assert R.shape == (30, 6) and sk._cached_bytes == 0  # nothing cached under a zero budget
    g = [torch.randn(3, *s, dtype=torch.float64) for s in shapes]
    flat = torch.cat([x.reshape(3, -1) for x in g], dim=1)
    torch.testing.assert_close(sk.apply(g), flat @ R)
    assert torch.equal(R, ntk.ParameterSketch(shapes, 6, seed=11, block_rows=4).dense())
    assert not torch.equal(R, ntk.ParameterSketch(shapes, 6, seed=12, block_rows=4).dense())
    cols = sk.columns(2, 4)
    torch.testing.assert_close(torch.cat([c.reshape(2, -1) for c in cols], 1), R[:, 2:4].T)
    with pytest.raises(ValueError, match="gradients of 1 parameters; the sketch has 3"):
        sk.apply(g[:1])


def test_sketch_unbiased_inner_products():
    rng = np.random.default_rng(0)
    g1, g2 = (torch.as_tensor(rng.normal(size=(1, 40))) for _ in range(2))
    vals = []
    for seed in range(400):
        sk = ntk.ParameterSketch([(40,)], 16, seed=seed)
        vals.append(float(sk.apply([g1]) @ sk.apply([g2]).T))
    exact = float(g1 @ g2.T)
    se = np.std(vals) / np.sqrt(len(vals))
    assert abs(np.mean(vals) - exact) < 4 * se


def test_per_output_gradients_loop_fallback_matches(monkeypatch):
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)
    out = torch.stack([w.sum() ** 2, (w ** 3).sum(), w[0] * w[1]])
    ref = torch.autograd.functional.jacobian(
        lambda x: torch.stack([x.sum() ** 2, (x ** 3).sum(), x[0] * x[1]]), w.detach())
    torch.testing.assert_close(ntk.per_output_gradients(out, [w], retain_graph=True,
                                                        chunk_size=2)[0], ref)
    real = torch.autograd.grad

    def no_batching(*args, **kw):
        if kw.get("is_grads_batched"):
            raise RuntimeError("no batching rule")
        return real(*args, **kw)

    monkeypatch.setattr(torch.autograd, "grad", no_batching)
    torch.testing.assert_close(ntk.per_output_gradients(out, [w])[0], ref)


# -- a linear-in-parameters model: E = Σ_{i<j} Σ_k θ_k exp(-(r_ij - μ_k)²) ---------------------

MU = np.array([0.8, 1.2, 1.6, 2.0])


class LinearPair(MLIP):
    cutoff = 10.0
    subset_patterns = {"readout": ("theta",), "last_block": ("theta",), "all": ("*",)}

    def __init__(self):
        self.module = torch.nn.Module()
        self.module.theta = torch.nn.Parameter(torch.tensor([0.3, -0.2, 0.5, 0.1],
                                                            dtype=torch.float64))

    def collate(self, atoms, device="cpu"):
        return collate(atoms, self.cutoff, device=device)

    def energy(self, batch):
        r = batch.edge_vectors(batch.positions).norm(dim=1, keepdim=True)
        phi = torch.exp(-(r - torch.as_tensor(MU)) ** 2)  # [n_edges, 4]
        e = 0.5 * (phi * self.module.theta).sum(1)
        out = torch.zeros(batch.n_structures, dtype=e.dtype)
        return out.index_add(0, batch.batch[batch.edge_index[0]], e)


def test_linear_model_ntk_in_closed_form():
    a = Atoms("H3", positions=[[0, 0, 0], [1.1, 0, 0], [0.2, 1.3, 0.4]])
    m = LinearPair()
    params = [m.module.theta]
    sk = exact_sketch(params)
    G = ntk.energy_rows(m, m.collate([a]), params, sk).numpy()
    J = ntk.force_rows_exact(m, m.collate([a]), params, sk).numpy()
    pos = a.positions
    g_ref = np.zeros(4)
    J_ref = np.zeros((3, 3, 4))
    for i in range(3):
        for j in range(i + 1, 3):
            d = pos[j] - pos[i]
            r = np.linalg.norm(d)
            g_ref += np.exp(-(r - MU) ** 2)
            dphi = -2 * (r - MU) * np.exp(-(r - MU) ** 2)  # dφ_k/dr
            # F_i = -dE/dR_i = Σ_k θ_k dφ_k/dr · d/r  ->  ∂F_i/∂θ_k = dφ_k/dr · d/r
            J_ref[i] += np.outer(d / r, dphi)
            J_ref[j] -= np.outer(d / r, dphi)
    np.testing.assert_allclose(G[0], g_ref, atol=1e-12)
    np.testing.assert_allclose(J, J_ref.reshape(9, 4), atol=1e-12)
    # the energy NTK of a linear model is exact: k(x, x) = |g|^2 for all θ
    with torch.no_grad():
        m.module.theta.mul_(-3.0)
    G2 = ntk.energy_rows(m, m.collate([a]), params, sk).numpy()
    np.testing.assert_allclose(G2, G, atol=1e-12)


# -- hypothesis invariants --------------------------------------------------------------------

@st.composite
def small_structures(draw):
    n = draw(st.integers(2, 6))
    z = draw(st.lists(st.sampled_from([1, 6, 8]), min_size=n, max_size=n))
    seed = draw(st.integers(0, 2 ** 16))
    rng = np.random.default_rng(seed)
    pos = np.zeros((n, 3))
    for k in range(1, n):  # each atom 0.9-1.5 Å from a previous one, no closer than 0.8 Å
        for _ in range(100):
            cand = pos[rng.integers(k)] + rng.normal(size=3) / 1.0
            dmin = np.linalg.norm(pos[:k] - cand, axis=1).min()
            if dmin > 0.8:
                break
        pos[k] = cand
    return Atoms(numbers=z, positions=pos), seed


@settings(max_examples=12, deadline=None)
@given(small_structures())
def test_kernel_invariants(model, data):
    a, seed = data
    names, params = subset(model, "last_block")
    sk = ntk.ParameterSketch([p.shape for p in params], 8, seed=seed)

    def rows(x):
        b = model.collate([x])
        J, g = ntk.force_rows_exact(model, b, params, sk, with_energy=True)
        return g.detach().numpy(), J.detach().numpy()

    g, J = rows(a)
    n = len(a)
    Q = Rotation.random(random_state=seed).as_matrix()
    b = a.copy()
    b.positions = a.positions @ Q.T + np.array([0.3, -1.0, 2.0])
    gb, Jb = rows(b)
    tol = dict(atol=1e-9, rtol=1e-7)
    np.testing.assert_allclose(gb, g, **tol)  # k_E invariant
    np.testing.assert_allclose(Jb.T @ Jb, J.T @ J, **tol)  # Gram kernel invariant
    rotated = np.einsum("kl,ald->akd", Q, J.reshape(n, 3, -1))
    np.testing.assert_allclose(Jb.reshape(n, 3, -1), rotated, **tol)  # force rows rotate as vectors
    perm = np.random.default_rng(seed).permutation(n)
    gp, Jp = rows(a[perm])
    np.testing.assert_allclose(gp, g, **tol)
    np.testing.assert_allclose(Jp.reshape(n, 3, -1), J.reshape(n, 3, -1)[perm], **tol)
    K = np.vstack([g, J]) @ np.vstack([g, J]).T  # joint kernel block
    np.testing.assert_allclose(K, K.T)
    assert np.linalg.eigvalsh(K).min() > -1e-9 * max(1.0, np.abs(K).max())
    assert np.abs(J.reshape(n, 3, -1).sum(0)).max() < 1e-9 * max(1.0, np.abs(J).max())


def test_per_output_gradients_loop_and_chunked_reduce_match_jacobian():
    w = torch.randn(5, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)

    def f(w, v):
        return torch.cat([(w[:3] * v).sum(0) ** 2, torch.sin(w).reshape(-1), v.sum()[None]])

    jw, jv = torch.autograd.functional.jacobian(f, (w.detach(), v.detach()))
    out = f(w, v)
    M = torch.randn(5 + 6, 4, dtype=torch.float64)  # a fixed reduction of the flat gradient

    def reduce(g):
        return torch.cat([g[0].reshape(g[0].shape[0], -1), g[1].reshape(g[1].shape[0], -1)], 1) @ M

    ref = torch.cat([jw, jv.reshape(jv.shape[0], -1)], 1) @ M
    for vectorize in (True, False):
        got = ntk.per_output_gradients(out, [w, v], retain_graph=True, chunk_size=3,
                                       vectorize=vectorize, reduce=reduce)
        torch.testing.assert_close(got, ref)
        loop = ntk.per_output_gradients(out, [w, v], retain_graph=True, vectorize=vectorize)
        torch.testing.assert_close(loop[1], jv)


# -- CountSketch ----------------------------------------------------------------------------------

def test_countsketch_is_one_signed_entry_per_row_seeded_and_matches_dense():
    shapes = [(5, 3), (7,), (2, 2, 2)]
    sk = ntk.ParameterSketch(shapes, 6, seed=11, method="countsketch")
    R = sk.dense()
    assert R.shape == (30, 6)
    assert ((R != 0).sum(1) == 1).all() and set(R[R != 0].tolist()) <= {-1.0, 1.0}
    g = [torch.randn(3, *s, dtype=torch.float64) for s in shapes]
    flat = torch.cat([x.reshape(3, -1) for x in g], dim=1)
    torch.testing.assert_close(sk.apply(g), flat @ R)
    cols = sk.columns(1, 5)
    torch.testing.assert_close(torch.cat([c.reshape(4, -1) for c in cols], 1), R[:, 1:5].T)
    again = ntk.ParameterSketch(shapes, 6, seed=11, method="countsketch").dense()
    assert torch.equal(R, again)
    assert not torch.equal(R, ntk.ParameterSketch(shapes, 6, seed=12,
                                                  method="countsketch").dense())
    assert not torch.equal(R, ntk.ParameterSketch(shapes, 6, seed=11).dense())  # not Gaussian
    with pytest.raises(ValueError, match="unknown sketch method 'srht'"):
        ntk.ParameterSketch(shapes, 6, seed=0, method="srht")


@pytest.mark.parametrize("method", ["gaussian", "countsketch"])
def test_sketches_are_unbiased_with_the_documented_variance(method):
    """E⟨gR, g'R⟩ = ⟨g, g'⟩ (a 4-standard-error check over 2000 seeds) and E[R Rᵀ] = I; the
    CountSketch variance is the documented closed form, the Gaussian one is larger."""
    rng = np.random.default_rng(0)
    g1, g2 = (torch.as_tensor(rng.normal(size=(1, 40)) * rng.exponential(size=40))
              for _ in range(2))
    d = 16
    vals, RRt = [], torch.zeros(40, 40, dtype=torch.float64)
    for seed in range(2000):
        sk = ntk.ParameterSketch([(40,)], d, seed=seed, method=method)
        vals.append(float(sk.apply([g1]) @ sk.apply([g2]).T))
        R = sk.dense()
        RRt += R @ R.T / 2000
    exact = float(g1 @ g2.T)
    se = np.std(vals) / np.sqrt(len(vals))
    assert abs(np.mean(vals) - exact) < 4 * se
    assert (RRt - torch.eye(40, dtype=torch.float64)).abs().max() < 0.1
    n1, n2 = float(g1 @ g1.T), float(g2 @ g2.T)
    gauss_var = (n1 * n2 + exact ** 2) / d
    if method == "countsketch":
        var = (n1 * n2 + exact ** 2 - 2 * float((g1 ** 2 * g2 ** 2).sum())) / d
        assert var < gauss_var
    else:
        var = gauss_var
    assert abs(np.var(vals) / var - 1) < 0.15


# -- observation_rows: the one entry point --------------------------------------------------------

def rows_offsets(*args, **kwargs):
    """``(rows as a Tensor, offsets)`` of :func:`ntk.observation_rows`'s FeatureBlocks."""
    G = ntk.observation_rows(*args, **kwargs)
    return torch.from_numpy(G.rows), G.offsets


@pytest.mark.parametrize("kind,route", [("energy", "exact"), ("force", "exact"),
                                        ("joint", "exact"), ("force", "forward"),
                                        ("joint", "forward"), ("force", "probes"),
                                        ("joint", "probes")])
def test_observation_rows_layout_equals_the_reference_routes(model, kind, route):
    """Blocks of observation_rows are [w_E energy row; w_F force rows] per structure, equal to
    the route functions called on their own (the reference)."""
    X = structures()
    names, params = subset(model)
    sk = ntk.ParameterSketch([p.shape for p in params], 9, seed=2, method="countsketch")
    batch = model.collate(X)
    G = ntk.observation_rows(model, batch, params, sk, kind, route, (2.0, 0.5), names=names,
                             n_probes=3, probe_seed=7)
    rows, offsets = torch.from_numpy(G.rows), G.offsets
    assert G.kind == ("plain" if route == "probes" and kind != "energy" else kind)
    n = [len(a) for a in X]
    m_f = [0] * 2 if kind == "energy" else ([3] * 2 if route == "probes" else [3 * k for k in n])
    m_e = 0 if kind == "force" else 1
    assert offsets.tolist() == np.cumsum([0] + [m_e + m for m in m_f]).tolist()
    e_ref = ntk.energy_rows(model, model.collate(X), params, sk, per_atom=True)
    if route == "exact":
        f_ref = ntk.force_rows_exact(model, model.collate(X), params, sk)
    elif route == "forward":
        f_ref = ntk.force_rows_forward(model, model.collate(X), params, sk, names=names)
    else:
        Z = ntk.rademacher_probes(n, 3, 7, n)
        f_ref = ntk.force_rows_probes(model, model.collate(X), params, sk, Z)
    f_start = np.cumsum([0] + m_f)
    for b in range(2):
        blk = rows[offsets[b]:offsets[b + 1]]
        if m_e:
            torch.testing.assert_close(blk[0], 2.0 * e_ref[b], rtol=1e-10, atol=1e-12)
        if kind != "energy":
            torch.testing.assert_close(blk[m_e:], 0.5 * f_ref[f_start[b]:f_start[b + 1]],
                                       rtol=1e-9, atol=1e-12)


def test_observation_rows_finite_differences_and_probe_projection(model):
    """Joint exact rows (unsketched) against central differences of E/N and F along random
    directions; probe rows are exactly Zᵀ (exact force rows) / √s for the same probes."""
    X = structures()
    names, params = subset(model)
    sk = exact_sketch(params)
    rows, off = rows_offsets(model, model.collate(X), params, sk, "joint", "exact")
    gen = torch.Generator().manual_seed(3)
    n = torch.tensor([len(a) for a in X], dtype=torch.float64)
    for _ in range(2):
        v = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
        flat_v = torch.cat([x.reshape(-1) for x in v])
        Ep, Fp = energies_forces_at(model, names, params, v, EPS, X)
        Em, Fm = energies_forces_at(model, names, params, v, -EPS, X)
        dE, dF = (Ep - Em) / (2 * EPS) / n, (Fp - Fm) / (2 * EPS)
        jv = rows @ flat_v
        f_at = 0
        for b in range(2):
            blk = jv[off[b]:off[b + 1]]
            torch.testing.assert_close(blk[0], dE[b], rtol=1e-6, atol=1e-8)
            torch.testing.assert_close(blk[1:], dF[f_at:f_at + blk.numel() - 1], rtol=1e-5,
                                       atol=1e-7)
            f_at += blk.numel() - 1
    probe_rows, poff = rows_offsets(model, model.collate(X), params, sk, "force", "probes",
                                    n_probes=4, probe_seed=5)
    nn_ = [len(a) for a in X]
    Z = ntk.rademacher_probes(nn_, 4, 5, nn_)  # (s, n_atoms, 3)
    f_at = 0
    for b in range(2):
        exact = torch.cat([rows[off[b] + 1:off[b + 1]]])
        zb = Z[:, f_at:f_at + nn_[b]].reshape(4, -1)
        torch.testing.assert_close(probe_rows[poff[b]:poff[b + 1]], zb @ exact / 2.0,
                                   rtol=1e-9, atol=1e-12)
        f_at += nn_[b]


def test_observation_rows_rejects_unknown_kind_and_route(model):
    names, params = subset(model)
    sk = exact_sketch(params)
    with pytest.raises(ValueError, match="kind must be"):
        ntk.observation_rows(model, model.collate(structures()), params, sk, "hessian", "exact")
    with pytest.raises(ValueError, match="route must be"):
        ntk.observation_rows(model, model.collate(structures()), params, sk, "force", "magic")
    with pytest.raises(ValueError, match="parameter names"):
        ntk.observation_rows(model, model.collate(structures()), params, sk, "force", "forward")


# -- memory budget: the graph is measured while it is built ---------------------------------------

def test_graph_meter_counts_saved_storages_once():
    """x * x saves x twice (one storage: counted once); nothing recorded gives 0."""
    x = torch.ones(250, dtype=torch.float64, requires_grad=True)
    meter = ntk.GraphMeter()
    with meter.record():
        (x * x).sum()
    assert meter.bytes == 250 * 8
    w = torch.ones(10, 20, requires_grad=True)
    with meter.record():
        (w[:, :5].exp() @ torch.ones(5)).sum()
    # exp saves its (10, 5) float32 result; the product saves it again (counted once) and v
    assert meter.bytes == 10 * 5 * 4 + 5 * 4
    with meter.record():
        pass
    assert meter.bytes == 0


def test_graph_meter_keeps_double_backward_and_frees_the_graph():
    """A graph recorded by the meter gives the same second derivatives as one built without it,
    and is freed with its outputs: a pack hook keeping a saved output with its grad_fn forms a
    cycle through the C++ graph that gc cannot break (pytorch#115255), which leaked every graph
    whose backward retained it (~1 MB per CHGNet structure featurised)."""
    import gc
    import weakref

    def grad2(meter):
        x = torch.linspace(0.1, 1.0, 7, dtype=torch.float64, requires_grad=True)
        with ntk._recording(meter):
            y = x.exp() * x.sin()
        (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
        return torch.autograd.grad(g.sum(), x)[0]

    torch.testing.assert_close(grad2(ntk.GraphMeter()), grad2(None), rtol=0, atol=0)
    x = torch.ones(10, requires_grad=True)
    with ntk.GraphMeter().record():
        e = x.exp()  # exp saves its output, e
    alive = weakref.ref(e)
    del e
    gc.collect()
    assert alive() is None, "the meter kept the recorded graph alive"


@pytest.mark.parametrize("kind,route", [("energy", "exact"), ("joint", "exact"),
                                        ("joint", "probes")])
def test_memory_budget_bounds_vectorised_rows_and_keeps_rows(model, kind, route, monkeypatch):
    """With a budget of 2.5 graphs, every vectorised backward takes at most 2 rows (the built-in
    model vectorises its double backward); the rows equal those without a budget."""
    X = structures()
    names, params = subset(model)
    sk = ntk.ParameterSketch([p.shape for p in params], 6, seed=1)
    ref, off = rows_offsets(model, model.collate(X), params, sk, kind, route, n_probes=3)
    meter = ntk.GraphMeter()
    ntk.observation_rows(model, model.collate(X), params, sk, kind, route, n_probes=3,
                         meter=meter)
    assert meter.bytes > 0
    chunks = []
    real = ntk.per_output_gradients

    def spy(outputs, params, **kw):
        chunks.append(kw["chunk_size"])
        return real(outputs, params, **kw)

    monkeypatch.setattr(ntk, "per_output_gradients", spy)
    rows, off2 = rows_offsets(model, model.collate(X), params, sk, kind, route, n_probes=3,
                              memory_budget=int(2.5 * meter.bytes))
    assert chunks and max(chunks) == 2
    np.testing.assert_array_equal(off, off2)
    torch.testing.assert_close(rows, ref, rtol=1e-10, atol=1e-12)
    chunks.clear()
    ntk.observation_rows(model, model.collate(X), params, sk, kind, route, n_probes=3,
                         memory_budget=1)
    assert chunks == [1] * len(chunks) and chunks
