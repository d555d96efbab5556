"""LCMD (largest cluster, maximum distance) batch selection, as in bmdal_reg."""

from __future__ import annotations

from skntk.selection._kernel import _KernelCentresSelector

__all__ = ["LCMDSelector"]


class LCMDSelector(_KernelCentresSelector):
    """Largest-cluster maximum-distance batch selection (Holzmüller et al., JMLR 2023).

    Semantics of bmdal_reg's ``LargestClusterMaxDistSelectionMethod``: the labelled structures
    given to :meth:`fit` are the initial centres (``sel_with_train=True``; without centres the
    first pick is the structure with the largest ``k(x, x)``). Each candidate belongs to its
    nearest centre under ``d²(a, b) = k(a, a) + k(b, b) − 2 k(a, b)``; a cluster's size is the
    sum of its members' squared distances; the next pick is the member farthest from its centre
    in the largest cluster and becomes a centre. Ties go to the first index; no candidate is
    picked twice. Cost ``O(n_to_select · (n_candidates + n_train) · D)`` (the train centres: one
    chunked pass), no ``n x n`` matrix.

    Kernels: ``"linear"`` (``g·g'``, single-row blocks) and ``"gram"`` (``‖G_A G_Bᵀ‖_F²``,
    multi-row blocks such as force or joint NTK rows) with exact features (dimension
    ``d(d+1)/2``) or a tensor sketch of ``n_sketch_features`` dimensions. LCMD runs on the features
    it is given (``features="prior"``: e.g. posterior features from a
    :class:`~skntk.selection.pv.ChunkedPosteriorVarianceSelector` step) or transforms them itself
    with its own posterior (``features="posterior"``, noise ``sigma2``). To run it on a PV
    shortlist, chain the two in a :class:`~skntk.pipeline.SelectionPipeline`
    (:func:`~skntk.pipeline.make_pv_lcmd_pipeline`): LCMD then sees only the shortlisted rows.

    Parameters
    ----------
    n_to_select : int, float or None, default=None
        Default budget of :meth:`select`: a count, a fraction of the candidates, or half of them.
    kernel : {"auto", "linear", "gram"}, default="auto"
        ``"auto"``: linear when every train structure has one row, else gram.
    gram_features : {"auto", "exact", "sketch"}, default="auto"
        Route of the gram kernel; ``"auto"`` is exact when ``d(d+1)/2 <= n_sketch_features`` or
        when the exact features of the train centres fit in half of ``working_memory``
        (:func:`~skntk.selection._kernel.exact_gram_affordable`), so that no seed is involved.
    n_sketch_features : int, default=1024
        Sketch dimension ``D`` of the sketched gram route.
    features : {"prior", "posterior"}, default="prior"
        Use ``X`` as given, or the posterior features ``Ψ`` of a posterior fitted on the train set.
    sigma2 : float, default=1e-3
        Noise variance of that posterior (``features="posterior"`` only).
    normalize : bool, default=True
        Normalise that posterior's features (mean train kernel diagonal 1).
    sel_with_train : bool, default=True
        Use the train structures as initial centres (bmdal's TP mode); ``False``: P mode.
    random_state : int, RandomState instance or None, default=None
        Seeds the sketch matrices (resolved in :meth:`fit`; sketched route only). ``None`` is the
        fixed seed 0, so equal inputs always give equal selections; pass a ``RandomState``
        instance for fresh draws.
    working_memory : float or None, default=None
        MiB budget for chunked temporaries; ``None`` uses ``sklearn.get_config()``.
    progress_bar : bool, default=False
        A tqdm bar over the picks.
    device : str or None, default=None
        Where the float32/float64 products of the assignment to the train centres run: ``None``
        NumPy on the host, ``"cuda"`` (or ``"auto"``: CUDA when there is one) torch on that
        device (:func:`skntk.linalg.array_device`). Picks agree with the host path (tested on
        the CPU; GPU unmeasured).

    Attributes
    ----------
    kernel_ : str
        Resolved kernel.
    gram_features_ : str or None
        Resolved gram route.
    centres_ : ndarray of shape (n_centres, D)
        Kernel features of the train centres (empty when ``sel_with_train=False``).
    sketch_ : tuple of two ndarray of shape (n_features, n_sketch_features)
        Sketch matrices (sketched route only).
    posterior_ : FeaturePosterior
        Own posterior (``features="posterior"`` only).
    n_features_in_ : int
    selected_idx_ : ndarray of int of shape (n_to_select,)
        Indices into the last ``X`` given to :meth:`select`, in selection order.

    See Also
    --------
    MaxDistSelector : farthest-point selection with the same kernels.

    Examples
    --------
    >>> import numpy as np
    >>> from skntk.selection.lcmd import LCMDSelector
    >>> train = np.array([[0.0, 0.0]])
    >>> pool = np.array([[0.1, 0.0], [5.0, 0.0], [5.1, 0.0], [0.0, 3.0]])
    >>> LCMDSelector(n_to_select=2).fit(train).select(pool).tolist()
    [2, 3]
    """

    _method = "lcmd"
