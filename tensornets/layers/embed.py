"""The factorized embedding table: a TT-matrix or a low-rank matrix, looked up row by row.

TT-matrix (Hrinchuk, Khrulkov, Mirvakhabova, Orlova & Oseledets 2020, "Tensorized
Embedding Layers"; the TT-matrix of Novikov et al. 2015): a lookup multiplies the
core slices picked by the index's digits. Low rank (the factorized embedding
parametrization of Lan et al. 2020, "ALBERT"): E = A diag(w) B^T with A (V, r) and
B (D, r), so a lookup is a row of A times diag(w) B^T. Either way the table (V, D) is
never built.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype
from flax.linen.linear import default_embed_init

from tensornets.formats import validation
from tensornets.formats.cp import CP
from tensornets.layers.layouts import embed_layout, format_of
from tensornets.layers.params import Initializer, init_factors, masked_factors
from tensornets.layers.spec import canonical_format

__all__ = ["FactorizedEmbedding"]


class FactorizedEmbedding(nn.Module):
    """An embedding table (num_embeddings, features) in TT-matrix or low-rank format.

    Attributes:
      num_embeddings: vocabulary size V (= prod(in_shape) for the TT-matrix).
      features: embedding size D (= prod(out_shape) for the TT-matrix).
      rank: TT bond ranks (int cap, tuple, or float fraction of V * D); low_rank:
        r <= min(V, D), or a float fraction of V * D.
      in_shape, out_shape: TT-matrix only: factorizations of V and D (default 3
        balanced factors).
      dtype, param_dtype: as in ``nn.Embed``.
      embedding_init: the dense initializer whose second moment the table matches
        (default Flax's, variance 1/D).
      init_variance: explicit target E[E_ij^2].
      format: "tt_matrix" (or "tt", the same) or "low_rank".

    ``__call__``: int (...) -> (..., D). ``attend``: (..., D) -> (..., V) logits.
    """

    num_embeddings: int
    features: int
    rank: Any
    in_shape: tuple[int, ...] | None = None
    out_shape: tuple[int, ...] | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    embedding_init: Initializer | None = default_embed_init
    init_variance: float | None = None
    format: str = "tt_matrix"

    def setup(self):
        fmt = canonical_format(self.format, "embed")
        v = validation.check_int_rank(self.num_embeddings, "num_embeddings")
        d = validation.check_int_rank(self.features, "features")
        self._layout = embed_layout(fmt, v, d, self.rank, self.in_shape, self.out_shape)
        self._factors = init_factors(
            self, self._layout, self.embedding_init, default_embed_init, 1.0 / d, (v, d)
        )

    def _table(self):
        """The table as a format object (`TTMatrix`, or `CP` of the (V, D) matrix)."""
        factors = masked_factors(self, dict(self._factors), 0.0)
        names = list(factors)
        leaves = promote_dtype(*factors.values(), dtype=self.dtype)
        return format_of(self._layout, dict(zip(names, leaves)))

    def __call__(self, inputs: jax.Array) -> jax.Array:
        if not jnp.issubdtype(inputs.dtype, jnp.integer):
            raise ValueError(f"inputs must be integers, got dtype {inputs.dtype}")
        table = self._table()
        if isinstance(table, CP):
            rows, cols = table.factors
            picked = jnp.take(rows, inputs, axis=0)  # (..., r)
            return jnp.einsum("...r,r,dr->...d", picked, table.weights, cols)
        return table.take(inputs)

    def attend(self, query: jax.Array) -> jax.Array:
        """Logits ``query @ E^T`` (weight tying), shape (..., num_embeddings)."""
        table = self._table()
        (query,) = promote_dtype(query, dtype=self.dtype)
        if isinstance(table, CP):
            rows, cols = table.factors
            return CP(weights=table.weights, factors=(cols, rows)).apply(query, 1)  # E^T
        return table.apply(query, transpose=True)
