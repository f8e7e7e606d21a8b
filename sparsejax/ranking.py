"""Exact top-k selection: which entries of an array rank highest, ties broken by position.

Every mask in `sparsejax.masks` keeps an exact number of entries, so selection must be exact
and deterministic: equal scores are ordered by flat position (earlier first) and NaN ranks
last, as a stable comparison sort orders them. `rank_descending` is that sort;
`topk_mask_by_count` gives the same entries without sorting for float and bool scores (a
bisection over their 32-bit sortable keys), since XLA:CPU sorts on one core and a mask update
of dynamic sparse training ranks every layer twice.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["descending_key", "rank_descending", "topk_mask_by_count"]


def descending_key(scores: jax.Array) -> jax.Array:
    """A key whose ascending order is the descending order of ``scores``, exact for every dtype.

    Floats are negated (exact; NaN stays NaN, which sorts last). Integers and
    bools are bit-flipped instead: ``~x`` is ``-x - 1`` for signed and ``max - x``
    for unsigned types, an order-reversing bijection that cannot overflow, where
    negation wraps uint8 (0 would become the largest) and int8's -128.

    Raises:
      ValueError: for scores that are not real numbers (e.g. complex).
    """
    dtype = scores.dtype
    if jnp.issubdtype(dtype, jnp.floating):
        return -scores
    if dtype == jnp.bool_ or jnp.issubdtype(dtype, jnp.integer):
        return ~scores
    raise ValueError(f"scores must be real (bool, integer or floating), got dtype {dtype}")


def rank_descending(scores: jax.Array) -> jax.Array:
    """Rank of every entry of a flat array when sorted by descending score.

    Rank 0 is the largest score; equal scores are ordered by position (lower
    index first), which makes top-k selection deterministic. NaN ranks last.
    Exact for every real dtype (see `descending_key`).
    """
    flat = scores.reshape(-1)
    # A stable argsort of the order-reversed key breaks ties by index.
    order = jnp.argsort(descending_key(flat), stable=True)
    return jnp.zeros_like(order).at[order].set(jnp.arange(flat.size, dtype=order.dtype))


def topk_mask_by_count(scores: jax.Array, k: Any) -> jax.Array:
    """Keeps exactly ``k`` highest-scoring entries (``k`` may be traced).

    Args:
      scores: array of any shape.
      k: number of entries to keep, 0 <= k <= size.

    Returns:
      Boolean array of ``scores.shape`` with ``k`` True entries.
    """
    scores = jnp.asarray(scores)
    if scores.size == 0:
        return jnp.zeros(scores.shape, bool)
    if scores.dtype == jnp.bool_ or (
        jnp.issubdtype(scores.dtype, jnp.floating) and jnp.finfo(scores.dtype).bits <= 32
    ):
        return _topk_by_bisection(scores.astype(jnp.float32), k).reshape(scores.shape)
    ranks = rank_descending(scores)
    return (ranks < k).reshape(scores.shape)


def _sortable_bits(scores: jax.Array) -> jax.Array:
    """uint32 keys whose ascending order is the descending order of float32 ``scores``.

    The float's bits are made monotone (negative floats have their bits flipped, positive
    ones their sign bit set); -0.0 counts as 0.0 and every NaN as the largest key (last), as
    in a comparison sort.
    """
    key = descending_key(scores)
    # -0.0 and 0.0 compare equal in a sort; XLA folds "x + 0.0" away, so select instead.
    key = jnp.where(key == 0, jnp.zeros_like(key), key)
    bits = jax.lax.bitcast_convert_type(key, jnp.uint32)
    sign = jnp.uint32(0x80000000)
    monotone = jnp.where(bits & sign, ~bits, bits | sign)
    return jnp.where(jnp.isnan(key), jnp.uint32(0xFFFFFFFF), monotone)


def _topk_by_bisection(scores: jax.Array, k: Any) -> jax.Array:
    """`topk_mask_by_count` for float32 scores in linear time, the same entries as the sort.

    The k-th smallest key t is found by bisection over the 32-bit key range (32 counting
    passes, each one vectorized reduction), then every key below t is kept and the entries
    equal to t in index order until k are kept: the ranking of a stable sort, without one.
    XLA:CPU sorts 10^5 entries in milliseconds on one core; the passes are cheaper.
    """
    flat = _sortable_bits(scores.reshape(-1))
    k = jnp.asarray(k, jnp.int32)

    def narrow(_, bounds):
        lo, hi = bounds  # the answer t is in [lo, hi]
        mid = lo + (hi - lo) // 2
        enough = jnp.sum(flat <= mid, dtype=jnp.int32) >= k
        return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

    bounds = (jnp.uint32(0), jnp.uint32(0xFFFFFFFF))
    t, _ = jax.lax.fori_loop(0, 32, narrow, bounds)
    below = flat < t
    ties = flat == t
    room = k - jnp.sum(below, dtype=jnp.int32)
    return below | (ties & (jnp.cumsum(ties, dtype=jnp.int32) <= room))
