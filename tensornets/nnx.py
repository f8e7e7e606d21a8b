"""Factorized layers for Flax NNX models: the Linen `tensornets.layers.Factorized`, as NNX.

A factorized layer is one implementation, the Linen `tensornets.layers.Factorized`; NNX
models get it through Flax's own Linen-to-NNX bridge (``nnx.bridge.ToNNX``), so the
formats, initialization, contraction choice and tensor dropout are the same code. What
this module adds is the NNX spelling and what differs:

- **Construction.** Linen wraps an unbound ``nn.Dense``; NNX layers are built with their
  params, so `Factorized` reads the hyperparameters of an ``nnx.Linear`` / ``nnx.Conv`` /
  ``nnx.Embed`` (features, kernel size, strides, padding, dilations, groups, bias, dtypes)
  and makes the factors right away (Linen makes them at ``init``). NNX layers do not keep
  their initializers, so the factors match the Linen defaults' variance (lecun normal, the
  NNX default too) unless ``init_variance`` says otherwise.
- **Params.** The factors are `nnx.Param` attributes named as the Linen params
  (``core_0``, ``factor_1``, ``weights``, ``bias`` ...), so ``nnx.state(model, nnx.Param)``
  has the layout of the Linen params and the rank functions of `tensornets.rank`
  (`init_rank_masks`, `param_masks`, `compact`) and the rank-adaptive algorithms run on it
  unchanged (through ``sparsejax.nnx`` for training). Rank masks ride in the masked
  optimizer's state (`tensornets.rank.param_masks`), not in a variable collection.
- **Compaction.** `compact` builds the smaller layer from a layer and its rank masks (a
  Linen model is rebuilt by its author with `tensornets.rank.compact_ranks`).

Tensor dropout (``rank_dropout``) is on when the layer's ``rngs`` have a ``'dropout'``
stream: the bridge hands the wrapped Linen layer every stream at every call (the
construction's, or ``layer(x, rngs=...)``'s), so for evaluation call it with ``rngs``
without one.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from tensornets import layers
from tensornets import rank as rank_lib

PyTree = Any

__all__ = ["Factorized", "compact"]


def _linen_twin(layer: nnx.Module) -> tuple[nn.Module, jax.Array]:
    """The Linen layer with ``layer``'s hyperparameters, and an example input for init."""
    if isinstance(layer, nnx.Linear):
        twin = nn.Dense(
            layer.out_features,
            use_bias=layer.use_bias,
            dtype=layer.dtype,
            param_dtype=layer.param_dtype,
            precision=layer.precision,
        )
        return twin, jnp.zeros((1, layer.in_features), layer.param_dtype)
    if isinstance(layer, nnx.Conv):
        if layer.mask is not None:
            raise ValueError("layer.mask is not supported: a masked conv has no factorization")
        twin = nn.Conv(
            layer.out_features,
            kernel_size=layer.kernel_size,
            strides=layer.strides,
            padding=layer.padding,
            input_dilation=layer.input_dilation,
            kernel_dilation=layer.kernel_dilation,
            feature_group_count=layer.feature_group_count,
            use_bias=layer.use_bias,
            dtype=layer.dtype,
            param_dtype=layer.param_dtype,
            precision=layer.precision,
        )
        dilation = layer.kernel_dilation
        dilations = (dilation,) * len(layer.kernel_size) if isinstance(dilation, int) else dilation
        # The smallest input every padding accepts: one window of the dilated kernel.
        spatial = tuple((k - 1) * (d or 1) + 1 for k, d in zip(layer.kernel_size, dilations))
        return twin, jnp.zeros((1, *spatial, layer.in_features), layer.param_dtype)
    if isinstance(layer, nnx.Embed):
        twin = nn.Embed(
            layer.num_embeddings, layer.features, dtype=layer.dtype, param_dtype=layer.param_dtype
        )
        return twin, jnp.zeros((1,), jnp.int32)
    raise ValueError(
        f"layer must be an nnx.Linear, nnx.Conv or nnx.Embed, got layer={type(layer).__name__}"
    )


