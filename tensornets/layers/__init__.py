"""Factorized Flax (Linen) layers: dense, convolution and embedding, and a wrapper.

Every layer stores the factors of its weight as flat parameters (``factor_0``,
``core``, ``core_0``, ``weights`` ... next to ``bias``) and computes its output
from them without materializing the weight (except when that is cheaper: dense
layers pick by FLOPs, see `tensornets.contract`).

Formats (`FORMATS`; which layer takes which: `LAYER_FORMATS`):
  ``"cp"``        CP of the kernel reshaped to in_shape + out_shape.
  ``"tucker"``    Tucker of the same tensor (conv: Tucker-2 over the channels).
  ``"tt"``        TT of the same tensor (conv: TT-matrix, see `tensornets.layers.conv`).
  ``"tt_matrix"`` TT-matrix with factorized input and output dims (Novikov et al.
                  2015); ``in_shape`` / ``out_shape`` default to 3 balanced factors.
  ``"tubal"``     dense layers only: a t-product layer (Newman, Horesh, Avron &
                  Kilmer 2018, "Stable Tensor Neural Networks for Rapid Deep
                  Learning"). The input (n2 * n3,) is a lateral slice (n2, 1, n3) of
                  tubes, the output is W * x (n1, 1, n3) for a weight tensor W
                  (n1, n2, n3) kept as a truncated t-SVD U * diag(s) * V^T (Kilmer &
                  Martin 2011) of tubal rank k: (n1 + n2 + 1) k n3 parameters.
                  ``in_shape=(n2, n3)``, ``out_shape=(n1, n3)`` (same tube length
                  n3); by default n3 is the largest common divisor of the two
                  dimensions that is at most sqrt(min(in, features)). As a matrix the
                  layer's kernel is block-circulant, K[(j, s), (i, t)] =
                  W[i, j, (t - s) mod n3], so even at full tubal rank it is a
                  structured (n3 times smaller) dense layer, not an arbitrary one;
                  a float rank is a fraction of in * features, capped there.
  ``"low_rank"``  dense layers and embeddings: the matrix itself (no in_shape /
                  out_shape) as W = U diag(w) V^T, U (in, r), V (out, r), w (r,):
                  a 2-factor CP (params ``factor_0``, ``factor_1``, ``weights``),
                  r (in + out + 1) parameters, exact for any matrix at
                  r = min(in, out).

Modules: `spec` (format names, the factorize spec and its validation), `layouts`
(factor shapes and ranks), `params` (the variance-preserving initialization, rank
masks, tensor dropout), `dense`, `conv`, `embed`, `wrapper` (`Factorized`),
`conversion` (`factorize_params`, `densify_params`) and `tubal` (the t-product
layer's kernel).
"""

from tensornets.layers.conv import FactorizedConv
from tensornets.layers.conversion import densify_params, factorize_params
from tensornets.layers.dense import FactorizedDense, factorized_dense_cost
from tensornets.layers.embed import FactorizedEmbedding
from tensornets.layers.layouts import balanced_factors
from tensornets.layers.spec import (
    FORMATS,
    LAYER_FORMATS,
    LAYER_KEYS,
    SPEC_KEYS,
    check_factorize_spec,
)
from tensornets.layers.wrapper import Factorized

__all__ = [
    "FORMATS",
    "Factorized",
    "FactorizedConv",
    "FactorizedDense",
    "FactorizedEmbedding",
    "LAYER_FORMATS",
    "LAYER_KEYS",
    "SPEC_KEYS",
    "balanced_factors",
    "check_factorize_spec",
    "densify_params",
    "factorize_params",
    "factorized_dense_cost",
]
