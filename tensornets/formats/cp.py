"""CP (CANDECOMP/PARAFAC) format: a tensor as a sum of R rank-one tensors.

References:
  Carroll & Chang 1970, "Analysis of individual differences in multidimensional
  scaling via an N-way generalization of 'Eckart-Young' decomposition";
  Harshman 1970, "Foundations of the PARAFAC procedure";
  Kolda & Bader 2009, "Tensor Decompositions and Applications" (SIAM Review).

Model: X[i_1, ..., i_N] = sum_r w_r * A_1[i_1, r] * ... * A_N[i_N, r], with a
weight vector w of length R and one factor matrix A_n of shape (I_n, R) per mode.

Fitting (`CP.from_dense`) is alternating least squares (Kolda & Bader, sec. 3.4):
holding every factor but A_n fixed, the best A_n solves the normal equations
  A_n V = M_n,  V = Hadamard product over m != n of (A_m^T A_m)  (R x R),
  M_n = X_(n) (Khatri-Rao product of the other factors)  (the MTTKRP),
so A_n = M_n V^+. The MTTKRP is one einsum along an optimal path, so the
Khatri-Rao product (prod_{m != n} I_m x R) is never built. Columns are
normalized into w after every update. Initialization: the leading left singular
vectors of each unfolding (the first scaled by the singular values), as in
tensorly's ``init="svd"``. At the largest allowed rank, R = prod(shape) / max(shape),
the tensor has an exact CP with one component per fibre of its longest mode, and
the fit starts from it.
"""

from __future__ import annotations

import functools
import math
import string
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from tensornets import contract as contract_lib
from tensornets.formats import validation
from tensornets.formats.operator import ModeOperator
from tensornets.formats.single_rank import SingleRank, resolve_single_rank

__all__ = ["CP"]

_MODES = string.ascii_lowercase[:24]  # mode letters; "y" is the rank, "Z" the batch
_RANK = "y"
_BATCH = "Z"


def _unfold(x: jax.Array, mode: int) -> jax.Array:
    return jnp.moveaxis(x, mode, 0).reshape(x.shape[mode], -1)


def _compute_dtype(dtype) -> jnp.dtype:
    # Decompositions need at least float32; bf16/f16 inputs are fitted in float32.
    return jnp.result_type(dtype, jnp.float32)


@flax.struct.dataclass
class CP(SingleRank, ModeOperator):
    """A tensor in CP format.

    Attributes:
      weights: (R,) component weights w.
      factors: tuple of N factor matrices, factor n of shape (I_n, R).
    """

    weights: jax.Array
    factors: tuple[jax.Array, ...]

    # ----------------------------------------------------------------- shape
    @property
    def shape(self) -> tuple[int, ...]:
        """(I_1, ..., I_N)."""
        return tuple(int(f.shape[0]) for f in self.factors)

    @property
    def ndim(self) -> int:
        return len(self.factors)

    @property
    def rank(self) -> int:
        return int(self.weights.shape[-1])

    @staticmethod
    def num_params_for(shape: tuple[int, ...], rank: int) -> int:
        """R + R * sum(I_n)."""
        return rank + rank * sum(shape)

    @staticmethod
    def max_rank(shape: tuple[int, ...]) -> int:
        """prod(shape) / max(shape): every tensor of this shape has a CP of this rank."""
        return math.prod(shape) // max(shape)

    @classmethod
    def resolve_rank(cls, shape: Any, rank: Any) -> int:
        """Turns ``rank`` (int, 1-tuple or float fraction of prod(shape)) into an int.

        Raises:
          ValueError: for a rank <= 0 or above `max_rank`, naming the value.
        """
        shape = validation.check_shape(shape)
        return resolve_single_rank(
            shape,
            rank,
            cls.max_rank(shape),
            lambda r: cls.num_params_for(shape, r),
            what=f"a CP of shape {shape}",
            bound_name="prod(shape) / max(shape)",
        )

    # ------------------------------------------------------------ conversion
    def to_dense(self) -> jax.Array:
        """The full tensor, shape (I_1, ..., I_N)."""
        subs = [m + _RANK for m in _MODES[: self.ndim]]
        expr = _RANK + "," + ",".join(subs) + "->" + _MODES[: self.ndim]
        return contract_lib.contract(expr, self.weights, *self.factors)

    @classmethod
    def from_dense(
        cls,
        x: jax.Array,
        rank: Any,
        *,
        n_iter_max: int = 100,
        tol: float = 1e-6,
    ) -> CP:
        """Fits a rank-R CP to ``x`` by ALS with SVD initialization (jit-able, rank static).

        Args:
          x: (I_1, ..., I_N) floating array, N <= 24.
          rank: int R, a 1-tuple, or a float fraction of ``x.size`` to spend on
            parameters.
          n_iter_max: maximum number of ALS sweeps (static).
          tol: stop when the relative reconstruction error changes by less than
            this between sweeps (tensorly's criterion; its default 1e-8 is below float32
            resolution, hence 1e-6).

        Returns:
          A `CP` with unit-norm factor columns and the norms in ``weights``.

        Raises:
          ValueError: if ``rank`` is not valid for ``x.shape`` (a float above 1.0 included),
            ``x`` is not real floating or holds NaN/inf (checked when concrete),
            ``n_iter_max`` is negative or ``tol`` is not a finite number >= 0.
        """
        x = jnp.asarray(x)
        if x.ndim > len(_MODES):
            raise ValueError(f"x.ndim must be <= {len(_MODES)}, got {x.ndim}")
        validation.check_dense_input(x)
        n_iter_max = validation.check_iterations(n_iter_max, tol)
        rank = cls.resolve_rank(x.shape, rank)
        weights, factors = _cp_als(x, rank, int(n_iter_max), tol)
        return cls(weights=weights, factors=tuple(factors))

    def to_params(self) -> dict[str, jax.Array]:
        """Flat parameter dict, as the factorized layers store it."""
        params = {"weights": self.weights}
        params.update({f"factor_{n}": f for n, f in enumerate(self.factors)})
        return params

    @classmethod
    def from_params(cls, params: dict[str, jax.Array]) -> CP:
        n = sum(1 for k in params if k.startswith("factor_"))
        factors = tuple(params[f"factor_{i}"] for i in range(n))
        return cls(weights=params["weights"], factors=factors)

    # ------------------------------------------------------------- operator
    def _subscripts(self, n_in: int):
        modes = _MODES[: self.ndim]
        x_sub = _BATCH + modes[:n_in]
        factor_subs = [_RANK] + [m + _RANK for m in modes]
        return x_sub, factor_subs, modes, _BATCH + modes[n_in:]

    def _operands(self) -> list[jax.Array]:
        return [self.weights, *self.factors]


