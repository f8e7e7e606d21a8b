"""tensornets: tensor-network factorizations (CP, Tucker, TT, TT-matrix, tubal) in JAX.

Formats are pytrees with jit-able ``from_dense`` and ``to_dense`` and a
factorized ``apply``; `tensornets.contract` plans contractions with opt_einsum and
chooses factorized vs reconstruct-then-matmul by FLOPs; `tensornets.layers`
holds Flax layers (``Factorized(nn.Dense(...), format=..., rank=...)``) and
`factorize_params` to convert a trained dense model, `tensornets.nnx` the same
layers for Flax NNX models; `tensornets.rank` holds rank masks and `compact`,
`tensornets.adaptive` rank-adaptive training (spectral truncation, greedy growth)
and `tensornets.regularizers` tensor dropout.
Importing or using it never changes tensorly's backend or JAX's x64 flag
(tensorly is not imported at all).
"""

from tensornets import adaptive, contract, formats, layers, nnx, rank, regularizers, sltrain
from tensornets.adaptive import GreedyGrowth, SpectralTruncation
from tensornets.formats import (
    CP,
    TT,
    TTMatrix,
    Tubal,
    Tucker,
    t_identity,
    t_product,
    t_svd,
    t_transpose,
    tubal_rank,
)
from tensornets.layers import (
    FORMATS,
    LAYER_FORMATS,
    LAYER_KEYS,
    SPEC_KEYS,
    Factorized,
    FactorizedConv,
    FactorizedDense,
    FactorizedEmbedding,
    balanced_factors,
    check_factorize_spec,
    densify_params,
    factorize_params,
    factorized_dense_cost,
)
from tensornets.rank import (
    apply_rank_masks,
    compact,
    compact_ranks,
    init_rank_masks,
    num_live_params,
    param_masks,
)
from tensornets.regularizers import tensor_dropout

__all__ = [
    "CP",
    "FORMATS",
    "Factorized",
    "FactorizedConv",
    "FactorizedDense",
    "FactorizedEmbedding",
    "GreedyGrowth",
    "LAYER_FORMATS",
    "LAYER_KEYS",
    "SPEC_KEYS",
    "SpectralTruncation",
    "TT",
    "TTMatrix",
    "Tubal",
    "Tucker",
    "adaptive",
    "apply_rank_masks",
    "balanced_factors",
    "check_factorize_spec",
    "compact",
    "compact_ranks",
    "contract",
    "densify_params",
    "factorize_params",
    "factorized_dense_cost",
    "formats",
    "init_rank_masks",
    "layers",
    "nnx",
    "num_live_params",
    "param_masks",
    "rank",
    "regularizers",
    "sltrain",
    "t_identity",
    "t_product",
    "t_svd",
    "t_transpose",
    "tensor_dropout",
    "tubal_rank",
]
