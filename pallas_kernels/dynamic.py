"""Block-sparse matmuls whose block positions are traced arrays, for sparse training.

`BSR` (`pallas_kernels.formats`) keeps its block layout in the treedef: every new pattern
recompiles. Dynamic sparse training (SET, RigL, SRigL) moves blocks every few hundred steps,
so here a weight ``W`` of shape ``(K, N)`` in ``(bk, bn)`` blocks keeps a FIXED number of
stored blocks whose positions are ordinary int32 arrays: a mask update changes indices and
values, never shapes, and one compiled train step serves the whole run. Two layouts:

* fan-in (constant fan-in, as SRigL): every block column ``j`` stores exactly ``f`` blocks,
  ``values float[N/bn, f, bk, bn]`` at block rows ``rows int32[N/bn, f]`` (distinct within
  a column, any order). ``Y[:, j] = concat_p X[:, rows[j, p]] @ stack_p values[j, p]``.
* COO (free placement): ``nb`` blocks anywhere, ``values float[nb, bk, bn]`` at
  ``(rows[b], cols[b])`` (distinct pairs). ``Y[:, cols[b]] += X[:, rows[b]] @ values[b]``.

Each layout has ``*_matmul`` (a ``jax.custom_vjp``: gradients reach ``x`` and ``values``;
the integer indices get float0 zeros), ``*_matmul_reference`` (densify, then ``jnp.dot``),
``*_to_dense``, ``*_from_dense``, ``*_select`` (a fixed number of blocks from a block-score
matrix, ties to the lower index) and ``*_update`` (RigL/SET: drop the lowest-scoring stored
blocks, grow the highest-scoring absent ones, counts preserved, new blocks at zero).

Why the XLA path is shaped this way (measured on a 2-core AVX-512 CPU, X 256x4096 @ W
4096x4096 at 10% of 32x32 blocks): gathering every column's blocks at once (13x the size of
X) costs more than the dense GEMM, since large fresh buffers are slow to write, and XLA's
gather is fast only when each slice is one contiguous run. So X is first rearranged into
contiguous blocks (one cheap pass), and a loop walks chunks of columns (blocks for COO)
whose gathered slab stays near `_CHUNK_BYTES`; large batches also run in row pieces. The
slab passes an optimization barrier: letting XLA fuse the gather into the GEMM measured
1.5-2x slower. Fan-in forward: per-block GEMMs summed over the f blocks of a column for
blocks of 32 and up, one GEMM of depth ``f*bk`` on X^T blocks below that. Backward:
``dvalues[j] = X^T-blocks[rows[j]] @ dY[:, j]`` and a scatter-add of ``values[j] @ dY[:, j]^T``
into ``dX^T`` blocks (cheap next to the GEMMs). The loops run on one core while XLA's dense
GEMM may use several, so the ratio to dense shrinks on an idle multi-core machine.

References:
  Lasby et al., "Dynamic Sparse Training with Structured Sparsity", ICLR 2024 (SRigL).
  Evci et al., "Rigging the Lottery: Making All Tickets Winners", ICML 2020 (RigL).
  Gray, Radford, Kingma, "GPU Kernels for Block-Sparse Weights", OpenAI 2017.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "coo_from_dense",
    "coo_matmul",
    "coo_matmul_reference",
    "coo_select",
    "coo_to_dense",
    "coo_update",
    "fan_in_from_dense",
    "fan_in_matmul",
    "fan_in_matmul_reference",
    "fan_in_select",
    "fan_in_to_dense",
    "fan_in_update",
]

# Bytes of gathered blocks per loop step: measured best between 1 and 4 MiB on 2 cores
# (smaller chunks pay loop overhead, larger ones fall out of cache).
_CHUNK_BYTES = 2 << 20
_PIB = lax.GatherScatterMode.PROMISE_IN_BOUNDS


def _is_concrete(*arrays: Any) -> bool:
    return not any(isinstance(a, jax.core.Tracer) for a in arrays)


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _check_index(name: str, a: Any, shape: tuple[int, ...]) -> None:
    if jnp.shape(a) != shape or not jnp.issubdtype(jnp.result_type(a), jnp.integer):
        got = f"{jnp.result_type(a)} {jnp.shape(a)}"
        raise ValueError(f"{name} must be an int array of shape {shape}, got {got}")


def _check_fan_in(values: Any, rows: Any, k: int | None) -> tuple[int, int, int, int, int]:
    """Static checks (and value checks when concrete); returns ``(nbc, f, bk, bn, kb)``."""
    if jnp.ndim(values) != 4:
        raise ValueError(f"values must be float[N/bn, f, bk, bn], got shape {jnp.shape(values)}")
    nbc, f, bk, bn = jnp.shape(values)
    _check_index("rows", rows, (nbc, f))
    if k is None:
        return nbc, f, bk, bn, 0
    if k % bk:
        raise ValueError(f"block rows bk={bk} (values.shape[2]) must divide K={k}")
    kb = k // bk
    if f > kb:
        raise ValueError(f"fan-in f={f} (values.shape[1]) exceeds the K/bk={kb} block rows")
    if _is_concrete(rows) and np.size(rows):
        r = np.asarray(rows)
        if r.min() < 0 or r.max() >= kb:
            raise ValueError(f"rows must lie in [0, {kb}), got [{r.min()}, {r.max()}]")
        s = np.sort(r, axis=1)
        dup = np.nonzero((s[:, 1:] == s[:, :-1]).any(axis=1))[0]
        if dup.size:
            raise ValueError(f"rows must be distinct within a column; column {dup[0]} repeats")
    return nbc, f, bk, bn, kb


def _check_coo(values: Any, rows: Any, cols: Any, shape: Any) -> tuple[int, ...]:
    """Static checks (and value checks when concrete); returns ``(nb, bk, bn, kb, nbc)``."""
    if jnp.ndim(values) != 3:
        raise ValueError(f"values must be float[nb, bk, bn], got shape {jnp.shape(values)}")
    nb, bk, bn = jnp.shape(values)
    _check_index("rows", rows, (nb,))
    _check_index("cols", cols, (nb,))
    k, n = (_positive_int(v, f"shape[{i}]") for i, v in enumerate(shape))
    if k % bk or n % bn:
        raise ValueError(f"block shape {(bk, bn)} (values.shape[1:]) must divide shape={(k, n)}")
    kb, nbc = k // bk, n // bn
    if not 1 <= nb <= kb * nbc:
        raise ValueError(f"values must hold 1 to {kb * nbc} blocks for shape={(k, n)}, got {nb}")
    if _is_concrete(rows, cols) and nb:
        r, c = np.asarray(rows), np.asarray(cols)
        for name, idx, hi in (("rows", r, kb), ("cols", c, nbc)):
            if idx.min() < 0 or idx.max() >= hi:
                raise ValueError(f"{name} must lie in [0, {hi}), got [{idx.min()}, {idx.max()}]")
        if np.unique(c.astype(np.int64) * kb + r).size != nb:
            raise ValueError("(rows, cols) pairs must be distinct; some block is stored twice")
    return nb, bk, bn, kb, nbc


def _flatten(x: Any) -> tuple[jax.Array, tuple[int, ...]]:
    x = jnp.asarray(x)
    if x.ndim < 1:
        raise ValueError(f"x must have shape (..., K), got {x.shape}")
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1]), x.shape[:-1]


def _take_blocks(xb: jax.Array, idx: jax.Array) -> jax.Array:
    """``xb[idx]`` for ``xb (n, L)``: each slice is one contiguous run of ``L`` elements."""
    dnums = lax.GatherDimensionNumbers(
        offset_dims=(idx.ndim,), collapsed_slice_dims=(0,), start_index_map=(0,)
    )
    return lax.gather(xb, idx[..., None], dnums, slice_sizes=(1, xb.shape[1]), mode=_PIB)


def _bdot(a: jax.Array, b: jax.Array, a_dim: int, b_dim: int) -> jax.Array:
    """Batched (axis 0) product contracting ``a``'s axis ``a_dim`` with ``b``'s ``b_dim``."""
    return lax.dot_general(a, b, (((a_dim,), (b_dim,)), ((0,), (0,))))


def _blocks(x2: jax.Array, width: int) -> jax.Array:
    """``(B, n*width) -> (n, B*width)``: block ``i`` is ``x2[:, i-th block]``, contiguous."""
    b = x2.shape[0]
    return x2.reshape(b, -1, width).transpose(1, 0, 2).reshape(-1, b * width)


def _blocks_t(x2: jax.Array, width: int) -> jax.Array:
    """``(B, n*width) -> (n, width*B)``: block ``i`` is ``x2[:, i-th block]^T``, contiguous."""
    return x2.T.reshape(-1, width * x2.shape[0])


def _scan_chunks(body, carry, chunk: int, *xs: jax.Array):
    """``body(carry, *chunk_of_xs) -> (carry, out)`` over chunks of axis 0 of ``xs``.

    Whole chunks run in a `lax.scan`, a shorter last chunk once after it (no padding copy).
    Returns the final carry and the outs concatenated along axis 0 (None if body gives None).
    """
    size = xs[0].shape[0]
    steps, rest = divmod(size, chunk)
    outs = []
    if steps == 1:
        carry, out = body(carry, *(a[:chunk] for a in xs))
        outs.append(out)
    elif steps > 1:
        stacked = tuple(a[: steps * chunk].reshape(steps, chunk, *a.shape[1:]) for a in xs)
        carry, out = lax.scan(lambda c, a: body(c, *a), carry, stacked)
        outs.append(None if out is None else out.reshape(steps * chunk, *out.shape[2:]))
    if rest:
        carry, out = body(carry, *(a[steps * chunk :] for a in xs))
        outs.append(out)
    if outs[0] is None:
        return carry, None
    return carry, outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=0)


def _chunk(bytes_per_item: int, count: int) -> int:
    return int(min(count, max(1, _CHUNK_BYTES // max(bytes_per_item, 1))))


def _by_row_pieces(fn, bytes_per_row: int, x2: jax.Array, *rest: jax.Array):
    """``fn(x2_piece, *rest_pieces)`` over row pieces whose gathered slabs fit `_CHUNK_BYTES`.

    ``fn`` returns ``(per_row, summed)``: per-row outputs are concatenated, summed ones
    (gradients of weights, a sum over rows) are added.
    """
    rows = x2.shape[0]
    piece = max(8, _CHUNK_BYTES // max(bytes_per_row, 1))
    if rows <= piece:
        return fn(x2, *rest)
    init = jax.eval_shape(fn, *(a[:piece] for a in (x2, *rest)))[1]
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), init)

    def body(total, *arrays):
        per_row, summed = fn(*arrays)
        return jax.tree.map(jnp.add, total, summed), per_row

    total, per_row = _scan_chunks(body, zeros, piece, x2, *rest)
    return per_row, total


# ----------------------------------------------------------------------------- fan-in, XLA


def _fan_in_forward(x2: jax.Array, values: jax.Array, rows: jax.Array) -> jax.Array:
    b = x2.shape[0]
    nbc, f, bk, bn = values.shape
    # Measured (module doc): from 32x32 blocks on, per-block GEMMs summed over f beat one
    # deep GEMM per column (whose slab needs a transpose to (B, f*bk)); smaller blocks make
    # GEMMs too small, and a deep GEMM on X^T blocks wins (1.5x at 16x16, 90%).
    per_block = bk >= 32
    xb = _blocks(x2, bk) if per_block else _blocks_t(x2, bk)

    def chunk(carry, v, r):
        g = r.shape[0]
        slab = lax.optimization_barrier(_take_blocks(xb, r.reshape(-1)))
        if per_block:  # (g*f, B, bk) @ (g*f, bk, bn), summed over f
            p = _bdot(slab.reshape(g * f, b, bk), v.reshape(g * f, bk, bn), 2, 1)
            return carry, p.reshape(g, f, b, bn).sum(axis=1)
        slab_t = slab.reshape(g, f * bk, b)  # Y[:, j]^T = values[j]^T @ X^T-slab
        return carry, _bdot(v.reshape(g, f * bk, bn), slab_t, 1, 1)

    g = _chunk(b * f * bk * x2.dtype.itemsize, nbc)
    _, y = _scan_chunks(chunk, (), g, values, rows)  # (N/bn, B, bn) or (N/bn, bn, B)
    if per_block:
        return y.transpose(1, 0, 2).reshape(b, nbc * bn)
    return y.reshape(nbc * bn, b).T


def _fan_in_backward(x2, dy, *, values, rows):
    """``(dx, dvalues)`` for one row piece; dvalues summed over its rows."""
    b, k = x2.shape
    nbc, f, bk, bn = values.shape
    xt = _blocks_t(x2, bk)  # (K/bk, bk*B): X^T blocks
    dyb = dy.reshape(b, nbc, bn).transpose(1, 0, 2)  # (N/bn, B, bn)

    def chunk(dxt, v, r, d):
        g = r.shape[0]
        slab_t = lax.optimization_barrier(_take_blocks(xt, r).reshape(g, f * bk, b))
        dv = _bdot(slab_t, d, 2, 1)  # (g, f*bk, bn)
        dslab_t = _bdot(v.reshape(g, f * bk, bn), d, 2, 2)  # (g, f*bk, B)
        dxt = dxt.at[r.reshape(-1)].add(dslab_t.reshape(g * f, bk * b), mode=_PIB)
        return dxt, dv

    g = _chunk(b * f * (bk + bk) * x2.dtype.itemsize, nbc)
    zeros = jnp.zeros((k // bk, bk * b), x2.dtype)
    dxt, dv = _scan_chunks(chunk, zeros, g, values, rows, dyb)
    return dxt.reshape(k, b).T, dv.reshape(nbc, f, bk, bn)


@jax.custom_vjp
def _fan_in_mm(x2, values, rows):
    v, row_bytes = values.astype(x2.dtype), values.shape[1] * values.shape[2] * x2.dtype.itemsize
    return _by_row_pieces(lambda xp: (_fan_in_forward(xp, v, rows), ()), row_bytes, x2)[0]


def _fan_in_mm_fwd(x2, values, rows):
    return _fan_in_mm(x2, values, rows), (x2, values, rows)


def _fan_in_mm_bwd(res, dy):
    x2, values, rows = res
    v, row_bytes = values.astype(dy.dtype), 2 * values.shape[1] * values.shape[2] * dy.itemsize
    fn = functools.partial(_fan_in_backward, values=v, rows=rows)
    dx, dv = _by_row_pieces(fn, row_bytes, x2.astype(dy.dtype), dy)
    return dx.astype(x2.dtype), dv.astype(values.dtype), np.zeros(rows.shape, jax.dtypes.float0)


_fan_in_mm.defvjp(_fan_in_mm_fwd, _fan_in_mm_bwd)


# ----------------------------------------------------------------------------- COO, XLA


def _coo_forward(x2, values, rows, cols, nbc):
    b = x2.shape[0]
    nb, bk, bn = values.shape
    xb = _blocks(x2, bk)

    def chunk(yb, v, r, c):
        xg = lax.optimization_barrier(_take_blocks(xb, r).reshape(-1, b, bk))
        p = _bdot(xg, v, 2, 1)  # (chunk, B, bn)
        return yb.at[c].add(p.reshape(-1, b * bn), mode=_PIB), None

    zeros, step = jnp.zeros((nbc, b * bn), x2.dtype), _chunk(b * bk * x2.dtype.itemsize, nb)
    yb, _ = _scan_chunks(chunk, zeros, step, values, rows, cols)
    return yb.reshape(nbc, b, bn).transpose(1, 0, 2).reshape(b, nbc * bn)


def _coo_backward(x2, dy, *, values, rows, cols):
    b, k = x2.shape
    nb, bk, bn = values.shape
    xt, dyt = _blocks_t(x2, bk), _blocks_t(dy, bn)  # (K/bk, bk*B), (N/bn, bn*B)

    def chunk(dxt, v, r, c):
        xg = lax.optimization_barrier(_take_blocks(xt, r).reshape(-1, bk, b))
        dg = lax.optimization_barrier(_take_blocks(dyt, c).reshape(-1, bn, b))
        dv = _bdot(xg, dg, 2, 2)  # (chunk, bk, bn)
        dxg = _bdot(v, dg, 2, 1)  # (chunk, bk, B)
        return dxt.at[r].add(dxg.reshape(-1, bk * b), mode=_PIB), dv

    zeros = jnp.zeros((k // bk, bk * b), x2.dtype)
    step = _chunk(b * (2 * bk + bn) * x2.dtype.itemsize, nb)
    dxt, dv = _scan_chunks(chunk, zeros, step, values, rows, cols)
    return dxt.reshape(k, b).T, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _coo_mm(x2, values, rows, cols, nbc):
    # Row pieces only for huge batches: one piece holds at least 4 blocks' slabs.
    v, row_bytes = values.astype(x2.dtype), 4 * values.shape[1] * x2.dtype.itemsize
    return _by_row_pieces(lambda xp: (_coo_forward(xp, v, rows, cols, nbc), ()), row_bytes, x2)[0]


def _coo_mm_fwd(x2, values, rows, cols, nbc):
    return _coo_mm(x2, values, rows, cols, nbc), (x2, values, rows, cols)


def _coo_mm_bwd(nbc, res, dy):
    x2, values, rows, cols = res
    v, row_bytes = (
        values.astype(dy.dtype),
        4 * (2 * values.shape[1] + values.shape[2]) * dy.itemsize,
    )
    fn = functools.partial(_coo_backward, values=v, rows=rows, cols=cols)
    dx, dv = _by_row_pieces(fn, row_bytes, x2.astype(dy.dtype), dy)
    zero = np.zeros(rows.shape, jax.dtypes.float0)
    return dx.astype(x2.dtype), dv.astype(values.dtype), zero, zero


_coo_mm.defvjp(_coo_mm_fwd, _coo_mm_bwd)


# ----------------------------------------------------------------------------- public ops


def fan_in_matmul(x: Any, values: Any, rows: Any) -> jax.Array:
    """``x @ W`` for a constant-fan-in block-sparse ``W`` with traced block rows.

    Args:
      x: float[..., K].
      values: float[N/bn, f, bk, bn]; ``values[j, p]`` is the block at block row
        ``rows[j, p]`` of block column ``j``.
      rows: int[N/bn, f], distinct within each column, in ``[0, K/bk)``. May be traced:
        new indices of the same shape reuse the compiled program.

    Returns:
      float[..., N] in ``result_type(x, values)``, ``N = (N/bn) * bn``.

    Raises:
      ValueError: wrong ranks or shapes, ``bk`` not dividing K, ``f > K/bk``, non-integer
        ``rows``; when ``rows`` is concrete, an index out of range or repeated in a column.

    Equation: ``Y[:, j] = sum_p X[:, rows[j, p]] @ values[j, p]`` (block slices; the module
    doc says how it runs). Gradients reach ``x`` (``dY @ W^T``) and ``values``
    (``X[:, rows[j, p]]^T @ dY[:, j]``), not ``rows``.
    Reference: Lasby et al., "Dynamic Sparse Training with Structured Sparsity", 2024.
    """
    x2, lead = _flatten(x)
    _, _, _, bn, _ = _check_fan_in(values, rows, x2.shape[1])
    values = jnp.asarray(values)
    dtype = jnp.result_type(x2.dtype, values.dtype)
    y = _fan_in_mm(x2.astype(dtype), values, jnp.asarray(rows, jnp.int32))
    return y.reshape(*lead, values.shape[0] * bn)


def coo_matmul(x: Any, values: Any, rows: Any, cols: Any, *, n: int) -> jax.Array:
    """``x @ W`` for a block-sparse ``W`` with ``nb`` freely placed blocks at traced positions.

    Args:
      x: float[..., K].
      values: float[nb, bk, bn]; ``values[b]`` sits at block ``(rows[b], cols[b])``.
      rows: int[nb] in ``[0, K/bk)``; may be traced.
      cols: int[nb] in ``[0, N/bn)``; may be traced. The pairs are distinct.
      n: N, the output width (static).

    Returns:
      float[..., N] in ``result_type(x, values)``.

    Raises:
      ValueError: wrong ranks or shapes, a block shape not dividing ``(K, n)``; and, when
        the indices are concrete, one out of range or a repeated ``(row, col)`` pair.

    Equation: ``Y[:, cols[b]] += X[:, rows[b]] @ values[b]`` for every block, as batched
    per-block GEMMs scatter-added into contiguous output blocks. Gradients reach ``x`` and
    ``values`` (``X[:, rows[b]]^T @ dY[:, cols[b]]``), not the indices.
    """
    x2, lead = _flatten(x)
    _, _, _, _, nbc = _check_coo(values, rows, cols, (x2.shape[1], n))
    values = jnp.asarray(values)
    dtype = jnp.result_type(x2.dtype, values.dtype)
    y = _coo_mm(
        x2.astype(dtype), values, jnp.asarray(rows, jnp.int32), jnp.asarray(cols, jnp.int32), nbc
    )
    return y.reshape(*lead, n)


def _scatter_dense(values, rows, cols, grid: tuple[int, int]) -> jax.Array:
    """Blocks ``values[..., bk, bn]`` added at ``(rows, cols)`` of a zero ``grid`` of blocks."""
    values = jnp.asarray(values)
    bk, bn = values.shape[-2:]
    dense = jnp.zeros((*grid, bk, bn), values.dtype)
    dense = dense.at[jnp.asarray(rows), jnp.asarray(cols)].add(values, mode="drop")
    return dense.transpose(0, 2, 1, 3).reshape(grid[0] * bk, grid[1] * bn)


def fan_in_to_dense(values: Any, rows: Any, k: int) -> jax.Array:
    """The dense ``(K, N)`` weight of a fan-in layout (blocks not stored are zero).

    Args:
      values: float[N/bn, f, bk, bn]. rows: int[N/bn, f]. k: K, input rows (static).

    Returns:
      float[K, N] in ``values``' dtype (repeated indices would add up, as in the matmul).
      Raises ValueError as `fan_in_matmul`.
    """
    nbc, f, bk, bn, kb = _check_fan_in(values, rows, _positive_int(k, "k"))
    cols = jnp.broadcast_to(jnp.arange(nbc)[:, None], (nbc, f))
    return _scatter_dense(values, rows, cols, (kb, nbc))


def coo_to_dense(values: Any, rows: Any, cols: Any, shape: tuple[int, int]) -> jax.Array:
    """The dense ``shape`` weight of a COO block layout (blocks not stored are zero).

    Args:
      values: float[nb, bk, bn]. rows, cols: int[nb]. shape: ``(K, N)`` (static).

    Returns:
      float[K, N] in ``values``' dtype. Raises ValueError as `coo_matmul`.
    """
    _, _, _, kb, nbc = _check_coo(values, rows, cols, shape)
    return _scatter_dense(values, rows, cols, (kb, nbc))


def _dense_dot(x: jax.Array, w: jax.Array) -> jax.Array:
    dtype = jnp.result_type(x.dtype, w.dtype)
    return jnp.dot(x.astype(dtype), w.astype(dtype), precision=lax.Precision.HIGHEST)


def fan_in_matmul_reference(x: Any, values: Any, rows: Any) -> jax.Array:
    """Plain-jnp reference: ``x @ fan_in_to_dense(values, rows, K)``, float[..., K] -> [..., N]."""
    x = jnp.asarray(x)
    return _dense_dot(x, fan_in_to_dense(values, rows, x.shape[-1]))


def coo_matmul_reference(x: Any, values: Any, rows: Any, cols: Any, *, n: int) -> jax.Array:
    """Plain-jnp reference: ``x @ coo_to_dense(values, rows, cols, (K, n))``."""
    x = jnp.asarray(x)
    return _dense_dot(x, coo_to_dense(values, rows, cols, (x.shape[-1], n)))


# ----------------------------------------------------------------------------- selection


def _check_scores(scores: Any, name: str = "scores") -> jax.Array:
    scores = jnp.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"{name} must be a [K/bk, N/bn] block-score matrix, got {scores.shape}")
    # Comparisons on float32 (bool and unsigned scores cannot be negated).
    return scores if jnp.issubdtype(scores.dtype, jnp.floating) else scores.astype(jnp.float32)


def fan_in_select(scores: Any, fan_in: int) -> jax.Array:
    """The ``fan_in`` highest-scoring block rows of every block column; jit-able.

    Args:
      scores: float[K/bk, N/bn], one score per block (e.g. block L2 norms of a weight).
      fan_in: f, blocks kept per column (static), ``1 <= f <= K/bk``.

    Returns:
      int32[N/bn, f]: each column's rows, ascending. Ties go to the lower row and NaN
      scores rank last, so the same scores always give the same rows.

    Raises:
      ValueError: ``scores`` not 2D, or ``fan_in`` not in ``[1, K/bk]``.
    """
    scores = _check_scores(scores)
    fan_in = _positive_int(fan_in, "fan_in")
    if fan_in > scores.shape[0]:
        raise ValueError(f"fan_in={fan_in} exceeds the K/bk={scores.shape[0]} block rows")
    top = jnp.argsort(-scores, axis=0, stable=True)[:fan_in]  # ties: lower row; NaN last
    return jnp.sort(top.T, axis=1).astype(jnp.int32)


def coo_select(scores: Any, num_blocks: int) -> tuple[jax.Array, jax.Array]:
    """The ``num_blocks`` highest-scoring blocks of the whole matrix; jit-able.

    Args:
      scores: float[K/bk, N/bn].
      num_blocks: nb (static), ``1 <= nb <= (K/bk) * (N/bn)``.

    Returns:
      ``(rows, cols)``, int32[nb] each, in column-major order (by column, then row). Ties
      go to the block earlier in that order and NaN scores rank last (deterministic).

    Raises:
      ValueError: ``scores`` not 2D or ``num_blocks`` out of range.
    """
    scores = _check_scores(scores)
    kb, nbc = scores.shape
    num_blocks = _positive_int(num_blocks, "num_blocks")
    if num_blocks > kb * nbc:
        raise ValueError(f"num_blocks={num_blocks} exceeds the {kb * nbc} blocks of scores")
    best = jnp.argsort(-scores.T.reshape(-1), stable=True)[:num_blocks]  # index col * kb + row
    flat = jnp.sort(best)
    return (flat % kb).astype(jnp.int32), (flat // kb).astype(jnp.int32)


def _block_mask(w: Any, block_mask: Any) -> tuple[jax.Array, np.ndarray]:
    """``w`` as blocks ``(K/bk, N/bn, bk, bn)`` and the concrete bool ``block_mask``."""
    if not _is_concrete(block_mask):
        raise ValueError("block_mask must be concrete here (call outside jax.jit)")
    w, mask = jnp.asarray(w), np.asarray(block_mask).astype(bool)
    if w.ndim != 2 or mask.ndim != 2 or w.shape[0] % mask.shape[0] or w.shape[1] % mask.shape[1]:
        raise ValueError(f"block_mask shape {mask.shape} must divide w shape {w.shape} (2D each)")
    (kb, nbc), (k, n) = mask.shape, w.shape
    return w.reshape(kb, k // kb, nbc, n // nbc).transpose(0, 2, 1, 3), mask


def fan_in_from_dense(w: Any, block_mask: Any) -> tuple[jax.Array, jax.Array]:
    """The fan-in layout of ``w`` keeping the blocks of a concrete ``block_mask``.

    Args:
      w: float[K, N].
      block_mask: bool[K/bk, N/bn] (the block shape is ``w.shape / block_mask.shape``),
        concrete, with the same number f of kept blocks in every column.

    Returns:
      ``(values float[N/bn, f, bk, bn], rows int32[N/bn, f])``, rows ascending.

    Raises:
      ValueError: shapes that do not divide, a traced mask, columns with different counts
        (the message lists them) or an empty mask.
    """
    blocks, mask = _block_mask(w, block_mask)
    counts = mask.sum(axis=0)
    if counts.size == 0 or counts.min() != counts.max() or counts[0] == 0:
        found = sorted(set(counts.tolist()))
        raise ValueError(
            f"block_mask must keep the same number (>= 1) of blocks in every column, "
            f"found counts {found[:8]}"
        )
    rows = np.stack([np.nonzero(col)[0] for col in mask.T]).astype(np.int32)
    cols = np.arange(mask.shape[1])[:, None]
    return blocks[rows, cols], jnp.asarray(rows)


def coo_from_dense(w: Any, block_mask: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The COO block layout of ``w`` keeping the blocks of a concrete ``block_mask``.

    Args:
      w: float[K, N]. block_mask: bool[K/bk, N/bn], concrete, keeping at least one block.

    Returns:
      ``(values float[nb, bk, bn], rows int32[nb], cols int32[nb])`` in column-major order.

    Raises:
      ValueError: shapes that do not divide, a traced or empty mask.
    """
    blocks, mask = _block_mask(w, block_mask)
    cols, rows = np.nonzero(mask.T)
    if rows.size == 0:
        raise ValueError("block_mask keeps no block; a layout needs at least one")
    rows, cols = rows.astype(np.int32), cols.astype(np.int32)
    return blocks[rows, cols], jnp.asarray(rows), jnp.asarray(cols)


