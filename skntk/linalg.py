"""Numerical helpers shared by the NTK and selection layers.

- :func:`robust_cholesky`: Cholesky factor with diagonal-jitter escalation and a named error
  (:class:`CholeskyError`) when the matrix is non-finite or still not positive definite.
- :func:`chunk_n_rows` and :func:`gen_structure_chunks`: chunk sizes from a MiB budget, modelled on
  scikit-learn's ``get_chunk_n_rows`` (at least one row, a warning naming both numbers).
- :class:`StreamingTopK`: a running top-k over a stream of score chunks (ties: lower index first).
- :func:`segment_sum`: per-structure sums of per-row values given block ``offsets``.
- :func:`array_device` and :class:`DeviceProduct`: the selection's matrix products in torch on a
  device (a GPU) instead of NumPy on the host.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator

import numpy as np
from scipy import linalg as sla
from sklearn import get_config

logger = logging.getLogger(__name__)

__all__ = [
    "CholeskyError",
    "robust_cholesky",
    "chunk_n_rows",
    "gen_structure_chunks",
    "StreamingTopK",
    "segment_sum",
    "array_device",
    "DeviceProduct",
    "available_host_memory",
    "format_bytes",
    "InsufficientMemoryError",
    "memory_check_skipped",
]


class InsufficientMemoryError(ValueError, MemoryError):
    """The work asked for would need more memory than is available (raised before the work
    starts); a ``ValueError`` and a ``MemoryError``. ``SKNTK_SKIP_MEMORY_CHECK=1`` skips the
    checks that raise it."""


def memory_check_skipped() -> bool:
    """Whether ``SKNTK_SKIP_MEMORY_CHECK`` is set (to anything but ``0``)."""
    import os

    return os.environ.get("SKNTK_SKIP_MEMORY_CHECK", "") not in ("", "0")


def available_host_memory() -> float | None:
    """Bytes a new allocation can take in this process on the host, or ``None`` when unknown.

    The smaller of ``MemAvailable`` (``/proc/meminfo``) and the headroom under the process's
    address-space limit (``RLIMIT_AS`` minus the current ``VmSize``), when they are known: a
    process under ``ulimit -v`` gets a ``MemoryError`` there long before the machine runs out.
    """
    limits = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    limits.append(float(line.split()[1]) * 1024.0)
                    break
    except OSError:
        pass
    try:
        import resource

        soft, infinite = resource.getrlimit(resource.RLIMIT_AS)[0], resource.RLIM_INFINITY
    except (ImportError, OSError, ValueError):  # no address-space limits on this platform
        soft = infinite = -1
    if soft != infinite and soft > 0:
        used = 0.0
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmSize:"):
                        used = float(line.split()[1]) * 1024.0
                        break
        except OSError:
            pass
        limits.append(max(float(soft) - used, 0.0))
    return min(limits) if limits else None


def format_bytes(n_bytes: float) -> str:
    """``"2.2 GB"`` / ``"52.0 MB"`` (decimal units), as the memory refusals print sizes."""
    return f"{n_bytes / 1e9:.1f} GB" if n_bytes >= 1e8 else f"{n_bytes / 1e6:.1f} MB"


def array_device(device):
    """Where the selection's matrix products run: ``None`` is NumPy on the host.

    Parameters
    ----------
    device : None, "auto", str or torch.device
        ``None``: NumPy; ``"auto"``: the first CUDA device when there is one, else NumPy; any
        other value: torch on that device (``"cpu"`` runs the torch code on the host, as the
        tests do).

    Returns
    -------
    device : torch.device or None
    """
    if device is None:
        return None
    import torch

    if isinstance(device, str) and device == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else None
    return torch.device(device)


class DeviceProduct:
    """Products ``rows @ right`` with ``right`` held on ``device`` (NumPy when ``None``).

    The rows travel to the device chunk by chunk and only what the caller needs comes back (the
    product, or its row-wise argmax): the ``n x k`` product of an assignment never leaves a GPU.

    Parameters
    ----------
    right : ndarray of shape (k, m)
    device : torch.device or None
        From :func:`array_device`.

    Examples
    --------
    >>> import numpy as np
    >>> right = np.array([[1.0, 0.0], [0.0, 2.0]])
    >>> DeviceProduct(right, None).argmax(np.array([[3.0, 1.0], [1.0, 1.0]])).tolist()
    [0, 1]
    """

    def __init__(self, right, device):
        self.device = device
        if device is None:
            self.right = right
        else:
            import torch

            self.right = torch.from_numpy(np.ascontiguousarray(right)).to(device)

    def _rows(self, rows):
        import torch

        return torch.from_numpy(np.ascontiguousarray(rows)).to(self.device,
                                                               dtype=self.right.dtype)

    def __call__(self, rows, out=None):
        """``rows @ right`` as an ndarray (written into ``out`` when given)."""
        if self.device is None:
            return np.matmul(rows, self.right, out=out)
        res = (self._rows(rows) @ self.right).cpu().numpy()
        if out is None:
            return res
        out[...] = res
        return out

    def argmax(self, rows):
        """Column of the largest entry of each row of ``rows @ right`` (first on ties)."""
        if self.device is None:
            return np.argmax(rows @ self.right, axis=1)
        import torch

        return torch.argmax(self._rows(rows) @ self.right, dim=1).cpu().numpy()


class CholeskyError(np.linalg.LinAlgError):
    """Raised when a matrix cannot be Cholesky-factorised, even after adding diagonal jitter.

    Subclasses :class:`numpy.linalg.LinAlgError`. The message says whether the matrix had
    non-finite entries (usually overflowing features) or stayed indefinite, and the largest jitter
    that was tried.
    """


def robust_cholesky(A, *, max_tries=20, initial_jitter=1e-10):
    """Lower Cholesky factor of a symmetric positive (semi-)definite matrix, jittered if needed.

    First tries ``A`` as given; on failure adds ``jitter * I`` with ``jitter`` starting at
    ``initial_jitter * max(tr(A) / n, tiny)`` and multiplying by 10 each try (bmdal_reg's
    ``robust_cholesky`` idea, with logging instead of printing).

    Parameters
    ----------
    A : array-like of shape (n, n)
        Symmetric matrix; only the lower triangle is read.
    max_tries : int, default=20
        Number of jittered attempts after the plain one.
    initial_jitter : float, default=1e-10
        First jitter, relative to the mean diagonal entry.

    Returns
    -------
    L : ndarray of shape (n, n)
        Lower-triangular factor with ``L @ L.T == A + jitter * I``.

    Raises
    ------
    CholeskyError
        If ``A`` has non-finite entries, or is still not positive definite after ``max_tries``.

    Examples
    --------
    >>> import numpy as np
    >>> from skntk.linalg import robust_cholesky
    >>> L = robust_cholesky(np.array([[4.0, 2.0], [2.0, 3.0]]))
    >>> np.allclose(L @ L.T, [[4.0, 2.0], [2.0, 3.0]])
    True
    """
    A = np.asarray(A, dtype=np.float64)
    if A.ndim != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"robust_cholesky needs a square 2-D matrix; got shape {A.shape}.")
    n = A.shape[0]
    if not np.all(np.isfinite(A)):
        n_bad = int(np.count_nonzero(~np.isfinite(A)))
        raise CholeskyError(
            f"cannot factorise a non-finite {n}x{n} matrix ({n_bad} entries are NaN or inf; "
            "features too large or not finite?)."
        )
    try:
        return sla.cholesky(A, lower=True, check_finite=False)
    except np.linalg.LinAlgError:
        pass
    scale = max(float(np.trace(A)) / max(n, 1), np.finfo(np.float64).tiny)
    jitter = initial_jitter * scale
    for _ in range(max_tries):
        try:
            L = sla.cholesky(A + jitter * np.eye(n), lower=True, check_finite=False)
        except np.linalg.LinAlgError:
            jitter *= 10.0
            continue
        logger.warning("robust_cholesky: added jitter %.3g to the diagonal of a %dx%d matrix.",
                       jitter, n, n)
        return L
    raise CholeskyError(
        f"{n}x{n} matrix is not positive definite even with diagonal jitter {jitter / 10.0:.3g} "
        f"(mean diagonal {scale:.3g})."
    )


def chunk_n_rows(row_bytes, *, max_n_rows=None, working_memory=None):
    """Number of rows whose temporaries fit in ``working_memory`` MiB (at least 1).

    Modelled on :func:`sklearn.utils.get_chunk_n_rows`.

    Parameters
    ----------
    row_bytes : int
        Bytes of temporaries needed per row.
    max_n_rows : int or None, default=None
        Upper bound on the result (e.g. the number of rows there are).
    working_memory : float or None, default=None
        Budget in MiB; ``None`` uses ``sklearn.get_config()["working_memory"]``.

    Returns
    -------
    n_rows : int

    Warns
    -----
    UserWarning
        If not even one row fits; the message names the budget and the bytes one row needs.

    Examples
    --------
    >>> from skntk.linalg import chunk_n_rows
    >>> chunk_n_rows(1024, working_memory=1)
    1024
    >>> chunk_n_rows(1024, max_n_rows=10, working_memory=1)
    10
    """
    if working_memory is None:
        working_memory = get_config()["working_memory"]
    n_rows = int(working_memory * 2**20 // row_bytes)
    if max_n_rows is not None:
        n_rows = min(n_rows, int(max_n_rows))
    if n_rows < 1:
        warnings.warn(
            f"Could not adhere to working_memory config. Currently {working_memory:.3g}MiB, "
            f"{row_bytes * 2**-20:.3g}MiB required.",
            UserWarning, stacklevel=2,
        )
        n_rows = 1
    return n_rows


def gen_structure_chunks(offsets, max_rows) -> Iterator[slice]:
    """Consecutive slices of structures holding at most ``max_rows`` rows (at least one structure).

    Parameters
    ----------
    offsets : ndarray of int of shape (n_structures + 1,)
        Block boundaries.
    max_rows : int
        Row budget per chunk; a single structure with more rows gets a chunk of its own.

    Yields
    ------
    chunk : slice
        ``slice(start, stop)`` over structures; the chunks cover every structure exactly once.

    Examples
    --------
    >>> from skntk.linalg import gen_structure_chunks
    >>> list(gen_structure_chunks([0, 1, 4, 6, 7], max_rows=3))
    [slice(0, 1, None), slice(1, 2, None), slice(2, 4, None)]
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    n = offsets.shape[0] - 1
    max_rows = max(int(max_rows), 1)
    start = 0
    while start < n:
        # largest stop with offsets[stop] - offsets[start] <= max_rows, at least start + 1
        stop = int(np.searchsorted(offsets, offsets[start] + max_rows, side="right")) - 1
        stop = min(max(stop, start + 1), n)
        yield slice(start, stop)
        start = stop


