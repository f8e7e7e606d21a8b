"""The sparsity pattern shared by the post-training pruners: unstructured or N:M."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import masks as masks_lib

__all__ = ["Pattern", "check_layer", "make_pattern", "mask_per_output"]


class Pattern(NamedTuple):
    """What to keep: a fraction of entries, or ``n`` of every ``m`` consecutive inputs.

    Attributes:
      sparsity: fraction of entries removed (unstructured); ``1 - n / m`` for N:M.
      n: kept entries per group (None for unstructured).
      m: group length along the input axis (None for unstructured).
    """

    sparsity: float
    n: int | None
    m: int | None

    @property
    def is_nm(self) -> bool:
        return self.m is not None


def make_pattern(sparsity: Any = 0.0, n: Any = None, m: Any = None) -> Pattern:
    """Validates ``sparsity`` or the pair ``(n, m)`` and returns the `Pattern`.

    Raises:
      ValueError: naming the argument, for a sparsity outside [0, 1), only one of n and m,
        non-positive n or m, n > m, or both a nonzero sparsity and N:M.
    """
    if (n is None) != (m is None):
        raise ValueError(f"n and m must be given together, got n={n!r}, m={m!r}")
    if n is None:
        masks_lib.validate_sparsity(sparsity)
        return Pattern(float(sparsity), None, None)
    for name, value in (("n", n), ("m", m)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if n > m:
        raise ValueError(f"n must be <= m, got n={n}, m={m}")
    if sparsity not in (0, 0.0, None):
        raise ValueError(
            f"give either sparsity or n and m, got sparsity={sparsity!r}, n={n}, m={m}"
        )
    return Pattern(1.0 - n / m, int(n), int(m))


def check_layer(kernel: jax.Array, x: jax.Array | None, pattern: Pattern) -> None:
    """A 2D kernel ``[in, out]``, inputs ``[tokens, in]`` and an N:M group that divides ``in``.

    Concrete values are checked too (a traced call checks shapes only): a NaN or inf
    weight would be ranked as if it were small and pruned to 0, and NaN/inf inputs turn
    every score of their feature into NaN; calibration inputs with no token, or zero on
    every token, carry no information, so every score ties and the mask would follow
    position.
    """
    if jnp.ndim(kernel) != 2:
        raise ValueError(f"kernel must be 2D [in, out], got shape {jnp.shape(kernel)}")
    if x is not None and (jnp.ndim(x) != 2 or jnp.shape(x)[1] != jnp.shape(kernel)[0]):
        raise ValueError(f"x must be [tokens, in={jnp.shape(kernel)[0]}], got shape {jnp.shape(x)}")
    _check_values(kernel, "kernel")
    if x is not None:
        if jnp.shape(x)[0] == 0:
            raise ValueError(f"x must hold at least one calibration token, got shape {x.shape}")
        _check_values(x, "x")
        if not isinstance(x, jax.core.Tracer) and not bool(jnp.any(x != 0)):
            raise ValueError(
                f"x (calibration inputs of shape {jnp.shape(x)}) is zero on every token: "
                "nothing to calibrate the layer on"
            )
    if pattern.is_nm and jnp.shape(kernel)[0] % pattern.m:
        raise ValueError(
            f"m={pattern.m} must divide the input dimension {jnp.shape(kernel)[0]} of the kernel"
        )


def _check_values(array: jax.Array, name: str) -> None:
    """ValueError naming ``name`` if a concrete ``array`` holds NaN or inf."""
    if isinstance(array, jax.core.Tracer):
        return
    finite = np.isfinite(np.asarray(array))
    if not finite.all():
        first = tuple(int(i) for i in np.argwhere(~finite)[0])
        raise ValueError(
            f"{name} holds NaN or inf values (first at index {first}: "
            f"{float(np.asarray(array)[first])})"
        )


def mask_per_output(scores: jax.Array, pattern: Pattern) -> jax.Array:
    """Keeps the best inputs of every output column of ``scores [in, out]``.

    Unstructured: exactly ``num_kept(in, sparsity)`` per column; N:M: ``n`` of every ``m``
    consecutive inputs per column (axis 0).
    """
    if pattern.is_nm:
        return masks_lib.nm_mask(scores, pattern.n, pattern.m, axis=0)
    k = masks_lib.num_kept(scores.shape[0], pattern.sparsity)
    return jax.vmap(lambda s: masks_lib.topk_mask_by_count(s, k), in_axes=1, out_axes=1)(scores)