# ----------------------------------------------------------------------------- updates


def _swap(pos, drop, grow, n):
    """One group's drop/grow: slots at grid positions ``pos`` (s,), grid scores ``grow`` (m,).

    Drops the ``n`` slots of lowest ``drop`` (ties: lower slot), grows the ``n`` grid
    positions of highest ``grow`` among those not kept (ties: lower position). A dropped
    position that is grown again keeps its slot and value; each new position takes a freed
    slot (the i-th new in grow order goes to the i-th freed in drop order).
    Returns new positions (s,) and a bool (s,) marking slots holding new positions.
    """
    s, m = pos.shape[0], grow.shape[0]
    drop_order = jnp.argsort(drop, stable=True)
    dropped = jnp.zeros(s, bool).at[drop_order].set(jnp.arange(s) < n)
    kept_grid = jnp.zeros(m, bool).at[pos].set(~dropped, mode="drop")
    old_grid = jnp.zeros(m, bool).at[pos].set(True, mode="drop")
    # Eligible (not kept) first, then by score high to low, then by position.
    cand = jnp.lexsort((-grow, kept_grid))[:s]
    chosen = jnp.arange(s) < n
    grown_grid = jnp.zeros(m, bool).at[cand].set(chosen)
    freed = dropped & ~grown_grid[pos]
    new = chosen & ~old_grid[cand]
    freed_sorted = freed[drop_order]  # slot_of[i]: the i-th freed slot in drop order
    rank = jnp.where(freed_sorted, jnp.cumsum(freed_sorted) - 1, s)
    slot_of = jnp.full(s, s).at[rank].set(drop_order, mode="drop")
    target = jnp.where(new, slot_of[jnp.cumsum(new) - 1], s)
    new_pos = pos.at[target].set(cand.astype(pos.dtype), mode="drop")
    return new_pos, jnp.zeros(s, bool).at[target].set(True, mode="drop")


