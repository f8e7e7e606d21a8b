"""Pruning at initialization with the model in hand: GraSP, SynFlow and SNIP.

These scores need more than one gradient (GraSP a Hessian-vector product,
SynFlow a data-free forward pass of the absolute network), so the masks are
computed before training from the model functions (the `Algorithm.masks_from_model`
hook a trainer calls) and handed to ``masked(inner, algorithm, masks=...)``;
training then keeps them fixed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from sparsejax import masks, scores
from sparsejax.algorithms.base import SparseAlgorithm

PyTree = Any

__all__ = ["PruneAtInit"]

_MODEL_SCORES = ("grasp", "synflow", "snip", "magnitude", "random")


@dataclasses.dataclass(frozen=True)
class PruneAtInit(SparseAlgorithm):
    """Prune once before training by a model-based score; the mask then stays fixed.

    Rounds: with ``rounds = n > 1`` pruning is iterative, the density after
    round k being (1 - s)^(k / n) (the exponential schedule of SynFlow), each
    round rescoring the already-pruned network. SynFlow uses n = 100 in the
    paper (Tanaka et al. 2020); GraSP and SNIP one round (Wang et al. 2020;
    Lee et al. 2019). The paper-default distribution for all three is 'global'.

    Attributes:
      score: 'grasp', 'synflow', 'snip', 'magnitude' or 'random'.
      rounds: n, number of pruning rounds.
      temperature: T > 0; the loss of GraSP and SNIP is taken on the model's
        outputs divided by T. None: T = 200 for GraSP (Wang et al. 2020 divide the
        logits by 200 so the Hessian-gradient product is not dominated by a
        saturated softmax), T = 1 otherwise.
    """

    score: str = "synflow"
    rounds: int = 100
    distribution: str = "global"
    temperature: float | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.score not in _MODEL_SCORES:
            raise ValueError(
                f"score={self.score!r} is unknown; known scores: {list(_MODEL_SCORES)}"
            )
        if not isinstance(self.rounds, int) or self.rounds < 1:
            raise ValueError(f"rounds must be a positive integer, got {self.rounds!r}")
        if self.temperature is None:
            object.__setattr__(self, "temperature", 200.0 if self.score == "grasp" else 1.0)
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, int | float) or not 0.0 < t < float("inf"):
            raise ValueError(f"temperature must be a positive number, got temperature={t!r}")

    def init_masks(self, params: PyTree, key: jax.Array) -> PyTree:
        raise ValueError(
            f"algorithm with score={self.score!r} prunes with the model: compute the masks with "
            "algorithm.masks_from_model(...) and pass them as masked(..., masks=masks)"
        )

    def masks_from_model(
        self,
        params: PyTree,
        *,
        key: jax.Array,
        apply_fn: Callable[[PyTree, jax.Array], jax.Array],
        batch: tuple[jax.Array, jax.Array] | None = None,
        loss_fn: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
        input_shape: Sequence[int] | None = None,
    ) -> PyTree:
        """Masks at the target sparsity (jit-able with the functions closed over).

        Args:
          params: the initial parameters.
          key: for 'random'.
          apply_fn: ``(params, x) -> outputs`` of the model.
          batch: ``(x, y)``, a calibration batch with a leading batch axis (GraSP,
            SNIP; SynFlow takes only its example shape).
          loss_fn: ``(outputs, y) -> scalar``; GraSP and SNIP score the loss
            ``loss_fn(apply_fn(params, x) / temperature, y)``.
          input_shape: one example's shape for SynFlow (default ``batch[0].shape[1:]``).

        Returns:
          The mask pytree.
        """
        if self.score in ("grasp", "snip") and (batch is None or loss_fn is None):
            raise ValueError(
                f"score={self.score!r} needs batch and loss_fn, got batch="
                f"{'None' if batch is None else 'given'}, loss_fn={loss_fn!r}"
            )
        if input_shape is None and batch is not None:
            input_shape = tuple(jnp.shape(batch[0])[1:])
        if self.score == "synflow" and input_shape is None:
            raise ValueError("score='synflow' needs input_shape or batch, got neither")

        def model_loss(p):
            x, y = batch
            return loss_fn(apply_fn(p, x) / self.temperature, y)

        def score_of(p):
            if self.score == "grasp":
                return scores.grasp(model_loss, p)
            if self.score == "synflow":
                return scores.synflow(apply_fn, p, input_shape)
            if self.score == "snip":
                return scores.saliency(p, jax.grad(model_loss)(p))
            if self.score == "magnitude":
                return scores.magnitude(p)
            return scores.random(p, key=key)

        def one_round(current, fraction):
            score_tree = jax.tree.map(
                lambda m, sc: sc if m is None else jnp.where(m, sc, -jnp.inf),
                current,
                score_of(masks.apply_masks(params, current)),
                is_leaf=masks.is_none,
            )
            return self.score_masks(score_tree, params, fraction)

        def fraction_after(k):
            # Density (1 - s)^(k / n) after round k, as a fraction of the final sparsity.
            density = (1.0 - self.sparsity) ** (k / self.rounds)
            return (1.0 - density) / self.sparsity if self.sparsity > 0 else 0.0

        current = jax.lax.fori_loop(
            1,
            self.rounds,
            lambda k, m: one_round(m, fraction_after(k)),
            self.dense_masks(params),
        )
        # The last round uses the exact target, so the count is exact.
        return one_round(current, 1.0)
