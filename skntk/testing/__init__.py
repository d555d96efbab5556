"""Property tests of the invariants of structure featurisers and MLIP handles (moving: see _mlip)."""

from skntk.testing._mlip import (  # noqa: F401
    Permutation,
    RigidMotion,
    __all__,
    atoms,
    check_featurizer,
    check_mlip,
    energy_gradients,
    force_vjp,
    parameter_derivatives,
    permutations,
    random_structures,
    rigid_motions,
    tiny_structures,
)