class Factorized(nnx.bridge.ToNNX):
    """An ``nnx.Linear``, ``nnx.Conv`` or ``nnx.Embed`` with factorized params; same call.

    The NNX form of `tensornets.layers.Factorized` (which runs inside it): the wrapped
    layer only supplies its hyperparameters and is not kept. Its factors are `nnx.Param`
    attributes named as the Linen layer's params, at full rank.

    Example::

        rngs = nnx.Rngs(0)
        layer = Factorized(nnx.Linear(512, 1024, rngs=rngs), format="tt_matrix", rank=16,
                           rngs=rngs)
        y = layer(x)  # as nnx.Linear(512, 1024)(x), through the TT-matrix cores

    Args:
      layer: the NNX layer to imitate.
      format, rank, in_shape, out_shape, contraction, init_variance, rank_dropout: as the
        attributes of `tensornets.layers.Factorized`.
      rngs: ``nnx.Rngs`` for the factors (its default or ``params`` stream) and for tensor
        dropout (a ``dropout`` stream; see the module docstring).

    Raises:
      ValueError: naming the argument, for a layer of another type, a masked conv, or
        options the Linen layer refuses (format, rank, shapes, contraction).

    The factorized formats and their initialization: see `tensornets.layers`.
    """

    def __init__(
        self,
        layer: nnx.Module,
        *,
        format: str,
        rank: Any,
        rngs: nnx.Rngs,
        in_shape: tuple[int, ...] | None = None,
        out_shape: tuple[int, ...] | None = None,
        contraction: str = "auto",
        init_variance: float | None = None,
        rank_dropout: float = 0.0,
    ):
        twin, example = _linen_twin(layer)
        module = layers.Factorized(
            twin,
            format=format,
            rank=rank,
            in_shape=in_shape,
            out_shape=out_shape,
            contraction=contraction,
            init_variance=init_variance,
            rank_dropout=rank_dropout,
        )
        super().__init__(module, rngs=rngs)
        nnx.bridge.lazy_init(self, example)

    @property
    def linen(self) -> layers.Factorized:
        """The Linen `tensornets.layers.Factorized` the layer runs (its hyperparameters)."""
        return self.to_nnx__module


def compact(layer: Factorized, rank_masks: PyTree) -> Factorized:
    """The layer with its dead components sliced out: same outputs, smaller ranks.

    `tensornets.rank.compact` of the layer's params, in a copy of the layer whose Linen
    module has the ranks of `tensornets.rank.compact_ranks`. The result computes what
    ``layer`` computes with ``apply_rank_masks(params, rank_masks)`` (up to float
    summation order). Host-side: the new shapes depend on the masks' values.

    Args:
      layer: a `Factorized`.
      rank_masks: the layer's rank mask, e.g. ``{'rank_0': bool[R0], 'rank_1': bool[R1]}``
        (`tensornets.rank.init_rank_masks` of its params).

    Returns:
      A new `Factorized` (``layer`` is unchanged).

    Raises:
      ValueError: for a ``layer`` that is not a `Factorized`, and as
        `tensornets.rank.compact` for masks that do not fit it.
    """
    if not isinstance(layer, Factorized):
        raise ValueError(f"layer must be a tensornets.nnx.Factorized, got {type(layer).__name__}")
    small = rank_lib.compact(nnx.to_pure_dict(nnx.state(layer, nnx.Param)), rank_masks)
    (ranks,) = rank_lib.compact_ranks(rank_masks).values()
    out = nnx.clone(layer)
    out.to_nnx__module = layer.linen.clone(rank=ranks)
    # The Linen layer's params are flat (factors and bias share its scope): one Param each.
    for name, value in small.items():
        setattr(out, name, nnx.Param(value))
    return out
