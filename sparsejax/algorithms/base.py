"""The algorithm interface shared by every sparse-training method.

An algorithm is an immutable dataclass of static hyperparameters with pure
methods; `sparsejax.transforms.masked` calls them inside jit. It never holds
arrays or mutable state: masks, counters and keys live in the optimizer state.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import distributions, masks, scores

PyTree = Any

__all__ = ["STRUCTURES", "Algorithm", "Dense", "SparseAlgorithm"]

STRUCTURES = ("unstructured", "block", "channel")


def _target_count(size: int, sparsity: float) -> int:
    """round((1 - sparsity) * size) in float64, kept in [1, size] (`masks.num_kept`'s rule).

    float64 gives back a distribution's integer count exactly (ER and ERK return
    s = 1 - c / n); the float32 of `masks.num_kept` misses c by one on layers of
    more than 2**24 entries.
    """
    return min(max(int(np.round((1.0 - float(sparsity)) * size)), min(1, size)), size)


def _layer_topk(scores: jax.Array, sparsity: float, fraction: Any = 1.0) -> jax.Array:
    """Top-k of one layer's ``scores`` at ``fraction`` (possibly traced) of its ``sparsity``.

    From fraction 1 on the count is the layer's exact target (`_target_count`);
    below it, a schedule's intermediate count, `masks.num_kept` of
    sparsity * fraction (float32, as under jit). At least one entry is kept.
    """
    size = int(np.size(scores))
    target = _target_count(size, sparsity)
    if isinstance(fraction, (int, float)):
        count = target if fraction >= 1 else masks.num_kept(size, sparsity * fraction)
    else:
        count = jnp.where(fraction >= 1, target, masks.num_kept(size, sparsity * fraction))
    return masks.topk_mask_by_count(scores, count)


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """Base class: a dense algorithm that never masks anything.

    Subclasses override:
      init_masks(params, key) -> masks at step 0.
      is_update_step(step) -> traced bool, when ``updates_masks`` is True.
      update_masks(masks, params, grads, step, key, algo_state) -> new masks.
      init_state / update_state, for algorithms with state of their own.
      forward_params(params, masks), for straight-through algorithms, and
        forward_params_with_state when the forward pass reads the state too.
      metrics(algo_state) -> scalars to log.
    and set the class flags ``updates_masks``, ``skip_update_on_mask_step``,
    ``reset_grown_moments`` and ``straight_through``.
    """

    updates_masks = False
    skip_update_on_mask_step = False
    reset_grown_moments = False
    straight_through = False

    def init_masks(self, params: PyTree, key: jax.Array) -> PyTree:
        del key
        return jax.tree.map(lambda p: None, params)

    def init_state(self, params: PyTree) -> PyTree:
        """The algorithm's own state (kept in `MaskedState.algo_state`)."""
        del params
        return ()

    def update_state(self, state: PyTree, params: PyTree, grads: PyTree, step: jax.Array):
        """Advances the algorithm's state by one step (every step, before mask updates)."""
        del params, grads, step
        return state

    def forward_params(self, params: PyTree, masks: PyTree) -> PyTree:
        """The weights the model computes with; pruned weights are already zero by default."""
        del masks
        return params

    def forward_params_with_state(self, params: PyTree, masks: PyTree, algo_state: PyTree):
        """`forward_params` for algorithms whose forward pass also reads their own state.

        The training step calls this one (e.g. N:M mask decay needs its step,
        S-STE its frozen scales); the default ignores the state.
        """
        del algo_state
        return self.forward_params(params, masks)

    def model_context(self, params: PyTree, masks: PyTree, algo_state: PyTree):
        """A context manager the training step holds while it runs the model.

        Algorithms that change a layer's backward pass (bidirectional N:M masks)
        return a Flax method interceptor here; the default does nothing.
        ``params`` are the dense parameters being differentiated.
        """
        del params, masks, algo_state
        return contextlib.nullcontext()

    def metrics(self, algo_state: PyTree) -> dict[str, jax.Array]:
        """Scalars worth logging from the algorithm's state (e.g. the N:M mask flip rate)."""
        del algo_state
        return {}

    def is_update_step(self, step: jax.Array) -> jax.Array:
        del step
        return jnp.asarray(False)

    def update_masks(
        self,
        masks: PyTree,
        params: PyTree,
        grads: PyTree,
        step: jax.Array,
        key: jax.Array,
        algo_state: PyTree = (),
    ) -> PyTree:
        del params, grads, step, key, algo_state
        return masks


