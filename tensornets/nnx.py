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
- **Conversion of trained layers.** `factorize` decomposes a trained ``nnx.Linear`` /
  ``nnx.Conv`` / ``nnx.Embed`` into a `Factorized` layer with the Linen conversion,
  `tensornets.layers.factorize_params` (Lebedev et al. 2015's decompose-then-fine-tune);
  `factorize_model` does it for the layers a factorize spec names, in a copy of the model.

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

from sparsejax import nnx as sparse_nnx
from tensornets import layers
from tensornets import rank as rank_lib

PyTree = Any

__all__ = ["Factorized", "compact", "factorize", "factorize_model"]

# The NNX layer types and their kinds in `tensornets.layers.LAYER_FORMATS`.
_KINDS = ((nnx.Linear, "dense"), (nnx.Conv, "conv"), (nnx.Embed, "embed"))


def _linen_twin(layer: nnx.Module) -> tuple[nn.Module, jax.Array]:
    """The Linen layer with ``layer``'s hyperparameters, and an example input for init."""
    if isinstance(layer, nnx.Linear):
        return sparse_nnx.linen_twin(layer), jnp.zeros((1, layer.in_features), layer.param_dtype)
    if isinstance(layer, nnx.Conv):
        if layer.mask is not None:
            raise ValueError("layer.mask is not supported: a masked conv has no factorization")
        twin = sparse_nnx.linen_twin(layer)
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


def _kind(layer: Any) -> str | None:
    return next((kind for cls, kind in _KINDS if isinstance(layer, cls)), None)


def factorize(
    layer: nnx.Linear | nnx.Conv | nnx.Embed,
    *,
    format: str,
    rank: Any,
    rngs: nnx.Rngs | None = None,
    in_shape: tuple[int, ...] | None = None,
    out_shape: tuple[int, ...] | None = None,
    contraction: str = "auto",
    init_variance: float | None = None,
    rank_dropout: float = 0.0,
    n_iter_max: int = 100,
) -> Factorized:
    """A `Factorized` layer whose factors are decomposed from ``layer``'s trained weights.

    The NNX form of `tensornets.layers.factorize_params` (which does the decomposition):
    the kernel (or embedding table) is fitted at the ranks the `Factorized` layer
    resolves (CP and low_rank: ALS from the truncated SVD, Tucker: HOOI, TT and
    TT-matrix: TT-SVD, tubal: the truncated t-SVD), the bias is copied, and the result is
    ready for fine-tuning. At full rank it computes what ``layer`` computes (up to float
    error); below, low_rank is the truncated SVD (Eckart & Young's best approximation).
    ``layer`` is not changed. Runs eagerly.

    Args:
      layer: the trained ``nnx.Linear``, ``nnx.Conv`` (no ``mask``) or ``nnx.Embed``.
      format, rank, in_shape, out_shape, contraction, init_variance, rank_dropout: as for
        `Factorized`.
      rngs: the layer's ``nnx.Rngs`` (a ``dropout`` stream turns tensor dropout on); None
        gives ``nnx.Rngs(0)``: the factors come from ``layer``, not from the stream.
      n_iter_max: iterations of the ALS / HOOI fits (CP, low_rank, Tucker).

    Returns:
      A new `Factorized`.

    Raises:
      ValueError: naming the argument, as `Factorized` (layer type, format, rank,
        shapes) and `tensornets.layers.factorize_params`.

    References: Lebedev et al., "Speeding-up Convolutional Neural Networks Using
    Fine-tuned CP-Decomposition", 2015; Kim et al., "Compression of Deep Convolutional
    Neural Networks for Fast and Low Power Mobile Applications", 2016 (Tucker-2);
    Novikov et al., "Tensorizing Neural Networks", 2015 (TT-matrix); Oseledets,
    "Tensor-Train Decomposition", 2011 (TT-SVD).
    """
    kind = _kind(layer)
    out = Factorized(
        layer,
        format=format,
        rank=rank,
        rngs=nnx.Rngs(0) if rngs is None else rngs,
        in_shape=in_shape,
        out_shape=out_shape,
        contraction=contraction,
        init_variance=init_variance,
        rank_dropout=rank_dropout,
    )
    if kind == "embed":
        node = {"embedding": layer.embedding[...]}
    else:
        node = {"kernel": layer.kernel[...]}
        if layer.bias is not None:
            node["bias"] = layer.bias[...]
    entry = {"format": format, "rank": rank, "kind": kind, "n_iter_max": n_iter_max}
    given = {"in_shape": in_shape, "out_shape": out_shape}
    entry.update({k: v for k, v in given.items() if v is not None})
    if kind == "conv":
        entry["feature_group_count"] = layer.feature_group_count
    factors = layers.factorize_params({"layer": node}, {"layer": entry})["layer"]
    state = nnx.state(out, nnx.Param)
    initial = nnx.to_pure_dict(state)
    # The same layout functions resolve the ranks of both; a mismatch would be a bug here.
    shapes, wanted = jax.tree.map(jnp.shape, factors), jax.tree.map(jnp.shape, initial)
    if shapes != wanted:
        raise AssertionError(f"factors {shapes} do not fit the layer's params {wanted}")
    nnx.replace_by_pure_dict(
        state, jax.tree.map(lambda new, old: new.astype(old.dtype), factors, initial)
    )
    nnx.update(out, state)
    return out


def _set_child(model: nnx.Module, path: tuple[Any, ...], child: nnx.Module) -> None:
    """Puts ``child`` at ``path`` (attribute names, ``nnx.List`` / ``nnx.Dict`` keys)."""
    parent = model
    for key in path[:-1]:
        parent = parent[key] if isinstance(key, int) else getattr(parent, key)
    if isinstance(path[-1], int) or isinstance(parent, (nnx.Dict, dict, list)):
        parent[path[-1]] = child
    else:
        setattr(parent, path[-1], child)


def factorize_model(model: nnx.Module, spec: Any, *, rngs: nnx.Rngs | None = None) -> nnx.Module:
    """A copy of ``model`` whose layers named in ``spec`` are factorized (`factorize`).

    The NNX form of ``factorize_params`` on a whole model: each path of ``spec`` names an
    ``nnx.Linear`` / ``nnx.Conv`` / ``nnx.Embed`` of ``model`` (its attribute path joined
    by '/', ``'layers/0'`` for an ``nnx.List`` item), replaced in a copy by
    ``factorize(layer, **entry)``. ``model`` is not changed (``nnx.clone``, as
    `compact` and ``sparsejax.nnx_sparse.export_model`` do). Runs eagerly.

    Args:
      model: the trained NNX model.
      spec: ``{"path": {"format": ..., "rank": ..., optional "in_shape", "out_shape",
        "contraction", "init_variance", "rank_dropout", "n_iter_max"}}``
        (`tensornets.layers.check_factorize_spec`; "kind", "feature_group_count" and
        "kernel_size" come from the layer itself, and a layer keeps its path, so "to"
        does not apply).
      rngs: for the new layers, as for `factorize`.

    Returns:
      The model with factorized layers.

    Raises:
      ValueError: for a ``model`` that is not an ``nnx.Module``, a ``spec`` path that is
        not one of its layers (listing them), unknown spec keys, and as `factorize`.
    """
    if not isinstance(model, nnx.Module):
        raise ValueError(f"model must be an nnx.Module, got model={type(model).__name__}")
    out = nnx.clone(model)
    found = {
        "/".join(str(k) for k in path): (tuple(path), node)
        for path, node in nnx.iter_graph(out)
        if path and _kind(node) is not None
    }
    spec = layers.check_factorize_spec(
        spec,
        keys=(*layers.LAYER_KEYS, "n_iter_max"),
        kinds={name: _kind(node) for name, (_, node) in found.items()},
    )
    for name, entry in spec.items():
        path, layer = found[name]
        try:
            new = factorize(layer, rngs=rngs, **entry)
        except ValueError as err:
            raise ValueError(f"spec[{name!r}]: {err}") from None
        _set_child(out, path, new)
    return out
