"""Contraction planning: optimal einsum paths, FLOP counts, factorized vs dense.

A factorized linear map y = x W, with W given by factors F_1..F_k, can be applied
two ways:

* **factorized**: contract ``x`` with the factors directly along an optimal path
  (never building W);
* **dense**: reconstruct W from its factors, then one matmul.

Which is cheaper depends on the batch size: reconstruction costs a fixed amount
per call, the factorized path costs per example. `choose_method` compares the
FLOP counts of both plans (``"auto"``), or obeys an explicit override. With the
exhaustive planner the factorized count never exceeds the dense one (multiplying
the factors first is one of the orders it searches, and it takes that order when
it is cheaper), so ``"auto"`` resolves to ``"factorized"`` whenever the search is
exhaustive. ``"dense"`` stays as an override because FLOPs are not time (one large
GEMM can beat several thin contractions on matrix hardware); on a 2-core CPU it
never won: benchmarks/factorized_layers.py measured it 1.1x-18x slower than "factorized".

Paths come from opt_einsum (Smith & Gray 2018, "opt_einsum - A Python package for
optimizing contraction order for einsum-like expressions"): exhaustive search
(``"optimal"``) for up to 7 operands, dynamic programming (``"dp"``, also optimal
for FLOPs) beyond. Planning uses shapes only, is cached, and happens at trace
time, so it adds nothing to a jitted step. FLOPs follow opt_einsum's convention:
a multiply-add counts as 2 (a (m,k)x(k,n) matmul is 2mkn).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import opt_einsum

__all__ = [
    "METHODS",
    "ContractionPlan",
    "choose_method",
    "contract",
    "factorized_apply",
    "factorized_apply_costs",
    "matmul_flops",
    "plan",
]

METHODS = ("auto", "factorized", "dense")


class ContractionPlan(NamedTuple):
    """An einsum contraction order and its cost.

    Attributes:
      subscripts: the einsum expression, with an explicit ``->`` output.
      path: pairwise contraction order (opt_einsum format), usable as
        ``jnp.einsum(..., optimize=path)``.
      flops: floating-point operations along ``path`` (multiply-add = 2).
      largest_intermediate: number of elements of the largest intermediate tensor.
    """

    subscripts: str
    path: tuple[tuple[int, ...], ...]
    flops: int
    largest_intermediate: int


def _strategy(num_operands: int, optimize: str) -> str:
    if optimize != "optimal":
        return optimize
    # Exhaustive search is factorial in the operand count; dp is also optimal for
    # FLOPs and polynomial, so switch to it for larger networks.
    return "optimal" if num_operands <= 7 else "dp"


@functools.lru_cache(maxsize=4096)
def _plan_cached(subscripts: str, shapes: tuple[tuple[int, ...], ...], optimize: str):
    if len(shapes) == 1:
        # A single operand (a transpose or a trace) has no pairwise order.
        size = math.prod(shapes[0])
        return ContractionPlan(subscripts, ((0,),), int(size), int(size))
    path, info = opt_einsum.contract_path(
        subscripts, *shapes, shapes=True, optimize=_strategy(len(shapes), optimize)
    )
    return ContractionPlan(
        subscripts,
        tuple(tuple(p) for p in path),
        int(info.opt_cost),
        int(info.largest_intermediate),
    )


def plan(subscripts: str, *shapes: Sequence[int], optimize: str = "optimal") -> ContractionPlan:
    """Plans an einsum contraction from operand shapes alone.

    Args:
      subscripts: einsum expression with an explicit output, e.g. ``"ab,bc->ac"``.
      *shapes: one shape per operand.
      optimize: ``"optimal"`` (default: exhaustive up to 7 operands, dp beyond),
        or any opt_einsum strategy name (``"greedy"``, ``"dp"``, ...).

    Returns:
      A `ContractionPlan` with the path and its FLOP count.
    """
    if "->" not in subscripts:
        raise ValueError(f"subscripts must have an explicit output ('->'), got {subscripts!r}")
    return _plan_cached(subscripts, tuple(tuple(int(d) for d in s) for s in shapes), optimize)


def contract(
    subscripts: str, *operands: jax.Array, optimize: str = "optimal", precision=None
) -> jax.Array:
    """``jnp.einsum`` along the path chosen by `plan` (planned at trace time)."""
    p = plan(subscripts, *(jnp.shape(o) for o in operands), optimize=optimize)
    if len(operands) == 1:
        return jnp.einsum(subscripts, operands[0], precision=precision)
    return jnp.einsum(subscripts, *operands, optimize=list(p.path), precision=precision)


def matmul_flops(batch: int, n_in: int, n_out: int) -> int:
    """FLOPs of a dense ``(batch, n_in) @ (n_in, n_out)`` matmul: ``2 * batch * n_in * n_out``."""
    return 2 * batch * n_in * n_out


def choose_method(factorized_flops: int, dense_flops: int, method: str = "auto") -> str:
    """Resolves ``method`` to ``"factorized"`` or ``"dense"``.

    ``"auto"`` picks the one with fewer FLOPs (factorized on ties, since it never
    materializes the weight); the other two values force a method.

    Raises:
      ValueError: if ``method`` is not one of `METHODS`.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method != "auto":
        return method
    return "factorized" if factorized_flops <= dense_flops else "dense"


