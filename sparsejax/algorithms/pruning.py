"""Pruning by score on a schedule: magnitude (one-shot or gradual), random and SNIP."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from sparsejax import masks, schedules, scores
from sparsejax.algorithms.base import SparseAlgorithm

PyTree = Any

__all__ = ["Prune"]

_SCHEDULES = ("one_shot", "polynomial")


@dataclasses.dataclass(frozen=True)
class Prune(SparseAlgorithm):
    """Prunes the lowest-scoring weights of each layer at scheduled steps.

    Masks start dense. At each update step t the leaf l keeps the
    round((1 - s_l(t)) * n_l) highest-scoring weights among those still alive
    (pruned weights never come back), where s_l(t) = s_l * s(t) / s: the layer's
    final sparsity s_l (from the distribution) scaled by the schedule's global
    progress s(t) / s.

    With ``schedule='polynomial'`` this is gradual magnitude pruning (Zhu &
    Gupta 2017, "To prune, or not to prune"): s(t) = s * (1 - (1 - p)^power),
    p = (t - begin_step) / (end_step - begin_step), pruning every
    ``update_every_steps`` from ``begin_step`` and at ``end_step`` (on the grid
    or not), so the last update reaches the target. With
    ``schedule='one_shot'`` everything is pruned at ``begin_step``.
    ``score='saliency'`` at step 0 is SNIP (Lee et al. 2019, "SNIP:
    Single-shot Network Pruning based on Connection Sensitivity"): the
    gradient of the first batch scores |w * g|. ``score='random'`` prunes a
    random subset (Liu et al. 2022).

    Attributes:
      score: 'magnitude', 'random' or 'saliency'.
      schedule: 'one_shot' or 'polynomial'.
      begin_step, end_step, update_every_steps, power: schedule parameters.
    """

    score: str = "magnitude"
    schedule: str = "polynomial"
    begin_step: int = 0
    end_step: int = 1000
    update_every_steps: int = 100
    power: float = 3.0

    updates_masks = True

    def __post_init__(self):
        super().__post_init__()
        scores.get(self.score)
        if self.schedule not in _SCHEDULES:
            raise ValueError(
                f"schedule={self.schedule!r} is unknown; known schedules: {_SCHEDULES}"
            )
        self.sparsity_schedule()  # Validates the step arguments.

    def sparsity_schedule(self) -> schedules.SparsitySchedule:
        """The global schedule s(t) and its update steps."""
        if self.schedule == "one_shot":
            return schedules.one_shot(self.sparsity, self.begin_step)
        return schedules.polynomial(
            self.sparsity,
            self.begin_step,
            self.end_step,
            self.update_every_steps,
            power=self.power,
        )

    def init_masks(self, params: PyTree, key: jax.Array) -> PyTree:
        del key
        return self.dense_masks(params)

    def is_update_step(self, step: jax.Array) -> jax.Array:
        return self.sparsity_schedule().is_update_step(step)

    def update_masks(self, masks_tree, params, grads, step, key, algo_state=()):
        progress = (
            self.sparsity_schedule().sparsity(step) / self.sparsity if self.sparsity > 0 else 0.0
        )
        score_tree = scores.get(self.score)(params, grads, key=key)
        # Dead weights rank last, so pruning never revives them.
        score_tree = jax.tree.map(
            lambda m, sc: sc if m is None else jnp.where(m, sc, -jnp.inf),
            masks_tree,
            score_tree,
            is_leaf=masks.is_none,
        )
        return self.score_masks(score_tree, params, progress)
