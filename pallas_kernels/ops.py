"""Public sparse matmuls: dispatch between Pallas kernels and a fast XLA path, with gradients.

``block_sparse_matmul(x, w: BSR)`` and ``nm_matmul(x, w: NM)`` compute ``x @ W`` for
``x`` of shape ``(..., K)``. ``impl`` picks the implementation:

* ``'auto'``: Pallas on TPU and on GPU within `GPU_JAX_RANGE`, the XLA path elsewhere
  (CPU; a GPU whose JAX no longer has the Triton lowering);
* ``'xla'``: plain XLA, correct everywhere, built to be fast on CPU;
* ``'pallas'``: the compiled kernel for the default backend (TPU: scalar-prefetch kernel;
  GPU: Triton-lowered kernel);
* ``'pallas_interpret'``: the TPU kernel run by the Pallas interpreter (CPU tests).

Each op is a ``jax.custom_vjp``: the cotangent reaches the activations
(``dX = dY @ W^T``, the same kernel walking ``W`` by block rows) and the stored nonzeros
only (BSR: the SDD product ``dV[b] = X[:, rows(b)]^T @ dY[:, cols(b)]``; NM: ``X^T dY``
sampled at the kept positions). Structural zeros get no gradient: the pattern is fixed.

The `*_reference` functions densify and call ``jnp.dot``; tests hold every path to them.

The XLA path for BSR (why it is shaped this way): on CPU, XLA runs a batched dot as a
loop of single-threaded GEMMs, and thousands of 32x32 products are far from peak. So the
static layout groups output block columns by their number of stored blocks
(`pallas_kernels.plans.xla_plan`); for a group of ``g`` columns with at most ``P`` blocks each,

    G[c, :, p*bk:(p+1)*bk] = X[:, rows(c, p)]     (B, P*bk) slab per column, one gather
    Y[:, col(c)]           = G[c] @ stack_p V[c, p]  one batched dot, K = P*bk

so each column is one contiguous GEMM of depth ``P*bk`` instead of ``P`` tiny ones, and
padding stays small because columns of similar counts share a group. Gather indices are
compile-time constants from the layout; nothing data-dependent runs at call time. The rows
of X run as independent cache-sized pieces (the cores work on several at once), and matrices
dense enough that the grouped dots would lose to XLA's multi-threaded GEMM (see
`_prefer_dense`) are densified and multiplied densely instead.
"""

from __future__ import annotations

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels import block_sparse, nm, plans
from pallas_kernels.formats import BSR, NM, BSRLayout, check_tpu_block_shape

__all__ = [
    "IMPLS",
    "block_sparse_matmul",
    "block_sparse_matmul_reference",
    "nm_matmul",
    "nm_matmul_reference",
    "GPU_JAX_RANGE",
    "gpu_kernels_supported",
    "resolve_impl",
]

IMPLS = ("auto", "xla", "pallas", "pallas_interpret")

# The GPU kernels are written for Pallas' Triton lowering as it is in JAX 0.10 (compiler
# params `pallas.triton.CompilerParams`, a generic ``jnp.dot`` in the kernel). JAX 0.11
# deprecates that lowering for Mosaic GPU, whose kernels are warpgroup-level code; outside
# [low, high) 'auto' runs the XLA path on GPU.
GPU_JAX_RANGE = ((0, 10), (0, 11))


