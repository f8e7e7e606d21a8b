"""Properties of `pallas_kernels.plans`: every stored block is visited exactly once, in the
order the ops expect; plans are cached by layout content and cannot be written to."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels import plans
from pallas_kernels.formats import BSR

_SETTINGS = settings(max_examples=12, deadline=None, derandomize=True)


def _case(kb, nb, density, seed, bk=2, bn=4):
    """A random weight and a mask keeping a random ``density`` of its (bk, bn) blocks."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((kb * bk, nb * bn)).astype(np.float32)
    mask = np.kron(rng.random((kb, nb)) < density, np.ones((bk, bn), bool))
    return w, mask


def _layout(kb, nb, density, seed):
    w, mask = _case(kb, nb, density, seed)
    return BSR.from_dense(w, mask, block_shape=(2, 4)).layout


@st.composite
def _layouts(draw, max_blocks: int):
    """Random (2, 4)-block layouts of 1 to ``max_blocks`` block rows and columns, any density."""
    kb, nb = draw(st.integers(1, max_blocks)), draw(st.integers(1, max_blocks))
    return _layout(kb, nb, draw(st.floats(0.0, 1.0)), draw(st.integers(0, 2**16)))


def _blocks_by_output(layout, transpose):
    """{output block: sorted [(input block, slot)]} straight from the layout's indices."""
    out = {j: [] for j in range(layout.grid[0] if transpose else layout.grid[1])}
    for slot, (r, c) in enumerate(zip(layout.row_indices, layout.col_indices)):
        o, i = (r, c) if transpose else (c, r)
        out[int(o)].append((int(i), slot))
    return {j: sorted(v) for j, v in out.items()}


@_SETTINGS
@given(layout=_layouts(max_blocks=6), transpose=st.booleans())
def test_xla_plan_covers_every_block_once(layout, transpose):
    groups, inverse = plans.xla_plan(layout, transpose)
    num_in = layout.grid[1] if transpose else layout.grid[0]
    want = _blocks_by_output(layout, transpose)
    order = np.concatenate([g.out_blocks for g in groups])
    assert sorted(order.tolist()) == list(want)  # each output block in exactly one group
    got = {}
    for g in groups:
        assert g.in_blocks.shape == g.slots.shape == (len(g.out_blocks), g.in_blocks.shape[1])
        for o, ins, slots in zip(g.out_blocks, g.in_blocks, g.slots):
            real = slots < layout.nnz_blocks
            # Padding sits after the real slots and points out of range on both sides.
            assert np.all(real[:-1] >= real[1:])
            assert np.all(ins[~real] == num_in)
            got[int(o)] = sorted(zip(ins[real].tolist(), slots[real].tolist()))
    assert got == want
    # `inverse` undoes the group order (None: already the identity).
    position = np.arange(len(order)) if inverse is None else inverse
    np.testing.assert_array_equal(order[position], np.arange(len(order)))
    # No group pads more than it must: its width is its fullest output block.
    for g in groups:
        widths = [len(want[int(o)]) for o in g.out_blocks]
        assert g.in_blocks.shape[1] == max(widths)


@_SETTINGS
@given(layout=_layouts(max_blocks=5), transpose=st.booleans())
def test_kernel_schedule_walks_each_output_block_in_one_run(layout, transpose):
    s = plans.kernel_schedule(layout, transpose)
    want = _blocks_by_output(layout, transpose)
    steps = len(s.out_block)
    for name in ("in_block", "slot", "first", "last", "valid"):
        assert getattr(s, name).shape == (steps,)
    # Steps of one output block are adjacent, in output order, one run per block.
    runs = np.flatnonzero(np.diff(s.out_block)) + 1
    np.testing.assert_array_equal(s.out_block[np.r_[0, runs]], np.arange(len(want)))
    np.testing.assert_array_equal(np.flatnonzero(s.first), np.r_[0, runs])
    np.testing.assert_array_equal(np.flatnonzero(s.last), np.r_[runs - 1, steps - 1])
    for j, blocks in want.items():
        mine = s.out_block == j
        if not blocks:  # one placeholder step, so the empty output block is still written
            assert mine.sum() == 1 and s.valid[mine].tolist() == [0]
            continue
        assert s.valid[mine].all()
        assert sorted(zip(s.in_block[mine].tolist(), s.slot[mine].tolist())) == blocks
    # The pointer form lists the same valid steps.
    np.testing.assert_array_equal(np.diff(s.ptr), [len(want[j]) for j in want])
    valid = s.valid.astype(bool)
    np.testing.assert_array_equal(s.valid_in_block, s.in_block[valid])
    np.testing.assert_array_equal(s.valid_slot, s.slot[valid])


@pytest.mark.parametrize("build", [plans.xla_plan, plans.kernel_schedule])
def test_equal_layouts_share_one_plan(build):
    w, mask = _case(4, 3, 0.5, seed=6)
    a = BSR.from_dense(w, mask, block_shape=(2, 4)).layout
    b = BSR.from_dense(w + 1, mask, block_shape=(2, 4)).layout
    assert a is not b and a == b
    for transpose in (False, True):
        assert build(a, transpose) is build(b, transpose)
        assert build(a, transpose) is build(a, np.bool_(transpose))
    assert build(a, False) is not build(a, True)


def test_plan_arrays_are_read_only():
    """Plans are shared through the cache; writing into one would corrupt every user."""
    layout = _layout(4, 4, 0.5, seed=7)
    groups, _ = plans.xla_plan(layout, False)
    schedule = plans.kernel_schedule(layout, True)
    # (Not dataclasses.astuple: it would deep-copy the arrays.)
    fields = lambda d: [getattr(d, f.name) for f in dataclasses.fields(d)]
    arrays = [a for g in groups for a in fields(g)] + fields(schedule)
    for a in arrays:
        with pytest.raises(ValueError, match="read-only"):
            a[...] = 0
        with pytest.raises(ValueError, match="WRITEABLE"):
            a.setflags(write=True)