def _check_swap(n_swap: Any, limit: int) -> jax.Array:
    if _is_concrete(n_swap):
        n = np.asarray(n_swap)
        if n.shape != () or not np.issubdtype(n.dtype, np.integer) or not 0 <= n <= limit:
            raise ValueError(f"n_swap must be an int in [0, {limit}], got {n_swap!r}")
    elif jnp.shape(n_swap) != () or not jnp.issubdtype(jnp.result_type(n_swap), jnp.integer):
        raise ValueError(f"n_swap must be an integer scalar, got {jnp.result_type(n_swap)}")
    return jnp.clip(jnp.asarray(n_swap, jnp.int32), 0, limit)


def _check_drop(drop_scores: Any, shape: tuple[int, ...]) -> jax.Array:
    drop_scores = jnp.asarray(drop_scores)
    if drop_scores.shape != shape:
        raise ValueError(f"drop_scores must have shape {shape}, got {drop_scores.shape}")
    return drop_scores.astype(jnp.float32) if drop_scores.dtype == bool else drop_scores


def fan_in_update(
    values: Any, rows: Any, drop_scores: Any, grow_scores: Any, n_swap: Any
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """RigL/SET step on a fan-in layout: in every column, swap ``n_swap`` blocks; jit-able.

    Each column drops its ``n_swap`` stored blocks of lowest ``drop_scores`` (e.g. block
    norms of ``values``) and grows the ``n_swap`` blocks of highest ``grow_scores`` (e.g.
    block norms of the dense gradient, or random scores for SET) among those not kept, so
    the fan-in stays f. A dropped block chosen again stays where it was, with its value
    (as in RigL, where it never left the mask); new blocks take the freed slots with zero
    values. Ties go to the lower slot (drop) and lower row (grow): deterministic.

    Args:
      values: float[N/bn, f, bk, bn]. rows: int[N/bn, f].
      drop_scores: float[N/bn, f], one per stored block; lowest are dropped.
      grow_scores: float[K/bk, N/bn], one per block position; highest are grown.
      n_swap: int in ``[0, f]``, blocks swapped per column; may be traced (e.g. from a
        cosine drop-fraction schedule).

    Returns:
      ``(values, rows, grown)``: the new layout and bool[N/bn, f] marking slots that hold a
      new block (reset their optimizer moments too).

    Raises:
      ValueError: shapes that disagree, or a concrete ``n_swap`` outside ``[0, f]``.

    Reference: Evci et al., "Rigging the Lottery", 2020; Lasby et al. 2024 (constant fan-in).
    """
    grow_scores = _check_scores(grow_scores, "grow_scores")
    bk = jnp.shape(values)[2] if jnp.ndim(values) == 4 else 1  # ranks are checked next
    nbc, f, _, _, _ = _check_fan_in(values, rows, grow_scores.shape[0] * bk)
    if grow_scores.shape[1] != nbc:
        raise ValueError(f"grow_scores must have N/bn={nbc} columns, got {grow_scores.shape}")
    drop = _check_drop(drop_scores, (nbc, f))
    n = _check_swap(n_swap, f)
    rows = jnp.asarray(rows, jnp.int32)
    new_rows, grown = jax.vmap(_swap, in_axes=(0, 0, 1, None))(rows, drop, grow_scores, n)
    values = jnp.where(grown[..., None, None], jnp.zeros((), jnp.asarray(values).dtype), values)
    return values, new_rows, grown


def coo_update(
    values: Any, rows: Any, cols: Any, drop_scores: Any, grow_scores: Any, n_swap: Any
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """RigL/SET step on a COO block layout: swap ``n_swap`` blocks anywhere; jit-able.

    As `fan_in_update` over the whole matrix: drop the ``n_swap`` stored blocks of lowest
    ``drop_scores``, grow the ``n_swap`` positions of highest ``grow_scores`` not kept
    (ties: earlier in column-major order); the block count stays nb.

    Args:
      values: float[nb, bk, bn]. rows, cols: int[nb].
      drop_scores: float[nb]. grow_scores: float[K/bk, N/bn].
      n_swap: int in ``[0, nb]``; may be traced.

    Returns:
      ``(values, rows, cols, grown)`` with grown bool[nb] marking new blocks (zero values).

    Raises:
      ValueError: shapes that disagree, or a concrete ``n_swap`` outside ``[0, nb]``.
    """
    grow_scores = _check_scores(grow_scores, "grow_scores")
    kb, nbc = grow_scores.shape
    bk, bn = jnp.shape(values)[1:] if jnp.ndim(values) == 3 else (1, 1)  # ranks checked next
    nb, *_ = _check_coo(values, rows, cols, (kb * bk, nbc * bn))
    drop = _check_drop(drop_scores, (nb,))
    n = _check_swap(n_swap, nb)
    pos = jnp.asarray(cols, jnp.int32) * kb + jnp.asarray(rows, jnp.int32)
    new_pos, grown = _swap(pos, drop, grow_scores.T.reshape(-1), n)
    values = jnp.where(grown[:, None, None], jnp.zeros((), jnp.asarray(values).dtype), values)
    return values, new_pos % kb, new_pos // kb, grown
