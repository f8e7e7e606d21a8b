"""The one mask packer: one bit an entry, leading axes kept."""

import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsejax import masks, packing


@settings(max_examples=30, deadline=None)
@given(
    shape=st.lists(st.integers(1, 19), min_size=0, max_size=3).map(tuple),
    seed=st.integers(0, 2**16),
)
def test_packed_masks_round_trip_with_one_bit_an_entry_along_the_last_axis(shape, seed):
    mask = np.random.default_rng(seed).random(shape) < 0.4
    packed = packing.pack_mask(mask)
    assert packed.bits.dtype == jnp.uint8 and packed.shape == shape
    want = (*shape[:-1], -(-shape[-1] // 8)) if shape else (1,)
    assert packed.bits.shape == want  # leading axes kept: shardable like the kernel
    np.testing.assert_array_equal(packed.unpack(), mask)
    tree = packing.pack_masks({"m": mask, "none": None})
    assert tree["none"] is None and isinstance(tree["m"], packing.PackedMask)
    np.testing.assert_array_equal(packing.unpack_masks(tree)["m"], mask)
    plain = {"m": jnp.asarray(mask)}
    assert packing.unpack_masks(plain) is plain  # nothing packed: the very same tree


def test_masks_re_exports_the_packer():
    for name in packing.__all__:
        assert getattr(masks, name) is getattr(packing, name)
