"""Energy, force and joint NTK observation rows of any MLIP handle.

Design: docs/design.md, sections "Observation rows", "Sketching the parameter space" and
"Force-row routes and their costs".

For a structure ``x`` with ``N`` atoms, energy ``E(x; θ)`` and forces ``F = -∂E/∂R`` (3N values),
and a parameter subset ``θ_S`` of size ``P``:

- energy row: ``g_E R`` with ``g_E = ∂E/∂θ_S`` (1 x P);
- force rows: ``J_F R`` with ``J_F = ∂F/∂θ_S = -∂²E/∂R∂θ_S`` (3N x P), atom-major (x, y, z of
  atom 0, then atom 1, ...);
- probe rows: ``V R / √s`` with ``V = Zᵀ J_F`` for ``s`` Rademacher probes ``Z`` (3N x s):
  ``E[(VR)ᵀ(VR)] / s = (J_F R)ᵀ(J_F R)``, so every kernel built from Gram matrices is unbiased;
- ``R`` (P x d) is a seeded sketch (:class:`ParameterSketch`: CountSketch, or Gaussian with
  entries ``N(0, 1/d)``), so ``E[⟨g R, g' R⟩] = ⟨g, g'⟩``; ``n_features=None`` uses ``R = I``
  (exact gradients).

Routes for force rows (``C`` = one energy+forces evaluation of the structure):

- ``"exact"``: reverse-over-reverse, one vector-Jacobian product of ``F`` per row, ~``3N · 2C``
  (vectorised with ``is_grads_batched`` where the backward supports vmap);
- ``"forward"``: forward-over-reverse, one forward-mode derivative of ``F`` along each column of
  ``R``, ~``d · 3C`` for a whole batch at once (``J_F R = -∂(g_E R)/∂R``); needs a model whose
  operations have forward-mode derivatives (``MLIP.supports_torch_func``);
- ``"probes"``: ``s`` double backwards per structure, ~``s · 2C`` whatever ``N``.

Per-structure gradients are vector-Jacobian products with one-hot cotangents through the graph of
the batch, so their cost grows with the batch; functions here accept any batch,
:func:`observation_rows` is the one entry point (rows and their layout), and
:class:`skntk.transformers.ForceNTKTransformer` chooses which structures share a graph
(``batching``: one graph per structure on the CPU for the pretrained backends).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.autograd.forward_ad as fwAD

from skntk.blocks import FeatureBlocks
from skntk.models.base import replaced_parameters

logger = logging.getLogger(__name__)

__all__ = ["ParameterSketch", "SKETCH_METHODS", "GraphMeter", "observation_rows",
           "per_output_gradients",
           "energy_rows", "force_rows_exact", "force_rows_forward", "force_rows_probes",
           "rademacher_probes", "structure_index"]


def _block_seed(seed: int, *key: int) -> int:
    return int(np.random.SeedSequence([int(seed), *map(int, key)]).generate_state(1,
                                                                                   np.uint64)[0]
               % (2 ** 63))


#: Sketches of parameter space (:class:`ParameterSketch`): ``"countsketch"`` (one ±1 per row of
#: ``R``, applied with an index-add in O(k P)) and ``"gaussian"`` (dense N(0, 1/d), the reference).
SKETCH_METHODS = ("countsketch", "gaussian")


class ParameterSketch:
    """Seeded random sketch ``R`` of shape (P, d) of parameter space, with ``E[R Rᵀ] = I`` so that
    ``E[⟨g R, g' R⟩] = ⟨g, g'⟩`` for any gradients ``g, g'``.

    Two methods, both generated per parameter tensor from the seed (float64/int64 on the CPU,
    then cast and moved), so the same seed gives the same ``R`` for train and pool, on any device
    and for any batch:

    - ``"countsketch"`` (Charikar, Chen & Farach-Colton 2002; Clarkson & Woodruff 2013): each row
      ``i`` of ``R`` has one non-zero, a random sign ``σ_i`` in a random column ``h(i)``. Applying
      it is an index-add of the signed gradient entries into ``d`` buckets, O(k P) for k rows, and
      its state is ``h`` and ``σ`` (12 bytes per parameter). Its inner-product estimates have
      variance ``(‖g‖²‖g'‖² + ⟨g, g'⟩² - 2 Σ_i g_i² g'_i²) / d``, never more than the Gaussian
      sketch's.
    - ``"gaussian"``: entries ``N(0, 1/d)``, generated in chunks of ``block_rows`` rows from the
      seed ``(seed, k, chunk)``, cached while the cache stays below ``cache_mib`` MiB and
      regenerated otherwise; applying it is a (k x P) @ (P x d) product. The reference method
      (skntk < 0.2).

    Parameters
    ----------
    shapes : sequence of tuple of int
        Shapes of the parameter tensors of the subset (P = total number of entries).
    n_features : int or None
        Sketch dimension ``d``; ``None`` is the identity (exact gradients, ``d = P``).
    seed : int
        Seed of the sketch.
    method : {"gaussian", "countsketch"}, default="gaussian"
    dtype : torch.dtype, default=torch.float64
        Dtype of the products (the gradients are cast to it).
    device : str or torch.device, default="cpu"
    block_rows : int, default=65536
        Rows of ``R`` per generated chunk (Gaussian).
    cache_mib : float, default=256
        Memory budget for cached chunks (Gaussian).

    Examples
    --------
    >>> import torch
    >>> sk = ParameterSketch([(3, 2), (4,)], n_features=5, seed=0)
    >>> g = [torch.ones(2, 3, 2, dtype=torch.float64), torch.ones(2, 4, dtype=torch.float64)]
    >>> sk.apply(g).shape, sk.n_params
    (torch.Size([2, 5]), 10)
    >>> bool(torch.equal(sk.dense(), ParameterSketch([(3, 2), (4,)], 5, seed=0).dense()))
    True
    >>> cs = ParameterSketch([(3, 2), (4,)], 5, seed=0, method="countsketch")
    >>> (cs.dense() != 0).sum(dim=1).tolist()  # one signed entry per row
    [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]
    """

    def __init__(self, shapes: Sequence[tuple], n_features: int | None, seed: int, *,
                 method: str = "gaussian", dtype=torch.float64, device="cpu",
                 block_rows: int = 65536, cache_mib: float = 256):
        if method not in SKETCH_METHODS:
            raise ValueError(f"unknown sketch method {method!r}; expected one of "
                             f"{list(SKETCH_METHODS)}.")
        self.shapes = [tuple(int(s) for s in sh) for sh in shapes]
        self.sizes = [int(np.prod(sh, dtype=np.int64)) for sh in self.shapes]
        self.n_params = int(sum(self.sizes))
        self.n_features = None if n_features is None else int(n_features)
        self.seed = int(seed)
        self.method = method
        self.dtype = dtype
        self.device = torch.device(device)
        self.block_rows = int(block_rows)
        self.cache_mib = float(cache_mib)
        self._cache: dict = {}
        self._cached_bytes = 0
        self._hashes: dict = {}

    def to(self, device) -> ParameterSketch:
        """The same sketch (the same ``R``: it is drawn on the CPU from the seed) with its state
        on ``device``; ``self`` when it is there already."""
        device = torch.device(device)
        if device == self.device:
            return self
        return ParameterSketch(self.shapes, self.n_features, self.seed, method=self.method,
                               dtype=self.dtype, device=device, block_rows=self.block_rows,
                               cache_mib=self.cache_mib)

    @property
    def d(self) -> int:
        """Number of output columns."""
        return self.n_params if self.n_features is None else self.n_features

    def peak_bytes(self, n_rows: int) -> int:
        """Estimated peak bytes of :meth:`apply` to ``n_rows`` gradient rows, without allocating.

        The flat gradients (``n_rows x P``) and the output (``n_rows x d``) in ``dtype``, plus
        the sketch's own state: a generated Gaussian chunk (``min(block_rows, largest tensor) x
        d`` float64, and its cast) and the cache (at most ``cache_mib``), or CountSketch's
        hashes and signs (P each).

        Examples
        --------
        >>> ParameterSketch([(3, 2), (4,)], 5, seed=0).peak_bytes(2)  # 240 + 480 + 400 bytes
        1120
        """
        item = torch.empty((), dtype=self.dtype).element_size()
        n = int(n_rows) * (self.n_params + self.d) * item
        if self.n_features is None:
            return n
        if self.method == "countsketch":
            return n + self.n_params * (8 + item)
        chunk = min(self.block_rows, max(self.sizes, default=0)) * self.d * (8 + item)
        return n + chunk + int(min(self.cache_mib * 2 ** 20,
                                   self.n_params * self.d * item))

    def _chunk(self, k: int, c: int) -> torch.Tensor:
        key = (k, c)
        if key in self._cache:
            return self._cache[key]
        start = c * self.block_rows
        rows = min(self.block_rows, self.sizes[k] - start)
        gen = torch.Generator(device="cpu").manual_seed(_block_seed(self.seed, k, c))
        block = torch.randn(rows, self.n_features, generator=gen, dtype=torch.float64)
        block = (block / math.sqrt(self.n_features)).to(device=self.device, dtype=self.dtype)
        nbytes = block.numel() * block.element_size()
        if self._cached_bytes + nbytes <= self.cache_mib * 2 ** 20:
            self._cache[key] = block
            self._cached_bytes += nbytes
        return block

    def _hash(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """CountSketch bucket ``h`` (int64) and sign ``σ`` of every entry of parameter ``k``."""
        if k not in self._hashes:
            gen = torch.Generator(device="cpu").manual_seed(_block_seed(self.seed, 2 ** 32 - 1, k))
            h = torch.randint(0, self.n_features, (self.sizes[k],), generator=gen)
            sign = torch.randint(0, 2, (self.sizes[k],), generator=gen).to(torch.float64)
            self._hashes[k] = (h.to(self.device),
                               (2.0 * sign - 1.0).to(device=self.device, dtype=self.dtype))
        return self._hashes[k]

    def apply(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        """Sketched rows ``[g_1, ..., g_K] R``.

        Parameters
        ----------
        grads : sequence of Tensor
            One tensor per parameter, of shape (k, \\*shape_j), rows of the gradient matrix.

        Returns
        -------
        rows : Tensor of shape (k, d)
        """
        if len(grads) != len(self.shapes):
            raise ValueError(f"got gradients of {len(grads)} parameters; the sketch has "
                             f"{len(self.shapes)}.")
        k = grads[0].shape[0]
        flat = [g.reshape(k, -1).to(device=self.device, dtype=self.dtype) for g in grads]
        if self.n_features is None:
            return torch.cat(flat, dim=1)
        out = torch.zeros(k, self.n_features, dtype=self.dtype, device=self.device)
        for j, g in enumerate(flat):
            if self.method == "countsketch":
                h, sign = self._hash(j)
                out.index_add_(1, h, g * sign)
                continue
            for c in range(math.ceil(self.sizes[j] / self.block_rows)):
                s = c * self.block_rows
                out.addmm_(g[:, s:s + self.block_rows], self._chunk(j, c))
        return out

    def _column_block(self, j: int, start: int, stop: int) -> torch.Tensor:
        """Columns ``start:stop`` of the rows of ``R`` that belong to parameter ``j``, transposed:
        shape (stop - start, size_j)."""
        if self.method == "countsketch":
            h, sign = self._hash(j)
            cols = torch.arange(start, stop, device=self.device).unsqueeze(1)
            return (h.unsqueeze(0) == cols).to(self.dtype) * sign
        return torch.cat([self._chunk(j, c)[:, start:stop]
                          for c in range(math.ceil(self.sizes[j] / self.block_rows))]).T

    def columns(self, start: int, stop: int) -> list[torch.Tensor]:
        """Columns ``start:stop`` of ``R`` split per parameter: tensors of shape
        (stop - start, \\*shape_j)."""
        out = []
        for j, shape in enumerate(self.shapes):
            if self.n_features is None:
                eye = torch.zeros(stop - start, self.n_params, dtype=self.dtype,
                                  device=self.device)
                offset = sum(self.sizes[:j])
                idx = torch.arange(start, stop, device=self.device)
                eye[torch.arange(stop - start), idx] = 1.0
                col = eye[:, offset:offset + self.sizes[j]]
            else:
                col = self._column_block(j, start, stop)
            out.append(col.reshape(stop - start, *shape))
        return out

    def dense(self) -> torch.Tensor:
        """``R`` as a dense (P, d) tensor (for tests and small P only)."""
        if self.n_features is None:
            return torch.eye(self.n_params, dtype=self.dtype, device=self.device)
        return torch.cat([self._column_block(j, 0, self.n_features).T
                          for j in range(len(self.sizes))])


class GraphMeter:
    """Bytes of the tensors autograd saves for backward inside ``with meter.record():``.

    Distinct storages are counted once. The graph of a batch is what a vectorised
    (``is_grads_batched``) backward copies once per cotangent row, so ``budget // bytes`` rows
    fit in a memory budget (:func:`observation_rows`).

    Attributes
    ----------
    bytes : int
        Saved bytes of the last recorded graph.

    Examples
    --------
    >>> x = torch.ones(1000, requires_grad=True)
    >>> meter = GraphMeter()
    >>> with meter.record():
    ...     y = x.exp().sum()  # exp saves its float32 result: 4000 bytes
    >>> meter.bytes
    4000
    """

    def __init__(self):
        self.bytes = 0

    def record(self):
        self.bytes = 0
        seen: set = set()

        def pack(t):
            try:
                storage = t.untyped_storage()
                key = (storage.data_ptr(), t.device)
                if key not in seen:
                    seen.add(key)
                    self.bytes += storage.nbytes()
            except (RuntimeError, NotImplementedError):  # e.g. tensors without storage
                self.bytes += t.numel() * t.element_size()
            # detached: a saved output kept with its grad_fn would form a cycle through the C++
            # graph that gc cannot break (pytorch#115255), leaking every graph built with
            # create_graph; autograd restores the grad_fn on unpack
            return t.detach()

        return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)


def _budget_chunk(chunk: int, meter: GraphMeter | None, budget: int | None,
                  vectorize: bool = True) -> int:
    """Rows per vectorised backward so that ``rows x graph bytes`` stays within ``budget``."""
    if budget is None or meter is None or not vectorize or meter.bytes <= 0:
        return chunk
    return int(max(1, min(chunk, budget // meter.bytes)))


def _recording(meter: GraphMeter | None):
    return meter.record() if meter is not None else contextlib.nullcontext()


def per_output_gradients(outputs: torch.Tensor, params: Sequence[torch.Tensor], *,
                         retain_graph: bool = False, chunk_size: int = 256,
                         vectorize: bool = True, reduce=None):
    """Gradient of every entry of ``outputs`` with respect to ``params``.

    Vector-Jacobian products with one-hot cotangents, vectorised with ``is_grads_batched`` (vmap
    over the backward) in chunks of ``chunk_size`` outputs; falls back to a loop when the backward
    of some operation has no batching rule.

    Parameters
    ----------
    outputs : Tensor of shape (k,)
    params : sequence of Tensor
    retain_graph : bool, default=False
        Keep the graph after the last chunk.
    chunk_size : int, default=256
    vectorize : bool, default=True
        Vectorise each chunk with ``is_grads_batched``; ``False`` loops over outputs. The loop is
        the safer choice for second-order graphs on the CPU: a vmapped double backward of
        SevenNet-0 took ~20 GB on one 68-atom slab and ran 4-5x slower than the loop.
    reduce : callable or None, default=None
        Applied to each chunk's list of gradients (e.g. ``sketch.apply``) so that only reduced
        chunks are kept; the result is then the concatenation of the reduced chunks.

    Returns
    -------
    grads : list of Tensor of shape (k, \\*param.shape), or Tensor (k, ...) with ``reduce``
        Zeros for parameters the outputs do not depend on.

    Examples
    --------
    >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
    >>> per_output_gradients(torch.stack([w[0] * w[1], w[1] ** 2]), [w])[0].tolist()
    [[2.0, 1.0], [0.0, 4.0]]
    """
    k = outputs.shape[0]
    chunks: list[list[torch.Tensor]] = []
    for s in range(0, k, chunk_size):
        e = min(k, s + chunk_size)
        last = e == k
        cot = torch.zeros(e - s, k, dtype=outputs.dtype, device=outputs.device)
        cot[torch.arange(e - s), torch.arange(s, e)] = 1.0
        keep = retain_graph or not last
        try:
            if not vectorize:
                raise RuntimeError("vectorize=False")
            g = torch.autograd.grad(outputs, params, grad_outputs=cot, is_grads_batched=True,
                                    retain_graph=True if not last else keep, allow_unused=True)
            g = list(g)
        except RuntimeError as err:  # no batching rule (or not asked for): loop
            logger.debug("not vectorised (%s); looping over outputs", err)
            rows = [torch.autograd.grad(outputs, params, grad_outputs=cot[r],
                                        retain_graph=True if (r < e - s - 1 or not last) else keep,
                                        allow_unused=True) for r in range(e - s)]
            g = [torch.stack([r[j] if r[j] is not None else torch.zeros_like(p) for r in rows])
                 for j, p in enumerate(params)]
        g = [gj if gj is not None else torch.zeros(e - s, *p.shape, dtype=p.dtype, device=p.device)
             for gj, p in zip(g, params, strict=True)]
        chunks.append(g if reduce is None else reduce(g))
    if reduce is not None:
        return torch.cat(chunks)
    return [torch.cat([c[j] for c in chunks]) for j in range(len(params))]


def _vectorize_double_backward(model, outs: torch.Tensor) -> bool:
    """vmap the second-order backward on CUDA, or where the backend declares it cheap
    (``MLIP.batched_double_backward``); loop otherwise (SevenNet-0 on the CPU: ~20 GB and 4-5x
    slower vmapped on a 68-atom slab)."""
    return outs.is_cuda or bool(getattr(model, "batched_double_backward", False))


def structure_index(ptr: torch.Tensor) -> torch.Tensor:
    """Structure index of every atom, shape (n_atoms,), from offsets ``ptr`` (n_structures + 1,)."""
    return torch.repeat_interleave(torch.arange(ptr.shape[0] - 1, device=ptr.device),
                                   ptr[1:] - ptr[:-1])


def energy_rows(model, batch, params, sketch: ParameterSketch, *,
                per_atom: bool = False, chunk_size: int = 256,
                memory_budget: int | None = None,
                meter: GraphMeter | None = None) -> torch.Tensor:
    """Sketched energy rows ``g_E R``, shape (n_structures, d).

    Parameters
    ----------
    model : skntk.models.base.MLIP
    batch : the model's batch (exposes ``ptr``)
    params : list of Tensor
        The parameter subset ``θ_S`` (requiring grad).
    sketch : ParameterSketch
    per_atom : bool, default=False
        Differentiate ``E / N`` instead of ``E``.
    chunk_size : int, default=256
        Unsketched gradient rows held at once.
    memory_budget : int or None, default=None
        Bytes for the vectorised backward: at most ``memory_budget // graph bytes`` rows at once
        (the graph measured by a :class:`GraphMeter` during the forward).
    meter : GraphMeter or None
        Filled with the graph's saved bytes (one is made when ``memory_budget`` is set).
    """
    if meter is None and memory_budget is not None:
        meter = GraphMeter()
    with _recording(meter):
        energy = model.energy(batch)  # [n_structures]
    if per_atom:
        energy = energy / (batch.ptr[1:] - batch.ptr[:-1]).to(energy.dtype)
    return per_output_gradients(energy, params, reduce=sketch.apply,
                                chunk_size=_budget_chunk(chunk_size, meter, memory_budget))


def force_rows_exact(model, batch, params, sketch: ParameterSketch, *,
                     with_energy: bool = False, per_atom: bool = False, chunk_size: int = 64,
                     memory_budget: int | None = None, meter: GraphMeter | None = None):
    """Exact sketched force rows ``J_F R`` by reverse-over-reverse, shape (3 n_atoms, d).

    Rows are atom-major within each structure, structures in batch order. With ``with_energy``
    also returns the energy rows (n_structures, d) from the same graph. ``memory_budget`` and
    ``meter`` as in :func:`energy_rows` (the graph of the forces, built with ``create_graph``).
    """
    if meter is None and memory_budget is not None:
        meter = GraphMeter()
    with _recording(meter):
        energy, forces = model.energy_and_forces(batch, create_graph=True)  # [B], [n_atoms, 3]
    rows, e_rows = _output_rows(model, batch, params, sketch, forces.reshape(-1), energy,
                                with_energy, per_atom, chunk_size, meter, memory_budget)
    return (rows, e_rows) if with_energy else rows


def _output_rows(model, batch, params, sketch, outs, energy, with_energy, per_atom, chunk_size,
                 meter, memory_budget):
    """Sketched gradients of the force outputs ``outs`` (n_outs,) of a graph built with
    ``create_graph``, and of the energies (n_structures,) with ``with_energy`` (per atom with
    ``per_atom``), in one vectorised double backward: ``(rows (n_outs, d), energy rows
    (n_structures, d) or None)``."""
    if with_energy:
        e = energy / (batch.ptr[1:] - batch.ptr[:-1]).to(energy.dtype) if per_atom else energy
        outs = torch.cat([e.to(outs.dtype), outs])
    vec = _vectorize_double_backward(model, outs)
    rows = per_output_gradients(outs, params, vectorize=vec, reduce=sketch.apply,
                                chunk_size=_budget_chunk(chunk_size, meter, memory_budget, vec))
    if with_energy:
        n_s = energy.shape[0]
        return rows[n_s:], rows[:n_s]
    return rows, None


def force_rows_forward(model, batch, params, sketch: ParameterSketch, *, names: Sequence[str],
                       column_chunk: int = 1) -> torch.Tensor:
    """Exact sketched force rows by forward-over-reverse, shape (3 n_atoms, d).

    Column ``c`` is the directional derivative of the forces along column ``c`` of ``R`` in
    parameter space, computed with forward-mode AD through the (reverse-mode) force computation.

    Parameters
    ----------
    names : sequence of str
        Names of ``params`` in ``model.module`` (they are swapped for dual tensors).
    """
    cols = []
    for c in range(sketch.d):
        tangents = sketch.columns(c, c + 1)
        with fwAD.dual_level():
            duals = {n: fwAD.make_dual(p.detach(), t[0].to(dtype=p.dtype, device=p.device))
                     for n, p, t in zip(names, params, tangents, strict=True)}
            with replaced_parameters(model.module, duals):
                _, forces = model.energy_and_forces(batch, create_graph=True)
                tangent = fwAD.unpack_dual(forces).tangent
        if tangent is None:
            tangent = torch.zeros_like(forces)
        cols.append(tangent.detach().reshape(-1).to(sketch.dtype))
    return torch.stack(cols, dim=1).to(sketch.device)


def rademacher_probes(n_atoms: Sequence[int], n_probes: int, seed: int,
                      structure_ids: Sequence[int], *, dtype=torch.float64,
                      device="cpu") -> torch.Tensor:
    """Rademacher probes of shape (n_probes, sum(n_atoms), 3), seeded per key.

    The probes of a structure depend only on ``(seed, structure_ids[i])``, never on the batch.
    :class:`~skntk.transformers.ForceNTKTransformer` keys them by atom count (common random
    numbers): structures of equal size share probes, so similar structures get similar rows.
    """
    blocks = []
    for n, sid in zip(n_atoms, structure_ids, strict=True):
        rng = np.random.default_rng([int(seed), 1, int(sid)])
        blocks.append(rng.integers(0, 2, size=(n_probes, int(n), 3)) * 2.0 - 1.0)
    return torch.as_tensor(np.concatenate(blocks, axis=1), dtype=dtype, device=device)


def force_rows_probes(model, batch, params, sketch: ParameterSketch, probes: torch.Tensor, *,
                      with_energy: bool = False, per_atom: bool = False, chunk_size: int = 64,
                      memory_budget: int | None = None, meter: GraphMeter | None = None):
    """Probe rows ``Zᵀ J_F R / √s``, shape (n_structures · s, d), structure-major.

    Parameters
    ----------
    probes : Tensor of shape (s, n_atoms, 3)
        Rademacher probes (:func:`rademacher_probes`).

    Returns
    -------
    rows : Tensor of shape (n_structures * s, d)
        Rows ``b * s + k`` are probe ``k`` of structure ``b``.
    energy_rows : Tensor of shape (n_structures, d), only with ``with_energy``

    ``memory_budget`` and ``meter`` as in :func:`force_rows_exact`.
    """
    s = probes.shape[0]
    if meter is None and memory_budget is not None:
        meter = GraphMeter()
    with _recording(meter):
        energy, forces = model.energy_and_forces(batch, create_graph=True)
    idx = structure_index(batch.ptr)
    n_s = batch.ptr.shape[0] - 1
    proj = (forces.unsqueeze(0) * probes.to(forces.dtype)).sum(-1).T  # [n_atoms, s]
    u = torch.zeros(n_s, s, dtype=forces.dtype, device=forces.device).index_add(0, idx, proj)
    rows, e_rows = _output_rows(model, batch, params, sketch, u.reshape(-1), energy, with_energy,
                                per_atom, chunk_size, meter, memory_budget)
    return (rows / math.sqrt(s), e_rows) if with_energy else rows / math.sqrt(s)


def observation_rows(model, batch, params, sketch: ParameterSketch, kind: str, route: str,
                     weights=(1.0, 1.0), *, names: Sequence[str] | None = None,
                     n_probes: int = 8, probe_seed: int = 0, per_atom: bool = True,
                     max_unsketched: int = 256, memory_budget: int | None = None,
                     meter: GraphMeter | None = None):
    """Every structure's observation rows of one collated batch, with their layout.

    The one entry point of the transformer: it batches structures, calls this and concatenates.

    Parameters
    ----------
    model : skntk.models.base.MLIP
    batch : the model's collated batch (exposes ``ptr``)
    params : list of Tensor
        The parameter subset ``θ_S`` (requiring grad).
    sketch : ParameterSketch
    kind : {"energy", "force", "joint"}
    route : {"exact", "forward", "probes"}
        Force-row route (ignored for ``kind="energy"``).
    weights : tuple of float, default=(1.0, 1.0)
        ``(w_E, w_F)``, multiplying energy and force rows.
    names : sequence of str or None
        Names of ``params`` in ``model.module`` (needed by ``route="forward"``).
    n_probes, probe_seed : int
        Probes per structure and their seed (``route="probes"``): probes are keyed by atom
        count (common random numbers, :func:`rademacher_probes`).
    per_atom : bool, default=True
        Energy rows of ``E / N``.
    max_unsketched : int, default=256
        Unsketched gradient rows (each of ``P`` entries) held at once; force routes hold at most
        64 (a vectorised double backward keeps one graph copy per row in flight).
    memory_budget : int or None, default=None
        Bytes for one vectorised backward: the graph of the batch is measured while it is built
        (:class:`GraphMeter`) and at most ``memory_budget // graph bytes`` rows are vectorised
        at once (at least one). The forward route holds one graph at a time and ignores it.
    meter : GraphMeter or None
        Filled with the bytes of the batch's graph (for callers that size later batches).

    Returns
    -------
    G : FeatureBlocks
        Float64 rows of shape (n_rows, d) on the host. Structure ``b``'s block ``G.block(b)``
        is its energy row (energy, joint), then its ``3N`` atom-major force rows (exact,
        forward) or ``n_probes`` probe rows; ``G.kind`` is ``kind``, or ``"plain"`` for probe
        rows (no per-atom layout).
    """
    if kind not in ("energy", "force", "joint"):
        raise ValueError(f"kind must be 'energy', 'force' or 'joint'; got {kind!r}.")
    if kind != "energy" and route not in ("exact", "forward", "probes"):
        raise ValueError(f"route must be 'exact', 'forward' or 'probes'; got {route!r}.")
    n_atoms = (batch.ptr[1:] - batch.ptr[:-1]).tolist()
    joint = kind == "joint"
    chunk = max(1, int(max_unsketched))
    f_chunk = min(64, chunk)
    e_rows = f_rows = None
    if meter is None and memory_budget is not None:
        meter = GraphMeter()
    mem = {"memory_budget": memory_budget, "meter": meter}
    with torch.enable_grad():
        if kind == "energy":
            e_rows = energy_rows(model, batch, params, sketch, per_atom=per_atom,
                                 chunk_size=chunk, **mem)
        elif route == "exact":
            out = force_rows_exact(model, batch, params, sketch, with_energy=joint,
                                   per_atom=per_atom, chunk_size=f_chunk, **mem)
            f_rows, e_rows = out if joint else (out, None)
        elif route == "forward":
            if names is None:
                raise ValueError("route='forward' needs the parameter names.")
            f_rows = force_rows_forward(model, batch, params, sketch, names=names)
            if joint:
                e_rows = energy_rows(model, batch, params, sketch, per_atom=per_atom,
                                     chunk_size=chunk, **mem)
        else:
            probes = rademacher_probes(n_atoms, n_probes, probe_seed, n_atoms,
                                       device=batch.ptr.device)
            out = force_rows_probes(model, batch, params, sketch, probes, with_energy=joint,
                                    per_atom=per_atom, chunk_size=f_chunk, **mem)
            f_rows, e_rows = out if joint else (out, None)
    n = np.asarray(n_atoms, dtype=np.int64)
    m_e = 1 if kind in ("energy", "joint") else 0
    m_f = np.zeros_like(n) if kind == "energy" else (
        np.full_like(n, n_probes) if route == "probes" else 3 * n)
    offsets = np.concatenate([[0], np.cumsum(m_e + m_f)]).astype(np.int64)
    we, wf = (float(w) for w in weights)
    if f_rows is None:
        rows = we * e_rows.detach()
    elif e_rows is None:
        rows = wf * f_rows.detach()
    else:  # structure b's block: its energy row, then its force rows
        f_rows = wf * f_rows.detach()
        e_rows = we * e_rows.detach().to(f_rows.dtype)
        f_off = np.concatenate([[0], np.cumsum(m_f)])
        rows = torch.cat([part for b in range(len(n_atoms))
                          for part in (e_rows[b:b + 1], f_rows[f_off[b]:f_off[b + 1]])])
    layout = "plain" if kind != "energy" and route == "probes" else kind
    return FeatureBlocks(rows.cpu().double().numpy(), offsets, kind=layout)
