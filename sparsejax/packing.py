"""Bit-packed masks: one bit an entry instead of one byte.

The one mask packer of the project: `sparsejax.transforms.masked(..., packed=True)` keeps its
masks in this form in the optimizer state, and `sparsejax.flops.memory` counts its bytes.
`sparsejax.masks` re-exports every name here.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

PyTree = Any

__all__ = ["PackedMask", "pack_mask", "pack_masks", "unpack_masks"]


class PackedMask(struct.PyTreeNode):
    """A boolean mask stored with one bit an entry.

    The bits are packed along the last axis (``jnp.packbits(mask, axis=-1)``,
    big-endian within each byte, zero padded), so the leading axes keep their
    sizes and a packed mask can be sharded over them like its kernel.

    Attributes:
      bits: uint8 ``[*shape[:-1], ceil(shape[-1] / 8)]`` (``[1]`` for a scalar).
      shape: the mask's shape (static).
    """

    bits: jax.Array
    shape: tuple[int, ...] = struct.field(pytree_node=False)

    def unpack(self) -> jax.Array:
        """The bool mask of ``shape``."""
        if not self.shape:
            return jnp.unpackbits(self.bits, count=1).astype(bool).reshape(())
        return jnp.unpackbits(self.bits, axis=-1, count=self.shape[-1]).astype(bool)


def pack_mask(mask: jax.Array) -> PackedMask:
    """One bool mask (any shape, a scalar included) -> its `PackedMask`, 1 bit an entry.

    Args:
      mask: array of any shape; nonzero entries count as True.

    Returns:
      The `PackedMask`; ``pack_mask(m).unpack()`` equals ``m.astype(bool)``.
    """
    mask = jnp.asarray(mask, bool)
    if mask.ndim == 0:
        return PackedMask(jnp.packbits(mask.reshape(1)), ())
    return PackedMask(jnp.packbits(mask, axis=-1), tuple(mask.shape))


def _is_mask_leaf(x: Any) -> bool:
    return x is None or isinstance(x, PackedMask)


def pack_masks(masks: PyTree) -> PyTree:
    """Bool mask pytree -> `PackedMask` pytree (None leaves stay None).

    Args:
      masks: bool arrays (any shape), None where a leaf is not sparsified.

    Returns:
      The same structure with `PackedMask` leaves: 1 bit an entry instead of 1 byte.
    """
    return jax.tree.map(
        lambda m: None if m is None else pack_mask(m), masks, is_leaf=lambda x: x is None
    )


def unpack_masks(masks: PyTree) -> PyTree:
    """Inverse of `pack_masks`; bool leaves pass through, so it accepts either form."""
    if not any(isinstance(m, PackedMask) for m in jax.tree.leaves(masks, is_leaf=_is_mask_leaf)):
        return masks  # unchanged (the very same object) when nothing is packed
    return jax.tree.map(
        lambda m: m.unpack() if isinstance(m, PackedMask) else m, masks, is_leaf=_is_mask_leaf
    )
