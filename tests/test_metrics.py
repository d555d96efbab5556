"""Tests of skntk.metrics.evaluate / error_metrics against plain reference computations."""

import numpy as np
import pytest
import torch
from ase.build import bulk, fcc111
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms

from skntk.finetune import MLIPRegressor
from skntk.metrics import error_metrics, evaluate
from tests.builders import tiny_builtin


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def emt(a):
    b = a.copy()
    b.calc = EMT()
    return float(b.get_potential_energy()), b.get_forces(apply_constraint=False).copy()


def structures():
    """Cu slabs and bulk cells of different sizes; OC20 ``fixed``, FixAtoms, sids, temperatures."""
    out = []
    for k in range(7):
        if k % 3 == 2:
            a = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((1, 1, 2 if k > 3 else 1))
        else:
            a = fcc111("Cu", (2, 2, 2), vacuum=4.0)
            if k == 0:
                a.arrays["fixed"] = (a.get_tags() == 2).astype(int)
            if k == 4:
                a.set_constraint(FixAtoms(indices=[0, 1, 2]))
        a.rattle(0.08, seed=k)
        if k < 5:
            a.info["sid"] = k % 2  # two systems; k = 5, 6 fall back to the formula
        a.info["temperature"] = 300 if k % 3 else 600
        out.append(a)
    return out


def labelled_with_noise(frames, seed=0, use_keys=False):
    """EMT labels plus noise (so an EMT "model" has non-zero, known errors)."""
    rng = np.random.default_rng(seed)
    out = []
    for a in frames:
        e, f = emt(a)
        e_lab = e + rng.normal(0, 0.3)
        f_lab = f + rng.normal(0, 0.1, f.shape)
        b = a.copy()
        if use_keys:
            b.info["REF_energy"] = e_lab
            b.arrays["REF_forces"] = f_lab
        else:
            b.calc = SinglePointCalculator(b, energy=e_lab, forces=f_lab)
        out.append(b)
    return out


def free_mask(a):
    fixed = np.zeros(len(a), bool)
    if "fixed" in a.arrays:
        fixed |= a.arrays["fixed"] == 1
    for c in a.constraints:
        fixed[c.get_indices()] = True
    return ~fixed


def labels_of(a):
    if a.calc is not None:
        return a.calc.results["energy"], a.calc.results["forces"]
    return a.info["REF_energy"], a.arrays.get("REF_forces")


def quantile(values, p):
    """The p-quantile by linear interpolation between order statistics (position (n - 1) p)."""
    if not values:
        return np.nan
    v = sorted(values)
    pos = (len(v) - 1) * p
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (pos - lo) * (v[hi] - v[lo])


def reference_metrics(frames, pred_e, pred_f, system_key="sid"):
    """The documented errors, with plain loops."""
    per_atom, systems = [], []
    for a, pe in zip(frames, pred_e, strict=True):
        e, _ = labels_of(a)
        per_atom.append((pe - e) / len(a))
        systems.append(str(a.info[system_key]) if system_key in a.info
                       else a.get_chemical_formula())
    per_atom = np.array(per_atom)
    centred = []
    for i, s in enumerate(systems):
        same = [per_atom[j] for j in range(len(frames)) if systems[j] == s]
        centred.append(per_atom[i] - sum(same) / len(same))
    comps, norms, struct_max, struct_mae = [], [], [], []
    for a, pf in zip(frames, pred_f, strict=True):
        _, f = labels_of(a)
        if f is None:
            continue
        free = free_mask(a)
        mine = []
        for i in range(len(a)):
            if free[i]:
                comps.extend(pf[i] - f[i])
                mine.append(list(pf[i] - f[i]))
                norms.append(sum(c * c for c in pf[i] - f[i]) ** 0.5)
        if mine:
            struct_max.append(max(sum(c * c for c in row) ** 0.5 for row in mine))
            struct_mae.append(sum(abs(c) for row in mine for c in row) / (3 * len(mine)))
    comps = np.array(comps)
    return {
        "energy_mae": np.mean(np.abs(per_atom)),
        "energy_rmse": np.sqrt(np.mean(per_atom ** 2)),
        "energy_mae_centered": np.mean(np.abs(centred)),
        "energy_rmse_centered": np.sqrt(np.mean(np.square(centred))),
        "force_mae": np.mean(np.abs(comps)) if comps.size else np.nan,
        "force_rmse": np.sqrt(np.mean(comps ** 2)) if comps.size else np.nan,
        "force_q95": quantile(norms, 0.95),
        "force_q99": quantile(norms, 0.99),
        "force_max": max(norms) if norms else np.nan,
        "force_max_atom_mean": sum(struct_max) / len(struct_max) if struct_max else np.nan,
        "force_mae_q90": quantile(struct_mae, 0.9),
        "n_structures": len(frames),
        "n_force_atoms": comps.size // 3,
    }