@dataclasses.dataclass(frozen=True)
class Dense(Algorithm):
    """Dense training: ``masked(inner, Dense())`` behaves exactly like ``inner``."""


@dataclasses.dataclass(frozen=True)
class SparseAlgorithm(Algorithm):
    """Common fields: the global target and how it is spread over layers.

    Attributes:
      sparsity: global target over the sparsified leaves, in [0, 1).
      distribution: 'uniform', 'er' or 'erk' (see `sparsejax.distributions`),
        or 'global': one ranking pooled over all sparsified leaves, so layer
        densities follow the scores.
      power_scale: ERK exponent.
      keep_dense: substrings of leaf names ('conv1/kernel') left dense.
      structure: what a mask keeps or drops as one unit. 'unstructured': single
        weights. 'block': blocks of ``block_shape`` over a leaf's trailing axes
        (leading axes in blocks of 1, e.g. (4, 4) on a conv kernel (k, in, out)
        takes (1, 4, 4) blocks), the pattern `pallas_kernels.BSR` stores and runs
        fast. 'channel': all weights into one output unit (a leaf's last axis:
        a neuron of a Dense kernel, a filter of a conv kernel). Scores of a unit
        are the sums of its weights' scores; a layer's target sparsity is met in
        whole units (exact, since a layer's units have equal size), and a mask
        is constant on every unit at every step.
      block_shape: the block for ``structure='block'``.
    """

    sparsity: float = 0.9
    distribution: str = "erk"
    power_scale: float = 1.0
    keep_dense: Sequence[str] = ()
    structure: str = "unstructured"
    block_shape: Sequence[int] = (1, 1)

    # Algorithms whose mask updates act on single weights only set this to False.
    supports_structure = True

    def __post_init__(self):
        masks.validate_sparsity(self.sparsity, "sparsity")
        if self.distribution != "global":
            distributions.get(self.distribution)
        # Refused here, at construction, not when the first masks are drawn: NaN or inf
        # would make ERK empty whole layers.
        power = self.power_scale
        if isinstance(power, bool) or not isinstance(power, (int, float, np.integer, np.floating)):
            raise ValueError(f"power_scale must be a finite number >= 0, got power_scale={power!r}")
        if not np.isfinite(power) or power < 0:
            raise ValueError(f"power_scale must be a finite number >= 0, got power_scale={power!r}")
        object.__setattr__(self, "keep_dense", distributions.validate_keep_dense(self.keep_dense))
        if self.structure not in STRUCTURES:
            raise ValueError(f"structure must be one of {STRUCTURES}, got {self.structure!r}")
        block = tuple(self.block_shape)
        if not block or any(
            isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 1 for b in block
        ):
            raise ValueError(f"block_shape must be positive ints, got {self.block_shape!r}")
        object.__setattr__(self, "block_shape", tuple(int(b) for b in block))
        if self.structure != "unstructured":
            if not self.supports_structure:
                raise ValueError(
                    f"{type(self).__name__} supports structure='unstructured' only, got "
                    f"structure={self.structure!r}"
                )
            if self.distribution == "global":
                raise ValueError(
                    f"structure={self.structure!r} needs a per-layer distribution "
                    "('uniform', 'er', 'erk'), got distribution='global'"
                )

    def unit_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The shape of one mask unit of a leaf of ``shape`` (all ones if unstructured).

        Raises:
          ValueError: if ``block_shape`` has more axes than the leaf or does not
            divide its trailing axes.
        """
        shape = tuple(shape)
        if self.structure == "unstructured":
            return (1,) * len(shape)
        if self.structure == "channel":
            return shape[:-1] + (1,)
        block = self.block_shape
        if len(block) > len(shape) or any(
            d % b for d, b in zip(shape[len(shape) - len(block) :], block)
        ):
            raise ValueError(
                f"block_shape={block} must divide the trailing axes of every sparsified "
                f"leaf; a leaf has shape {shape} (leave it dense with keep_dense)"
            )
        return (1,) * (len(shape) - len(block)) + block

    def pool(self, x: jax.Array, unit: Sequence[int]) -> jax.Array:
        """Sums ``x`` over each unit: shape ``x.shape // unit`` (the unit grid)."""
        if all(u == 1 for u in unit):
            return x
        split = []
        for d, u in zip(x.shape, unit):
            split += [d // u, u]
        return x.reshape(split).sum(axis=tuple(range(1, 2 * x.ndim, 2)))

    @staticmethod
    def expand(units: jax.Array, unit: Sequence[int]) -> jax.Array:
        """Repeats every unit-grid entry over its unit (the inverse layout of `pool`)."""
        for axis, u in enumerate(unit):
            if u != 1:
                units = jnp.repeat(units, u, axis=axis)
        return units

    def layer_sparsities(self, params: PyTree) -> PyTree:
        """Per-leaf target sparsities (Python floats, None where not sparsified).

        For 'global' these are the uniform targets; they only mark which leaves
        are sparsified, since the pooled ranking decides each layer's count.
        """
        if self.distribution == "global":
            return distributions.uniform(params, self.sparsity, keep_dense=self.keep_dense)
        fn = distributions.get(self.distribution)
        kwargs = {"keep_dense": self.keep_dense}
        if self.distribution == "erk":
            kwargs["power_scale"] = self.power_scale
        return fn(params, self.sparsity, **kwargs)

    def target_counts(self, params: PyTree) -> PyTree:
        """Per-leaf kept weights at the target (Python ints, None where not sparsified).

        Exact: round((1 - s_l) * n_l) in float64, the distribution's own integer
        count, at least one (`masks.num_kept`'s rule). For 'global' these are the
        uniform counts (the pooled ranking decides each layer's real count).
        """
        return jax.tree.map(
            lambda s, p: None if s is None else _target_count(int(np.size(p)), s),
            self.layer_sparsities(params),
            params,
            is_leaf=masks.is_none,
        )

    def dense_masks(self, params: PyTree) -> PyTree:
        """All-True masks on the sparsified leaves, None elsewhere."""
        return jax.tree.map(
            lambda s, p: None if s is None else jnp.ones(jnp.shape(p), bool),
            self.layer_sparsities(params),
            params,
            is_leaf=masks.is_none,
        )

    def score_masks(self, score_tree: PyTree, params: PyTree, fraction: Any = 1.0) -> PyTree:
        """Top-k masks of ``score_tree`` at ``fraction`` of each target sparsity.

        Per leaf for uniform/ER/ERK, pooled over leaves for 'global'. ``fraction``
        (possibly traced) scales the targets, for schedules; from 1 on a layer
        keeps exactly its `target_counts`. Every layer keeps at least one weight
        (unit) under uniform/ER/ERK; the pooled 'global' ranking keeps at least
        one in total and may empty a layer (layer collapse, Tanaka et al. 2020).
        """
        sparsities = self.layer_sparsities(params)
        if self.distribution == "global":
            return masks.global_topk_masks(score_tree, self.sparsity * fraction, sparsities)

        def leaf_mask(s, sc):
            if s is None:
                return None
            unit = self.unit_shape(jnp.shape(sc))
            return self.expand(_layer_topk(self.pool(sc, unit), s, fraction), unit)

        return jax.tree.map(leaf_mask, sparsities, score_tree, is_leaf=masks.is_none)

    def random_masks(self, params: PyTree, key: jax.Array) -> PyTree:
        """Random masks with each leaf's exact target density."""
        if self.distribution == "global":
            return self.score_masks(scores.random(params, key=key), params)
        sparsities = self.layer_sparsities(params)
        leaves, treedef = jax.tree.flatten(sparsities, is_leaf=masks.is_none)
        keys = jax.random.split(key, max(len(leaves), 1))
        param_leaves = treedef.flatten_up_to(params)

        def leaf_mask(s, k, p):
            if s is None:
                return None
            unit = self.unit_shape(jnp.shape(p))
            grid = tuple(d // u for d, u in zip(jnp.shape(p), unit))
            return self.expand(_layer_topk(jax.random.uniform(k, grid), s), unit)

        out = [leaf_mask(s, k, p) for s, k, p in zip(leaves, keys, param_leaves)]
        return jax.tree.unflatten(treedef, out)
