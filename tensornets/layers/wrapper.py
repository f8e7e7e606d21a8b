"""`Factorized`: wraps an ``nn.Dense``, ``nn.Conv`` or ``nn.Embed``; same call, factors."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax

from tensornets.layers.conv import FactorizedConv
from tensornets.layers.dense import FactorizedDense
from tensornets.layers.embed import FactorizedEmbedding
from tensornets.layers.spec import canonical_format, check_contraction, check_rank_dropout

__all__ = ["Factorized"]

# (the dense layer, its kind in `tensornets.layers.LAYER_FORMATS`, the factorized layer)
_IMPLEMENTATIONS = (
    (nn.Dense, "dense", FactorizedDense),
    (nn.Conv, "conv", FactorizedConv),
    (nn.Embed, "embed", FactorizedEmbedding),
)
_MODULE_FIELDS = frozenset({"parent", "name"})


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)} - _MODULE_FIELDS


def _factorized_like(module: nn.Module, options: dict[str, Any]) -> nn.Module:
    """The factorized layer for ``module``, with its hyperparameters and ``options``.

    Every attribute the factorized layer shares with the wrapped one (features,
    kernel size, strides, padding, dilations, groups, bias, dtypes, initializers) is
    copied; of ``options`` (the wrapper's own attributes), those the layer has.
    """
    found = [(kind, cls) for base, kind, cls in _IMPLEMENTATIONS if isinstance(module, base)]
    if not found:
        raise ValueError(
            f"module must be an nn.Dense, nn.Conv or nn.Embed, got {type(module).__name__}"
        )
    ((kind, cls),) = found
    options = {**options, "format": canonical_format(options["format"], kind)}
    contraction = check_contraction(options["contraction"])
    if kind != "dense" and contraction != "auto":
        # Only the dense layer chooses how to contract; elsewhere the value would be ignored.
        raise ValueError(
            f"contraction={contraction!r} is for dense layers (nn.Dense) only; "
            f"{type(module).__name__} takes only the default 'auto'"
        )
    check_rank_dropout(options["rank_dropout"])
    # Only nn.Conv has a mask; asking another bound module for an attribute it lacks would
    # run its setup (nn.Embed's declares its table).
    if kind == "conv" and module.mask is not None:
        raise ValueError("module.mask is not supported: a masked conv has no factorization")
    fields = _field_names(cls)
    if options["rank_dropout"] and "rank_dropout" not in fields:
        raise ValueError(
            f"rank_dropout={options['rank_dropout']!r} is for cp / tucker, not embeddings"
        )
    copied = {name: getattr(module, name) for name in fields & _field_names(type(module))}
    return cls(**copied, **{k: v for k, v in options.items() if k in fields}, parent=None)


class Factorized(nn.Module):
    """Wraps an ``nn.Dense``, ``nn.Conv`` or ``nn.Embed``; same call, factorized params.

    The wrapped module only supplies its hyperparameters (features, kernel size,
    strides, padding, dilations, groups, bias, dtypes, initializers); it is never
    called and owns no parameters. The factors live directly under this module
    (no extra nesting), named as in `FactorizedDense` / `FactorizedConv` /
    `FactorizedEmbedding`.

    Example::

        layer = Factorized(nn.Dense(1024), format="tt_matrix", rank=16)
        y = layer.apply(layer.init(key, x), x)       # same as nn.Dense(1024)(x)

    Attributes:
      module: the dense layer to imitate.
      format: see `tensornets.layers.LAYER_FORMATS` for what each layer takes
        (dense: all of `FORMATS`; conv: cp, tucker, tt / tt_matrix; embeddings:
        tt / tt_matrix, low_rank).
      rank: int, tuple or float fraction of the dense parameter count.
      in_shape, out_shape: factorizations (see the factorized layers).
      contraction: dense layers only: "auto" | "factorized" | "dense" (a conv or an
        embedding takes only "auto").
      init_variance: explicit target second moment of the reconstructed weight.
      rank_dropout: tensor dropout rate for cp / low_rank / tucker (a "dropout" rng
        turns it on).
    """

    module: nn.Module
    format: str
    rank: Any
    in_shape: tuple[int, ...] | None = None
    out_shape: tuple[int, ...] | None = None
    contraction: str = "auto"
    init_variance: float | None = None
    rank_dropout: float = 0.0

    def setup(self):
        options = {name: getattr(self, name) for name in _field_names(Factorized) - {"module"}}
        self.impl = _factorized_like(self.module, options)
        nn.share_scope(self, self.impl)

    def __call__(self, inputs: jax.Array) -> jax.Array:
        return self.impl(inputs)

    def attend(self, query: jax.Array) -> jax.Array:
        """``nn.Embed.attend`` for a wrapped embedding."""
        if not isinstance(self.impl, FactorizedEmbedding):
            raise ValueError("attend is only defined for a wrapped nn.Embed")
        return self.impl.attend(query)
