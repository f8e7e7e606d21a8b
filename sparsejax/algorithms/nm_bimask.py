"""Bi-Mask: N:M training with separate forward and backward N:M masks.

`bidirectional_matmul` is the product whose input gradient uses its own mask (a
custom VJP); `BiMask` runs every Flax Dense layer through it via `model_context`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparsejax import masks
from sparsejax.algorithms.nm_ste import NMSTE

PyTree = Any

__all__ = ["BiMask", "bidirectional_matmul"]


@jax.custom_vjp
def bidirectional_matmul(
    x: jax.Array, w: jax.Array, forward_mask: jax.Array, backward_mask: jax.Array
) -> jax.Array:
    """``x @ (w ⊙ forward_mask)`` whose input gradient uses ``w ⊙ backward_mask``.

    Args:
      x: float[..., K] activations.
      w: float[K, N] dense weights.
      forward_mask: bool[K, N], N:M along K (the forward product's reduction axis).
      backward_mask: bool[K, N], N:M along N (the reduction axis of dX = dY W^T).

    Returns:
      float[..., N]. Its VJP maps dY to dX = dY (w ⊙ backward_mask)^T and
      dW = x^T dY (dense: straight through both masks).

    Reference: Zhang et al. 2023, "Bi-directional Masks for Efficient N:M
    Sparse Training".
    """
    return x @ jnp.where(forward_mask, w, jnp.zeros_like(w))


def _bimm_fwd(x, w, forward_mask, backward_mask):
    return bidirectional_matmul(x, w, forward_mask, backward_mask), (x, w, backward_mask)


def _bimm_bwd(residuals, g):
    x, w, backward_mask = residuals
    dx = g @ jnp.where(backward_mask, w, jnp.zeros_like(w)).T
    dw = x.reshape(-1, x.shape[-1]).T @ g.reshape(-1, g.shape[-1])
    return dx.astype(x.dtype), dw.astype(w.dtype), None, None


bidirectional_matmul.defvjp(_bimm_fwd, _bimm_bwd)


@dataclasses.dataclass(frozen=True)
class BiMask(NMSTE):
    """Bi-Mask: separate N:M masks for the forward weight and the transposed backward weight.

    Forward: y = x (W ⊙ E_f), E_f the magnitude N:M mask along the input axis
    of the current weights (as `NMSTE`, `forward_masks`). Backward to the
    activations: dX = dY (W ⊙ E_b)^T, E_b the magnitude N:M mask along the
    *output* axis, so that product is N:M along its own reduction axis and can
    run on sparse tensor cores too, without the accuracy cost of a single
    transposable mask. The weight gradient dW = X^T dY is dense (straight
    through), as in the paper.

    Both masks are recomputed from the current |W| in every forward pass. The
    paper also searches over row permutations of W for the backward mask that
    keeps the most forward weights; that search is not done here (E_b is the
    plain magnitude mask).

    Only ``flax.linen.Dense`` layers get the bidirectional backward pass, through
    `model_context` (a Flax method interceptor the training step enables);
    other sparsified layers are trained as in `NMSTE`.

    Reference: Zhang et al. 2023, "Bi-directional Masks for Efficient N:M
    Sparse Training".
    """

    def __post_init__(self):
        super().__post_init__()
        if self.transposable:
            raise ValueError("transposable=True contradicts bidirectional masks; use nm_ste")

    def backward_masks(self, params: PyTree) -> PyTree:
        """E_b: N:M along the last (output) axis of every sparsified kernel.

        None for a kernel whose output width ``m`` does not divide (e.g. a
        10-class head at m = 4): that layer keeps the uni-directional backward.
        """

        def one(sel, w):
            if sel is None or jnp.shape(w)[-1] % self.m:
                return None
            return masks.nm_mask(jnp.abs(w), self.n, self.m, -1)

        return jax.tree.map(one, self.selected(params), params, is_leaf=masks.is_none)

    def model_context(self, params: PyTree, masks_tree: PyTree, algo_state: PyTree):
        # Both masks of the weights the model runs on now, as `forward_params_with_state`.
        forward = self.forward_masks(params, masks_tree, algo_state)
        backward = self.backward_masks(jax.lax.stop_gradient(params))

        def lookup(tree, path):
            node = tree
            for key in (*path, "kernel"):
                if not isinstance(node, dict) or key not in node:
                    return None
                node = node[key]
            return node

        def interceptor(next_fun, args, kwargs, context):
            module = context.module
            if context.method_name != "__call__" or not isinstance(module, nn.Dense):
                return next_fun(*args, **kwargs)
            forward_mask = lookup(forward, module.path)
            backward_mask = lookup(backward, module.path)
            if forward_mask is None or backward_mask is None:
                return next_fun(*args, **kwargs)
            w = lookup(params, module.path)
            y = bidirectional_matmul(args[0], w, forward_mask, backward_mask)
            if module.use_bias:
                y = y + module.variables["params"]["bias"]
            return y

        return nn.intercept_methods(interceptor)
