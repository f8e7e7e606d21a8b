"""tensornets: tensor-network factorizations (CP, Tucker, TT, TT-matrix, tubal) in JAX.

Formats are pytrees with jit-able ``from_dense`` and ``to_dense`` and a
factorized ``apply``; `tensornets.contract` plans contractions with opt_einsum and
chooses factorized vs reconstruct-then-matmul by FLOPs; `tensornets.layers`
holds Flax layers (``Factorized(nn.Dense(...), format=..., rank=...)``) and
`factorize_params` to convert a trained dense model. Importing or using it never
changes tensorly's backend or JAX's x64 flag (tensorly is not imported at all).
"""

from tensornets import contract, formats, layers
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
    Factorized,
    FactorizedConv,
    FactorizedDense,
    FactorizedEmbedding,
    balanced_factors,
    densify_params,
    factorize_params,
    factorized_dense_cost,
)

__all__ = [
    "CP",
    "FORMATS",
    "Factorized",
    "FactorizedConv",
    "FactorizedDense",
    "FactorizedEmbedding",
    "TT",
    "TTMatrix",
    "Tubal",
    "Tucker",
    "balanced_factors",
    "contract",
    "densify_params",
    "factorize_params",
    "factorized_dense_cost",
    "formats",
    "layers",
    "t_identity",
    "t_product",
    "t_svd",
    "t_transpose",
    "tubal_rank",
]
