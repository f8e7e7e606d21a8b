"""N:M structured sparse training: STE, SR-STE, S-STE, Bi-Mask, mask decay, one-shot pruning.

Every method here keeps N of every M consecutive weights along one axis of each
sparsified kernel: by default the input (reduction) axis ``-2`` of a Dense
``(in, out)`` or convolution ``(..., in, out)`` kernel, the axis sparse tensor
cores compress. With ``transposable=True`` the mask is N:M along both of the
last two axes (`sparsejax.masks.transposable_nm_mask`), so W^T is N:M too.

The straight-through methods keep dense weights in the optimizer and recompute
the magnitude N:M mask from them before every step; the model runs on
``forward_params(params, masks)``. Their state (`NMState`) records how many
mask entries flip from one step to the next: the *sparse architecture
divergence* of Zhou et al. 2021, logged as ``mask_flip_rate``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import distributions, masks
from sparsejax.algorithms.base import Algorithm

PyTree = Any

__all__ = [
    "BiMask",
    "NMDecay",
    "NMOneShot",
    "NMSTE",
    "NMState",
    "SRSTE",
    "SSTE",
    "bidirectional_matmul",
    "nm_flip_rate",
    "soft_threshold_nm",
    "sr_ste_weights",
]

_DECAYS = ("mask_linear", "mask_exponential", "structure")


class NMState(NamedTuple):
    """State of the straight-through N:M methods (`MaskedState.algo_state`).

    Attributes:
      masks: the masks of the current step (the ones ``update_masks`` returns).
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
    axis = masks._normalize_axis(axis, w.ndim)
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
class _NMBase(Algorithm):
    """Fields and mask computation shared by the N:M methods.

    Attributes:
      n, m: keep ``n`` of every ``m`` consecutive weights (0 < n <= m).
      axis: the grouped axis of every sparsified leaf (-2: a kernel's input axis).
      transposable: N:M along both of the last two axes instead (Hubara et al. 2021).
      keep_dense: substrings of leaf names left dense (e.g. 'conv_0' for a first
        layer with a single input channel). Leaves with fewer than 2 axes (biases)
        are never sparsified.
    """

    n: int = 2
    m: int = 4
    axis: int = -2
    transposable: bool = False
    keep_dense: Sequence[str] = ()

    def __post_init__(self):
        masks.validate_nm(self.n, self.m)
        if isinstance(self.axis, bool) or not isinstance(self.axis, (int, np.integer)):
            raise ValueError(f"axis must be an integer, got axis={self.axis!r}")
        if isinstance(self.keep_dense, str):
            object.__setattr__(self, "keep_dense", (self.keep_dense,))
        object.__setattr__(self, "keep_dense", tuple(self.keep_dense))

    @property
    def sparsity(self) -> float:
        """The N:M sparsity 1 - n/m."""
        return 1.0 - self.n / self.m

    def nm_pattern(self) -> tuple[int, int]:
        """``(n, m)``: the pattern the final masks follow."""
        return (self.n, self.m)

    def selected(self, params: PyTree) -> PyTree:
        """True on the sparsified leaves (rank >= 2, not in ``keep_dense``), None elsewhere."""
        chosen = distributions.uniform(params, 0.0, keep_dense=self.keep_dense)
        return jax.tree.map(lambda s: None if s is None else True, chosen, is_leaf=masks.is_none)

    def _check_shapes(self, params: PyTree) -> None:
        chosen = jax.tree_util.tree_leaves_with_path(self.selected(params), is_leaf=masks.is_none)
        for (path, sel), p in zip(chosen, jax.tree.leaves(params), strict=True):
            if sel is None:
                continue
            shape = tuple(jnp.shape(p))
            axes = (-2, -1) if self.transposable else (self.axis,)
            for a in axes:
                if not -len(shape) <= a < len(shape) or shape[a] % self.m:
                    raise ValueError(
                        f"parameter {distributions.path_name(path)} of shape {shape} cannot be "
                        f"{self.n}:{self.m} along axis {a}; list it in keep_dense"
                    )

    def nm_masks(self, score_tree: PyTree, params: PyTree, n: Any = None) -> PyTree:
        """N:M (or transposable) masks of ``score_tree`` on the sparsified leaves.

        ``n`` overrides ``self.n``; it may be traced (structure decay), in which
        case ranks inside each group are compared with it.
        """
        self._check_shapes(params)
        n = self.n if n is None else n

        def one(sel, s):
            if sel is None:
                return None
            if self.transposable:
                return masks.transposable_nm_mask(s, self.n, self.m)
            if isinstance(n, int):
                return masks.nm_mask(s, n, self.m, self.axis)
            return _nm_mask_traced(s, n, self.m, self.axis)

        return jax.tree.map(one, self.selected(params), score_tree, is_leaf=masks.is_none)

    def magnitude_masks(self, params: PyTree, n: Any = None) -> PyTree:
        return self.nm_masks(jax.tree.map(jnp.abs, params), params, n)


