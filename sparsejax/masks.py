"""Masks: boolean pytrees that select the live entries of parameters.

A mask tree mirrors the parameter tree. A leaf is a boolean array of the
parameter's shape, or ``None`` where the parameter is not sparsified. Every
mask-building function here is pure and jit-able; the number of kept entries is
exact (ties are broken deterministically by position), so densities are exact.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# The one mask packer lives in `sparsejax.packing`, the exact top-k in `sparsejax.ranking`;
# masks re-exports them.
from sparsejax.packing import PackedMask, pack_mask, pack_masks, unpack_masks
from sparsejax.ranking import descending_key, topk_mask_by_count

PyTree = Any

__all__ = [
    "PackedMask",
    "apply_masks",
    "block_mask",
    "channel_mask",
    "global_topk_masks",
    "group_ranks",
    "is_none",
    "nm_mask",
    "normalize_axis",
    "num_kept",
    "pack_mask",
    "pack_masks",
    "path_name",
    "sparsity_of",
    "summary",
    "topk_mask",
    "topk_mask_by_count",
    "transposable_nm_mask",
    "transposable_nm_patterns",
    "unpack_masks",
    "validate_masks",
    "validate_nm",
    "validate_sparsity",
]


def is_none(x: Any) -> bool:
    """`is_leaf` predicate that makes ``None`` mask entries visible to `jax.tree.map`."""
    return x is None


def path_name(path: Sequence[Any]) -> str:
    """The 'conv1/kernel' style name of a pytree key path.

    Args:
      path: a key path from `jax.tree_util.tree_flatten_with_path` (dict keys,
        attribute names, sequence indices) or a tuple of plain keys.

    Returns:
      The keys joined by '/': ``(DictKey('conv1'), DictKey('kernel'))`` gives
      'conv1/kernel', a list index its number.
    """
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def validate_sparsity(sparsity: Any, name: str = "sparsity") -> None:
    """Raises ValueError unless a concrete ``sparsity`` lies in [0, 1).

    Traced values (inside jit) cannot be checked and are passed through.
    """
    if isinstance(sparsity, jax.core.Tracer):
        return
    value = np.asarray(sparsity)
    if value.ndim != 0 or not np.issubdtype(value.dtype, np.number):
        raise ValueError(f"{name} must be a scalar in [0, 1), got {sparsity!r}")
    if not (0.0 <= float(value) < 1.0):
        raise ValueError(f"{name} must be in [0, 1), got {float(value)!r}")


def num_kept(size: int, sparsity: Any) -> Any:
    """Entries kept out of ``size`` at ``sparsity``: round((1 - sparsity) * size), at least one.

    This is the one rule for degenerate layers: a non-empty array keeps at least
    one entry, so no sparsity empties a layer (0.9999 of 64 weights keeps 1, a
    (1, 1) kernel at 0.5 keeps its weight). Every per-layer count goes through
    it (top-k, block and channel masks, the algorithms' layer targets).

    Works on Python floats (returns int) and on traced scalars (returns int32).
    A traced sparsity cannot be refused under jit, so the count is clipped to
    [1, size] (1.5 keeps one entry, -0.5 all). A Python float is rounded with
    the same float32 arithmetic a traced sparsity gets, so eager and jit keep
    the same count (e.g. 0.9 of 5 entries: float64 gives 0.4999... and float32
    0.5000001).
    """
    lowest = min(1, size)
    if isinstance(sparsity, (int, float)):
        real = jax.dtypes.canonicalize_dtype(np.float64).type
        kept = int(np.round((real(1.0) - real(sparsity)) * real(size)))
        return min(max(kept, lowest), size)
    kept = jnp.round((1.0 - sparsity) * size).astype(jnp.int32)
    return jnp.clip(kept, lowest, size)


def _magnitude(scores: jax.Array) -> jax.Array:
    """``|scores|`` without overflow: signed integers come back unsigned (|-128| = 128 in uint8)."""
    if jnp.issubdtype(scores.dtype, jnp.signedinteger):
        # abs(INT_MIN) wraps to INT_MIN, whose two's complement bits read as unsigned are |INT_MIN|.
        unsigned = jnp.dtype(f"uint{jnp.iinfo(scores.dtype).bits}")
        return jnp.abs(scores).astype(unsigned)
    return jnp.abs(scores)


def topk_mask(scores: jax.Array, sparsity: Any) -> jax.Array:
    """Keeps the round((1 - sparsity) * size) highest-scoring entries, at least one.

    Args:
      scores: array of any shape; larger means more important.
      sparsity: fraction of entries to drop, in [0, 1); a Python float or a
        traced scalar (so schedules can drive it inside jit).

    Returns:
      Boolean array of ``scores.shape`` with exactly `num_kept` (size, sparsity)
      True entries: round((1 - sparsity) * size), and one if that rounds to zero.
      Ties are broken by flat position (earlier entries win).

    Raises:
      ValueError: if a concrete ``sparsity`` is outside [0, 1).
    """
    validate_sparsity(sparsity)
    scores = jnp.asarray(scores)
    k = num_kept(scores.size, sparsity)
    return topk_mask_by_count(scores, k)


def normalize_axis(axis: int, ndim: int, name: str = "axis") -> int:
    """``axis`` of an array of rank ``ndim`` as a non-negative index.

    Args:
      axis: an integer in [-ndim, ndim).
      ndim: the array's rank.
      name: the argument's name, for the error.

    Returns:
      ``axis % ndim``.

    Raises:
      ValueError: naming ``name`` and the value, for a non-integer or out-of-range axis.
    """
    if not isinstance(axis, (int, np.integer)) or not -ndim <= axis < ndim:
        raise ValueError(f"{name}={axis!r} is out of range for an array of rank {ndim}")
    return int(axis) % ndim


def validate_nm(n: Any, m: Any) -> None:
    """Raises ValueError unless ``n`` and ``m`` are positive integers with n <= m.

    The message names the offending parameter and its value.
    """
    for name, value in (("n", n), ("m", m)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if n > m:
        raise ValueError(f"n must be <= m, got n={n}, m={m}")


def nm_mask(scores: jax.Array, n: int, m: int, axis: int = -1) -> jax.Array:
    """N:M mask: in every group of ``m`` consecutive entries along ``axis`` keep the ``n`` largest.

    Args:
      scores: array of any rank; ``scores.shape[axis]`` must be divisible by ``m``.
      n: entries kept per group, 0 < n <= m.
      m: group size along ``axis``.
      axis: the grouped axis (for a convolution kernel, its input-channel axis).

    Returns:
      Boolean array of ``scores.shape`` with exactly ``n`` True entries in every group.

    Raises:
      ValueError: for n > m, non-positive n or m, an out-of-range axis, or an
        axis length that ``m`` does not divide.

    Reference: Mishra et al. 2021, "Accelerating Sparse Deep Neural Networks"
    (2:4 sparsity on Ampere tensor cores); Zhou et al. 2021, "Learning N:M
    Fine-grained Structured Sparse Neural Networks From Scratch".
    """
    scores = jnp.asarray(scores)
    validate_nm(n, m)
    if scores.ndim == 0:
        raise ValueError("scores must have at least one axis for an N:M mask, got a scalar")
    axis = normalize_axis(axis, scores.ndim)
    if scores.shape[axis] % m:
        raise ValueError(
            f"m={m} must divide the length {scores.shape[axis]} of axis {axis} "
            f"(scores.shape={tuple(scores.shape)})"
        )
    moved = jnp.moveaxis(scores, axis, -1)
    groups = moved.reshape(*moved.shape[:-1], moved.shape[-1] // m, m)
    keep = (group_ranks(groups) < n).reshape(moved.shape)
    return jnp.moveaxis(keep, -1, axis)


def group_ranks(groups: jax.Array) -> jax.Array:
    """Rank of every entry inside its group along the last axis (0 = largest score).

    Equal scores are ranked by position (the earlier one first), NaN last.
    For groups of up to 16 the rank is counted with pairwise comparisons,
    r_i = #{j : s_j > s_i or (s_j == s_i and j < i)}, which XLA:CPU runs several
    times faster than two argsorts; larger groups use a stable argsort.

    Args:
      groups: array [..., m].

    Returns:
      int32 array [..., m], a permutation of 0..m-1 along the last axis.
    """
    m = groups.shape[-1]
    if m > 16:
        order = jnp.argsort(descending_key(groups), axis=-1, stable=True)
        return jnp.argsort(order, axis=-1, stable=True).astype(jnp.int32)
    # NaN is ordered below every number (and equal to another NaN) to rank last.
    nan = jnp.isnan(groups) if jnp.issubdtype(groups.dtype, jnp.floating) else None
    s = groups if nan is None else jnp.where(nan, -jnp.inf, groups)
    a, b = s[..., :, None], s[..., None, :]  # a: s_i, b: s_j
    before = jnp.tril(jnp.ones((m, m), bool), k=-1)  # [i, j]: j < i
    beats = (b > a) | ((b == a) & before)
    if nan is not None:
        na, nb = nan[..., :, None], nan[..., None, :]
        # A number beats NaN; NaN never beats a number; NaNs tie by position.
        beats = jnp.where(na & ~nb, True, jnp.where(nb & ~na, False, beats))
        beats = jnp.where(na & nb, before, beats)
    return jnp.sum(beats, axis=-1, dtype=jnp.int32)


@functools.cache
def transposable_nm_patterns(n: int, m: int) -> np.ndarray:
    """Candidate (m, m) blocks with exactly ``n`` ones in every row and every column.

    For ``m <= 4`` these are *all* such blocks (90 for 2:4, 24 for 1:4), so the
    best candidate is the optimal transposable block. For larger ``m`` the count
    explodes (40320 permutation matrices for 1:8), so the candidates are the
    C(m, n) unions of ``n`` distinct cyclic diagonals {(i, (i + s) mod m)}, each a
    valid transposable block; the choice among them is then approximate.

    Args:
      n, m: the pattern, 0 < n <= m.

    Returns:
      Read-only bool numpy array of shape (num_candidates, m, m).

    Raises:
      ValueError: for invalid ``n`` or ``m``.
    """
    validate_nm(n, m)
    if m <= 4:
        rows = [np.array(c) for c in itertools.combinations(range(m), n)]
        found = []

        def extend(prefix, col_counts):
            if len(prefix) == m:
                found.append(np.stack(prefix))
                return
            for cols in rows:
                if np.all(col_counts[cols] < n):
                    row = np.zeros(m, bool)
                    row[cols] = True
                    counts = col_counts.copy()
                    counts[cols] += 1
                    extend([*prefix, row], counts)

        extend([], np.zeros(m, np.int64))
        return _read_only(np.stack(found))
    eye = np.arange(m)
    out = []
    for shifts in itertools.combinations(range(m), n):
        block = np.zeros((m, m), bool)
        for s in shifts:
            block[eye, (eye + s) % m] = True
        out.append(block)
    return _read_only(np.stack(out))


def _read_only(array: np.ndarray) -> np.ndarray:
    # The result is cached, so callers must not be able to change it in place.
    array.setflags(write=False)
    return array


def transposable_nm_mask(
    scores: jax.Array, n: int, m: int, axes: Sequence[int] = (-2, -1)
) -> jax.Array:
    """Transposable N:M mask: N:M along *both* ``axes``, so W and W^T are both N:M.

    The two axes are tiled by (m, m) blocks; each block takes the candidate of
    `transposable_nm_patterns` with the largest sum of ``scores`` (ties: the
    first candidate). Every group of ``m`` consecutive entries along either axis
    then keeps exactly ``n``. A transposable mask lets the backward product with
    W^T use the same sparse tensor cores as the forward one.

    Args:
      scores: array of rank >= 2; larger means more important (e.g. ``|w|``).
        The other axes (e.g. a convolution's spatial axis) are independent.
      n, m: the pattern, 0 < n <= m; ``m`` must divide both axis lengths.
      axes: the two axes (for a kernel ``(..., in, out)``: (-2, -1)).

    Returns:
      Boolean array of ``scores.shape``.

    Raises:
      ValueError: for invalid ``n``/``m``, axes out of range or equal, or axis
        lengths that ``m`` does not divide.

    Reference: Hubara et al. 2021, "Accelerated Sparse Neural Training: A
    Provable and Efficient Method to Find N:M Transposable Masks" (the optimal
    block is what their min-cost-flow solves; here it is found by enumeration
    for m <= 4).
    """
    scores = jnp.asarray(scores)
    validate_nm(n, m)
    if scores.ndim < 2:
        raise ValueError(
            f"scores must have rank >= 2 for a transposable mask, got shape {tuple(scores.shape)}"
        )
    if len(tuple(axes)) != 2:
        raise ValueError(f"axes must name two axes, got axes={axes!r}")
    a0 = normalize_axis(axes[0], scores.ndim, "axes[0]")
    a1 = normalize_axis(axes[1], scores.ndim, "axes[1]")
    if a0 == a1:
        raise ValueError(f"axes must be two different axes, got axes={tuple(axes)!r}")
    for a in (a0, a1):
        if scores.shape[a] % m:
            raise ValueError(
                f"m={m} must divide the length {scores.shape[a]} of axis {a} "
                f"(scores.shape={tuple(scores.shape)})"
            )
    moved = jnp.moveaxis(scores, (a0, a1), (-2, -1))
    *lead, r, c = moved.shape
    blocks = moved.reshape(*lead, r // m, m, c // m, m).swapaxes(-3, -2)
    patterns = jnp.asarray(transposable_nm_patterns(n, m))
    totals = jnp.einsum("...ij,kij->...k", blocks.astype(jnp.float32), patterns.astype(jnp.float32))
    best = jnp.argmax(totals, axis=-1)
    keep = patterns[best].swapaxes(-3, -2).reshape(moved.shape)
    return jnp.moveaxis(keep, (-2, -1), (a0, a1))


def block_mask(scores: jax.Array, sparsity: Any, block_shape: Sequence[int]) -> jax.Array:
    """Block-sparse mask: keeps whole blocks ranked by the sum of |scores| inside them.

    Args:
      scores: array of any rank.
      sparsity: fraction of *blocks* dropped, in [0, 1).
      block_shape: one block length per axis of ``scores``; each must divide
        the corresponding dimension.

    Returns:
      Boolean array of ``scores.shape``, constant on every block, with exactly
      round((1 - sparsity) * num_blocks) kept blocks.

    Raises:
      ValueError: for a block shape of the wrong rank, non-positive, or not
        dividing the array shape; or a sparsity outside [0, 1).
    """
    scores = jnp.asarray(scores)
    if isinstance(block_shape, (str, bytes)) or not isinstance(block_shape, Sequence):
        raise ValueError(
            f"block_shape must be a sequence with one block length per axis of scores "
            f"(shape {tuple(scores.shape)}), got block_shape={block_shape!r}"
        )
    block_shape = tuple(block_shape)
    if len(block_shape) != scores.ndim:
        raise ValueError(
            f"block_shape={block_shape} must have one entry per axis of scores "
            f"(shape {tuple(scores.shape)})"
        )
    for dim, b in zip(scores.shape, block_shape):
        if not isinstance(b, (int, np.integer)) or b <= 0 or dim % b:
            raise ValueError(
                f"block_shape={block_shape} must be positive and divide scores.shape="
                f"{tuple(scores.shape)}"
            )
    validate_sparsity(sparsity)
    grid = tuple(d // b for d, b in zip(scores.shape, block_shape))
    split = []
    for g, b in zip(grid, block_shape):
        split += [g, b]
    blocked = _magnitude(scores).reshape(split)
    block_scores = blocked.sum(axis=tuple(range(1, 2 * scores.ndim, 2)))
    keep_blocks = topk_mask(block_scores, sparsity)
    expanded = keep_blocks
    for axis, b in enumerate(block_shape):
        expanded = jnp.repeat(expanded, b, axis=axis)
    return expanded


def channel_mask(scores: jax.Array, sparsity: Any, axis: int = -1) -> jax.Array:
    """Structured mask that keeps whole slices along ``axis`` (e.g. output channels).

    Args:
      scores: array of any rank.
      sparsity: fraction of channels dropped, in [0, 1).
      axis: the channel axis; each index along it is kept or dropped as a whole,
        ranked by the L1 norm of its scores.

    Returns:
      Boolean array of ``scores.shape`` with exactly round((1 - sparsity) * C)
      channels kept, C = ``scores.shape[axis]``.

    Reference: Li et al. 2017, "Pruning Filters for Efficient ConvNets" (L1 filter norms).
    """
    scores = jnp.asarray(scores)
    if scores.ndim == 0:
        raise ValueError("scores must have at least one axis for a channel mask, got a scalar")
    axis = normalize_axis(axis, scores.ndim)
    validate_sparsity(sparsity)
    other = tuple(a for a in range(scores.ndim) if a != axis)
    channel_scores = _magnitude(scores).sum(axis=other)
    keep = topk_mask(channel_scores, sparsity)
    shape = [1] * scores.ndim
    shape[axis] = scores.shape[axis]
    return jnp.broadcast_to(keep.reshape(shape), scores.shape)


def validate_masks(params: PyTree, masks: PyTree, name: str = "masks") -> None:
    """Raises ValueError unless ``masks`` is a mask tree of ``params``.

    A mask tree has the structure of ``params`` (the same keys, matched by key path,
    never by position) with a boolean array of the parameter's shape, or ``None``, at
    every leaf. Only structure, dtypes and shapes are read, so it works under jit.

    Args:
      params: the parameter pytree (arrays or `jax.ShapeDtypeStruct`).
      masks: the candidate mask tree.
      name: how the message names ``masks``.

    Raises:
      ValueError: naming the first offending entry: a parameter without a mask entry
        or a mask entry without a parameter, a mask that is not boolean (0.3 is not
        "keep"), or a mask of another shape.
    """
    param_leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    mask_leaves = jax.tree_util.tree_flatten_with_path(masks, is_leaf=is_none)[0]
    param_paths = [jax.tree_util.keystr(path) for path, _ in param_leaves]
    mask_paths = [jax.tree_util.keystr(path) for path, _ in mask_leaves]
    if param_paths != mask_paths or jax.tree.structure(params) != jax.tree.structure(
        masks, is_leaf=is_none
    ):
        known_masks, known_params = set(mask_paths), set(param_paths)
        missing = [p for p in param_paths if p not in known_masks]
        extra = [p for p in mask_paths if p not in known_params]
        detail = "; ".join(
            [f"no entry for params{p}" for p in missing[:3]]
            + [f"{name}{p} is not a parameter" for p in extra[:3]]
        )
        if not detail:
            detail = f"{jax.tree.structure(masks, is_leaf=is_none)} vs {jax.tree.structure(params)}"
        raise ValueError(f"{name} must have the structure of params: {detail}")
    for (path, p), (_, m) in zip(param_leaves, mask_leaves):
        if m is None:
            continue
        where = f"{name}{jax.tree_util.keystr(path)}"
        dtype = m.dtype if hasattr(m, "dtype") else np.asarray(m).dtype
        if dtype != np.bool_:
            raise ValueError(f"{where} must be boolean, got dtype {dtype}")
        if jnp.shape(m) != jnp.shape(p):
            raise ValueError(f"{where} has shape {jnp.shape(m)}, its parameter {jnp.shape(p)}")


def apply_masks(params: PyTree, masks: PyTree) -> PyTree:
    """Zeroes the masked-out entries of ``params``; leaves with a ``None`` mask pass through.

    Args:
      params: parameter pytree.
      masks: pytree of the same structure with boolean arrays or ``None``.

    Returns:
      A pytree like ``params`` with ``where(mask, p, 0)`` on every masked leaf.

    Raises:
      ValueError: as `validate_masks`: the structures differ, a mask is not boolean
        (a float 0.3 would keep its entry), or a mask's shape is not its leaf's
        (broadcasting would silently zero the wrong entries).
    """
    validate_masks(params, masks)
    return jax.tree.map(
        lambda m, p: p if m is None else jnp.where(m, p, jnp.zeros_like(p)),
        masks,
        params,
        is_leaf=is_none,
    )


def summary(tree: PyTree, masks: PyTree | None = None) -> dict[str, Any]:
    """Counts of nonzeros, density and sparsity per leaf and overall.

    Args:
      tree: pytree of arrays (parameters or boolean masks).
      masks: optional mask tree; when given, only leaves with a non-None mask
        are counted (the "sparsified parameters") and the mask decides what is
        live. Without it, every leaf of ``tree`` counts and nonzero entries are live.

    Returns:
      ``{"leaves": {path: {"size", "nonzeros", "density", "sparsity"}},
      "size", "nonzeros", "density", "sparsity"}`` with Python numbers; the
      global figures pool all counted leaves. Not jit-able (it reads values).

    Raises:
      ValueError: if ``masks`` is not a mask tree of ``tree`` (`validate_masks`).
    """
    if masks is not None:
        validate_masks(tree, masks)
    leaves = {}
    if masks is None:
        items = [
            (jax.tree_util.keystr(path), leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
        ]
    else:
        items = [
            (jax.tree_util.keystr(path), m)
            for path, m in jax.tree_util.tree_leaves_with_path(masks, is_leaf=is_none)
            if m is not None
        ]
    total = nonzero = 0
    for name, leaf in items:
        arr = np.asarray(leaf)
        size, nnz = int(arr.size), int(np.count_nonzero(arr))
        leaves[name] = {
            "size": size,
            "nonzeros": nnz,
            "density": nnz / size if size else 1.0,
            "sparsity": 1.0 - nnz / size if size else 0.0,
        }
        total += size
        nonzero += nnz
    density = nonzero / total if total else 1.0
    return {
        "leaves": leaves,
        "size": total,
        "nonzeros": nonzero,
        "density": density,
        "sparsity": 1.0 - density,
    }


def sparsity_of(params: PyTree, masks: PyTree) -> jax.Array:
    """Global fraction of zeros over the leaves that have a mask (jit-able).

    Args:
      params: parameter pytree.
      masks: mask pytree (None where not sparsified).

    Returns:
      float32 scalar; 0.0 when no leaf is masked.
    """
    masked = jax.tree.leaves(
        jax.tree.map(lambda m, p: None if m is None else p, masks, params, is_leaf=is_none)
    )
    total = sum(p.size for p in masked)
    if not total:
        return jnp.zeros((), jnp.float32)
    zeros = sum(jnp.sum(p == 0) for p in masked)
    return (zeros / total).astype(jnp.float32)


def _pooled_dtype(leaves: Sequence[Any]) -> Any:
    """The dtype that holds every pooled score exactly (a float32 cast ties int32 2**30, 2**30+1).

    Raises:
      ValueError: if the leaves' dtypes have no common type that represents all of
        them exactly under the current JAX config (int32 with float32, uint32 with
        int32 without x64).
    """
    dtypes = sorted({jnp.result_type(s) for s in leaves}, key=str)
    common = jnp.result_type(*dtypes)
    if not all(np.can_cast(d, common, "safe") for d in dtypes):
        raise ValueError(
            f"scores of dtypes {[str(d) for d in dtypes]} have no common dtype holding them "
            f"all exactly (JAX promotes them to {common}): give every pooled leaf one dtype"
        )
    return common


def global_topk_masks(scores: PyTree, sparsity: Any, selected: PyTree) -> PyTree:
    """Keeps the round((1 - sparsity) * N) highest scores pooled over all selected leaves.

    Args:
      scores: pytree of score arrays, of one real dtype or of dtypes that promote
        exactly (ranked without a float32 cast, so int32 2**30 + 1 beats 2**30).
      sparsity: fraction dropped over the pooled entries, in [0, 1); may be traced.
      selected: pytree with the structure of ``scores`` whose leaves are truthy
        for the leaves to pool and ``None`` for the others.

    Returns:
      Mask pytree: booleans on selected leaves (exactly N kept in total, ties by
      position in leaf order), ``None`` elsewhere. Layers may end up with very
      different densities; that is the point of global pruning.

    Raises:
      ValueError: for a sparsity outside [0, 1), or a ``selected`` leaf that is
        ``False`` (it reads as "not pooled", but only ``None`` means that).
    """
    validate_sparsity(sparsity)
    for path, sel in jax.tree_util.tree_flatten_with_path(selected, is_leaf=is_none)[0]:
        if isinstance(sel, (bool, np.bool_)) and not sel:
            raise ValueError(
                f"selected{jax.tree_util.keystr(path)} is False: use None for a leaf that "
                "is not pooled (every other value pools it)"
            )
    sel_leaves, treedef = jax.tree.flatten(selected, is_leaf=is_none)
    score_leaves = treedef.flatten_up_to(scores)
    chosen = [s for s, keep in zip(score_leaves, sel_leaves) if keep is not None]
    if not chosen:
        return jax.tree.unflatten(treedef, [None] * len(sel_leaves))
    flat = jnp.concatenate([jnp.ravel(s).astype(_pooled_dtype(chosen)) for s in chosen])
    keep = topk_mask(flat, sparsity)
    out, offset = [], 0
    for s, sel in zip(score_leaves, sel_leaves):
        if sel is None:
            out.append(None)
            continue
        size = int(np.prod(jnp.shape(s)))
        out.append(keep[offset : offset + size].reshape(jnp.shape(s)))
        offset += size
    return jax.tree.unflatten(treedef, out)