class StreamingTopK:
    """Running top-k of scores arriving in chunks, with exact first-index tie breaking.

    Parameters
    ----------
    k : int
        How many to keep.

    Examples
    --------
    >>> import numpy as np
    >>> from skntk.linalg import StreamingTopK
    >>> top = StreamingTopK(2)
    >>> top.push(np.array([1.0, 3.0]), np.array([0, 1]))
    >>> top.push(np.array([3.0, 2.0]), np.array([2, 3]))
    >>> top.indices().tolist(), top.scores().tolist()
    ([1, 2], [3.0, 3.0])
    """

    def __init__(self, k):
        self.k = int(k)
        self._scores = np.empty(0, dtype=np.float64)
        self._idx = np.empty(0, dtype=np.int64)

    def push(self, scores, indices):
        """Add a chunk of ``scores`` (n,) for global ``indices`` (n,)."""
        self._scores = np.concatenate([self._scores, np.asarray(scores, dtype=np.float64)])
        self._idx = np.concatenate([self._idx, np.asarray(indices, dtype=np.int64)])
        if self._scores.size > 2 * self.k + 1024:
            self._prune()

    def _prune(self):
        order = np.lexsort((self._idx, -self._scores))[: self.k]
        self._scores, self._idx = self._scores[order], self._idx[order]

    def indices(self):
        """ndarray of int of shape (min(k, n_seen),): best first, ties by lower index."""
        self._prune()
        return self._idx.copy()

    def scores(self):
        """ndarray of shape (min(k, n_seen),): the scores of :meth:`indices`."""
        self._prune()
        return self._scores.copy()


def segment_sum(values, offsets):
    """Sum per-row ``values`` over each block ``offsets[i]:offsets[i + 1]``.

    Parameters
    ----------
    values : ndarray of shape (n_rows,) or (n_rows, k)
    offsets : ndarray of int of shape (n_structures + 1,)
        Non-decreasing, ``offsets[-1] == n_rows`` (relative to ``values``); empty blocks sum to 0.

    Returns
    -------
    sums : ndarray of shape (n_structures,) or (n_structures, k)

    Examples
    --------
    >>> import numpy as np
    >>> from skntk.linalg import segment_sum
    >>> segment_sum(np.array([1.0, 2.0, 3.0, 4.0]), np.array([0, 1, 1, 4])).tolist()
    [1.0, 0.0, 9.0]
    """
    values = np.asarray(values)
    offsets = np.asarray(offsets, dtype=np.int64)
    n = offsets.shape[0] - 1
    out = np.zeros((n,) + values.shape[1:], dtype=np.result_type(values.dtype, np.float64))
    nonempty = offsets[1:] > offsets[:-1]
    if values.shape[0] == 0 or not np.any(nonempty):
        return out
    starts = offsets[:-1][nonempty]
    out[nonempty] = np.add.reduceat(values, starts, axis=0)
    return out
