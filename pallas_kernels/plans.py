"""Execution plans of a `BSRLayout`: which stored blocks each matmul step touches, in what order.

A plan is a pure function of the (static, hashable) layout, built once with numpy outside jit
and read by the ops as compile-time constants:

* `xla_plan`: the CPU path's groups of output blocks. Output blocks (block columns of ``W``,
  or block rows for ``W^T``) are sorted by their number of stored blocks and cut into runs of
  similar counts; each run becomes one batched dot padded to its largest count (`XlaGroup`).
* `kernel_schedule`: the Pallas kernels' flattened step list, one step per stored block
  (`KernelSchedule`).

Plans are cached by layout content (`BSRLayout` hashes and compares by its arrays), so two
equal layouts get the very same plan object, and every plan array is read-only: a cached
plan is shared by every trace that uses it.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from pallas_kernels.formats import BSRLayout

__all__ = [
    "KernelSchedule",
    "XlaGroup",
    "kernel_schedule",
    "xla_plan",
]

# Relative cost, in multiplied blocks, of launching one more batched dot in the XLA plan.
# Measured on 2 CPU cores: one more dot costs about as much as a few padded 32x32 blocks
# at a batch of 256 rows, so a few groups of columns with similar counts beat one padded group.
_GROUP_OVERHEAD_BLOCKS = 4
_MAX_GROUPS = 16
# Plans of this many (layout, orientation) pairs stay cached; a model has a few per kernel.
_CACHE_SIZE = 1024


def _frozen(values) -> np.ndarray:
    """An int32 copy that nobody can write to (plans are shared through the cache)."""
    a = np.ascontiguousarray(values, dtype=np.int32)
    # Over immutable bytes, so `setflags(write=True)` cannot make it writable again.
    out = np.frombuffer(a.tobytes(), dtype=np.int32).reshape(a.shape)
    out.setflags(write=False)
    return out


@dataclasses.dataclass(frozen=True)
class XlaGroup:
    """One batched dot of the XLA path: ``len(out_blocks)`` output blocks with ``P`` slots.

    Attributes (read-only numpy arrays):
      out_blocks: int32[g], which output block (column of W, or row for the transpose).
      in_blocks: int32[g, P], input block index for each slot; out-of-range pads.
      slots: int32[g, P], index into ``BSR.values``; out-of-range (``nnz``) pads.
    """

    out_blocks: np.ndarray
    in_blocks: np.ndarray
    slots: np.ndarray


@dataclasses.dataclass(frozen=True)
class KernelSchedule:
    """Flattened step list of the Pallas kernels: one step per stored block (plus one per
    empty output block, so it still gets written). Steps of one output block are adjacent.

    Attributes (all read-only int32[steps]): ``out_block``, ``in_block``, ``slot`` (index
    into values), ``first`` / ``last`` (1 on the first / last step of an output block),
    ``valid`` (0 on the placeholder step of an empty output block). Also ``ptr``
    int32[num_out + 1] (steps of output block ``j`` are ``ptr[j]:ptr[j+1]`` among the valid
    ones, used by the GPU kernel's in-kernel loop) with matching ``valid_in_block`` /
    ``valid_slot``.
    """

    out_block: np.ndarray
    in_block: np.ndarray
    slot: np.ndarray
    first: np.ndarray
    last: np.ndarray
    valid: np.ndarray
    ptr: np.ndarray
    valid_in_block: np.ndarray
    valid_slot: np.ndarray


def _plan_groups(counts: np.ndarray) -> list[tuple[int, int]]:
    """Splits output blocks sorted by decreasing count into at most `_MAX_GROUPS` runs.

    Minimizes padded slots + overhead per group by dynamic programming over the sorted
    counts: cost(run a..b) = (b - a) * counts[a] + overhead. Exact for this cost model.
    """
    n = len(counts)
    inf = float("inf")
    max_groups = min(_MAX_GROUPS, n)
    best = np.full((max_groups + 1, n + 1), inf)
    arg = np.zeros((max_groups + 1, n + 1), dtype=np.int64)
    best[0, 0] = 0.0
    for g in range(1, max_groups + 1):
        for i in range(1, n + 1):
            starts = np.arange(i)
            cost = best[g - 1, :i] + (i - starts) * counts[starts] + _GROUP_OVERHEAD_BLOCKS
            a = int(np.argmin(cost))
            best[g, i], arg[g, i] = cost[a], a
    g = int(np.argmin(best[1:, n])) + 1
    bounds, i = [], n
    while g > 0:
        a = int(arg[g, i])
        bounds.append((a, i))
        i, g = a, g - 1
    return bounds[::-1]


def _oriented(layout: BSRLayout, transpose: bool):
    """(ptr over output blocks, input block of each step, slot of each step)."""
    if transpose:
        perm = layout.transpose_perm
        return layout.row_ptr, layout.col_indices[perm], perm
    return layout.col_ptr, layout.row_indices, np.arange(layout.nnz_blocks, dtype=np.int32)


def xla_plan(layout: BSRLayout, transpose: bool) -> tuple[tuple[XlaGroup, ...], np.ndarray | None]:
    """Groups of output blocks for the CPU path, and the inverse permutation.

    Args:
      layout: the BSR layout of ``W`` (shape ``(K, N)``, blocks ``(bk, bn)``).
      transpose: plan ``X @ W^T`` (output blocks are block rows of ``W``) instead of
        ``X @ W`` (output blocks are block columns).

    Returns:
      ``(groups, inverse)``: the `XlaGroup` runs, whose ``out_blocks`` concatenated list
      every output block once; ``inverse[j]`` is the position of output block ``j`` in the
      concatenated group outputs (None when that order is already the identity). Empty
      output blocks go in a group with ``P = 0``. Cached: equal layouts get the same
      object.
    """
    return _xla_plan(layout, bool(transpose))


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _xla_plan(layout: BSRLayout, transpose: bool):
    ptr, in_blocks, slots = _oriented(layout, transpose)
    counts = np.diff(ptr)
    order = np.argsort(-counts, kind="stable").astype(np.int32)
    sorted_counts = counts[order]
    num_in = layout.grid[1] if transpose else layout.grid[0]
    groups = []
    for a, b in _plan_groups(sorted_counts):
        outs = order[a:b]
        width = int(sorted_counts[a])
        ins = np.full((b - a, width), num_in, dtype=np.int32)
        sl = np.full((b - a, width), layout.nnz_blocks, dtype=np.int32)
        for r, j in enumerate(outs):
            lo, hi = ptr[j], ptr[j + 1]
            ins[r, : hi - lo] = in_blocks[lo:hi]
            sl[r, : hi - lo] = slots[lo:hi]
        groups.append(XlaGroup(_frozen(outs), _frozen(ins), _frozen(sl)))
    inverse = None
    if not np.array_equal(order, np.arange(len(order))):
        inverse = _frozen(np.argsort(order))
    return tuple(groups), inverse


def kernel_schedule(layout: BSRLayout, transpose: bool) -> KernelSchedule:
    """Flattened step list for the Pallas kernels (see `KernelSchedule`).

    Args:
      layout: the BSR layout of ``W``.
      transpose: walk ``W`` by block rows (for ``X @ W^T``) instead of block columns.

    Returns:
      The schedule; cached, so equal layouts get the same object.
    """
    return _kernel_schedule(layout, bool(transpose))


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _kernel_schedule(layout: BSRLayout, transpose: bool) -> KernelSchedule:
    ptr, in_blocks, slots = _oriented(layout, transpose)
    out_b, in_b, slot, first, last, valid = [], [], [], [], [], []
    for j in range(len(ptr) - 1):
        lo, hi = int(ptr[j]), int(ptr[j + 1])
        if lo == hi:
            out_b.append(j)
            in_b.append(0)
            slot.append(0)
            first.append(1)
            last.append(1)
            valid.append(0)
            continue
        for t in range(lo, hi):
            out_b.append(j)
            in_b.append(int(in_blocks[t]))
            slot.append(int(slots[t]))
            first.append(int(t == lo))
            last.append(int(t == hi - 1))
            valid.append(1)
    return KernelSchedule(
        out_block=_frozen(out_b),
        in_block=_frozen(in_b),
        slot=_frozen(slot),
        first=_frozen(first),
        last=_frozen(last),
        valid=_frozen(valid),
        ptr=_frozen(ptr),
        valid_in_block=_frozen(in_blocks),
        valid_slot=_frozen(slots),
    )
