"""Tucker format: a small core tensor multiplied by a factor matrix along each mode.

Reference: De Lathauwer, De Moor & Vandewalle 2000, "A Multilinear Singular Value
Decomposition" (HOSVD) and "On the Best Rank-1 and Rank-(R1, R2, ..., RN)
Approximation of Higher-Order Tensors" (HOOI); Kolda & Bader 2009, sec. 4.

Model: X = G x_1 U_1 x_2 U_2 ... x_N U_N, i.e.
  X[i_1..i_N] = sum_{r_1..r_N} G[r_1..r_N] U_1[i_1, r_1] ... U_N[i_N, r_N],
with a core G of shape (R_1, ..., R_N) and factors U_n of shape (I_n, R_n).
A *partial* Tucker factorizes only some ``modes`` (the core keeps the other
dimensions whole): Tucker-2 of a conv kernel (Kim et al. 2016) factorizes just
the two channel modes.

Fitting (`Tucker.from_dense`): HOSVD takes U_n = the R_n leading left singular
vectors of the mode-n unfolding X_(n). HOOI then alternates: with the other
factors fixed, U_n = leading left singular vectors of (X x_{m != n} U_m^T)_(n),
which maximizes ||G||; since the factors are orthonormal,
||X - Xhat||^2 = ||X||^2 - ||G||^2 and the error never increases. Finally
G = X x_n U_n^T for every factorized mode.
"""

from __future__ import annotations

import functools
import math
import string
from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from tensornets import contract as contract_lib
from tensornets.formats import validation
from tensornets.formats.operator import ModeOperator

__all__ = ["Tucker"]

_MODES = string.ascii_lowercase[:24]
_RANKS = string.ascii_uppercase[:24]
_BATCH = "Z"


def _unfold(x: jax.Array, mode: int) -> jax.Array:
    return jnp.moveaxis(x, mode, 0).reshape(x.shape[mode], -1)


def _check_modes(modes: Any, ndim: int) -> tuple[int, ...]:
    if modes is None:
        return tuple(range(ndim))
    out = tuple(int(m) % ndim if -ndim <= int(m) < ndim else -1 for m in modes)
    if not out or any(m < 0 for m in out) or len(set(out)) != len(out):
        raise ValueError(f"modes must be distinct axes of a {ndim}-d tensor, got {modes!r}")
    return tuple(sorted(out))


def _core_dims(shape, ranks, modes):
    dims = list(shape)
    for m, r in zip(modes, ranks):
        dims[m] = r
    return dims


