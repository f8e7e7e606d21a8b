"""N:M sparsity reached gradually or at once: mask/structure decay and one-shot pruning.

`NMDecay` (Bambhaniya et al. 2024) moves a straight-through N:M method from dense
to N:M over a window of steps by decaying the pruned weights' gradient flow;
`NMOneShot` trains dense, prunes to N:M once by magnitude and fine-tunes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import masks
from sparsejax.algorithms.base import NMAlgorithm
from sparsejax.algorithms.nm_ste import NMSTE, NMState

PyTree = Any

__all__ = ["NMDecay", "NMOneShot"]

_DECAYS = ("mask_linear", "mask_exponential", "structure")


@dataclasses.dataclass(frozen=True)
class NMDecay(NMSTE):
    """Progressive gradient flow: N:M training whose dense gradients decay away.

    Between ``begin_step`` and ``end_step`` the network moves from dense to N:M;
    before ``begin_step`` it trains dense, after ``end_step`` it is plain N:M.
    Two families (``decay_schedule``):

    * mask decay (MDGF): the N:M magnitude mask E is recomputed in every forward
      pass from the current weights W_t (`NMSTE.forward_masks`, as in the
      SR-STE code the paper builds on) and the forward weights are
      W_t ⊙ (E + alpha_t (1 - E)). Pruned weights take part
      in the forward pass scaled by alpha_t and, through autodiff, receive the
      gradient alpha_t * dL/dW~: the gradient flow to them fades with alpha_t.
      ``mask_linear``: alpha_t falls linearly from 1 to 0.
      ``mask_exponential``: alpha_t = decay_rate ** k over ``decay_intervals``
      equal intervals k = 0, 1, ... (then 0 after ``end_step``).
    * ``structure`` (SDGF): binary masks whose N shrinks stepwise from M to n,
      halving at each of equal stages (1:8 goes 8:8 -> 4:8 -> 2:8 -> 1:8), trained
      with the straight-through estimator; the mask of step t is N_t:M of W_t.

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
        """The forward pass at the state's step (``NMState.num_steps``), on the current mask."""
        current = self.forward_masks(params, masks_tree, algo_state)
        return self._forward(params, current, algo_state.num_steps)

    def metrics(self, algo_state: NMState) -> dict[str, jax.Array]:
        out = super().metrics(algo_state)
        if self.decay_schedule == "structure":
            out["nm_n"] = self.n_at(algo_state.num_steps).astype(jnp.float32)
        else:
            out["mask_alpha"] = self.alpha(algo_state.num_steps)
        return out


@dataclasses.dataclass(frozen=True)
class NMOneShot(NMAlgorithm):
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
        self.check_shapes(params)
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