# ---------------------------------------------------------------------- ALS
def _exact_init(x: jax.Array) -> list[jax.Array]:
    """Exact CP with prod(shape)/max(shape) components: one per fibre of the longest mode."""
    longest = int(np.argmax(x.shape))
    others = [m for m in range(x.ndim) if m != longest]
    index = np.indices([x.shape[m] for m in others]).reshape(len(others), -1)
    factors = [None] * x.ndim
    factors[longest] = _unfold(x, longest)
    for k, m in enumerate(others):
        factors[m] = jnp.asarray(np.arange(x.shape[m])[:, None] == index[k][None, :], x.dtype)
    return factors


def _svd_init(x: jax.Array, rank: int) -> list[jax.Array]:
    factors = []
    key = jax.random.key(0)
    for n in range(x.ndim):
        u, s, _ = jnp.linalg.svd(_unfold(x, n), full_matrices=False)
        k = min(rank, u.shape[1])
        u = u[:, :k]
        if n == 0:
            # Put the tensor's scale into the first factor so the weights start at 1.
            u = u * s[:k]
        if k < rank:
            # More components than the unfolding has singular vectors: fill the rest
            # with small random columns (fixed key: the fit is deterministic).
            scale = jnp.sqrt(jnp.mean(u**2))
            extra = jax.random.normal(jax.random.fold_in(key, n), (u.shape[0], rank - k), x.dtype)
            u = jnp.concatenate([u, scale * extra], axis=1)
        factors.append(u)
    return factors


def _mttkrp(x: jax.Array, factors, mode: int) -> jax.Array:
    if x.ndim == 1:
        # A vector: the Khatri-Rao product of no factors is a row of ones.
        return jnp.broadcast_to(x[:, None], (x.shape[0], factors[0].shape[1]))
    modes = _MODES[: x.ndim]
    subs = [modes[m] + _RANK for m in range(x.ndim) if m != mode]
    ops = [factors[m] for m in range(x.ndim) if m != mode]
    expr = ",".join([modes, *subs]) + "->" + modes[mode] + _RANK
    return contract_lib.contract(expr, x, *ops)


@functools.partial(jax.jit, static_argnames=("rank", "n_iter_max"))
def _cp_als(x: jax.Array, rank: int, n_iter_max: int, tol: float):
    out_dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
    x = x.astype(_compute_dtype(x.dtype))
    n = x.ndim
    if n >= 3 and rank == CP.max_rank(x.shape):
        factors = _exact_init(x)
    else:
        factors = _svd_init(x, rank)
    weights = jnp.ones((rank,), x.dtype)
    norm_x = jnp.linalg.norm(x)
    safe_norm_x = jnp.where(norm_x > 0, norm_x, 1.0)

    def sweep(factors):
        grams = [f.T @ f for f in factors]
        for mode in range(n):
            v = jnp.ones((rank, rank), x.dtype)
            for m in range(n):
                if m != mode:
                    v = v * grams[m]
            m_n = _mttkrp(x, factors, mode)
            a = m_n @ jnp.linalg.pinv(v, hermitian=True)
            weights = jnp.linalg.norm(a, axis=0)
            factors = list(factors)
            factors[mode] = a / jnp.where(weights > 0, weights, 1.0)
            grams[mode] = factors[mode].T @ factors[mode]
        # The residual is formed explicitly: the cheaper identity ||X||^2 - 2<X, Xhat> +
        # ||Xhat||^2 cancels catastrophically in float32 near a good fit, and its jitter
        # would keep the stopping test from ever firing.
        modes = _MODES[:n]
        expr = _RANK + "," + ",".join(m + _RANK for m in modes) + "->" + modes
        x_hat = contract_lib.contract(expr, weights, *factors)
        return factors, weights, jnp.linalg.norm(x - x_hat) / safe_norm_x

    def cond(state):
        _, _, it, prev, err = state
        return (it < n_iter_max) & ((it < 2) | (jnp.abs(prev - err) >= tol))

    def body(state):
        factors, _, it, _, err = state
        factors, weights, new_err = sweep(factors)
        return factors, weights, it + 1, err, new_err

    inf = jnp.asarray(jnp.inf, x.dtype)
    state = (factors, weights, jnp.asarray(0), inf, inf)
    if n_iter_max > 0:
        factors, weights, _, _, _ = jax.lax.while_loop(cond, body, state)
    return weights.astype(out_dtype), [f.astype(out_dtype) for f in factors]
