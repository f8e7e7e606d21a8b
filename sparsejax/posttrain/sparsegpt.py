"""SparseGPT: one-shot pruning with optimal-brain-surgeon weight updates, in column blocks."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sparsejax import masks as masks_lib
from sparsejax.posttrain import pattern as pattern_lib

__all__ = ["hessian_inverse_factor", "sparsegpt"]


def hessian_inverse_factor(x: jax.Array, dampening: float = 0.01) -> jax.Array:
    """Upper Cholesky factor U of (XᵀX + λI)⁻¹ = UᵀU, λ = ``dampening`` · mean(diag XᵀX).

    Args:
      x: calibration inputs ``[tokens, in]``.
      dampening: relative dampening (SparseGPT's default 1%).

    Returns:
      ``float32[in, in]`` upper triangular. Inputs that are zero on every token get a unit
      diagonal first, as in the paper's code, so H is invertible; unlike that code, their
      weights are not zeroed here (they do not change the calibration outputs, and pruning
      at sparsity 0 must return the layer unchanged).
    """
    x = jnp.asarray(x, jnp.float32)
    h = x.T @ x
    diag = jnp.diag(h)
    h = h + jnp.diag(jnp.where(diag == 0, 1.0, 0.0))
    h = h + dampening * jnp.mean(jnp.diag(h)) * jnp.eye(h.shape[0], dtype=h.dtype)
    chol = jnp.linalg.cholesky(h)
    h_inv = jax.scipy.linalg.cho_solve((chol, True), jnp.eye(h.shape[0], dtype=h.dtype))
    h_inv = (h_inv + h_inv.T) / 2  # symmetric up to rounding; cholesky wants it exactly
    return jnp.linalg.cholesky(h_inv).T


def sparsegpt(
    kernel: jax.Array,
    x: jax.Array,
    *,
    sparsity: Any = 0.0,
    n: int | None = None,
    m: int | None = None,
    block_size: int = 128,
    dampening: float = 0.01,
) -> tuple[jax.Array, jax.Array]:
    """Prunes a layer and updates its remaining weights to reconstruct its outputs on ``x``.

    Args:
      kernel: ``float[in, out]`` (a conv kernel flattened to ``[window * in, out]``).
      x: calibration inputs ``float[tokens, in]`` (conv: im2col patches).
      sparsity: fraction of entries removed, in [0, 1) (unstructured; chosen adaptively per
        column block, exactly ``round((1 - sparsity) * size)`` kept over the layer).
      n, m: N:M instead: ``n`` kept in every ``m`` consecutive inputs of each output.
      block_size: inputs per lazy-update block (the paper's B = 128); for N:M a multiple of m.
      dampening: λ as a fraction of the mean diagonal of XᵀX (the paper's 1%).

    Returns:
      ``(pruned kernel, mask)``: removed entries are exactly 0; kept entries carry the OBS
      updates. ``mask`` is the boolean ``[in, out]`` pattern.

    Raises:
      ValueError: for a bad sparsity, (n, m), block size or dampening, mismatched shapes,
        ``m`` not dividing ``in``, NaN/inf or all-zero calibration inputs, or a Hessian that
        the dampening leaves singular (e.g. ``dampening=0`` with fewer tokens than inputs).

    Reference: Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately
    Pruned in One-Shot". Per output row w (over the inputs), the layer-wise problem
    min ||Xw - Xŵ||² has Hessian H = XᵀX (+ λI). The inputs are visited in order; when input
    j is removed from a row, the optimal-brain-surgeon update spreads its error over the inputs
    not yet visited: δ = -(w_j / [H⁻¹]_jj) · H⁻¹_{j,:}, where H⁻¹ is that of the inputs still
    ahead. Those shrinking inverses are exactly the rows of the upper Cholesky factor U of H⁻¹,
    so the update of column j is err_j = (w_j - ŵ_j) / U_jj applied as w_{>j} -= err_j U_{j,>j}.
    Updates inside a block of B inputs are applied at once to the rest of the layer (lazy
    batching). The mask of each block is chosen when the block starts, from the current
    (already updated) weights, by the OBS saliency w² / U_jj² (adaptive mask selection); for
    N:M it is chosen every m inputs.
    """
    pattern = pattern_lib.make_pattern(sparsity, n, m)
    kernel, x = jnp.asarray(kernel), jnp.asarray(x)
    pattern_lib.check_layer(kernel, x, pattern)
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)):
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if block_size <= 0 or (pattern.is_nm and block_size % pattern.m):
        raise ValueError(
            f"block_size must be positive (and a multiple of m for N:M), got {block_size!r}"
        )
    if not 0.0 <= float(dampening) < np.inf:
        raise ValueError(f"dampening must be a non-negative float, got {dampening!r}")
    factor = hessian_inverse_factor(x, float(dampening))
    if not isinstance(factor, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(factor))):
        # H = XᵀX has rank <= tokens, so with fewer tokens than inputs only the dampening
        # makes it invertible; without it the Cholesky factors are NaN.
        raise ValueError(
            f"H = XᵀX + λI is singular or ill-conditioned at dampening={dampening!r} for x "
            f"of shape {tuple(jnp.shape(x))} ({jnp.shape(x)[0]} tokens for "
            f"{jnp.shape(x)[1]} inputs): use a positive dampening or more calibration tokens"
        )
    pruned, mask = _sparsegpt(kernel.astype(jnp.float32), factor, pattern, int(block_size))
    return pruned.astype(kernel.dtype), mask


@functools.partial(jax.jit, static_argnums=(2, 3))
def _sparsegpt(kernel, factor, pattern, block_size):
    w = kernel.T  # [rows = outputs, columns = inputs], the paper's layout
    rows, columns = w.shape
    mask = jnp.zeros_like(w, bool)
    for start in range(0, columns, block_size):
        end = min(start + block_size, columns)
        u = factor[start:end, start:end]
        diag = jnp.diag(u)
        block = w[:, start:end]
        if pattern.is_nm:
            block_mask = jnp.ones_like(block, bool)
        else:
            # Cumulative rounding: the blocks' counts sum exactly to the layer's count.
            keep = masks_lib.num_kept(end * rows, pattern.sparsity) - masks_lib.num_kept(
                start * rows, pattern.sparsity
            )
            block_mask = masks_lib.topk_mask_by_count(jnp.square(block / diag), keep)

        def column(i, carry, u=u, diag=diag):
            block, block_mask, errors = carry
            if pattern.is_nm:
                # Every m columns, keep the n best of the next m by saliency, per row.
                def choose(block_mask):
                    group = lax.dynamic_slice_in_dim(block, i, pattern.m, axis=1)
                    d = lax.dynamic_slice_in_dim(diag, i, pattern.m)
                    keep = masks_lib.nm_mask(jnp.square(group / d), pattern.n, pattern.m, axis=1)
                    return lax.dynamic_update_slice_in_dim(block_mask, keep, i, axis=1)

                block_mask = lax.cond(i % pattern.m == 0, choose, lambda b: b, block_mask)
            col = block[:, i]
            quantized = jnp.where(block_mask[:, i], col, 0.0)
            error = (col - quantized) / diag[i]
            # u is upper triangular, so this leaves the columns before i untouched and
            # turns column i into `quantized`.
            block = block - error[:, None] * u[i][None, :]
            block = block.at[:, i].set(quantized)
            return block, block_mask, errors.at[:, i].set(error)

        block, block_mask, errors = lax.fori_loop(
            0, end - start, column, (block, block_mask, jnp.zeros_like(block))
        )
        w = w.at[:, start:end].set(block)
        w = w.at[:, end:].add(-errors @ factor[start:end, end:])
        mask = mask.at[:, start:end].set(block_mask)
    return jnp.where(mask, w, 0.0).T, mask.T