def _einsum_parts(x_sub: str, factor_subs: Sequence[str], w_sub: str, out_sub: str):
    factorized = ",".join([x_sub, *factor_subs]) + "->" + out_sub
    reconstruct = ",".join(factor_subs) + "->" + w_sub
    matmul = f"{x_sub},{w_sub}->{out_sub}"
    return factorized, reconstruct, matmul


def factorized_apply_costs(
    x_shape: Sequence[int],
    x_sub: str,
    factor_subs: Sequence[str],
    factor_shapes: Sequence[Sequence[int]],
    w_sub: str,
    out_sub: str,
) -> dict[str, int]:
    """FLOPs of applying a factorized weight both ways.

    Args:
      x_shape: shape of the input, subscripted by ``x_sub``.
      x_sub: subscripts of the input (batch letters, then input-mode letters).
      factor_subs: subscripts of each factor.
      factor_shapes: shapes of the factors.
      w_sub: subscripts of the reconstructed weight (input modes, then output modes).
      out_sub: subscripts of the output.

    Returns:
      ``{"factorized": f, "reconstruct": r, "matmul": m, "dense": r + m}``.
    """
    factorized, reconstruct, matmul = _einsum_parts(x_sub, factor_subs, w_sub, out_sub)
    f = plan(factorized, x_shape, *factor_shapes).flops
    r = plan(reconstruct, *factor_shapes).flops
    sizes = dict(zip(x_sub, x_shape))
    for sub, shape in zip(factor_subs, factor_shapes):
        sizes.update(zip(sub, shape))
    m = plan(matmul, x_shape, [sizes[c] for c in w_sub]).flops
    return {"factorized": f, "reconstruct": r, "matmul": m, "dense": r + m}


def factorized_apply(
    x: jax.Array,
    x_sub: str,
    factor_subs: Sequence[str],
    factors: Sequence[jax.Array],
    w_sub: str,
    out_sub: str,
    method: str = "auto",
    precision=None,
) -> jax.Array:
    """Applies a factorized weight to ``x``, factorized or reconstruct-then-matmul.

    Args:
      x: input; see `factorized_apply_costs` for the subscripts.
      x_sub, factor_subs, w_sub, out_sub: einsum subscripts.
      factors: the factor arrays.
      method: ``"auto"`` (fewer FLOPs), ``"factorized"`` or ``"dense"``.
      precision: passed to ``jnp.einsum``.

    Returns:
      The contraction, subscripted by ``out_sub``.
    """
    costs = factorized_apply_costs(
        jnp.shape(x), x_sub, factor_subs, [jnp.shape(f) for f in factors], w_sub, out_sub
    )
    factorized, reconstruct, matmul = _einsum_parts(x_sub, factor_subs, w_sub, out_sub)
    if choose_method(costs["factorized"], costs["dense"], method) == "factorized":
        return contract(factorized, x, *factors, precision=precision)
    w = contract(reconstruct, *factors, precision=precision)
    return contract(matmul, x, w, precision=precision)
