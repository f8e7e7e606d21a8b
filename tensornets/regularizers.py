"""Regularizers of factorized layers: tensor dropout on rank components.

Reference: Kolbeinsson, Kossaifi, Panagakis, Bulat, Anandkumar, Tzoulaki &
Matthews 2021, "Tensor Dropout for Robust Learning". During training each
component of the low-rank structure is dropped independently:

  CP      W = sum_r lambda_r m_r / (1 - p) a_r^(1) o ... o a_r^(N), m_r ~ Bernoulli(1 - p):
          whole rank-1 terms are dropped (a random sketch of the weights vector).
  Tucker  W = G x_1 (U_1 M_1) x_2 ... x_N (U_N M_N), M_n = diag(m_n) / (1 - p) with
          m_n ~ Bernoulli(1 - p) per column: whole fibres of the core are dropped along
          every factorized mode.

Dividing each multiplier by 1 - p keeps E[W] equal to the undropped weight (the
Tucker multipliers of different modes are independent, so the expectation of their
product is the product of their expectations, 1). At test time nothing is dropped.
The multipliers act exactly like float rank masks (`tensornets.rank.mask_layer`),
so the factorized layers apply them where they apply rank masks
(``Factorized(..., rank_dropout=p)`` with a ``"dropout"`` rng).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from tensornets import rank as rank_lib

__all__ = ["DROPOUT_FORMATS", "tensor_dropout", "tensor_dropout_multipliers"]

DROPOUT_FORMATS = ("cp", "tucker")


def _check_rate(rate: Any) -> float:
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0.0 <= rate < 1.0:
        raise ValueError(f"rate must be a float in [0, 1), got {rate!r}")
    return float(rate)


def tensor_dropout_multipliers(node: Mapping, rate: float, key: jax.Array) -> dict[str, jax.Array]:
    """Random per-component multipliers ``m / (1 - rate)``, m ~ Bernoulli(1 - rate).

    Args:
      node: a CP or Tucker layer's params (names as in `tensornets.layers`).
      rate: drop probability p in [0, 1).
      key: ``jax.random.key``.

    Returns:
      ``{axis name: float32[size]}`` with entries 0 or 1 / (1 - p), one independent
      draw per rank axis (CP: the components; Tucker: the columns of every factor).

    Raises:
      ValueError: for another format or a rate outside [0, 1).
    """
    rate = _check_rate(rate)
    fmt = rank_lib.layer_format(node)
    if fmt not in DROPOUT_FORMATS:
        raise ValueError(f"tensor dropout is defined for {DROPOUT_FORMATS} layers, got {fmt!r}")
    axes = rank_lib.layer_rank_axes(node)
    keys = jax.random.split(key, len(axes))
    out = {}
    for k, (name, ((leaf, ax), *_)) in zip(keys, axes.items()):
        size = jnp.shape(node[leaf])[ax]
        keep = jax.random.bernoulli(k, 1.0 - rate, (size,))
        out[name] = keep.astype(jnp.float32) / (1.0 - rate)
    return out


def tensor_dropout(node: Mapping, rate: float, key: jax.Array) -> dict:
    """A CP or Tucker layer's params with tensor dropout applied (training-time only).

    Args:
      node: the layer's params.
      rate: drop probability p in [0, 1).
      key: ``jax.random.key``.

    Returns:
      The params with the dropped components zeroed and the kept ones scaled by
      1 / (1 - p) on each rank axis's gate leaf (CP: ``weights``; Tucker: ``core``).
    """
    mult = tensor_dropout_multipliers(node, rate, key)
    return rank_lib.mask_layer(node, mult, gate_only=True)
