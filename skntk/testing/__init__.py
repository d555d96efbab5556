"""Property tests of the invariants of structure featurisers and MLIP handles.

For users who build pipelines with their own featurisers or models, and for skntk's own tests.
Like scikit-learn's ``check_estimator``, each ``check_*`` function runs a list of invariants and
raises an ``AssertionError`` whose message names the invariant that failed and the structures it
failed on (``X[i] (formula)``).

- :func:`check_featurizer`: rotation / translation / lattice-shift / permutation invariance of the
  structure kernel ``K(A, B) = G_A G_Bᵀ`` (through its singular values, since force rows rotate
  with the frame; exactly for single rows), row equivariance for per-atom layouts, PSD Gram
  matrices across separate ``transform`` calls, determinism for a fixed ``random_state``,
  clone / ``get_params`` round trip, clear errors for empty input and unknown elements.
- :func:`check_mlip`: the backend contract of :class:`skntk.models.base.MLIP` — offsets, shapes,
  batching, agreement with a reference ASE calculator and with the handle's own calculator,
  ``F = -∂E/∂R``, ``∂E/∂θ`` and ``∂F/∂θ`` by central finite differences, rotation invariance,
  embeddings, parameter subsets, copies, the unknown-element error and the module's state
  (train/eval modes, ``requires_grad`` flags, parameter values) restored after every call.
- Hypothesis strategies (need the ``test`` extra, ``pip install skntk[test]``): :func:`atoms`
  (molecules and periodic cells, orthorhombic or triclinic, mixed pbc, atoms never closer than a
  bound), :func:`rigid_motions` and :func:`permutations`, whose values ``apply`` to any
  ``ase.Atoms``.

Structures are small on purpose (a few atoms): every check runs in seconds on the CPU.

The package has one module per seam: ``_structures`` (structures and strategies),
``_featurizer`` (``check_featurizer``), ``_mlip`` (``check_mlip`` and its finite differences),
and ``_common`` (failure messages shared by the two checks).

Examples
--------
>>> import torch
>>> from skntk.models.builtin import BuiltinMLIP
>>> from skntk.testing import check_featurizer, check_mlip
>>> from skntk.transformers import ForceNTKTransformer
>>> model = BuiltinMLIP([1, 6, 8], cutoff=3.0, n_hidden=8, n_blocks=1, dtype=torch.float64)
>>> check_mlip(model)
>>> check_featurizer(ForceNTKTransformer(model, kind="joint", n_features=16))
"""

from skntk.testing._featurizer import check_featurizer
from skntk.testing._mlip import check_mlip, energy_gradients, force_vjp, parameter_derivatives
from skntk.testing._structures import (
    Permutation,
    RigidMotion,
    atoms,
    permutations,
    random_structures,
    rigid_motions,
    tiny_structures,
)

__all__ = ["atoms", "rigid_motions", "permutations", "RigidMotion", "Permutation",
           "random_structures", "tiny_structures", "check_featurizer", "check_mlip",
           "parameter_derivatives", "energy_gradients", "force_vjp"]