def assert_metrics(got, ref, rtol=1e-10):
    assert set(ref) <= set(got)
    for k, v in ref.items():
        if k.startswith("n_"):
            assert got[k] == v, k
        elif np.isnan(v):
            assert np.isnan(got[k]), k
        else:
            assert got[k] == pytest.approx(v, rel=rtol, abs=1e-12), k


@pytest.mark.parametrize("use_keys", [False, True])
def test_evaluate_emt_model_against_noisy_labels(use_keys):
    frames = labelled_with_noise(structures(), seed=1, use_keys=use_keys)
    preds = [emt(a) for a in frames]
    ref = reference_metrics(frames, [p[0] for p in preds], [p[1] for p in preds])
    got = evaluate(EMT(), frames)
    assert_metrics(got, ref)
    assert 0 < got["energy_mae_centered"] < got["energy_rmse"]
    n_free = sum(int(free_mask(a).sum()) for a in frames)
    assert got["n_force_atoms"] == n_free < sum(len(a) for a in frames)
    # another system key changes only the centred errors
    for a in frames:
        a.info["batch"] = "all"
    other = evaluate(EMT(), frames, system_key="batch")
    assert_metrics(other, reference_metrics(frames, [p[0] for p in preds],
                                            [p[1] for p in preds], system_key="batch"))
    assert other["energy_mae"] == got["energy_mae"]
    assert other["energy_mae_centered"] != got["energy_mae_centered"]


def test_evaluate_exact_model_is_zero_and_energy_only_labels():
    frames = structures()[:4]
    exact = []
    for a in frames:
        e, f = emt(a)
        b = a.copy()
        b.calc = SinglePointCalculator(b, energy=e, forces=f)
        exact.append(b)
    m = evaluate(EMT(), exact)
    assert m["energy_mae"] == 0 and m["force_mae"] == 0 and m["energy_rmse_centered"] == 0
    # energy-only labels: no force errors at all
    energy_only = []
    for a in frames:
        b = a.copy()
        b.info["REF_energy"] = emt(a)[0] + 0.5 * len(a)
        energy_only.append(b)
    m = evaluate(EMT(), energy_only)
    assert m["energy_mae"] == pytest.approx(0.5, rel=1e-12)
    assert m["energy_mae_centered"] == pytest.approx(0.0, abs=1e-12)
    assert np.isnan(m["force_mae"]) and np.isnan(m["force_rmse"]) and m["n_force_atoms"] == 0
    for key in ("force_q95", "force_q99", "force_max", "force_max_atom_mean", "force_mae_q90"):
        assert np.isnan(m[key]), key  # always present, NaN without force labels
    with pytest.raises(ValueError, match="no energy label"):
        evaluate(EMT(), frames)  # unlabelled
    with pytest.raises(ValueError, match="at least one"):
        evaluate(EMT(), [])
    with pytest.raises(TypeError, match="MLIPRegressor"):
        evaluate(MLIPRegressor(tiny_builtin((29,))), exact)


