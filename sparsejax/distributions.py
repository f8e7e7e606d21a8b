"""Per-layer sparsities from one global target: uniform, ER and ERK.

Each function returns a pytree shaped like ``params`` whose leaves are Python
floats (the sparsity of that leaf) or ``None`` where the leaf is not sparsified.
The default filter sparsifies kernels (leaves with ndim >= 2); biases, norms and
anything named in ``keep_dense`` are left dense (``None``). Results depend only
on shapes, so they are static under jit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from sparsejax.masks import path_name, validate_sparsity

PyTree = Any
FilterFn = Callable[[str, Any], bool]

__all__ = ["default_filter", "er", "erk", "get", "uniform", "validate_keep_dense"]


def default_filter(name: str, param: Any) -> bool:
    """Sparsify kernels: every leaf with at least two dimensions."""
    del name
    return np.ndim(param) >= 2


def validate_keep_dense(keep_dense: Any) -> tuple[str, ...]:
    """``keep_dense`` as a tuple of name substrings: one string, or a sequence of strings.

    Raises:
      ValueError: naming ``keep_dense`` and its value, for anything else (None, a number,
        a sequence holding a non-string).
    """
    if isinstance(keep_dense, str):
        return (keep_dense,)
    if not isinstance(keep_dense, Sequence) or not all(isinstance(k, str) for k in keep_dense):
        raise ValueError(
            "keep_dense must be a string or a sequence of strings (substrings of leaf "
            f"names such as 'conv1/kernel'), got keep_dense={keep_dense!r}"
        )
    return tuple(keep_dense)


def _selected(params: PyTree, filter_fn: FilterFn | None, keep_dense: Sequence[str]):
    """(names, shapes, treedef, selected flags) of the leaves of ``params``."""
    keep_dense = validate_keep_dense(keep_dense)
    if filter_fn is not None and not callable(filter_fn):
        raise ValueError(
            f"filter_fn must be a callable (name, param) -> bool or None, got {filter_fn!r}"
        )
    filter_fn = default_filter if filter_fn is None else filter_fn
    with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
    names = [path_name(p) for p, _ in with_path]
    shapes = [tuple(np.shape(x)) for _, x in with_path]
    selected = [
        bool(filter_fn(n, x)) and not any(k in n for k in keep_dense) and np.prod(s) > 0
        for n, (_, x), s in zip(names, with_path, shapes)
    ]
    return names, shapes, treedef, selected


def _exact_allocation(densities: Sequence[float], sizes: Sequence[int], sparsity: float):
    """Integer nonzero counts near ``densities * sizes`` summing to round((1 - s) * total).

    Largest-remainder rounding, never exceeding a layer's size, so the global
    count is exact and each layer is within one weight of its real-valued share.
    Every layer keeps at least one weight (the rule of `masks.num_kept`); when
    the target is below one weight a layer, the total is one weight a layer.
    """
    sizes = np.asarray(sizes, np.int64)
    target = max(int(np.round((1.0 - sparsity) * sizes.sum())), len(sizes))
    ideal = np.minimum(np.asarray(densities, np.float64) * sizes, sizes)
    counts = np.maximum(np.floor(ideal), 1).astype(np.int64)
    remainder = target - counts.sum()
    frac = ideal - counts
    # Stable order: largest fractional part first, ties by layer order.
    order = sorted(range(len(sizes)), key=lambda i: (-frac[i], i))
    i = 0
    while remainder > 0:
        j = order[i % len(order)]
        if counts[j] < sizes[j]:
            counts[j] += 1
            remainder -= 1
        i += 1
    while remainder < 0:  # Overshoot: floating error, or layers raised to one weight.
        j = order[::-1][i % len(order)]
        if counts[j] > 1:
            counts[j] -= 1
            remainder += 1
        i += 1
    return counts


def _finish(treedef, selected, sizes, counts_by_index):
    leaves = []
    for i, sel in enumerate(selected):
        if not sel:
            leaves.append(None)
        else:
            leaves.append(float(1.0 - counts_by_index[i] / sizes[i]))
    return jax.tree.unflatten(treedef, leaves)


def uniform(
    params: PyTree,
    sparsity: float,
    filter_fn: FilterFn | None = None,
    keep_dense: Sequence[str] = (),
) -> PyTree:
    """The same sparsity for every sparsified leaf.

    Args:
      params: parameter pytree (only shapes are read).
      sparsity: target in [0, 1).
      filter_fn: ``(name, param) -> bool`` choosing the sparsified leaves
        (default: ndim >= 2); ``name`` is like 'conv1/kernel'.
      keep_dense: substrings of leaf names to leave dense.

    Returns:
      Pytree of per-leaf sparsities (float) or None.
    """
    validate_sparsity(sparsity)
    _, shapes, treedef, selected = _selected(params, filter_fn, keep_dense)
    return jax.tree.unflatten(treedef, [float(sparsity) if s else None for s in selected])


def _check_power_scale(power_scale: Any) -> None:
    # A NaN or infinite exponent makes every raw density NaN, 0 or inf, which emptied layers.
    if (
        isinstance(power_scale, bool)
        or not isinstance(power_scale, (int, float, np.integer, np.floating))
        or not np.isfinite(power_scale)
        or power_scale < 0
    ):
        raise ValueError(
            "power_scale must be a finite number >= 0 (1 is ERK, 0 uniform), got "
            f"power_scale={power_scale!r}"
        )


def _erk_like(params, sparsity, raw_density_fn, filter_fn, keep_dense):
    validate_sparsity(sparsity)
    _, shapes, treedef, selected = _selected(params, filter_fn, keep_dense)
    idx = [i for i, s in enumerate(selected) if s]
    sizes = np.array([int(np.prod(shapes[i])) for i in idx], np.int64)
    raw = np.array([raw_density_fn(shapes[i]) for i in idx], np.float64)
    dense = np.zeros(len(idx), bool)
    # Scale eps so that sum_l eps * raw_l * n_l (+ dense layers at full size)
    # equals the nonzero budget; a layer whose density would pass 1 is made
    # dense and the scale is solved again on the rest.
    while True:
        budget = (1.0 - sparsity) * sizes.sum() - sizes[dense].sum()
        divisor = (raw[~dense] * sizes[~dense]).sum()
        if divisor <= 0:
            break
        eps = budget / divisor
        over = ~dense & (eps * raw > 1.0)
        if not over.any():
            break
        dense |= over & (raw == raw[over].max())
    densities = np.where(dense, 1.0, np.clip(eps * raw, 0.0, 1.0) if divisor > 0 else 1.0)
    counts = _exact_allocation(densities, sizes, sparsity)
    by_index = {i: c for i, c in zip(idx, counts)}
    all_sizes = [int(np.prod(s)) for s in shapes]
    return _finish(treedef, selected, all_sizes, by_index)


def erk(
    params: PyTree,
    sparsity: float,
    power_scale: float = 1.0,
    filter_fn: FilterFn | None = None,
    keep_dense: Sequence[str] = (),
) -> PyTree:
    """Erdős–Rényi-Kernel allocation: density ∝ (sum of dims / product of dims) ** power.

    Args:
      params: parameter pytree (only shapes are read).
      sparsity: global target over the sparsified leaves, in [0, 1).
      power_scale: exponent on the raw ERK density (1.0 in the paper; 0 gives uniform).
      filter_fn: ``(name, param) -> bool`` choosing the sparsified leaves.
      keep_dense: substrings of leaf names to leave dense (not sparsified).

    Returns:
      Pytree of per-leaf sparsities (float) or None. The implied nonzero counts,
      round((1 - s_l) * n_l) in float64, sum to exactly round((1 - sparsity) *
      sum_l n_l), and each is at least one (a target below one weight a layer
      gives every layer one weight).

    Raises:
      ValueError: for a sparsity outside [0, 1), or a ``power_scale`` that is not
        a finite number >= 0 (NaN or inf would empty whole layers).

    Reference: Evci et al. 2020, "Rigging the Lottery: Making All Tickets
    Winners". A kernel of shape (k_1, ..., c_in, c_out) gets density
    eps * (sum_i dim_i / prod_i dim_i); eps is solved so the total matches the
    target, and layers whose density would exceed 1 are made dense first.
    """
    _check_power_scale(power_scale)
    return _erk_like(
        params,
        sparsity,
        lambda shape: (np.sum(shape) / np.prod(shape)) ** power_scale,
        filter_fn,
        keep_dense,
    )


def er(
    params: PyTree,
    sparsity: float,
    filter_fn: FilterFn | None = None,
    keep_dense: Sequence[str] = (),
) -> PyTree:
    """Erdős–Rényi allocation: density ∝ (n_in + n_out) / (n_in * n_out), channels only.

    Args and returns as in `erk`; for a kernel (..., c_in, c_out) only the two
    channel dimensions enter the raw density (kernel dimensions do not).

    Raises:
      ValueError: as `erk`, and for a selected leaf with fewer than two axes (it has no
        c_in and c_out), naming the leaf.

    Reference: Mocanu et al. 2018, "Scalable training of artificial neural
    networks with adaptive sparse connectivity inspired by network science";
    Evci et al. 2020.
    """
    names, shapes, _, selected = _selected(params, filter_fn, keep_dense)
    for name, shape, sel in zip(names, shapes, selected):
        if sel and len(shape) < 2:
            raise ValueError(
                f"er needs leaves of rank >= 2 (..., c_in, c_out), but filter_fn selected "
                f"{name!r} of shape {shape}; leave it dense"
            )
    return _erk_like(
        params,
        sparsity,
        lambda shape: (shape[-2] + shape[-1]) / (shape[-2] * shape[-1]),
        filter_fn,
        keep_dense,
    )


_DISTRIBUTIONS = {"uniform": uniform, "erk": erk, "er": er}


def get(name: str) -> Callable[..., PyTree]:
    """Looks a distribution up by name ('uniform', 'er' or 'erk').

    Raises:
      ValueError: for an unknown name or one that is not a string.
    """
    if not isinstance(name, str) or name not in _DISTRIBUTIONS:
        raise ValueError(
            f"distribution={name!r} is unknown; known distributions: {sorted(_DISTRIBUTIONS)}"
        )
    return _DISTRIBUTIONS[name]
