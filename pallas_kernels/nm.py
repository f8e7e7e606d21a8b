"""Pallas kernel for ``Y = X @ W`` with an N:M compressed `NM` weight, decompressed in-kernel.

Each program loads a ``(tk * n / m, tn)`` tile of stored values and their int8 group
positions, rebuilds the dense ``(tk, tn)`` tile of ``W`` in VMEM / registers,

    W[g*m + p, j] = sum_s values[g*n + s, j] * [indices[g*n + s, j] == p],

and feeds it to the MXU / tensor cores. HBM traffic for W is the compressed bytes
(2:4 fp32 with int8 indices: 0.625 of dense). The same kernel serves ``dX = dY @ W^T``
(``transpose=True``: the rebuilt tile is contracted on its column axis). No scalar prefetch
is needed, so there are two variants of one body: TPU (grid over the reduction, f32 VMEM
accumulator, Mosaic) and GPU (in-kernel loop over the reduction, register accumulator,
Triton lowering). Both run in the interpreter on CPU, which is how they are tested; neither
has been compiled on hardware here (the GPU one reshapes tiles to (groups, n, tn), which
Triton may refuse).

Reference: Mishra et al., "Accelerating Sparse Deep Neural Networks", 2021 (2:4 format);
Zhou et al., "Learning N:M Fine-grained Structured Sparse Neural Networks", ICLR 2021.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.formats import nm_decompress as _decompress

__all__ = ["nm_matmul_pallas"]


def _pick_tile(size: int, quantum: int, candidates=(512, 256, 128)) -> int:
    """Largest candidate tile dividing ``size`` and a multiple of ``quantum``, else ``size``."""
    for c in candidates:
        if c <= size and size % c == 0 and c % quantum == 0:
            return c
    return size


def _nm_kernel(x_ref, v_ref, i_ref, o_ref, acc_ref, *, n, m, transpose):
    r = pl.program_id(2)

    @pl.when(r == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    w = _decompress(v_ref[...], i_ref[...], n, m).astype(x_ref.dtype)
    dims = (((1,), (1,)), ((), ())) if transpose else (((1,), (0,)), ((), ()))
    acc_ref[...] += lax.dot_general(x_ref[...], w, dims, preferred_element_type=jnp.float32)

    @pl.when(r == pl.num_programs(2) - 1)
    def _store():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def _nm_kernel_loop(x_ref, v_ref, i_ref, o_ref, *, n, m, transpose, t_red, num_red):
    # GPU variant: no VMEM scratch on Triton, so the reduction is an in-kernel loop over
    # slices of the full reduction extent, accumulating in registers.
    tkc_or_tn = t_red * n // m if not transpose else t_red

    def body(r, acc):
        if transpose:  # reduce over N: x (tm, N), W tile (tkc, N) columns sliced
            c0 = pl.multiple_of(r * t_red, t_red)
            xb = x_ref[:, pl.ds(c0, t_red)]
            w = _decompress(v_ref[:, pl.ds(c0, t_red)], i_ref[:, pl.ds(c0, t_red)], n, m)
            dims = (((1,), (1,)), ((), ()))
        else:  # reduce over K: x (tm, K) columns, compressed W rows sliced
            k0 = pl.multiple_of(r * t_red, t_red)
            c0 = pl.multiple_of(r * tkc_or_tn, tkc_or_tn)
            xb = x_ref[:, pl.ds(k0, t_red)]
            w = _decompress(v_ref[pl.ds(c0, tkc_or_tn), :], i_ref[pl.ds(c0, tkc_or_tn), :], n, m)
            dims = (((1,), (0,)), ((), ()))
        w = w.astype(xb.dtype)
        return acc + lax.dot_general(xb, w, dims, preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, num_red, body, jnp.zeros(o_ref.shape, jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("n", "m", "transpose", "interpret", "backend"))
def nm_matmul_pallas(
    x: jax.Array,
    values: jax.Array,
    indices: jax.Array,
    *,
    n: int,
    m: int,
    transpose: bool = False,
    interpret: bool = False,
    backend: str = "tpu",
) -> jax.Array:
    """``x @ W`` (or ``x @ W^T``) for an N:M ``W`` stored as values + int8 positions.

    Args:
      x: float[B, K] (float[B, N] with ``transpose``).
      values: float[K * n / m, N].
      indices: int8[K * n / m, N] (unpacked).
      n, m: the N:M pattern along K.
      transpose: multiply by ``W^T``.
      interpret: run in the Pallas interpreter.
      backend: ``'tpu'``: grid over the reduction, f32 VMEM accumulator, Mosaic params;
        ``'gpu'``: in-kernel loop over the reduction, register accumulator, Triton params.
        Both variants run in the interpreter.

    Returns:
      float[B, N] (float[B, K] with ``transpose``) in x's dtype.

    Grid ``(B / tm, out / t_out, red / t_red)`` with the reduction innermost into an f32
    scratch. ``tk`` is a multiple of ``m`` and of ``8 * m / n`` so the compressed tile keeps
    whole groups and a TPU-legal row count.
    """
    k = values.shape[0] * m // n
    cols = values.shape[1]
    rows = x.shape[0]
    tm = min(256, -(-rows // 8) * 8)
    rows_p = -(-rows // tm) * tm
    xp = x if rows_p == rows else jnp.pad(x, ((0, rows_p - rows), (0, 0)))
    tk = _pick_tile(k, quantum=max(m, 32 * m // n))
    tn = _pick_tile(cols, quantum=128)
    tkc = tk * n // m
    if transpose:  # out axis is K, reduction over N
        grid = (rows_p // tm, k // tk, cols // tn)
        x_spec = pl.BlockSpec((tm, tn), lambda i, a, r: (i, r))
        w_map = lambda i, a, r: (a, r)
        o_spec = pl.BlockSpec((tm, tk), lambda i, a, r: (i, a))
        out_cols, acc_cols = k, tk
    else:
        grid = (rows_p // tm, cols // tn, k // tk)
        x_spec = pl.BlockSpec((tm, tk), lambda i, a, r: (i, r))
        w_map = lambda i, a, r: (r, a)
        o_spec = pl.BlockSpec((tm, tn), lambda i, a, r: (i, a))
        out_cols, acc_cols = cols, tn
    if backend not in ("tpu", "gpu"):
        raise ValueError(f"backend must be 'tpu' or 'gpu', got {backend!r}")
    if backend == "gpu":
        return _nm_gpu(xp, values, indices, n, m, transpose, interpret, tm, tk, tn)[:rows]
    params = None
    if not interpret:
        params = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))
    out = pl.pallas_call(
        functools.partial(_nm_kernel, n=n, m=m, transpose=transpose),
        out_shape=jax.ShapeDtypeStruct((rows_p, out_cols), x.dtype),
        grid=grid,
        in_specs=[x_spec, pl.BlockSpec((tkc, tn), w_map), pl.BlockSpec((tkc, tn), w_map)],
        out_specs=o_spec,
        scratch_shapes=[pltpu.VMEM((tm, acc_cols), jnp.float32)],
        compiler_params=params,
        interpret=interpret,
    )(xp, values, indices)
    return out[:rows]


def _nm_gpu(xp, values, indices, n, m, transpose, interpret, tm, tk, tn):
    k = values.shape[0] * m // n
    cols = values.shape[1]
    rows_p = xp.shape[0]
    params = None
    if not interpret:
        from jax.experimental.pallas import triton as pltriton

        params = pltriton.CompilerParams(num_warps=4, num_stages=2)
    if transpose:  # programs over (rows, K tiles); loop over N tiles
        grid = (rows_p // tm, k // tk)
        x_spec = pl.BlockSpec((tm, cols), lambda i, a: (i, 0))
        w_spec = pl.BlockSpec((tk * n // m, cols), lambda i, a: (a, 0))
        o_spec = pl.BlockSpec((tm, tk), lambda i, a: (i, a))
        out_cols, t_red, num_red = k, tn, cols // tn
    else:  # programs over (rows, N tiles); loop over K tiles
        grid = (rows_p // tm, cols // tn)
        x_spec = pl.BlockSpec((tm, k), lambda i, a: (i, 0))
        w_spec = pl.BlockSpec((values.shape[0], tn), lambda i, a: (0, a))
        o_spec = pl.BlockSpec((tm, tn), lambda i, a: (i, a))
        out_cols, t_red, num_red = cols, tk, k // tk
    kernel = functools.partial(
        _nm_kernel_loop, n=n, m=m, transpose=transpose, t_red=t_red, num_red=num_red
    )
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((rows_p, out_cols), xp.dtype),
        grid=grid,
        in_specs=[x_spec, w_spec, w_spec],
        out_specs=o_spec,
        compiler_params=params,
        interpret=interpret,
    )(xp, values, indices)
