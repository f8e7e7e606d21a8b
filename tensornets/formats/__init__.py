"""Tensor formats, one module each: CP, Tucker, TT / TT-matrix, tubal (t-SVD).

Every format is a registered pytree (factors are leaves, static metadata is not)
with ``to_dense()``, a jit-able ``from_dense(x, rank, ...)`` (ranks are static),
``num_params``, ``ranks``, ``apply`` (the factorized operator applied to an input
without materializing it) and ``flops``.
"""

from tensornets.formats.cp import CP
from tensornets.formats.tt import TT, TTMatrix
from tensornets.formats.tubal import Tubal, t_identity, t_product, t_svd, t_transpose, tubal_rank
from tensornets.formats.tucker import Tucker

__all__ = [
    "CP",
    "TT",
    "TTMatrix",
    "Tubal",
    "Tucker",
    "t_identity",
    "t_product",
    "t_svd",
    "t_transpose",
    "tubal_rank",
]
