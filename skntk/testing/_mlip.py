"""``check_mlip``: the MLIP backend contract, with autograd checked against central finite
differences (``parameter_derivatives``, ``energy_gradients``, ``force_vjp``)."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import numpy as np
import torch

from skntk.testing._common import (
    _bad_structure,
    _expect_named_error,
    _invariant,
    _label,
    _pick_species,
    _unknown_z,
)
from skntk.testing._structures import _random_motions, random_structures


def _energy_and_forces(model, X):
    e, f = model.energy_and_forces(model.collate(X, "cpu"))
    return e.detach().to("cpu", torch.float64).numpy(), f.detach().to("cpu", torch.float64).numpy()


def _module_state(module):
    return ({n: m.training for n, m in module.named_modules()},
            {n: (p.requires_grad, p.dtype, p.device, p.detach().clone())
             for n, p in module.named_parameters()})


def _assert_state(module, before, after_what):
    modes, params = _module_state(module)
    changed = [n or "<root>" for n, t in modes.items() if before[0].get(n) != t]
    assert not changed, (f"{after_what} left train/eval mode changed in {changed[:5]} "
                         f"(module.training was {before[0].get('')}, is {modes.get('')})")
    for n, (rg, dt, dev, val) in params.items():
        rg0, dt0, dev0, val0 = before[1][n]
        assert (rg, dt, dev) == (rg0, dt0, dev0), (
            f"{after_what} changed parameter {n}: requires_grad/dtype/device "
            f"{(rg0, dt0, dev0)} -> {(rg, dt, dev)}")
        assert torch.equal(val, val0), f"{after_what} changed the values of parameter {n}"


def _flat_grad(output, params, create_graph=False):
    """d(output)/dθ flattened over ``params`` (zeros for unused parameters), shape (P,)."""
    grads = torch.autograd.grad(output, params, retain_graph=True, allow_unused=True,
                                create_graph=create_graph)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                      for g, p in zip(grads, params, strict=True)])


@contextlib.contextmanager
def _grad_enabled(params):
    """``requires_grad`` on ``params`` inside the block, restored after."""
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for p, f in zip(params, flags, strict=True):
            p.requires_grad_(f)


def parameter_derivatives(model, X, subset, *, n_directions=2, eps=1e-3, seed=0):
    """Autograd and central finite-difference derivatives of the energies and forces along random
    parameter directions.

    For random unit directions ``v`` in the subset and random weights ``w`` (energies) and ``W``
    (forces), the autograd values ``w·(∂E/∂θ)v`` and ``Σ W∘(∂F/∂θ)v`` and the same from
    ``(E(θ+εv) - E(θ-εv)) / 2ε``, with ``ε = eps`` times the RMS of the subset's parameters.
    The parameters are put back (bit for bit) after each step.

    Parameters
    ----------
    model : MLIP
    X : list of ase.Atoms
    subset : str or list of str
        As for :meth:`skntk.models.base.MLIP.parameters`.
    n_directions : int, default=2
    eps : float, default=1e-3
    seed : int, default=0

    Returns
    -------
    auto, fd : ndarray of shape (n_directions, 2)
        Columns: energy (eV per unit θ), forces (eV/Å per unit θ).
    """
    rng = np.random.default_rng(seed)
    params = [p for _, p in model.parameters(subset)]
    with _grad_enabled(params):
        batch = model.collate(X, "cpu")
        energy, forces = model.energy_and_forces(batch, create_graph=True)
        w = torch.as_tensor(rng.standard_normal(energy.shape), dtype=energy.dtype)
        W = torch.as_tensor(rng.standard_normal(forces.shape), dtype=forces.dtype)
        gE = _flat_grad((energy * w).sum(), params).double().cpu()
        gF = _flat_grad((forces * W).sum(), params).double().cpu()
        del energy, forces
    theta = torch.cat([p.detach().reshape(-1).cpu() for p in params]).double()
    step = eps * float(theta.pow(2).mean().sqrt())
    auto, fd = [], []
    for _ in range(n_directions):
        v = torch.as_tensor(rng.standard_normal(theta.numel()))
        v /= v.norm()
        auto.append([float(gE @ v), float(gF @ v)])
        vals = []
        for sign in (1.0, -1.0):
            saved = [p.detach().clone() for p in params]
            try:
                with torch.no_grad():
                    off = 0
                    for p in params:
                        k = p.numel()
                        p.add_((sign * step * v[off:off + k]).reshape(p.shape).to(p))
                        off += k
                e, f = _energy_and_forces(model, X)
                vals.append([float((e * w.double().numpy()).sum()),
                             float((f * W.double().numpy()).sum())])
            finally:
                with torch.no_grad():
                    for p, s in zip(params, saved, strict=True):
                        p.copy_(s)
        fd.append([(vals[0][k] - vals[1][k]) / (2 * step) for k in range(2)])
    return np.array(auto), np.array(fd)


def energy_gradients(model, X, subset="readout") -> np.ndarray:
    """Energy NTK rows ``∂E/∂θ`` (unsketched) of each structure, ndarray (n_structures, P),
    float64."""
    params = [p for _, p in model.parameters(subset)]
    with _grad_enabled(params):
        energy = model.energy_and_forces(model.collate(X, "cpu"), create_graph=True)[0]
        return np.stack([_flat_grad(e, params).double().cpu().numpy() for e in energy])


def force_vjp(model, atoms_, subset, weights) -> np.ndarray:
    """``Σ_i weights_i · ∂F_i/∂θ`` for one structure, ndarray (P,), float64."""
    params = [p for _, p in model.parameters(subset)]
    with _grad_enabled(params):
        _, forces = model.energy_and_forces(model.collate([atoms_], "cpu"), create_graph=True)
        W = torch.as_tensor(weights, dtype=forces.dtype)
        return _flat_grad((forces * W).sum(), params).double().cpu().numpy()


def _model_dtype(model):
    p = next(iter(model.module.parameters()), None)
    return torch.float64 if p is None else p.dtype


def check_mlip(handle, structures=None, *, reference=None, subsets=("readout",), eps=None,
               rtol=None, fd_rtol=None, unknown_element="auto", random_state=0):
    """Check the MLIP backend contract of a handle; raise on the first failure.

    Checks (the name of each appears in its failure message):

    1. ``state restored after <call>``: ``collate``, ``energy_and_forces`` (with and without
       ``create_graph``), ``embeddings``, the calculator and every other check leave the
       module's train/eval modes, ``requires_grad`` flags, dtypes, devices and parameter values
       as they were;
    2. ``collate offsets``: ``batch.ptr`` holds the atom offsets;
    3. ``energies and forces shape``: (n_structures,) and (n_atoms, 3), finite;
    4. ``energy() equals energy_and_forces()``, when the handle overrides ``energy``;
    5. ``batch equals separate``: energies and forces of the batch equal those of each structure
       alone;
    6. ``translation invariance: no net force``: ``Σ_i F_i = 0`` for every structure;
    7. ``matches reference calculator`` (when ``reference`` is given) and ``matches own ASE
       calculator`` (:meth:`~skntk.models.base.MLIP.calculator`);
    8. ``forces = -dE/dR (finite differences)`` along a random displacement of each structure;
    9. ``dE/dtheta and dF/dtheta (finite differences)`` for each subset;
    10. ``rotation invariance``: energies invariant and forces rotating under a rigid motion with
       a permutation, the energy-gradient kernel ``G_E G_Eᵀ`` invariant, and
       ``Σ_i (Q w_i)·∂F_i(QR)/∂θ = Σ_i w_i·∂F_i(R)/∂θ``;
    11. ``embeddings shape and invariance`` (when ``"embeddings"`` is implemented);
    12. ``parameter subsets``: every declared subset and ``"default"`` resolve to distinct
        parameters of the module, an unknown name raises ``ValueError``;
    13. ``copy is independent``;
    14. ``error on unknown element``: ``collate`` raises a ``ValueError`` naming the element and
        the structure (``X[1]``).

    Parameters
    ----------
    handle : MLIP
        The model handle (:class:`skntk.models.base.MLIP`); its parameters are moved by tiny steps
        for the finite differences and put back exactly.
    structures : list of ase.Atoms or None, default=None
        Small structures (a few atoms) to check on; ``None`` generates three
        (:func:`random_structures`) from the handle's ``species``.
    reference : ase Calculator, callable or None, default=None
        The backend's own ASE calculator, or a callable ``atoms -> (energy, forces)`` (eV, eV/Å,
        shapes () and (n_atoms, 3)) for structures the calculator needs prepared.
    subsets : sequence or mapping, default=("readout",)
        Parameter subsets for the ∂θ finite differences: names or tuples of fnmatch patterns, or
        a mapping from those to the relative step ``eps`` of each.
    eps : float or None, default=None
        Relative parameter step (``None``: 1e-4 for float64 models, 1e-2 for float32).
    rtol : float or None, default=None
        Tolerance of exact identities (calculators, batching, rotations) relative to the largest
        value compared (``None``: 1e-7 for float64 models, 2e-4 for float32).
    fd_rtol : float or None, default=None
        Tolerance of finite differences (``None``: 1e-5 for float64, 2e-2 for float32).
    unknown_element : int, "auto" or None, default="auto"
        Atomic number ``collate`` must refuse (``"auto"``: one outside ``species``).
    random_state : int, default=0
        Seeds the directions, weights and motions.

    Raises
    ------
    AssertionError
        ``"<handle> fails the invariant '<name>' on X[i] (formula), ...: <detail>"``.

    Examples
    --------
    >>> import torch
    >>> from skntk.models.builtin import BuiltinMLIP
    >>> check_mlip(BuiltinMLIP([1, 8], cutoff=3.0, n_hidden=8, n_blocks=1, dtype=torch.float64))
    """
    who = type(handle).__name__
    module = handle.module
    single = _model_dtype(handle) == torch.float32
    rtol = rtol if rtol is not None else (2e-4 if single else 1e-7)
    fd_rtol = fd_rtol if fd_rtol is not None else (2e-2 if single else 1e-5)
    eps = eps if eps is not None else (1e-2 if single else 1e-4)
    steps = dict(subsets) if isinstance(subsets, Mapping) else {s: None for s in subsets}
    X = (list(structures) if structures is not None
         else random_structures(_pick_species(handle.species), random_state=random_state))
    n = len(X)
    all_x = _label(X, range(n))
    rng = np.random.default_rng(random_state)
    state = _module_state(module)

    def restored(after):
        with _invariant(who, f"state restored after {after}", all_x):
            _assert_state(module, state, after)

    batch = handle.collate(X, "cpu")
    restored("collate")
    with _invariant(who, "collate offsets", all_x):
        ptr = np.asarray(batch.ptr.cpu())
        np.testing.assert_array_equal(ptr, np.cumsum([0] + [len(a) for a in X]))
    e_t, f_t = handle.energy_and_forces(batch)
    restored("energy_and_forces(create_graph=False)")
    with _invariant(who, "energies and forces shape", all_x):
        assert tuple(e_t.shape) == (n,), f"energies have shape {tuple(e_t.shape)}"
        assert tuple(f_t.shape) == (ptr[-1], 3), f"forces have shape {tuple(f_t.shape)}"
    E = e_t.detach().to("cpu", torch.float64).numpy()
    F = f_t.detach().to("cpu", torch.float64).numpy()
    with _invariant(who, "energies and forces shape", all_x):
        assert np.all(np.isfinite(E)) and np.all(np.isfinite(F)), "non-finite outputs"
    e_scale = max(float(np.abs(E).max()), 1.0)
    f_scale = max(float(np.abs(F).max()), 1e-3)
    e2, f2 = handle.energy_and_forces(handle.collate(X, "cpu"), create_graph=True)
    restored("energy_and_forces(create_graph=True)")
    with _invariant(who, "energies and forces shape", all_x):
        np.testing.assert_allclose(e2.detach().double().cpu().numpy(), E, rtol=rtol,
                                   atol=rtol * e_scale, err_msg="create_graph=True energies")
        del e2, f2
    from skntk.models.base import MLIP

    if type(handle).energy is not MLIP.energy:
        e3 = handle.energy(handle.collate(X, "cpu")).detach().double().cpu().numpy()
        restored("energy")
        with _invariant(who, "energy() equals energy_and_forces()", all_x):
            np.testing.assert_allclose(e3, E, rtol=rtol, atol=rtol * e_scale)

    ptr_list = ptr.tolist()
    with _invariant(who, "batch equals separate", all_x):
        for i, a in enumerate(X):
            e, f = _energy_and_forces(handle, [a])
            np.testing.assert_allclose(e[0], E[i], rtol=rtol, atol=rtol * e_scale,
                                       err_msg=f"energy of X[{i}]")
            np.testing.assert_allclose(f, F[ptr_list[i]:ptr_list[i + 1]], rtol=rtol,
                                       atol=rtol * f_scale, err_msg=f"forces of X[{i}]")

    def compare(name, get):
        with _invariant(who, name, all_x):
            for i, a in enumerate(X):
                e, f = get(a)
                np.testing.assert_allclose(e, E[i], rtol=rtol, atol=rtol * e_scale + 1e-12,
                                           err_msg=f"energy of X[{i}]")
                np.testing.assert_allclose(np.asarray(f), F[ptr_list[i]:ptr_list[i + 1]],
                                           rtol=0, atol=rtol * f_scale * 10 + 1e-12,
                                           err_msg=f"forces of X[{i}]")

    if reference is not None:
        def ref(a):
            if callable(reference) and not hasattr(reference, "get_potential_energy"):
                return reference(a)
            a = a.copy()
            a.calc = reference
            return a.get_potential_energy(), a.get_forces()

        compare("matches reference calculator", ref)

    def own(a):
        a = a.copy()
        a.calc = handle.calculator()
        return a.get_potential_energy(), a.get_forces()

    compare("matches own ASE calculator", own)
    restored("calculator")

    with _invariant(who, "translation invariance: no net force", all_x):
        for i, a in enumerate(X):
            net = F[ptr_list[i]:ptr_list[i + 1]].sum(axis=0)
            assert np.abs(net).max() <= 10 * rtol * f_scale * len(a) + 1e-12, (
                f"X[{i}]: Σ_i F_i = {net.tolist()} eV/Å")

    with _invariant(who, "forces = -dE/dR (finite differences)", all_x):
        h = 1e-2 if single else 1e-4
        for i, a in enumerate(X):
            U = rng.standard_normal((len(a), 3))
            U /= np.linalg.norm(U)
            plus, minus = a.copy(), a.copy()
            plus.positions += h * U
            minus.positions -= h * U
            ep, em = _energy_and_forces(handle, [plus])[0][0], _energy_and_forces(handle,
                                                                                   [minus])[0][0]
            fd = -(ep - em) / (2 * h)
            auto = float(np.sum(F[ptr_list[i]:ptr_list[i + 1]] * U))
            assert abs(auto - fd) <= fd_rtol * (abs(fd) + f_scale), (
                f"X[{i}]: F·u = {auto:.6g} but -(E(R+hu) - E(R-hu))/2h = {fd:.6g} "
                f"(h = {h} Å along a random unit displacement u)")

    for k, (subset, step) in enumerate(steps.items()):
        pattern = list(subset) if isinstance(subset, tuple) else subset
        with _invariant(who, f"dE/dtheta and dF/dtheta (finite differences), subset {subset!r}",
                        all_x):
            auto, fd = parameter_derivatives(handle, X, pattern, eps=step or eps,
                                             seed=random_state + k)
            assert np.abs(auto).max() > 0, "all parameter derivatives are zero"
            np.testing.assert_allclose(auto, fd, rtol=fd_rtol,
                                       atol=fd_rtol * np.abs(fd).max(),
                                       err_msg="autograd (rows) vs finite differences; "
                                               "columns: energy, forces")
        restored(f"parameter finite differences of {subset!r}")

    first = next(iter(steps), "readout")
    first = list(first) if isinstance(first, tuple) else first
    motion = _random_motions(random_state)[2][1]  # rigid motion, lattice shifts, permutation
    with _invariant(who, "rotation invariance", all_x):
        Xm = [motion.apply(a) for a in X]
        Em, Fm = _energy_and_forces(handle, Xm)
        np.testing.assert_allclose(Em, E, rtol=rtol, atol=rtol * e_scale, err_msg="energies")
        for i, a in enumerate(X):
            fr = F[ptr_list[i]:ptr_list[i + 1]][motion.order(len(a))] @ motion.rotation.T
            np.testing.assert_allclose(Fm[ptr_list[i]:ptr_list[i + 1]], fr, rtol=0,
                                       atol=10 * rtol * f_scale,
                                       err_msg=f"forces of X[{i}] vs Q F[order]")
        G, Gm = energy_gradients(handle, X, first), energy_gradients(handle, Xm, first)
        K, Km = G @ G.T, Gm @ Gm.T
        np.testing.assert_allclose(Km, K, rtol=0, atol=10 * rtol * np.abs(K).max(),
                                   err_msg="energy-gradient kernel G_E G_Eᵀ")
        a = X[0]
        w = rng.standard_normal((len(a), 3))
        v0 = force_vjp(handle, a, first, w)
        # atom k of the moved copy is atom order[k]: weights follow the atoms and rotate
        v1 = force_vjp(handle, Xm[0], first, w[motion.order(len(a))] @ motion.rotation.T)
        np.testing.assert_allclose(v1, v0, rtol=0, atol=10 * rtol * np.abs(v0).max(),
                                   err_msg="Σ (Q w_i)·∂F_i(QR)/∂θ vs Σ w_i·∂F_i(R)/∂θ")
    restored("rotation checks")

    if "embeddings" in handle.implemented_properties:
        with _invariant(who, "embeddings shape and invariance", all_x):
            h = handle.embeddings(handle.collate(X, "cpu")).detach().double().cpu().numpy()
            hm = handle.embeddings(handle.collate(Xm, "cpu")).detach().double().cpu().numpy()
            width = getattr(handle, "n_embedding", h.shape[-1] if h.ndim == 2 else None)
            assert h.shape == (ptr[-1], width), (f"embeddings have shape {h.shape}; expected "
                                                 f"(n_atoms={ptr[-1]}, n_embedding={width})")
            assert np.all(np.isfinite(h)), "non-finite embeddings"
            for i, a in enumerate(X):
                np.testing.assert_allclose(
                    hm[ptr_list[i]:ptr_list[i + 1]],
                    h[ptr_list[i]:ptr_list[i + 1]][motion.order(len(a))], rtol=0,
                    atol=10 * rtol * max(float(np.abs(h).max()), 1e-12),
                    err_msg=f"embeddings of moved X[{i}]")
        restored("embeddings")

    with _invariant(who, "parameter subsets"):
        names = [nm for nm, _ in module.named_parameters()]
        for s in (*handle.parameter_subsets, "default"):
            named = handle.parameters(s)
            got = [nm for nm, _ in named]
            assert got, f"subset {s!r} is empty"
            assert len(set(got)) == len(got), f"subset {s!r} repeats parameters"
            assert set(got) <= set(names), f"subset {s!r} names {set(got) - set(names)}"
            assert all(isinstance(p, torch.nn.Parameter) for _, p in named), (
                f"subset {s!r} holds non-Parameter tensors")
        try:
            handle.parameters("no-such-subset")
        except ValueError:
            pass
        else:
            raise AssertionError("parameters('no-such-subset') did not raise a ValueError")

    with _invariant(who, "copy is independent", all_x):
        twin = handle.copy()
        assert type(twin) is type(handle) and twin.module is not module, "not a new module"
        e_c, _ = _energy_and_forces(twin, X)
        np.testing.assert_allclose(e_c, E, rtol=rtol, atol=rtol * e_scale,
                                   err_msg="copy's energies")
        with torch.no_grad():
            twin.parameters(first)[-1][1].add_(0.1)
        del twin
    restored("copy")

    if unknown_element == "auto":
        unknown_element = _unknown_z(handle.species)
    if unknown_element is not None:
        bad = _bad_structure(unknown_element, handle.species)
        with _invariant(who, "error on unknown element", f"X[1] ({bad.get_chemical_formula()})"):
            _expect_named_error(lambda: handle.collate([X[0], bad], "cpu"), unknown_element)
    restored("check_mlip")
