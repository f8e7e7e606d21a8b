"""Averaging models that share one sparsity mask: Sparse Model Soups and SWAMP.

Models pruned to the same mask and retrained from the same starting point stay in one
linearly connected basin, so their average is a good model with the same mask. The
functions here average stacked models (leading axis = ingredient), check that every
ingredient respects the shared mask, and keep the running (SWA) average one particle needs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import masks as masks_lib

PyTree = Any

__all__ = [
    "average",
    "check_shared_mask",
    "greedy_soup",
    "shared_mask",
    "swa_update",
]


def _num_ingredients(stacked: PyTree) -> int:
    leaves = jax.tree.leaves(stacked)
    if not leaves:
        raise ValueError("stacked params must have at least one leaf")
    sizes = {int(np.shape(leaf)[0]) if np.ndim(leaf) else -1 for leaf in leaves}
    if len(sizes) != 1 or -1 in sizes or 0 in sizes:
        raise ValueError(
            f"every leaf must have the same leading (ingredient) axis, got sizes {sorted(sizes)}"
        )
    return sizes.pop()


def shared_mask(stacked_masks: PyTree) -> PyTree:
    """The one mask a stack of masks holds, or a ValueError if the ingredients' masks differ.

    Args:
      stacked_masks: mask tree whose boolean leaves have a leading ingredient axis
        (None leaves allowed).

    Returns:
      The mask of ingredient 0 (the same for all).

    Raises:
      ValueError: naming the first leaf where two ingredients disagree.
    """
    out = []
    leaves, treedef = jax.tree_util.tree_flatten_with_path(stacked_masks, is_leaf=masks_lib.is_none)
    for path, m in leaves:
        if m is None:
            out.append(None)
            continue
        m = np.asarray(m, bool)
        if not np.all(m == m[:1]):
            raise ValueError(
                f"ingredients have different masks at {jax.tree_util.keystr(path)}: a soup "
                "averages models that share one mask"
            )
        out.append(jnp.asarray(m[0]))
    return jax.tree.unflatten(treedef, out)


def check_shared_mask(stacked_params: PyTree, mask: PyTree) -> None:
    """Raises ValueError unless every ingredient is exactly zero wherever ``mask`` is False.

    Args:
      stacked_params: params with a leading ingredient axis.
      mask: one mask tree (no ingredient axis), None for leaves that are not sparse.

    Raises:
      ValueError: if ``mask`` is not a mask tree of one ingredient (matched by key path;
        `sparsejax.masks.validate_masks`) or an ingredient has a nonzero weight off it.
    """
    one = jax.tree.map(
        lambda p: jax.ShapeDtypeStruct(np.shape(p)[1:], jnp.result_type(p)), stacked_params
    )
    masks_lib.validate_masks(one, mask, "mask")
    flat_masks = jax.tree.leaves(mask, is_leaf=masks_lib.is_none)
    flat_params, _ = jax.tree_util.tree_flatten_with_path(stacked_params)
    for (path, p), m in zip(flat_params, flat_masks):
        if m is None:
            continue
        p, m = np.asarray(p), np.asarray(m, bool)
        off = np.abs(p[:, ~m]).max(initial=0.0)
        if off != 0:
            raise ValueError(
                f"an ingredient has nonzero weights off the shared mask at "
                f"{jax.tree_util.keystr(path)} (max |w| = {off:g})"
            )


def _check_same_zeros(stacked_params: PyTree) -> None:
    """Raises ValueError, naming the leaf, where the ingredients' exact zeros differ.

    Sparse ingredients sharing a mask are zero at the same entries, and dense ones are
    zero nowhere; ingredients with different masks are not, and their soup would fill
    the union of their supports. A shared mask whose live weights may also be exactly
    zero is passed as ``mask`` instead.
    """
    for path, p in jax.tree_util.tree_flatten_with_path(stacked_params)[0]:
        zero = np.asarray(p) == 0
        differ = np.any(zero != zero[:1], axis=tuple(range(1, zero.ndim)))
        if differ.any():
            raise ValueError(
                f"stacked_params{jax.tree_util.keystr(path)}: ingredient "
                f"{int(np.argmax(differ))} is zero at other entries than ingredient 0, so "
                "the ingredients have different masks and their average would be denser "
                "than each; a soup averages models that share one mask (pass it as mask=)"
            )


def average(
    stacked_params: PyTree,
    mask: PyTree | None = None,
    weights: Sequence[float] | jax.Array | None = None,
) -> PyTree:
    """The (weighted) average of stacked models, a uniform soup by default.

    Args:
      stacked_params: params with a leading ingredient axis of size k.
      mask: the shared mask; if given, every ingredient is checked to be zero off it
        (`check_shared_mask`) and the soup is exactly zero there too.
      weights: k non-negative weights summing to a positive number (normalized here);
        uniform when None.

    Returns:
      Params without the ingredient axis: Σ_i a_i θ_i with Σ a_i = 1.

    Raises:
      ValueError: for inconsistent leading axes, bad weights, or ingredients off the mask;
        without a mask, for ingredients that are zero at different entries of a leaf
        (models with different masks, whose average would be denser than each).

    Reference: Zimmer et al. 2024, "Sparse Model Soups: A Recipe for Improved Pruning via
    Model Averaging" (the uniform soup of m models retrained from one pruned model; the
    average of models with one mask has that mask, so averaging keeps the sparsity);
    Wortsman et al. 2022, "Model soups".
    """
    k = _num_ingredients(stacked_params)
    if weights is None:
        a = jnp.full((k,), 1.0 / k)
    else:
        a = jnp.asarray(weights, jnp.float32)
        if a.shape != (k,) or bool(jnp.any(a < 0)) or not float(jnp.sum(a)) > 0:
            raise ValueError(
                f"weights must be {k} non-negative numbers with a positive sum, got {weights!r}"
            )
        a = a / jnp.sum(a)
    if mask is not None:
        check_shared_mask(stacked_params, mask)
    else:
        _check_same_zeros(stacked_params)
    soup = jax.tree.map(lambda p: jnp.tensordot(a.astype(p.dtype), p, axes=1), stacked_params)
    if mask is not None:
        soup = masks_lib.apply_masks(soup, mask)
    return soup


def greedy_soup(
    stacked_params: PyTree,
    evaluate: Callable[[PyTree], float],
    mask: PyTree | None = None,
) -> tuple[PyTree, list[int]]:
    """Greedy soup: add ingredients best-first while the held-out score does not drop.

    Args:
      stacked_params: params with a leading ingredient axis.
      evaluate: params -> score on held-out data (higher is better).
      mask: optional shared mask, checked as in `average`.

    Returns:
      ``(soup, chosen ingredient indices)``.

    Reference: Wortsman et al. 2022, "Model soups" (greedy soup); used as GreedySoup by
    Zimmer et al. 2024.
    """
    k = _num_ingredients(stacked_params)
    if mask is not None:
        check_shared_mask(stacked_params, mask)

    def subset(indices: list[int]) -> PyTree:
        index = jnp.asarray(indices)
        return jax.tree.map(lambda p: p[index], stacked_params)

    scores = [float(evaluate(jax.tree.map(lambda p, i=i: p[i], stacked_params))) for i in range(k)]
    order = sorted(range(k), key=lambda i: -scores[i])
    chosen = [order[0]]
    best = scores[order[0]]
    for i in order[1:]:
        score = float(evaluate(average(subset(chosen + [i]))))
        if score >= best:
            chosen, best = chosen + [i], score
    return average(subset(chosen), mask), chosen


def swa_update(swa_params: PyTree, params: PyTree, count: jax.Array) -> PyTree:
    """One step of a running average: ``(count * swa + params) / (count + 1)``.

    Args:
      swa_params: the average of ``count`` snapshots so far (any value when count is 0).
      params: the new snapshot.
      count: number of snapshots already in the average (scalar, may be traced).

    Returns:
      The average of ``count + 1`` snapshots. Zeros shared by all snapshots stay exactly 0.
      At ``count == 0`` it is ``params`` itself: ``swa_params`` is not read, so a NaN or
      uninitialized start cannot leak into the average.

    Raises:
      ValueError: for a concrete negative ``count``.

    Reference: Izmailov et al. 2018, "Averaging Weights Leads to Wider Optima and Better
    Generalization" (SWA); Choi et al. 2023, "SWAMP: Sparse Weight Averaging with Multiple
    Particles for Iterative Magnitude Pruning" (each particle is trained with SWA, the
    particles are averaged, and IMP prunes the average by magnitude).
    """
    if not isinstance(count, jax.core.Tracer) and np.any(np.asarray(count) < 0):
        raise ValueError(f"count must be >= 0 (snapshots already averaged), got {count!r}")
    count = jnp.asarray(count, jnp.float32)
    # where, not arithmetic: 0 * NaN is NaN, so the first snapshot must replace the start.
    return jax.tree.map(
        lambda s, p: jnp.where(count > 0, (count * s + p) / (count + 1.0), p), swa_params, params
    )