@flax.struct.dataclass
class Tucker(ModeOperator):
    """A tensor in (partial) Tucker format.

    Attributes:
      core: G, shape (R_1, ..., R_N), with R_n = I_n for the modes not factorized.
      factors: one (I_n, R_n) matrix per factorized mode, in the order of ``modes``.
      modes: the factorized modes (static), sorted; all modes for a full Tucker.
    """

    core: jax.Array
    factors: tuple[jax.Array, ...]
    modes: tuple[int, ...] = flax.struct.field(pytree_node=False, default=None)

    def __post_init__(self):
        if self.modes is None:
            object.__setattr__(self, "modes", tuple(range(len(self.factors))))

    @property
    def shape(self) -> tuple[int, ...]:
        dims = list(self.core.shape[-self.ndim :])
        for m, f in zip(self.modes, self.factors):
            dims[m] = int(f.shape[-2])
        return tuple(dims)

    @property
    def ndim(self) -> int:
        return self.core.ndim

    @property
    def ranks(self) -> tuple[int, ...]:
        """(R_n for n in modes)."""
        return tuple(int(f.shape[-1]) for f in self.factors)

    @property
    def num_params(self) -> int:
        """prod(core.shape) + sum(I_n * R_n)."""
        return self.num_params_for(self.shape, self.ranks, self.modes)

    @staticmethod
    def num_params_for(shape, ranks, modes=None) -> int:
        modes = tuple(range(len(shape))) if modes is None else tuple(modes)
        core = math.prod(_core_dims(shape, ranks, modes))
        return core + sum(shape[m] * r for m, r in zip(modes, ranks))

    @classmethod
    def resolve_ranks(cls, shape: Any, rank: Any, modes: Sequence[int] | None = None):
        """Turns ``rank`` into one int per factorized mode.

        Args:
          shape: the tensor shape.
          rank: an int (a cap applied to every factorized mode), a tuple with one
            rank per factorized mode, or a float fraction of prod(shape) to spend on
            parameters (largest uniform cap that fits).
          modes: factorized modes (default: all).

        Returns:
          (R_n for n in modes), each R_n <= I_n and R_n <= prod of the other core dims
          (a larger R_n could not be filled by the unfolding's singular vectors).

        Raises:
          ValueError: for ranks <= 0, a tuple entry above its limit, or an int
            larger than every mode allows.
        """
        shape = validation.check_shape(shape)
        modes = _check_modes(modes, len(shape))
        limits = [shape[m] for m in modes]

        def capped(r: int) -> tuple[int, ...]:
            ranks = [min(r, lim) for lim in limits]
            # Each R_n is bounded by the product of the other core dims; shrink until
            # consistent (terminates: ranks only decrease and stay >= 1).
            changed = True
            while changed:
                changed = False
                core = _core_dims(shape, ranks, modes)
                for k, m in enumerate(modes):
                    bound = math.prod(core) // core[m]
                    if ranks[k] > bound:
                        ranks[k], changed = bound, True
                        core[m] = bound
            return tuple(ranks)

        if validation.is_fraction(rank):
            budget = validation.check_fraction(rank) * math.prod(shape)
            r = validation.uniform_rank_for_budget(
                budget, lambda r: cls.num_params_for(shape, capped(r), modes), max(limits)
            )
            return capped(r)
        if isinstance(rank, int) and not isinstance(rank, bool):
            r = validation.check_int_rank(rank, "rank")
            if r > max(limits):
                raise ValueError(
                    f"rank={r} is larger than allowed for a Tucker of shape {shape} over "
                    f"modes {modes}: every mode allows at most its dimension {tuple(limits)}"
                )
            return capped(r)
        ranks = validation.check_rank_tuple(rank, len(modes), "rank")
        core = _core_dims(shape, ranks, modes)
        for k, m in enumerate(modes):
            if ranks[k] > shape[m]:
                raise ValueError(
                    f"rank[{k}]={ranks[k]} is larger than allowed: mode {m} has dimension "
                    f"{shape[m]}"
                )
            bound = math.prod(core) // core[m]
            if ranks[k] > bound:
                raise ValueError(
                    f"rank[{k}]={ranks[k]} is larger than allowed: it exceeds the product of "
                    f"the other core dimensions ({bound}) in ranks {ranks}"
                )
        return ranks

    # ------------------------------------------------------------ conversion
    def _reconstruct_subscripts(self):
        core_sub = list(_MODES[: self.ndim])
        factor_subs = []
        for m in self.modes:
            core_sub[m] = _RANKS[m]
            factor_subs.append(_MODES[m] + _RANKS[m])
        return "".join(core_sub), factor_subs

    def to_dense(self) -> jax.Array:
        """The full tensor, shape (I_1, ..., I_N)."""
        core_sub, factor_subs = self._reconstruct_subscripts()
        expr = ",".join([core_sub, *factor_subs]) + "->" + _MODES[: self.ndim]
        return contract_lib.contract(expr, self.core, *self.factors)

    @classmethod
    def from_dense(
        cls,
        x: jax.Array,
        rank: Any,
        *,
        modes: Sequence[int] | None = None,
        n_iter_max: int = 100,
        tol: float = 1e-6,
    ) -> Tucker:
        """HOSVD refined by HOOI (jit-able; rank and modes static).

        Args:
          x: (I_1, ..., I_N) floating array, N <= 24.
          rank: see `resolve_ranks`.
          modes: modes to factorize (default all; e.g. ``(2, 3)`` for Tucker-2 of a
            (kh, kw, C, F) conv kernel).
          n_iter_max: maximum HOOI sweeps (0 = plain truncated HOSVD).
          tol: stop when the relative error changes by less than this.

        Returns:
          A `Tucker` with orthonormal factors.

        Raises:
          ValueError: for ranks or modes not valid for ``x.shape``, an ``x`` that is not
            real floating or holds NaN/inf (checked when concrete), a negative
            ``n_iter_max`` or a ``tol`` that is not a finite number >= 0.
        """
        x = jnp.asarray(x)
        if x.ndim > len(_MODES):
            raise ValueError(f"x.ndim must be <= {len(_MODES)}, got {x.ndim}")
        validation.check_dense_input(x)
        n_iter_max = validation.check_iterations(n_iter_max, tol)
        modes = _check_modes(modes, x.ndim)
        ranks = cls.resolve_ranks(x.shape, rank, modes)
        core, factors = _hooi(x, ranks, modes, int(n_iter_max), tol)
        return cls(core=core, factors=tuple(factors), modes=modes)

    def to_params(self) -> dict[str, jax.Array]:
        params = {"core": self.core}
        params.update({f"factor_{k}": f for k, f in enumerate(self.factors)})
        return params

    @classmethod
    def from_params(cls, params: dict[str, jax.Array], modes: Sequence[int] | None = None):
        n = sum(1 for k in params if k.startswith("factor_"))
        factors = tuple(params[f"factor_{k}"] for k in range(n))
        return cls(core=params["core"], factors=factors, modes=modes)

    # ------------------------------------------------------------- operator
    def _subscripts(self, n_in: int):
        core_sub, factor_subs = self._reconstruct_subscripts()
        modes = _MODES[: self.ndim]
        return _BATCH + modes[:n_in], [core_sub, *factor_subs], modes, _BATCH + modes[n_in:]

    def _operands(self) -> list[jax.Array]:
        return [self.core, *self.factors]