def gpu_kernels_supported(version: str | None = None) -> bool:
    """Whether JAX ``version`` (default: the installed one) runs the Triton GPU kernels.

    True when ``version`` lies in `GPU_JAX_RANGE` and the Triton lowering imports.
    """
    parts = [int(p) for p in re.findall(r"\d+", version or jax.__version__)[:2]]
    low, high = GPU_JAX_RANGE
    if len(parts) < 2 or not low <= tuple(parts) < high:
        return False
    try:
        from jax.experimental.pallas import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_impl(impl: str) -> str:
    """Maps ``impl`` to a concrete one: ``'xla'``, ``'tpu'``, ``'gpu'`` or ``'interpret'``.

    ``'auto'`` on a GPU picks ``'xla'`` when `gpu_kernels_supported` is False.

    Raises:
      ValueError: for an unknown ``impl`` (the message lists the known ones), or
        ``'pallas'`` on a backend without a Pallas lowering (CPU).
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    backend = jax.default_backend()
    if impl == "xla":
        return "xla"
    if impl == "pallas_interpret":
        return "interpret"
    if backend == "tpu":
        return "tpu"
    if backend in ("gpu", "cuda", "rocm"):
        return "gpu" if impl == "pallas" or gpu_kernels_supported() else "xla"
    if impl == "pallas":
        raise ValueError(
            f"impl='pallas' needs a TPU or GPU backend, got {backend!r}; use impl='xla' or "
            "'pallas_interpret'"
        )
    return "xla"


def _flatten(x: jax.Array, k: int, name: str = "x") -> tuple[jax.Array, tuple[int, ...]]:
    if x.ndim < 1 or x.shape[-1] != k:
        raise ValueError(f"{name} must have shape (..., {k}), got {x.shape}")
    lead = x.shape[:-1]
    return x.reshape(math.prod(lead), k), lead


# ----------------------------------------------------------------------------- BSR, XLA


_FILL = lax.GatherScatterMode.FILL_OR_DROP


def _gather_blocks(x2: jax.Array, blocks: np.ndarray, width: int) -> jax.Array:
    """``x2 (B, n_blocks*width)``, ``blocks (g, P)`` -> ``(g, B, P*width)``; out-of-range -> 0.

    Written as one lax.gather whose slices are whole ``(B, 1, width)`` column blocks, so
    XLA copies contiguous runs of ``width`` floats per row instead of single elements.
    """
    rows = x2.shape[0]
    x3 = x2.reshape(rows, -1, width)
    g, p = blocks.shape
    dnums = lax.GatherDimensionNumbers(
        offset_dims=(1, 3), collapsed_slice_dims=(1,), start_index_map=(1,)
    )
    out = lax.gather(
        x3,
        jnp.asarray(blocks)[..., None],
        dnums,
        slice_sizes=(rows, 1, width),
        mode=_FILL,
        fill_value=0,
    )  # (g, B, P, width)
    return out.reshape(g, rows, p * width)


def _dsd_xla(x2: jax.Array, values: jax.Array, layout: BSRLayout, transpose: bool) -> jax.Array:
    """``x2 @ W`` (``x2 @ W^T`` with ``transpose``) by grouped gather + batched dot."""
    bk, bn = layout.block_shape
    b_in, b_out = (bn, bk) if transpose else (bk, bn)
    rows = x2.shape[0]
    groups, inverse = plans.xla_plan(layout, transpose)
    outs = []
    for grp in groups:
        g, p = grp.in_blocks.shape
        if p == 0:
            outs.append(jnp.zeros((g, rows, b_out), x2.dtype))
            continue
        slab = _gather_blocks(x2, grp.in_blocks, b_in)
        v = values.at[jnp.asarray(grp.slots)].get(mode="fill", fill_value=0)  # (g, P, bk, bn)
        if transpose:
            v = jnp.swapaxes(v, -1, -2)
        v = v.reshape(g, p * b_in, b_out).astype(x2.dtype)
        outs.append(lax.dot_general(slab, v, (((2,), (1,)), ((0,), (0,)))))
    y3 = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=0)  # (n_out, B, b_out)
    if inverse is not None:
        dnums = lax.GatherDimensionNumbers(
            offset_dims=(0, 2), collapsed_slice_dims=(0,), start_index_map=(0,)
        )
        y = lax.gather(
            y3,
            jnp.asarray(inverse)[:, None],
            dnums,
            slice_sizes=(1, rows, b_out),
            mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS,
        )  # (B, n_out, b_out): reorders and transposes in one pass
    else:
        y = jnp.swapaxes(y3, 0, 1)
    return y.reshape(rows, -1)


# Row pieces of the XLA path. The gathered slabs hold padded_slots * b_in floats per row of
# x; once they outgrow the cache XLA's gather slows down sharply, and one grouped call keeps
# only about one core busy (its batched dots run one after another). So a batch of up to
# `_UNROLL` cache-sized pieces runs as that many independent ops, which XLA's CPU runtime
# runs side by side. Measured on 2 cores, X 256x2048 @ W 2048x2048 at 10% of 32x32 blocks:
# one call 5.0 ms (1.3 cores busy), eight 32-row pieces 3.0-3.7 ms (1.7 cores), dense GEMM
# 13 ms. Larger batches loop (`lax.map` / `lax.scan`) over chunks of two pieces: unrolling
# inside the loop body measured slower there (B=1024: 28 ms vs 23 ms).
_PIECE_BYTES = 2 << 20
_UNROLL = 8


def _row_piece(rows: int, bytes_per_row: int) -> int:
    """Rows per piece: the largest power of two >= 8 whose slab fits `_PIECE_BYTES`."""
    piece = 8
    while piece < rows and piece * 2 * bytes_per_row <= _PIECE_BYTES:
        piece *= 2
    return piece


def _by_row_pieces(fn, bytes_per_row: int, *arrays: jax.Array, reduce: bool = False):
    """``fn(*arrays)`` for row-wise ``fn``, computed over cache-sized row pieces.

    With ``reduce``, ``fn`` returns a sum over rows (e.g. ``X^T dY``) and the pieces' results
    are added (zero rows of padding add nothing); otherwise they are concatenated. Up to
    `_UNROLL` pieces run as independent ops; beyond that, a loop over two-piece chunks.
    """
    rows = arrays[0].shape[0]
    piece = _row_piece(rows, bytes_per_row)
    pieces = -(-rows // piece)
    if pieces == 1:
        return fn(*arrays)
    if pieces > _UNROLL:
        piece, pieces = 2 * piece, -(-rows // (2 * piece))
    stacked = tuple(
        jnp.pad(a, ((0, pieces * piece - rows), (0, 0))).reshape(pieces, piece, a.shape[1])
        for a in arrays
    )
    if pieces <= _UNROLL:
        outs = [fn(*(a[i] for a in stacked)) for i in range(pieces)]
        if reduce:
            return sum(outs[1:], outs[0])
        return jnp.concatenate(outs, axis=0)[:rows]
    if reduce:
        init = jax.eval_shape(fn, *(a[0] for a in stacked))
        total, _ = lax.scan(
            lambda acc, a: (acc + fn(*a), None), jnp.zeros(init.shape, init.dtype), stacked
        )
        return total
    return lax.map(lambda a: fn(*a), stacked).reshape(pieces * piece, -1)[:rows]


def _prefer_dense(layout: BSRLayout) -> bool:
    """Whether the XLA path should densify W and call the GEMM instead.

    The grouped path runs small GEMMs and pays a gather of ``b_in`` floats per stored block
    and row; dense XLA runs one large GEMM on every core. Work model (per row of x, in multiply-
    adds): sparse ``slots * bk * bn * (1 + 16 / bn)``, dense ``K * N / 2``. Calibrated on 2
    cores at B=256: picks dense for 16x16 blocks at 50% density (sparse 0.3-0.7x) and
    sparse at <= 20% for blocks >= 32 (1.4-5x).
    """
    bk, bn = layout.block_shape
    groups, _ = plans.xla_plan(layout, False)
    slots = sum(g.in_blocks.size for g in groups)
    k, n = layout.shape
    return slots * bk * bn * (1 + 16 / bn) > k * n / 2


def _block_values_from_dense(dw: jax.Array, layout: BSRLayout) -> jax.Array:
    """The stored blocks of a dense ``(K, N)`` array, in CSC order: ``(nnz, bk, bn)``."""
    bk, bn = layout.block_shape
    kb, nb = layout.grid
    blocks = dw.reshape(kb, bk, nb, bn).transpose(0, 2, 1, 3)
    return blocks[jnp.asarray(layout.row_indices), jnp.asarray(layout.col_indices)]


def _dsd_xla_chunked(x2, values, layout, transpose):
    if _prefer_dense(layout):
        w = BSR(values=values, layout=layout).to_dense().astype(x2.dtype)
        return x2 @ (w.T if transpose else w)
    bk, bn = layout.block_shape
    b_in = bn if transpose else bk
    groups, _ = plans.xla_plan(layout, transpose)
    slots = sum(g.in_blocks.size for g in groups)
    return _by_row_pieces(
        lambda xc: _dsd_xla(xc, values, layout, transpose), slots * b_in * x2.dtype.itemsize, x2
    )


def _sdd_xla_chunked(x2, dy2, layout):
    if _prefer_dense(layout):
        return _block_values_from_dense(x2.T @ dy2, layout)
    bk, bn = layout.block_shape
    bytes_per_row = layout.nnz_blocks * (bk + bn) * x2.dtype.itemsize
    return _by_row_pieces(
        lambda xc, yc: _sdd_xla(xc, yc, layout), bytes_per_row, x2, dy2, reduce=True
    )


def _sdd_xla(x2: jax.Array, dy2: jax.Array, layout: BSRLayout) -> jax.Array:
    """``dV[b] = x2[:, rows(b)]^T @ dy2[:, cols(b)]`` as one batched dot over stored blocks."""
    bk, bn = layout.block_shape
    xg = _gather_blocks(x2, layout.row_indices[:, None], bk)  # (nnz, B, bk)
    yg = _gather_blocks(dy2, layout.col_indices[:, None], bn)  # (nnz, B, bn)
    return lax.dot_general(xg, yg, (((1,), (1,)), ((0,), (0,))))


# ----------------------------------------------------------------------------- BSR, vjp


def _dsd(x2, values, layout, transpose, impl):
    if layout.nnz_blocks == 0:
        n_out = layout.shape[0] if transpose else layout.shape[1]
        return jnp.zeros((x2.shape[0], n_out), x2.dtype)
    if impl == "xla":
        return _dsd_xla_chunked(x2, values, layout, transpose)
    if impl == "gpu":
        return block_sparse.dsd_gpu(x2, values, layout=layout, transpose=transpose)
    return block_sparse.dsd_tpu(
        x2, values, layout=layout, transpose=transpose, interpret=impl == "interpret"
    )


def _sdd(x2, dy2, layout, impl, dtype):
    bk, bn = layout.block_shape
    if layout.nnz_blocks == 0:
        return jnp.zeros((0, bk, bn), dtype)
    if impl == "xla":
        out = _sdd_xla_chunked(x2, dy2, layout)
    elif impl == "gpu":
        out = block_sparse.sdd_gpu(x2, dy2, layout=layout)
    else:
        out = block_sparse.sdd_tpu(x2, dy2, layout=layout, interpret=impl == "interpret")
    return out.astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _bsr_matmul(x2, values, layout, impl):
    return _dsd(x2, values.astype(x2.dtype), layout, False, impl)


def _bsr_fwd(x2, values, layout, impl):
    return _bsr_matmul(x2, values, layout, impl), (x2, values)


def _bsr_bwd(layout, impl, res, dy):
    x2, values = res
    dx = _dsd(dy, values.astype(dy.dtype), layout, True, impl).astype(x2.dtype)
    dvalues = _sdd(x2.astype(dy.dtype), dy, layout, impl, values.dtype)
    return dx, dvalues


_bsr_matmul.defvjp(_bsr_fwd, _bsr_bwd)


def _kernel_fits(layout: BSRLayout, resolved: str) -> bool:
    """Whether the compiled kernel for ``resolved`` accepts this block shape."""
    try:
        if resolved == "tpu":
            check_tpu_block_shape(layout.block_shape, layout.shape)
        elif resolved == "gpu":
            block_sparse.check_gpu_block_shape(layout.block_shape)
    except ValueError:
        return False
    return True


def block_sparse_matmul(x: jax.Array, w: BSR, *, impl: str = "auto") -> jax.Array:
    """``x @ W`` for a block-sparse ``W``, touching only the stored blocks.

    Args:
      x: float[..., K].
      w: `BSR` of shape ``(K, N)``.
      impl: ``'auto'`` | ``'xla'`` | ``'pallas'`` | ``'pallas_interpret'`` (module doc).
        ``'auto'`` uses the XLA path when the block shape does not fit the kernel
        (TPU: multiples of 128; GPU: powers of two >= 16); ``'pallas'`` raises then.

    Returns:
      float[..., N] in ``result_type(x, w.values)``.

    Raises:
      ValueError: unknown ``impl``, or ``x.shape[-1] != K``, or (compiled TPU kernel) a
        block shape breaking the (8, 128) tiling rule.

    Equation: ``Y[:, j-block] = sum over stored blocks b of column j of
    X[:, row(b)-block] @ V[b]``. Gradients flow to ``x`` and to ``w.values`` (SDD).
    Reference: Gray et al., "GPU Kernels for Block-Sparse Weights", 2017.
    """
    resolved = resolve_impl(impl)
    if not isinstance(w, BSR):
        raise ValueError(f"w must be a BSR, got {type(w).__name__}")
    x2, lead = _flatten(jnp.asarray(x), w.shape[0])
    if impl == "auto" and not _kernel_fits(w.layout, resolved):
        resolved = "xla"  # 'auto' never fails on a block shape; 'pallas' raises instead
    values = jnp.asarray(w.values)
    dtype = jnp.result_type(x2.dtype, values.dtype)
    y = _bsr_matmul(x2.astype(dtype), values, w.layout, resolved)
    return y.reshape(*lead, w.shape[1])


def block_sparse_matmul_reference(x: jax.Array, w: BSR) -> jax.Array:
    """Plain-jnp reference: ``x @ w.to_dense()``, float[..., K] -> float[..., N]."""
    dtype = jnp.result_type(x.dtype, w.values.dtype)
    return jnp.dot(x.astype(dtype), w.to_dense().astype(dtype), precision=lax.Precision.HIGHEST)


# ----------------------------------------------------------------------------- N:M


def _nm_dense(values: jax.Array, indices: jax.Array, n: int, m: int) -> jax.Array:
    k = values.shape[0] * m // n
    return NM(values, indices, shape=(k, values.shape[1]), n=n, m=m).to_dense()


def _nm_apply(x2, values, indices, n, m, transpose, impl):
    if impl == "xla":
        # CPU has no sparse tensor cores: rebuilding W (one fused elementwise pass over
        # K*N) and calling the multi-threaded dense GEMM is the fastest correct route.
        w = _nm_dense(values, indices, n, m).astype(x2.dtype)
        return x2 @ (w.T if transpose else w)
    backend = "gpu" if impl == "gpu" else "tpu"
    return nm.nm_matmul_pallas(
        x2,
        values.astype(x2.dtype),
        indices,
        n=n,
        m=m,
        transpose=transpose,
        interpret=impl == "interpret",
        backend=backend,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _nm_matmul(x2, values, indices, n, m, impl):
    return _nm_apply(x2, values, indices, n, m, False, impl)


def _nm_fwd(x2, values, indices, n, m, impl):
    return _nm_matmul(x2, values, indices, n, m, impl), (x2, values, indices)


def _nm_bwd(n, m, impl, res, dy):
    x2, values, indices = res
    dx = _nm_apply(dy, values, indices, n, m, True, impl).astype(x2.dtype)
    # dW is needed only at kept positions: dV[g*n+s, j] = (X^T dY)[g*m + idx[g*n+s, j], j].
    k, cols = values.shape[0] * m // n, values.shape[1]
    dw = jnp.dot(x2.T.astype(dy.dtype), dy).reshape(k // m, m, cols)
    idx = indices.astype(jnp.int32).reshape(k // m, n, cols)
    dvalues = jnp.take_along_axis(dw, idx, axis=1).reshape(values.shape)
    dindices = np.zeros(indices.shape, dtype=jax.dtypes.float0)
    return dx, dvalues.astype(values.dtype), dindices


_nm_matmul.defvjp(_nm_fwd, _nm_bwd)


def nm_matmul(x: jax.Array, w: NM, *, impl: str = "auto") -> jax.Array:
    """``x @ W`` for an N:M ``W`` compressed along K.

    Args:
      x: float[..., K].
      w: `NM` of shape ``(K, N)``.
      impl: as `block_sparse_matmul`.

    Returns:
      float[..., N] in ``result_type(x, w.values)``.

    Raises:
      ValueError: unknown ``impl`` or ``x.shape[-1] != K``.

    Equation: ``Y[b, j] = sum_g sum_s X[b, g*m + idx[g*n+s, j]] * V[g*n+s, j]``; the Pallas
    kernel rebuilds W tiles in VMEM, the XLA path rebuilds W and calls the dense GEMM (on
    CPU that is not faster than dense: the win there is 0.53-0.63x the bytes). Gradients
    reach ``x`` and ``w.values`` (``X^T dY`` at the kept positions), not the indices.
    Reference: Mishra et al., "Accelerating Sparse Deep Neural Networks", 2021.
    """
    resolved = resolve_impl(impl)
    if not isinstance(w, NM):
        raise ValueError(f"w must be an NM, got {type(w).__name__}")
    x2, lead = _flatten(jnp.asarray(x), w.shape[0])
    values = jnp.asarray(w.values)
    dtype = jnp.result_type(x2.dtype, values.dtype)
    y = _nm_matmul(x2.astype(dtype), values, jnp.asarray(w.int8_indices()), w.n, w.m, resolved)
    return y.reshape(*lead, w.shape[1])


def nm_matmul_reference(x: jax.Array, w: NM) -> jax.Array:
    """Plain-jnp reference: ``x @ w.to_dense()``, float[..., K] -> float[..., N]."""
    dtype = jnp.result_type(x.dtype, w.values.dtype)
    return jnp.dot(x.astype(dtype), w.to_dense().astype(dtype), precision=lax.Precision.HIGHEST)