def test_evaluate_mlip_handle_and_regressor_match_calculator_predictions():
    frames = labelled_with_noise(structures(), seed=2)
    model = tiny_builtin((29,), n_hidden=16)
    pred_e, pred_f = [], []
    for a in frames:  # one structure at a time through the handle's ASE calculator
        b = a.copy()
        b.set_constraint()
        b.calc = model.calculator()
        pred_e.append(b.get_potential_energy())
        pred_f.append(b.get_forces())
    ref = reference_metrics(frames, pred_e, pred_f)
    assert_metrics(evaluate(model, frames), ref, rtol=1e-5)
    reg = MLIPRegressor(model, epochs=1, random_state=0).fit(frames[:4])
    assert evaluate(reg, frames) == evaluate(reg.model_, frames)


def test_error_metrics_skips_missing_forces():
    frames = structures()[:3]
    energies = np.array([1.0, 2.0, 3.0])
    forces = [np.zeros((len(a), 3)) for a in frames]
    forces[1] = None
    pred_e = energies + np.array([len(a) for a in frames]) * np.array([0.1, -0.2, 0.4])
    pred_f = [np.full((len(a), 3), 0.5) for a in frames]
    m = error_metrics(frames, energies, forces, pred_e, pred_f)
    assert m["energy_mae"] == pytest.approx(np.mean([0.1, 0.2, 0.4]))
    assert m["force_mae"] == pytest.approx(0.5) and m["force_rmse"] == pytest.approx(0.5)
    assert m["n_force_atoms"] == int(free_mask(frames[0]).sum()) + int(free_mask(frames[2]).sum())


def test_groups_by_info_key_and_by_list():
    frames = labelled_with_noise(structures(), seed=3)
    preds = [emt(a) for a in frames]
    m = evaluate(EMT(), frames, groups="temperature")
    assert sorted(m["groups"]) == ["300", "600"]
    for key in ("300", "600"):
        idx = [i for i, a in enumerate(frames) if str(a.info["temperature"]) == key]
        sub = [frames[i] for i in idx]
        ref = reference_metrics(sub, [preds[i][0] for i in idx], [preds[i][1] for i in idx])
        assert_metrics(m["groups"][key], ref)
    # the overall numbers are unchanged by grouping
    assert_metrics(m, reference_metrics(frames, [p[0] for p in preds], [p[1] for p in preds]))

    labels = ["a" if i < 2 else "b" if i < 5 else 7 for i in range(len(frames))]
    by_list = evaluate(EMT(), frames, groups=np.array(labels, dtype=object))
    assert sorted(by_list["groups"]) == ["7", "a", "b"]
    for key, idx in (("a", [0, 1]), ("b", [2, 3, 4]), ("7", [5, 6])):
        sub = [frames[i] for i in idx]
        ref = reference_metrics(sub, [preds[i][0] for i in idx], [preds[i][1] for i in idx])
        assert_metrics(by_list["groups"][key], ref)
        assert by_list["groups"][key]["n_structures"] == len(idx)

    del frames[3].info["temperature"]
    with pytest.raises(KeyError, match="structure 3 has no info\\['temperature'\\]"):
        evaluate(EMT(), frames, groups="temperature")
    with pytest.raises(ValueError, match="groups has 3 labels; there are 7"):
        evaluate(EMT(), frames, groups=["a", "b", "c"])


def test_tail_force_errors_by_hand():
    """Two structures, one error vector each atom, numbers small enough to check by hand."""
    frames = [bulk("Cu", "fcc", a=3.61).repeat((2, 1, 1)), bulk("Cu", "fcc", a=3.61)]
    forces = [np.zeros((2, 3)), np.zeros((1, 3))]
    pred_f = [np.array([[3.0, 4.0, 0.0], [0.0, 0.0, 1.0]]), np.array([[0.0, 2.0, 0.0]])]
    m = error_metrics(frames, np.zeros(2), forces, np.zeros(2), pred_f)
    # per-atom norms 5, 1, 2; per-structure max 5, 2; per-structure MAE 8/6, 2/3
    assert m["force_max"] == 5.0
    assert m["force_max_atom_mean"] == pytest.approx(3.5)
    assert m["force_q95"] == pytest.approx(2 + 0.9 * 3)  # position 1.9 between 2 and 5
    assert m["force_q99"] == pytest.approx(2 + 0.98 * 3)
    assert m["force_mae_q90"] == pytest.approx(2 / 3 + 0.9 * (8 / 6 - 2 / 3))
