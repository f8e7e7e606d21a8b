"""One-shot magnitude pruning of a layer (the baseline of the post-training papers)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from sparsejax import masks as masks_lib
from sparsejax.posttrain import pattern as pattern_lib

__all__ = ["magnitude"]


def magnitude(
    kernel: jax.Array,
    x: jax.Array | None = None,
    *,
    sparsity: Any = 0.0,
    n: int | None = None,
    m: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Keeps the largest |W|: over the whole layer (unstructured) or ``n`` of every ``m`` inputs.

    Args:
      kernel: ``float[in, out]`` (a conv kernel flattened to ``[window * in, out]``).
      x: unused (calibration inputs; accepted so every pruner has one signature).
      sparsity: fraction of the layer's entries removed, in [0, 1) (unstructured).
      n, m: N:M instead: ``n`` kept in every ``m`` consecutive inputs of each output.

    Returns:
      ``(pruned kernel, mask)``: the kernel with removed entries set to 0 and the boolean
      ``[in, out]`` mask of kept entries (exactly ``round((1 - sparsity) * size)`` True, or a
      valid N:M pattern along axis 0).

    Raises:
      ValueError: for a bad sparsity or (n, m), a kernel that is not 2D, or ``m`` not dividing
        ``in``.

    Reference: Han et al. 2015, "Learning both Weights and Connections for Efficient Neural
    Networks" (layer-wise magnitude thresholds), the baseline of Sun et al. 2024 and Frantar &
    Alistarh 2023: the score is |W_ij| and no weight changes.
    """
    del x
    pattern = pattern_lib.make_pattern(sparsity, n, m)
    kernel = jnp.asarray(kernel)
    pattern_lib.check_layer(kernel, None, pattern)
    scores = jnp.abs(kernel)
    if pattern.is_nm:
        mask = masks_lib.nm_mask(scores, pattern.n, pattern.m, axis=0)
    else:
        mask = masks_lib.topk_mask(scores, pattern.sparsity)
    return jnp.where(mask, kernel, 0), mask