def _nm_mask_traced(scores: jax.Array, n: jax.Array, m: int, axis: int) -> jax.Array:
    """`masks.nm_mask` with a traced ``n`` (the ``m`` - ``n`` smallest per group dropped)."""
    full = masks.nm_mask(scores, m, m, axis)  # validates the axis and divisibility
    axis = masks._normalize_axis(axis, scores.ndim)
    moved = jnp.moveaxis(scores, axis, -1)
    groups = moved.reshape(*moved.shape[:-1], moved.shape[-1] // m, m)
    keep = (masks.group_ranks(groups) < n).reshape(moved.shape)
    return jnp.moveaxis(keep, -1, axis) & full


@dataclasses.dataclass(frozen=True)
class NMSTE(_NMBase):
    """N:M training with the straight-through estimator.

    The optimizer updates dense weights W. Before every step the mask E keeps
    the ``n`` largest |W| of every group of ``m``; the forward pass uses
    W~ = E ⊙ W and the backward pass copies dL/dW~ to dL/dW for every weight,
    pruned or not, so pruned weights keep learning and may return.

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
        """The masks used at ``step``, from the current dense weights."""
        del step
        return self.magnitude_masks(params)

    def update_state(self, state: NMState, params, grads, step) -> NMState:
        del grads
        new = self.step_masks(params, step)
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
        """E ⊙ W forward, identity backward."""
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


@dataclasses.dataclass(frozen=True)
class NMDecay(NMSTE):
    """Progressive gradient flow: N:M training whose dense gradients decay away.

    Between ``begin_step`` and ``end_step`` the network moves from dense to N:M;
    before ``begin_step`` it trains dense, after ``end_step`` it is plain N:M.
    Two families (``decay_schedule``):

    * mask decay (MDGF): the N:M magnitude mask E is recomputed every step and
      the forward weights are W ⊙ (E + alpha_t (1 - E)). Pruned weights take part
      in the forward pass scaled by alpha_t and, through autodiff, receive the
      gradient alpha_t * dL/dW~: the gradient flow to them fades with alpha_t.
      ``mask_linear``: alpha_t falls linearly from 1 to 0.
      ``mask_exponential``: alpha_t = decay_rate ** k over ``decay_intervals``
      equal intervals k = 0, 1, ... (then 0 after ``end_step``).
    * ``structure`` (SDGF): binary masks whose N shrinks stepwise from M to n,
      halving at each of equal stages (1:8 goes 8:8 -> 4:8 -> 2:8 -> 1:8), trained
      with the straight-through estimator.

    The decay uses the step count of `NMState`, so training must call
    `forward_params_with_state`; the stateless `forward_params` gives the final
    (fully decayed) N:M forward pass.

    Reference: Bambhaniya et al. 2024, "Progressive Gradient Flow for Robust
    N:M Sparsity Training in Transformers" (MDGF-Linear, MDGF-Exponential,
    SDGF-Stepwise).

    Attributes:
      decay_schedule: 'mask_linear', 'mask_exponential' or 'structure'.
      begin_step, end_step: the decay window, 0 <= begin_step < end_step.
      decay_intervals: number of constant pieces of the exponential schedule.
      decay_rate: the exponential factor per interval, in (0, 1).
    """

    decay_schedule: str = "mask_exponential"
    begin_step: int = 0
    end_step: int = 1000
    decay_intervals: int = 10
    decay_rate: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        if self.decay_schedule not in _DECAYS:
            raise ValueError(
                f"decay_schedule must be one of {_DECAYS}, "
                f"got decay_schedule={self.decay_schedule!r}"
            )
        for name in ("begin_step", "end_step", "decay_intervals"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {name}={value!r}")
        if self.end_step <= self.begin_step:
            raise ValueError(
                f"end_step must be > begin_step, got begin_step={self.begin_step}, "
                f"end_step={self.end_step}"
            )
        if self.decay_intervals < 1:
            raise ValueError(f"decay_intervals must be >= 1, got {self.decay_intervals!r}")
        if not 0.0 < self.decay_rate < 1.0:
            raise ValueError(f"decay_rate must be in (0, 1), got decay_rate={self.decay_rate!r}")
        if self.transposable and self.decay_schedule == "structure":
            raise ValueError("transposable=True is not supported with decay_schedule='structure'")

    def _fraction(self, step: jax.Array) -> jax.Array:
        t = jnp.asarray(step, jnp.float32)
        return jnp.clip((t - self.begin_step) / (self.end_step - self.begin_step), 0.0, 1.0)

    def alpha(self, step: jax.Array) -> jax.Array:
        """Forward scale of the pruned weights at ``step`` (mask decay), float32 in [0, 1]."""
        frac = self._fraction(step)
        if self.decay_schedule == "mask_linear":
            value = 1.0 - frac
        else:
            k = jnp.floor(frac * self.decay_intervals)
            value = jnp.asarray(self.decay_rate, jnp.float32) ** k
        return jnp.where(jnp.asarray(step) >= self.end_step, 0.0, value).astype(jnp.float32)

    def stages(self) -> tuple[int, ...]:
        """The N of each structure-decay stage: m, m // 2, ... down to n."""
        out = [self.m]
        while out[-1] > self.n:
            out.append(max(self.n, out[-1] // 2))
        return tuple(out)

    def n_at(self, step: jax.Array) -> jax.Array:
        """N kept per group at ``step`` (structure decay), int32."""
        stages = jnp.asarray(self.stages(), jnp.int32)
        index = jnp.floor(self._fraction(step) * len(stages)).astype(jnp.int32)
        index = jnp.minimum(index, len(stages) - 1)
        return jnp.where(jnp.asarray(step) >= self.end_step, self.n, stages[index])

    def step_masks(self, params: PyTree, step: jax.Array) -> PyTree:
        if self.decay_schedule == "structure":
            return self.magnitude_masks(params, self.n_at(step))
        return self.magnitude_masks(params)

    def init_masks(self, params: PyTree, key: jax.Array) -> PyTree:
        del key
        return self.step_masks(params, jnp.zeros((), jnp.int32))

    def _forward(self, params: PyTree, masks_tree: PyTree, step: jax.Array | None) -> PyTree:
        if self.decay_schedule == "structure" or step is None:
            return NMSTE.forward_params(self, params, masks_tree)
        alpha = self.alpha(step)

        def one(m, w):
            if m is None:
                return w
            return w * jnp.where(m, 1.0, alpha).astype(w.dtype)

        return jax.tree.map(one, masks_tree, params, is_leaf=masks.is_none)

    def forward_params(self, params: PyTree, masks_tree: PyTree) -> PyTree:
        """The fully decayed forward pass: E ⊙ W, straight-through backward."""
        return self._forward(params, masks_tree, None)

    def forward_params_with_state(self, params, masks_tree, algo_state) -> PyTree:
        """The forward pass at the state's step (``NMState.num_steps``)."""
        return self._forward(params, masks_tree, algo_state.num_steps)

    def metrics(self, algo_state: NMState) -> dict[str, jax.Array]:
        out = super().metrics(algo_state)
        if self.decay_schedule == "structure":
            out["nm_n"] = self.n_at(algo_state.num_steps).astype(jnp.float32)
        else:
            out["mask_alpha"] = self.alpha(algo_state.num_steps)
        return out


@dataclasses.dataclass(frozen=True)
class NMOneShot(_NMBase):
    """Dense training, one N:M magnitude pruning at ``begin_step``, then sparse fine-tuning.

    Until ``begin_step`` every mask is all True; at ``begin_step`` each
    sparsified kernel keeps the ``n`` largest |w| of every group of ``m`` and the
    mask stays fixed: the masked optimizer zeroes the pruned weights and their
    gradients from then on. This is the prune-then-fine-tune recipe N:M
    training from scratch is compared with.

    Reference: Mishra et al. 2021, "Accelerating Sparse Deep Neural Networks"
    (2:4 magnitude pruning of a trained network, then retraining).

    Attributes:
      begin_step: the step that prunes (>= 0).
    """

    begin_step: int = 0

    updates_masks = True

    def __post_init__(self):
        super().__post_init__()
        value = self.begin_step
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"begin_step must be a non-negative integer, got {value!r}")

    def init_masks(self, params: PyTree, key: jax.Array) -> PyTree:
        del key
        self._check_shapes(params)
        if self.begin_step == 0:
            return self.magnitude_masks(params)
        return jax.tree.map(
            lambda s, p: None if s is None else jnp.ones(jnp.shape(p), bool),
            self.selected(params),
            params,
            is_leaf=masks.is_none,
        )

    def is_update_step(self, step: jax.Array) -> jax.Array:
        return jnp.asarray(step) == self.begin_step

    def update_masks(self, masks_tree, params, grads, step, key, algo_state=()):
        del masks_tree, grads, step, key, algo_state
        return self.magnitude_masks(params)


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
    (as `NMSTE`). Backward to the activations: dX = dY (W ⊙ E_b)^T, E_b the
    magnitude N:M mask along the *output* axis, so that product is N:M along
    its own reduction axis and can run on sparse tensor cores too, without the
    accuracy cost of a single transposable mask. The weight gradient
    dW = X^T dY is dense (straight through), as in the paper.

    Both masks follow |W| every step. The paper also searches over row
    permutations of W for the backward mask that keeps the most forward
    weights; that search is not done here (E_b is the plain magnitude mask).

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
        del algo_state
        backward = self.backward_masks(params)

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
            forward_mask = lookup(masks_tree, module.path)
            backward_mask = lookup(backward, module.path)
            if forward_mask is None or backward_mask is None:
                return next_fun(*args, **kwargs)
            w = lookup(params, module.path)
            y = bidirectional_matmul(args[0], w, forward_mask, backward_mask)
            if module.use_bias:
                y = y + module.variables["params"]["bias"]
            return y

        return nn.intercept_methods(interceptor)