def _project(x: jax.Array, factors: dict[int, jax.Array], skip: int | None = None) -> jax.Array:
    """X x_m U_m^T for every m in ``factors`` except ``skip``."""
    sub = list(_MODES[: x.ndim])
    ops, subs = [], []
    for m, u in factors.items():
        if m == skip:
            continue
        ops.append(u)
        subs.append(_MODES[m] + _RANKS[m])
        sub[m] = _RANKS[m]
    if not ops:
        return x
    expr = ",".join([_MODES[: x.ndim], *subs]) + "->" + "".join(sub)
    return contract_lib.contract(expr, x, *ops)


def _expand(core: jax.Array, factors: dict[int, jax.Array]) -> jax.Array:
    """G x_m U_m for every m in ``factors``."""
    sub = list(_MODES[: core.ndim])
    subs = []
    for m in factors:
        sub[m] = _RANKS[m]
        subs.append(_MODES[m] + _RANKS[m])
    expr = ",".join(["".join(sub), *subs]) + "->" + _MODES[: core.ndim]
    return contract_lib.contract(expr, core, *factors.values())


def _leading_left(y: jax.Array, mode: int, r: int) -> jax.Array:
    u, _, _ = jnp.linalg.svd(_unfold(y, mode), full_matrices=False)
    return u[:, :r]


@functools.partial(jax.jit, static_argnames=("ranks", "modes", "n_iter_max"))
def _hooi(x, ranks, modes, n_iter_max, tol):
    out_dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
    x = x.astype(jnp.result_type(x.dtype, jnp.float32))
    rank_of = dict(zip(modes, ranks))
    factors = {m: _leading_left(x, m, rank_of[m]) for m in modes}
    norm_x = jnp.linalg.norm(x)
    safe = jnp.where(norm_x > 0, norm_x, 1.0)

    def sweep(factors):
        factors = dict(factors)
        for m in modes:
            factors[m] = _leading_left(_project(x, factors, skip=m), m, rank_of[m])
        core = _project(x, factors)
        # Explicit residual: ||X||^2 - ||G||^2 cancels in float32 near a good fit.
        x_hat = _expand(core, factors)
        return factors, jnp.linalg.norm(x - x_hat) / safe

    def cond(state):
        _, it, prev, err = state
        return (it < n_iter_max) & ((it < 2) | (jnp.abs(prev - err) >= tol))

    def body(state):
        factors, it, _, err = state
        factors, new_err = sweep(factors)
        return factors, it + 1, err, new_err

    if n_iter_max > 0:
        inf = jnp.asarray(jnp.inf, x.dtype)
        factors, _, _, _ = jax.lax.while_loop(cond, body, (factors, jnp.asarray(0), inf, inf))
    core = _project(x, factors)
    return core.astype(out_dtype), [factors[m].astype(out_dtype) for m in modes]
