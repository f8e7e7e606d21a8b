"""A factorized layer's parameters: factors at the dense variance, rank masks, bias, dtype.

Initialization preserves the dense layer's output variance. With independent
zero-mean factors, the entries of the reconstructed kernel are uncorrelated, so
Var(y_j) = ||x||^2 E[W_ij^2] as for a dense kernel; each format's factor scales
make E[W_ij^2] equal the dense initializer's (1/fan_in for Flax's lecun_normal):
  CP      W = sum_r prod_n A_n[i_n, r], A_n ~ N(0, s^2):  E W^2 = R s^(2N),
          so s^2 = (sigma^2 / R)^(1/N) (low_rank: the same with N = 2);
  Tucker  core ~ N(0, sigma^2), U_n ~ N(0, 1/R_n):  E W^2 = sigma^2;
  TT      core k ~ N(0, sigma^(2/d) / r_{k-1}):  E W^2 = prod_k (sigma^(2/d) / r_{k-1})
          * prod_k r_k = sigma^2 (r_0 = r_d = 1). TensorLy-Torch draws every core
          with the same std and ends up sqrt(prod r) too small; here each core
          normalizes its incoming bond.
  tubal   s = the identity tube (1, 0, ..., 0) per component, U, V ~ N(0, t^2): each
          W[i, j, d] sums k n3 products of two factors, so E W^2 = k n3 t^4 and
          t^4 = sigma^2 / (k n3).

A layer keeps its factors at their maximum rank; the ``"rank_masks"`` variable
collection (`tensornets.rank`) says which components are live, so one compiled shape
serves every rank, and tensor dropout (`tensornets.regularizers`) drops whole
components while training.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype
from flax.linen.linear import default_kernel_init

from tensornets import rank as rank_lib
from tensornets import regularizers
from tensornets.layers.layouts import CP_FORMATS, Layout
from tensornets.layers.spec import check_rank_dropout

__all__ = ["Initializer", "init_factors", "layer_params", "masked_factors"]

Initializer = Callable[..., jax.Array]


def _param_std(layout: Layout, name: str, variance):
    """Std of a factor so the reconstructed entries have second moment ``variance``."""
    if layout.format in CP_FORMATS:
        if name == "weights":
            return None  # ones
        r, n = layout.ranks[0], len(layout.shape)
        return (variance / r) ** (0.5 / n)
    if layout.format == "tucker":
        if name == "core":
            return jnp.sqrt(variance)
        return 1.0 / math.sqrt(layout.ranks[int(name.split("_")[1])])
    if layout.format == "tubal":
        if name == "s":
            return None  # the identity tube
        k, n3 = layout.ranks[0], layout.shape[2]
        return (variance / (k * n3)) ** 0.25
    # tt, tt_matrix
    d = len(layout.param_shapes)
    r_prev = layout.param_shapes[name][0]
    return variance ** (0.5 / d) / math.sqrt(r_prev)


def _target_variance(module: nn.Module, dense_init, default_init, default_variance, shape):
    """Target E[W_ij^2]: ``module.init_variance``, the default's, or the initializer's."""
    if module.init_variance is not None:
        if not module.init_variance > 0:
            raise ValueError(f"init_variance must be > 0, got {module.init_variance!r}")
        return float(module.init_variance)
    if dense_init is None or dense_init is default_init:
        return default_variance
    if module.is_initializing():
        # A custom dense initializer: match its empirical second moment (sampled once,
        # at init only).
        w = dense_init(module.make_rng("params"), shape, module.param_dtype)
        return jnp.mean(jnp.square(w.astype(jnp.float32)))
    return 1.0  # unused: factor initializers only run at init


def init_factors(
    module: nn.Module,
    layout: Layout,
    dense_init: Initializer | None,
    default_init: Initializer,
    default_variance: float,
    dense_shape: tuple[int, ...],
    groups: int | None = None,
) -> dict[str, jax.Array]:
    """Declares the layout's factors as params of ``module`` (call inside it).

    Each factor is drawn so the reconstructed weight's entries have the second moment
    of the dense initializer (see the module docstring); CP weights start at one and
    tubal's s at the identity tube.

    Args:
      module: the layer that owns the params; its ``init_variance`` (an explicit
        target, or None) and ``param_dtype`` are read.
      layout: the weight's layout.
      dense_init: the dense initializer to imitate, or None for ``default_init``.
      default_init: the layer's default dense initializer.
      default_variance: its second moment (1 / fan_in for lecun_normal).
      dense_shape: the dense weight's shape (a custom initializer is sampled once at
        it, at init, to measure its second moment).
      groups: a leading axis of this size on every factor (conv feature groups), or
        None.

    Returns:
      ``{name: param}`` in the layout's order.

    Raises:
      ValueError: for ``init_variance`` <= 0, naming it.
    """
    variance = _target_variance(module, dense_init, default_init, default_variance, dense_shape)
    params = {}
    for name, shape in layout.param_shapes.items():
        full = shape if groups is None else (groups, *shape)

        def init(key, shape, dtype, name=name):
            std = _param_std(layout, name, variance)
            if std is None and layout.format == "tubal":
                return jnp.zeros(shape, dtype).at[..., 0].set(1)
            if std is None:
                return jnp.ones(shape, dtype)
            return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)

        params[name] = module.param(name, init, full, module.param_dtype)
    return params


def _layer_name(module: nn.Module) -> str:
    """The layer as messages name it: its path in the model, quoted."""
    if module.path:
        return repr("/".join(module.path))
    return f"the top-level {type(module).__name__}"


def masked_factors(module: nn.Module, params: dict, rank_dropout: float) -> dict[str, jax.Array]:
    """Applies the layer's rank mask and, when training, tensor dropout to its factors.

    The rank mask comes from the ``"rank_masks"`` variable collection when the caller
    passes one (``model.apply({"params": p, "rank_masks": rm}, x)``, one boolean
    vector per rank axis, see `tensornets.rank`): dead components are exactly zero.
    Tensor dropout runs when ``rank_dropout`` > 0 and a ``"dropout"`` rng is given,
    never at init.

    Args:
      module: the layer (call inside it; its variables and rngs are read).
      params: its factors, ``{name: array}``.
      rank_dropout: tensor dropout rate, 0 for none.

    Returns:
      The factors to compute with, same names and shapes.

    Raises:
      ValueError: naming the layer, for a rank mask missing some of the layer's axes
        or one that is not boolean (a float would scale the factors, see
        `tensornets.rank.mask_layer`); naming ``rank_dropout``, for a rate outside
        [0, 1) or on a format without tensor dropout (then also the format).
    """
    rank_dropout = check_rank_dropout(rank_dropout)
    axes = rank_lib.layer_rank_axes(params)
    present = [a for a in axes if module.has_variable(rank_lib.RANK_COLLECTION, a)]
    layer = _layer_name(module)
    if present and len(present) != len(axes):
        raise ValueError(
            f"rank_masks of {layer} has axes {present}; the layer needs all of {list(axes)}"
        )
    if present:
        mask = {a: module.get_variable(rank_lib.RANK_COLLECTION, a) for a in axes}
        rank_lib.check_boolean_rank_mask(
            mask, f"rank_masks of {layer}", "tensor dropout is the layer's rank_dropout"
        )
        params = rank_lib.mask_layer(params, mask)
    if rank_dropout:
        fmt = rank_lib.layer_format(params)
        if fmt not in regularizers.DROPOUT_FORMATS:
            raise ValueError(
                f"rank_dropout={rank_dropout!r} needs format in {regularizers.DROPOUT_FORMATS}, "
                f"got {fmt!r}"
            )
        if not module.is_initializing() and module.has_rng("dropout"):
            params = regularizers.tensor_dropout(params, rank_dropout, module.make_rng("dropout"))
    return params


def layer_params(
    module: nn.Module,
    inputs: jax.Array,
    layout: Layout,
    fan_in: int,
    dense_shape: tuple[int, ...],
    groups: int | None = None,
) -> tuple[jax.Array, jax.Array | None, dict[str, jax.Array]]:
    """A factorized dense or conv layer's factors and bias, masked and promoted.

    Declares the factors (`init_factors`, imitating ``module.kernel_init``, default
    lecun_normal with variance 1 / fan_in), then the bias when ``module.use_bias``,
    applies the rank mask and tensor dropout (`masked_factors`), and promotes the
    inputs, bias and factors to ``module.dtype`` as Flax's layers do.

    Args:
      module: a `FactorizedDense` or `FactorizedConv` (call inside it).
      inputs: the layer's inputs.
      layout: the kernel's layout.
      fan_in: the dense kernel's fan-in.
      dense_shape: the dense kernel's shape, whose last axis is the bias's.
      groups: conv feature groups (a leading axis on every factor), or None.

    Returns:
      ``(inputs, bias or None, factors)``.
    """
    params = init_factors(
        module, layout, module.kernel_init, default_kernel_init, 1.0 / fan_in, dense_shape, groups
    )
    params = masked_factors(module, params, module.rank_dropout)
    bias = None
    if module.use_bias:
        bias = module.param("bias", module.bias_init, dense_shape[-1:], module.param_dtype)
    names = list(params)
    inputs, bias, *leaves = promote_dtype(inputs, bias, *params.values(), dtype=module.dtype)
    return inputs, bias, dict(zip(names, leaves))
