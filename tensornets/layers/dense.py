"""The factorized dense layer ``y = x W + b``, and its parameter and FLOP count.

The kernel W (in, features) is stored as the factors of its format and applied
without materializing it, unless reconstruct-then-matmul takes fewer FLOPs
(`tensornets.contract` picks; ``contraction`` forces either).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.linear import default_kernel_init

from tensornets import contract as contract_lib
from tensornets.formats import validation
from tensornets.layers.layouts import Layout, dense_layout, format_of
from tensornets.layers.params import Initializer, layer_params
from tensornets.layers.spec import check_contraction
from tensornets.layers.tubal import tubal_apply

__all__ = ["FactorizedDense", "factorized_dense_cost"]


def _apply_matrix(layout: Layout, params, x, method, precision):
    """x (..., N_in) @ W (N_in, N_out) through the factors."""
    fmt = format_of(layout, params)
    if layout.format == "tubal":
        return tubal_apply(fmt, x, method)
    if layout.format == "tt_matrix":
        return fmt.apply(x, method=method, precision=precision)
    in_shape, out_shape = layout.shape[: layout.n_in], layout.shape[layout.n_in :]
    y = fmt.apply(x.reshape(x.shape[:-1] + in_shape), layout.n_in, method, precision)
    return y.reshape(x.shape[:-1] + (math.prod(out_shape),))


class FactorizedDense(nn.Module):
    """A dense layer ``y = x W + b`` whose kernel W (in, features) is factorized.

    Attributes:
      features: output dimension.
      format: "cp" | "tucker" | "tt" | "tt_matrix" | "tubal" | "low_rank" (see
        `tensornets.layers`).
      rank: int, tuple or float fraction of in * features (tubal: the tubal rank k,
        or a float fraction; low_rank: r <= min(in, features), or a float fraction).
      in_shape: factorization of the input dimension (prod must equal it); default
        (in,) for cp/tucker/tt, 3 balanced factors for tt_matrix, (in / n3, n3)
        for tubal (see `tensornets.layers`); low_rank takes none.
      out_shape: same for ``features``.
      use_bias: add a bias.
      dtype: computation dtype (default: inferred from inputs and params).
      param_dtype: parameter dtype.
      precision: einsum precision.
      kernel_init: the dense initializer whose second moment the reconstructed
        kernel matches (default Flax's lecun_normal: 1/in).
      bias_init: bias initializer.
      init_variance: explicit target E[W_ij^2], overriding ``kernel_init``.
      contraction: "auto" (fewer FLOPs) | "factorized" | "dense".
      rank_dropout: tensor dropout rate (cp, low_rank and tucker; Kolbeinsson et
        al. 2021), active when a "dropout" rng is passed.

    A "rank_masks" variable collection, when given, masks the components (see
    `tensornets.rank`). Input (..., in) -> output (..., features).
    """

    features: int
    format: str
    rank: Any
    in_shape: tuple[int, ...] | None = None
    out_shape: tuple[int, ...] | None = None
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Initializer | None = default_kernel_init
    bias_init: Initializer = nn.initializers.zeros_init()
    init_variance: float | None = None
    contraction: str = "auto"
    rank_dropout: float = 0.0

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        contraction = check_contraction(self.contraction)
        features = validation.check_int_rank(self.features, "features")
        in_features = inputs.shape[-1]
        layout = dense_layout(
            self.format, in_features, features, self.rank, self.in_shape, self.out_shape
        )
        inputs, bias, params = layer_params(
            self, inputs, layout, in_features, (in_features, features)
        )
        y = _apply_matrix(layout, params, inputs, contraction, self.precision)
        return y if bias is None else y + bias


def factorized_dense_cost(layer: FactorizedDense, in_features: int) -> dict[str, int]:
    """Parameters and forward FLOPs per example of a `FactorizedDense` (no init needed).

    FLOPs follow `tensornets.contract` (a multiply-add is 2; the tubal layer's
    FFTs count as in `tensornets.formats.Tubal.apply_costs`) for the contraction
    the layer runs on one example, plus one add per output for the bias. The
    dense layer it replaces costs ``2 * in_features * features + features``.

    Args:
      layer: the (unbound) layer.
      in_features: the input dimension.

    Returns:
      ``{"params": factor entries plus bias, "flops": FLOPs of one example}``.
    """
    method = check_contraction(layer.contraction)
    features = validation.check_int_rank(layer.features, "features")
    in_features = validation.check_int_rank(in_features, "in_features")
    layout = dense_layout(
        layer.format, in_features, features, layer.rank, layer.in_shape, layer.out_shape
    )
    shapes = {k: jax.ShapeDtypeStruct(v, jnp.float32) for k, v in layout.param_shapes.items()}
    fmt = format_of(layout, shapes)
    if layout.format in ("tt_matrix", "tubal"):
        costs = fmt.apply_costs(1)
    else:
        costs = fmt.apply_costs(1, layout.n_in)
    flops = costs[contract_lib.choose_method(costs["factorized"], costs["dense"], method)]
    bias = features if layer.use_bias else 0
    params = sum(math.prod(v) for v in layout.param_shapes.values())
    return {"params": params + bias, "flops": int(flops) + bias}
