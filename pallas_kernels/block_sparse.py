"""Pallas kernels for ``Y = X @ W`` with a block-sparse `BSR` weight, for TPU and GPU.

Two products cover the forward and backward passes:

* DSD (dense x sparse -> dense): ``Y[:, j] = sum_{b in column j} X[:, rows(b)] @ V[b]``,
  and with ``transpose=True`` the product with ``W^T`` used for ``dX = dY @ W^T``:
  ``dX[:, i] = sum_{b in row i} dY[:, cols(b)] @ V[b]^T``. The transpose walks the same
  ``values`` array in CSR order through `BSRLayout.transpose_perm`, so no block is moved.
* SDD (sampled dense x dense -> sparse): the gradient of the stored blocks,
  ``dV[b] = X[:, rows(b)]^T @ dY[:, cols(b)]``, summed over the batch.

TPU kernels take the block indices by scalar prefetch (`pltpu.PrefetchScalarGridSpec`): the
indices sit in SMEM before the grid starts, and the BlockSpec index maps read them to pick
which X block and which W block the pipeline DMAs next, so only stored blocks are fetched.
The DSD grid is ``(row tiles of X, steps)`` where the steps enumerate stored blocks grouped
by output block column (`pallas_kernels.plans.kernel_schedule`); consecutive steps of one
column keep the output block resident in VMEM and accumulate into an f32 scratch.

GPU kernels cannot prefetch scalars (both GPU lowerings refuse it), so they take the
pointers and indices as ordinary int32 inputs: one program per (row tile, output block)
loops over its column's stored blocks, slicing the X row panel and the values with dynamic
offsets. They target the Triton lowering (`pallas.triton.CompilerParams`), the GPU lowering
that accepts a generic ``jnp.dot``; Mosaic GPU needs warpgroup-level code (``plgpu.kernel``
with ``wgmma`` on Hopper) and is not written yet.

Every kernel also runs with ``interpret=True`` (any backend), which is how the tests check
them on CPU; no TPU or GPU was available here, so neither compiled lowering has been run.
Gradients: `pallas_call` with scalar prefetch or in-kernel loops is not differentiable, so
`pallas_kernels.ops` wraps these in a ``jax.custom_vjp``.

References:
  Gray, Radford, Kingma, "GPU Kernels for Block-Sparse Weights", OpenAI 2017.
  Gale et al., "MegaBlocks: Efficient Sparse Training with Mixture-of-Experts", MLSys 2023
  (the DSD / SDD naming and the transpose-by-index trick).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import plans
from pallas_kernels.formats import BSRLayout, check_tpu_block_shape

__all__ = [
    "check_gpu_block_shape",
    "dsd_gpu",
    "dsd_tpu",
    "sdd_gpu",
    "sdd_tpu",
]


def _row_tile(rows: int, max_tile: int = 256) -> tuple[int, int]:
    """Row tile (a multiple of 8, as TPU sublanes need) and the padded row count."""
    tile = min(max_tile, -(-rows // 8) * 8)
    return tile, -(-rows // tile) * tile


def _pad_rows(x: jax.Array, rows: int) -> jax.Array:
    return x if x.shape[0] == rows else jnp.pad(x, ((0, rows - x.shape[0]), (0, 0)))


def _contract(a: jax.Array, b: jax.Array, transpose_b: bool) -> jax.Array:
    dims = (((1,), (1,)), ((), ())) if transpose_b else (((1,), (0,)), ((), ()))
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _dsd_tpu_kernel(
    out_ref_idx, in_ref_idx, slot_idx, first_ref, last_ref, valid_ref,  # scalar prefetch
    x_ref, v_ref, o_ref, acc_ref, *, transpose,
):  # fmt: skip
    del out_ref_idx, in_ref_idx, slot_idx
    t = pl.program_id(1)

    @pl.when(first_ref[t] == 1)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(valid_ref[t] == 1)
    def _accumulate():
        acc_ref[...] += _contract(x_ref[...], v_ref[...], transpose)

    @pl.when(last_ref[t] == 1)
    def _store():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("layout", "transpose", "interpret"))
def dsd_tpu(
    x: jax.Array,
    values: jax.Array,
    *,
    layout: BSRLayout,
    transpose: bool = False,
    interpret: bool = False,
) -> jax.Array:
    """TPU kernel: ``x @ W`` (or ``x @ W^T`` with ``transpose``) for a BSR ``W``.

    Args:
      x: float[B, K] (float[B, N] with ``transpose``).
      values: float[nnz, bk, bn], `BSR.values`.
      layout: the static `BSRLayout`.
      transpose: multiply by ``W^T`` (the dX product of the backward pass).
      interpret: run the kernel in the Pallas interpreter (CPU tests).

    Returns:
      float[B, N] (float[B, K] with ``transpose``) in x's dtype.

    Raises:
      ValueError: if the block shape breaks the TPU (8, 128) tiling rule (compiled mode).

    Grid ``(B / tm, steps)``; step ``t`` multiplies the X block ``(i, in_block[t])`` by
    stored block ``slot[t]`` into output block ``(i, out_block[t])``.
    """
    if not interpret:
        check_tpu_block_shape(layout.block_shape, layout.shape)
    bk, bn = layout.block_shape
    b_in, b_out = (bn, bk) if transpose else (bk, bn)
    n_out = layout.shape[0] if transpose else layout.shape[1]
    sched = plans.kernel_schedule(layout, transpose)
    rows = x.shape[0]
    tm, rows_p = _row_tile(rows)
    xp = _pad_rows(x, rows_p)
    grid = (rows_p // tm, len(sched.out_block))

    def x_map(i, t, out_b, in_b, slot, first, last, valid):
        return i, in_b[t]

    def v_map(i, t, out_b, in_b, slot, first, last, valid):
        return slot[t], 0, 0

    def o_map(i, t, out_b, in_b, slot, first, last, valid):
        return i, out_b[t]

    out = pl.pallas_call(
        functools.partial(_dsd_tpu_kernel, transpose=transpose),
        out_shape=jax.ShapeDtypeStruct((rows_p, n_out), x.dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=6,
            grid=grid,
            in_specs=[
                pl.BlockSpec((tm, b_in), x_map),
                pl.BlockSpec((None, bk, bn), v_map),
            ],
            out_specs=pl.BlockSpec((tm, b_out), o_map),
            scratch_shapes=[pltpu.VMEM((tm, b_out), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=interpret,
    )(
        jnp.asarray(sched.out_block),
        jnp.asarray(sched.in_block),
        jnp.asarray(sched.slot),
        jnp.asarray(sched.first),
        jnp.asarray(sched.last),
        jnp.asarray(sched.valid),
        xp,
        values.astype(x.dtype),
    )
    return out[:rows]


def _sdd_tpu_kernel(rows_ref, cols_ref, x_ref, dy_ref, o_ref, acc_ref):
    del rows_ref, cols_ref
    m = pl.program_id(1)

    @pl.when(m == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    # X^T @ dY over this row tile: contract the batch axis (0) of both.
    acc_ref[...] += lax.dot_general(
        x_ref[...], dy_ref[...], (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
    )

    @pl.when(m == pl.num_programs(1) - 1)
    def _store():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("layout", "interpret"))
def sdd_tpu(
    x: jax.Array, dy: jax.Array, *, layout: BSRLayout, interpret: bool = False
) -> jax.Array:
    """TPU kernel: gradient of the stored blocks, ``dV[b] = x[:, rows(b)]^T @ dy[:, cols(b)]``.

    Args:
      x: float[B, K], the forward input.
      dy: float[B, N], the output cotangent.
      layout: the static `BSRLayout`.
      interpret: run in the Pallas interpreter.

    Returns:
      float[nnz, bk, bn] in dy's dtype (zero rows of padding contribute nothing).

    Grid ``(nnz, B / tm)``: the batch reduction is innermost, accumulating in f32 VMEM.
    """
    if not interpret:
        check_tpu_block_shape(layout.block_shape, layout.shape)
    bk, bn = layout.block_shape
    rows = x.shape[0]
    tm, rows_p = _row_tile(rows, max_tile=512)
    grid = (layout.nnz_blocks, rows_p // tm)
    return pl.pallas_call(
        _sdd_tpu_kernel,
        out_shape=jax.ShapeDtypeStruct((layout.nnz_blocks, bk, bn), dy.dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=grid,
            in_specs=[
                pl.BlockSpec((tm, bk), lambda b, m, r, c: (m, r[b])),
                pl.BlockSpec((tm, bn), lambda b, m, r, c: (m, c[b])),
            ],
            out_specs=pl.BlockSpec((None, bk, bn), lambda b, m, r, c: (b, 0, 0)),
            scratch_shapes=[pltpu.VMEM((bk, bn), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=interpret,
    )(
        jnp.asarray(layout.row_indices),
        jnp.asarray(layout.col_indices),
        _pad_rows(x, rows_p),
        _pad_rows(dy, rows_p),
    )


def _triton_params():
    # Imported lazily: the Triton lowering is deprecated after JAX 0.10 and may disappear,
    # which must not break CPU or TPU users of this module.
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=4, num_stages=2)


def check_gpu_block_shape(block_shape, row_tile: int = 16) -> None:
    """Raises unless the GPU kernel's tiles are powers of two >= 16 (Triton ``dot``).

    Args:
      block_shape: ``(bk, bn)``.
      row_tile: rows of x per program.

    Raises:
      ValueError: naming the offending tile and the block shape.
    """
    for name, v in (("bk", block_shape[0]), ("bn", block_shape[1]), ("row tile", row_tile)):
        if v < 16 or v & (v - 1):
            raise ValueError(
                f"the GPU kernel needs power-of-two tiles >= 16 (Triton dot), got {name}={v} "
                f"for block_shape={tuple(block_shape)}; use impl='xla'"
            )


def _dsd_gpu_kernel(ptr_ref, in_ref, slot_ref, x_ref, v_ref, o_ref, *, b_in, transpose):
    j = pl.program_id(1)

    def body(t, acc):
        start = pl.multiple_of(in_ref[t] * b_in, b_in)
        x_blk = x_ref[:, pl.ds(start, b_in)]
        return acc + _contract(x_blk, v_ref[slot_ref[t]], transpose)

    acc = lax.fori_loop(ptr_ref[j], ptr_ref[j + 1], body, jnp.zeros(o_ref.shape, jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("layout", "transpose", "interpret"))
def dsd_gpu(
    x: jax.Array,
    values: jax.Array,
    *,
    layout: BSRLayout,
    transpose: bool = False,
    interpret: bool = False,
) -> jax.Array:
    """GPU kernel: ``x @ W`` (or ``x @ W^T``), block indices passed as ordinary inputs.

    Args and returns as `dsd_tpu`. One program per (row tile ``i``, output block ``j``)
    loops ``t`` over ``ptr[j]:ptr[j+1]`` and accumulates
    ``x[i-tile, in_block[t]-block] @ values[slot[t]]`` (``values[slot[t]]^T`` when
    transposed) in f32 registers.

    Raises:
      ValueError: if the tiles are not powers of two >= 16 (compiled mode).
    """
    bk, bn = layout.block_shape
    b_in, b_out = (bn, bk) if transpose else (bk, bn)
    k_in = layout.shape[1] if transpose else layout.shape[0]
    n_out = layout.shape[0] if transpose else layout.shape[1]
    sched = plans.kernel_schedule(layout, transpose)
    rows = x.shape[0]
    tm, rows_p = _row_tile(rows, max_tile=64)
    tm = max(tm, 16)
    rows_p = -(-rows // tm) * tm
    params = None
    if not interpret:
        check_gpu_block_shape(layout.block_shape, tm)
        params = _triton_params()
    num_out_blocks = n_out // b_out
    out = pl.pallas_call(
        functools.partial(_dsd_gpu_kernel, b_in=b_in, transpose=transpose),
        out_shape=jax.ShapeDtypeStruct((rows_p, n_out), x.dtype),
        grid=(rows_p // tm, num_out_blocks),
        in_specs=[
            pl.BlockSpec(sched.ptr.shape, lambda i, j: (0,)),
            pl.BlockSpec(sched.valid_in_block.shape, lambda i, j: (0,)),
            pl.BlockSpec(sched.valid_slot.shape, lambda i, j: (0,)),
            pl.BlockSpec((tm, k_in), lambda i, j: (i, 0)),
            pl.BlockSpec(values.shape, lambda i, j: (0, 0, 0)),
        ],
        out_specs=pl.BlockSpec((tm, b_out), lambda i, j: (i, j)),
        compiler_params=params,
        interpret=interpret,
    )(
        jnp.asarray(sched.ptr),
        jnp.asarray(sched.valid_in_block),
        jnp.asarray(sched.valid_slot),
        _pad_rows(x, rows_p),
        values.astype(x.dtype),
    )
    return out[:rows]


def _sdd_gpu_kernel(rows_ref, cols_ref, x_ref, dy_ref, o_ref, *, bk, bn, tm, num_tiles):
    b = pl.program_id(0)
    x_start = pl.multiple_of(rows_ref[b] * bk, bk)
    y_start = pl.multiple_of(cols_ref[b] * bn, bn)

    def body(m, acc):
        r0 = pl.multiple_of(m * tm, tm)
        xb = x_ref[pl.ds(r0, tm), pl.ds(x_start, bk)]
        yb = dy_ref[pl.ds(r0, tm), pl.ds(y_start, bn)]
        return acc + lax.dot_general(
            xb, yb, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )

    acc = lax.fori_loop(0, num_tiles, body, jnp.zeros((bk, bn), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("layout", "interpret"))
def sdd_gpu(
    x: jax.Array, dy: jax.Array, *, layout: BSRLayout, interpret: bool = False
) -> jax.Array:
    """GPU kernel: ``dV[b] = x[:, rows(b)]^T @ dy[:, cols(b)]``, one program per block.

    Args and returns as `sdd_tpu`; the batch reduction is an in-kernel loop over row tiles.
    """
    bk, bn = layout.block_shape
    rows = x.shape[0]
    tm = 32
    rows_p = -(-rows // tm) * tm
    params = None
    if not interpret:
        check_gpu_block_shape(layout.block_shape, tm)
        params = _triton_params()
    xp, dyp = _pad_rows(x, rows_p), _pad_rows(dy, rows_p)
    kernel = functools.partial(_sdd_gpu_kernel, bk=bk, bn=bn, tm=tm, num_tiles=rows_p // tm)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((layout.nnz_blocks, bk, bn), dy.dtype),
        grid=(layout.nnz_blocks,),
        in_specs=[
            pl.BlockSpec((layout.nnz_blocks,), lambda b: (0,)),
            pl.BlockSpec((layout.nnz_blocks,), lambda b: (0,)),
            pl.BlockSpec(xp.shape, lambda b: (0, 0)),
            pl.BlockSpec(dyp.shape, lambda b: (0, 0)),
        ],
        out_specs=pl.BlockSpec((None, bk, bn), lambda b: (b, 0, 0)),
        compiler_params=params,
        interpret=interpret,
    )(jnp.asarray(layout.row_indices), jnp.asarray(layout.col_indices), xp, dyp)
