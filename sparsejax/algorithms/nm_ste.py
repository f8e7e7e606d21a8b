"""N:M training with straight-through estimators: NMSTE, SR-STE and S-STE.

The straight-through methods keep dense weights in the optimizer and recompute
the magnitude N:M mask from them in every forward pass (the N:M fields and masks
are those of `sparsejax.algorithms.base.NMAlgorithm`): the model runs on
``forward_params_with_state(params, masks, state)``, whose mask
(``forward_masks``) is that of the weights ``params`` the step starts from, and the
backward pass goes straight through the mask to every dense weight. Their state
(`NMState`) keeps the mask that forward pass used and records how many mask
entries flip from one step to the next: the *sparse architecture divergence* of
Zhou et al. 2021, logged as ``mask_flip_rate``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from sparsejax import masks
from sparsejax.algorithms.base import NMAlgorithm

PyTree = Any

__all__ = [
    "NMSTE",
    "NMState",
    "SRSTE",
    "SSTE",
    "nm_flip_rate",
    "soft_threshold_nm",
    "sr_ste_weights",
]


class NMState(NamedTuple):
    """State of the straight-through N:M methods (`MaskedState.algo_state`).

    Attributes:
      masks: the masks the last step's forward pass applied: the magnitude N:M
        mask of the weights that step started from (``update_masks`` returns them).
      flip_sum: float32 scalar, sum over steps of the fraction of mask entries
        that changed since the previous step.
      flip_ema: float32 scalar, exponential moving average (decay 0.99) of the
        same fraction, i.e. the recent flip rate.
      num_steps: int32 scalar, how many steps ``flip_sum`` covers.
      scales: per-leaf float32 scalars (S-STE's frozen rescaling, None where a
        leaf is not sparsified); ones for the other methods.
    """

    masks: PyTree
    flip_sum: jax.Array
    flip_ema: jax.Array
    num_steps: jax.Array
    scales: PyTree


def nm_flip_rate(old: PyTree, new: PyTree) -> jax.Array:
    """Fraction of mask entries that differ between two mask trees (None leaves skipped).

    Args:
      old, new: mask pytrees of the same structure.

    Returns:
      float32 scalar in [0, 1]; 0 when no leaf is masked.

    Reference: Zhou et al. 2021, "Learning N:M Fine-grained Structured Sparse
    Neural Networks From Scratch": the sparse architecture divergence (flip
    rate) r_t = ||E_t xor E_{t-1}||_1 / D over the D masked weights.
    """
    pairs = [
        (a, b)
        for a, b in zip(
            jax.tree.leaves(old, is_leaf=masks.is_none),
            jax.tree.leaves(new, is_leaf=masks.is_none),
            strict=True,
        )
        if a is not None
    ]
    total = sum(a.size for a, _ in pairs)
    if not total:
        return jnp.zeros((), jnp.float32)
    changed = sum(jnp.sum(a != b) for a, b in pairs)
    return (changed / total).astype(jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _sr_ste(w: jax.Array, mask: jax.Array, decay: float) -> jax.Array:
    return jnp.where(mask, w, jnp.zeros_like(w))


def _sr_ste_fwd(w, mask, decay):
    return _sr_ste(w, mask, decay), (w, mask)


def _sr_ste_bwd(decay, residuals, g):
    w, mask = residuals
    # The refined gradient: straight through for every weight, plus a decay that
    # pulls only the pruned weights toward zero.
    return g + decay * jnp.where(mask, jnp.zeros_like(w), w), None


_sr_ste.defvjp(_sr_ste_fwd, _sr_ste_bwd)


def sr_ste_weights(w: jax.Array, mask: jax.Array, decay: float) -> jax.Array:
    """``w * mask`` forward; the SR-STE gradient ``g + decay * (1 - mask) * w`` backward.

    Args:
      w: dense weights, any shape and float dtype.
      mask: bool array of ``w.shape``.
      decay: lambda_w >= 0 (0 gives the plain straight-through estimator).

    Returns:
      ``where(mask, w, 0)``; its VJP maps a cotangent g (dL/dW~) to
      ``g + decay * where(mask, 0, w)``.

    Reference: Zhou et al. 2021, "Learning N:M Fine-grained Structured Sparse
    Neural Networks From Scratch", Eq. (5): W_{t+1} = W_t - eta (g(W~_t) +
    lambda_w (E-bar ⊙ W_t)), E-bar the pruned entries.
    """
    return _sr_ste(w, mask, float(decay))


def soft_threshold_nm(w: jax.Array, n: int, m: int, axis: int = -2) -> jax.Array:
    """S-STE's continuous N:M pruning: shrink each group by its (n+1)-th largest magnitude.

    In every group of ``m`` consecutive entries along ``axis`` let t be the
    (n+1)-th largest |w| (the largest pruned magnitude). Then
    S(w)_i = sign(w_i) * max(|w_i| - t, 0): at most ``n`` entries per group stay
    nonzero, and S is continuous in w (a weight crossing the threshold enters or
    leaves at 0, not with a jump). For n == m nothing is pruned and S(w) = w.

    Args:
      w: array of any rank; ``m`` divides ``w.shape[axis]``.
      n, m: the pattern.
      axis: the grouped axis.

    Returns:
      Array like ``w``.

    Reference: Hu et al. 2024, "S-STE: Continuous Pruning Function for
    Efficient 2:4 Sparse Pre-training".
    """
    masks.validate_nm(n, m)
    if n == m:
        return w
    axis = masks.normalize_axis(axis, w.ndim)
    if w.shape[axis] % m:
        raise ValueError(
            f"m={m} must divide the length {w.shape[axis]} of axis {axis} (w.shape={w.shape})"
        )
    moved = jnp.moveaxis(w, axis, -1)
    groups = moved.reshape(*moved.shape[:-1], moved.shape[-1] // m, m)
    mags = jnp.abs(groups)
    t = -jnp.sort(-mags, axis=-1)[..., n : n + 1]
    shrunk = jnp.sign(groups) * jnp.maximum(mags - t, 0.0)
    return jnp.moveaxis(shrunk.reshape(moved.shape), -1, axis)


def _ste(w: jax.Array, forward: jax.Array) -> jax.Array:
    """``forward`` in the forward pass, identity to ``w`` in the backward pass."""
    return w + jax.lax.stop_gradient(forward - w)


@dataclasses.dataclass(frozen=True)
class NMSTE(NMAlgorithm):
    """N:M training with the straight-through estimator.

    The optimizer updates dense weights W. Every forward pass computes the mask
    E = E(W_t) from the current weights W_t, keeping the ``n`` largest |W_t| of
    every group of ``m`` (`forward_masks`); it uses W~ = E ⊙ W_t and the backward
    pass copies dL/dW~ to dL/dW for every weight, pruned or not, so pruned weights
    keep learning and may return. The state keeps E(W_t) after step t (for the
    flip rate, export and the masks `sparsejax.transforms.get_masks` returns).

    Reference: Zhou et al. 2021, "Learning N:M Fine-grained Structured Sparse
    Neural Networks From Scratch" (the STE baseline, Eq. (3)); Bengio et al.
    2013 (the estimator).
    """

    updates_masks = True
    straight_through = True

    def init_masks(self, params: PyTree, key: jax.Array) -> PyTree:
        del key
        return self.magnitude_masks(params)

    def init_scales(self, params: PyTree) -> PyTree:
        return jax.tree.map(
            lambda s: None if s is None else jnp.ones((), jnp.float32),
            self.selected(params),
            is_leaf=masks.is_none,
        )

    def init_state(self, params: PyTree) -> NMState:
        return NMState(
            masks=self.init_masks(params, None),
            flip_sum=jnp.zeros((), jnp.float32),
            flip_ema=jnp.zeros((), jnp.float32),
            num_steps=jnp.zeros((), jnp.int32),
            scales=self.init_scales(params),
        )

    def step_masks(self, params: PyTree, step: jax.Array) -> PyTree:
        """The masks of the dense weights ``params`` at ``step`` (the step matters to decay)."""
        del step
        return self.magnitude_masks(params)

    def forward_masks(self, params: PyTree, masks_tree: PyTree, algo_state: NMState) -> PyTree:
        """E(W_t): the magnitude N:M masks of the current weights ``params``.

        Recomputed in every forward pass, as in Zhou et al. 2021 (the stored
        ``masks_tree`` come from the previous step's weights and are not used); at
        the state's step ``algo_state.num_steps`` for methods whose N changes.
        """
        del masks_tree
        return self.step_masks(jax.lax.stop_gradient(params), algo_state.num_steps)

    def update_state(self, state: NMState, params, grads, step) -> NMState:
        # ``params`` are the weights this step's forward pass ran on: keep its mask.
        del grads, step
        new = self.forward_masks(params, state.masks, state)
        rate = nm_flip_rate(state.masks, new)
        return state._replace(
            masks=new,
            flip_sum=state.flip_sum + rate,
            flip_ema=0.99 * state.flip_ema + 0.01 * rate,
            num_steps=state.num_steps + 1,
        )

    def is_update_step(self, step: jax.Array) -> jax.Array:
        del step
        return jnp.asarray(True)

    def update_masks(self, masks_tree, params, grads, step, key, algo_state=()):
        del masks_tree, params, grads, step, key
        return algo_state.masks

    def forward_params(self, params: PyTree, masks_tree: PyTree) -> PyTree:
        """E ⊙ W forward (E = ``masks_tree``), identity backward."""
        return jax.tree.map(
            lambda m, w: w if m is None else _ste(w, jnp.where(m, w, jnp.zeros_like(w))),
            masks_tree,
            params,
            is_leaf=masks.is_none,
        )

    def metrics(self, algo_state: NMState) -> dict[str, jax.Array]:
        """``mask_flip_rate`` (recent, EMA over ~100 steps) and ``mask_flip_rate_mean``."""
        return {
            "mask_flip_rate": algo_state.flip_ema,
            "mask_flip_rate_mean": algo_state.flip_sum / jnp.maximum(algo_state.num_steps, 1),
        }


@dataclasses.dataclass(frozen=True)
class SRSTE(NMSTE):
    """SR-STE: the straight-through estimator with a sparse-refined decay on pruned weights.

    Forward as `NMSTE`. The gradient of the dense weights is refined to
    g~ = dL/dW~ + lambda_w * (E-bar ⊙ W), E-bar = 1 - E the pruned entries: the
    pruned weights are pulled toward zero, so they stop oscillating around the
    kept ones and the mask flips less (a lower sparse architecture divergence).

    Reference: Zhou et al. 2021, "Learning N:M Fine-grained Structured Sparse
    Neural Networks From Scratch", Eq. (5); lambda_w = 2e-4 in the paper.

    Attributes:
      lambda_w: the decay of the pruned weights, >= 0.
    """

    lambda_w: float = 2e-4

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.lambda_w, (int, float)) or not math.isfinite(self.lambda_w):
            raise ValueError(f"lambda_w must be a finite number, got lambda_w={self.lambda_w!r}")
        if self.lambda_w < 0:
            raise ValueError(f"lambda_w must be >= 0, got lambda_w={self.lambda_w!r}")

    def forward_params(self, params: PyTree, masks_tree: PyTree) -> PyTree:
        return jax.tree.map(
            lambda m, w: w if m is None else sr_ste_weights(w, m, self.lambda_w),
            masks_tree,
            params,
            is_leaf=masks.is_none,
        )


def _sste_scale(w: jax.Array, s: jax.Array) -> jax.Array:
    """beta = <w, s> / <s, s> (1 when s is all zero): the least-squares scale of s toward w."""
    denom = jnp.sum(s * s)
    safe = jnp.where(denom > 0, denom, 1.0)
    return jnp.where(denom > 0, jnp.sum(w * s) / safe, 1.0).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class SSTE(NMSTE):
    """S-STE: a continuous N:M pruning function with a per-tensor rescaling.

    Forward: W~ = beta * S(W), S the soft-thresholding of `soft_threshold_nm`
    (every group shrunk by its largest pruned magnitude, so W~ is continuous in
    W: a weight that changes sides of the threshold does so at zero, and the
    jumps that make hard-threshold STE oscillate are gone). beta minimizes
    ||W - beta S(W)||^2, beta = <W, S(W)> / <S(W), S(W)>, and is treated as a
    constant. Backward: straight through S, dL/dW = beta * dL/dW~.

    As in the paper, beta is computed once, from the initial weights, and frozen
    (`NMState.scales`): recomputing it every step moves the forward weights of
    every group at once. Training uses `forward_params_with_state`; the
    stateless `forward_params` (for callers without the state) recomputes beta
    from the current weights. The mask (for export and the flip rate) is the N:M
    magnitude mask, which is exactly the support of S(W) when magnitudes within
    a group are distinct.

    Reference: Hu et al. 2024, "S-STE: Continuous Pruning Function for
    Efficient 2:4 Sparse Pre-training" (the MVUE activation-gradient estimator
    and FP8 parts of that paper are about speed and are not done here).
    """

    def __post_init__(self):
        super().__post_init__()
        if self.transposable:
            raise ValueError("transposable=True is not supported by S-STE (its threshold is 1-D)")

    def init_scales(self, params: PyTree) -> PyTree:
        return jax.tree.map(
            lambda sel, w: (
                None
                if sel is None
                else _sste_scale(w, soft_threshold_nm(w, self.n, self.m, self.axis))
            ),
            self.selected(params),
            params,
            is_leaf=masks.is_none,
        )

    def _forward(self, params: PyTree, masks_tree: PyTree, scales: PyTree | None) -> PyTree:
        def one(m, w, beta):
            if m is None:
                return w
            s = soft_threshold_nm(w, self.n, self.m, self.axis)
            if beta is None:
                beta = _sste_scale(w, s)
            return jax.lax.stop_gradient(beta).astype(w.dtype) * _ste(w, s)

        if scales is None:
            scales = jax.tree.map(lambda m: None, masks_tree, is_leaf=masks.is_none)
        return jax.tree.map(one, masks_tree, params, scales, is_leaf=masks.is_none)

    def forward_params(self, params: PyTree, masks_tree: PyTree) -> PyTree:
        """beta * S(W) forward, beta * identity backward; beta from the current weights."""
        return self._forward(params, masks_tree, None)

    def forward_params_with_state(self, params, masks_tree, algo_state) -> PyTree:
        """beta * S(W) forward, beta * identity backward; beta frozen at initialization."""
        return self._forward(params, masks_tree, algo_state.scales)
