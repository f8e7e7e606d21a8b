"""Tensor-train formats: TT for tensors and TT-matrix for linear maps.

References: Oseledets 2011, "Tensor-Train Decomposition" (SIAM J. Sci. Comput.);
Novikov, Podoprikhin, Osokin & Vetrov 2015, "Tensorizing Neural Networks".

TT: a d-way tensor is a product of matrices, one slice per index,
  X[i_1, ..., i_d] = G_1[:, i_1, :] G_2[:, i_2, :] ... G_d[:, i_d, :],
with cores G_k of shape (r_{k-1}, I_k, r_k) and r_0 = r_d = 1. The bond ranks
r_1..r_{d-1} are the ranks of the unfoldings X[i_1..i_k ; i_{k+1}..i_d], so
r_k <= min(prod_{j<=k} I_j, prod_{j>k} I_j).

TT-SVD (Oseledets, Algorithm 1): reshape X to (I_1, rest), keep the r_1 leading
singular triplets, put U in G_1, carry S V^T reshaped to (r_1 I_2, rest) to the next
step, and so on; the last remainder is G_d. Each truncation is an orthogonal
projection, so the squared error is the sum of the squared discarded singular
values of every step.

TT-matrix (Novikov et al. 2015): a matrix W of shape (prod m_k, prod n_k), rows
indexed by (i_1..i_d) and columns by (j_1..j_d), is
  W[(i_1..i_d), (j_1..j_d)] = G_1[:, i_1, j_1, :] ... G_d[:, i_d, j_d, :],
cores of shape (r_{k-1}, m_k, n_k, r_k): the TT of W reshaped to
(m_1 n_1, ..., m_d n_d). ``y = x W`` is contracted core by core, costing about
sum_k 2 B r_{k-1} r_k m_k prod(n_{<=k}) prod(m_{>k}) FLOPs instead of 2 B M N.
"""

from __future__ import annotations

import functools
import math
import string
from typing import Any, Self

import flax.struct
import jax
import jax.numpy as jnp

from tensornets import contract as contract_lib
from tensornets.formats import validation
from tensornets.formats.operator import ModeOperator

__all__ = ["TT", "TTMatrix"]

_IN = string.ascii_lowercase[:12]  # input (or tensor) mode letters
_OUT = string.ascii_lowercase[12:24]  # output mode letters of a TT-matrix
_BONDS = string.ascii_uppercase[:25]  # r_0 .. r_d
_BATCH = "Z"
_MAX_CORES = 12


def bond_limits(mode_sizes: tuple[int, ...]) -> tuple[int, ...]:
    """Largest meaningful rank of each internal bond: min(prod I_{<=k}, prod I_{>k})."""
    return tuple(
        min(math.prod(mode_sizes[:k]), math.prod(mode_sizes[k:])) for k in range(1, len(mode_sizes))
    )


def tt_num_params(mode_sizes, bonds) -> int:
    full = (1, *bonds, 1)
    return sum(full[k] * s * full[k + 1] for k, s in enumerate(mode_sizes))


def resolve_bonds(mode_sizes: tuple[int, ...], rank: Any, name: str = "rank") -> tuple[int, ...]:
    """Internal bond ranks (r_1..r_{d-1}) from an int cap, a tuple or a float fraction.

    ``mode_sizes`` are I_k for a TT and m_k * n_k for a TT-matrix. An int is a cap,
    applied bond by bond (boundary bonds of a small mode are smaller); a tuple lists
    the d-1 internal ranks (or all d+1 with r_0 = r_d = 1); a float is the fraction of
    prod(mode_sizes) to spend on parameters.

    Raises:
      ValueError: for ranks <= 0, a tuple entry above its bond's limit or not
        reachable from its neighbours (r_k <= r_{k-1} I_k and r_k <= I_{k+1} r_{k+1}),
        or an int cap larger than every bond allows.
    """
    d = len(mode_sizes)
    limits = bond_limits(mode_sizes)
    if d == 1:
        if validation.is_fraction(rank):
            validation.check_fraction(rank, name)
            return ()
        if isinstance(rank, int) and not isinstance(rank, bool):
            validation.check_int_rank(rank, name)
            return ()
        if tuple(rank) in ((), (1, 1)):
            return ()
        raise ValueError(f"{name} of a one-core TT has no internal bonds, got {rank!r}")
    if validation.is_fraction(rank):
        budget = validation.check_fraction(rank, name) * math.prod(mode_sizes)
        r = validation.uniform_rank_for_budget(
            budget,
            lambda r: tt_num_params(mode_sizes, tuple(min(r, lim) for lim in limits)),
            max(limits),
        )
        return tuple(min(r, lim) for lim in limits)
    if isinstance(rank, int) and not isinstance(rank, bool):
        r = validation.check_int_rank(rank, name)
        if r > max(limits):
            raise ValueError(
                f"{name}={r} is larger than allowed: the bonds of a TT with mode sizes "
                f"{mode_sizes} allow at most {limits}"
            )
        return tuple(min(r, lim) for lim in limits)
    if not isinstance(rank, str) and hasattr(rank, "__len__") and len(rank) == d + 1:
        if rank[0] != 1 or rank[-1] != 1:
            raise ValueError(f"{name} with d+1 entries must start and end with 1, got {rank!r}")
        rank = tuple(rank)[1:-1]
    bonds = validation.check_rank_tuple(rank, d - 1, name)
    full = (1, *bonds, 1)
    for k in range(1, d):
        r = full[k]
        if r > limits[k - 1]:
            raise ValueError(
                f"{name}[{k - 1}]={r} is larger than allowed: bond {k} of a TT with mode sizes "
                f"{mode_sizes} has rank at most {limits[k - 1]}"
            )
        if r > full[k - 1] * mode_sizes[k - 1] or r > mode_sizes[k] * full[k + 1]:
            raise ValueError(
                f"{name}[{k - 1}]={r} is larger than allowed by its neighbours in {bonds}: "
                f"it must be <= {full[k - 1]}*{mode_sizes[k - 1]} and <= "
                f"{mode_sizes[k]}*{full[k + 1]}"
            )
    return bonds


@functools.partial(jax.jit, static_argnames=("bonds",))
def _tt_svd(x: jax.Array, bonds: tuple[int, ...]) -> list[jax.Array]:
    """TT-SVD of ``x`` (I_1, ..., I_d) with internal ranks ``bonds``."""
    out_dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
    x = x.astype(jnp.result_type(x.dtype, jnp.float32))
    sizes = x.shape
    full = (1, *bonds, 1)
    cores = []
    rest = x
    for k in range(len(sizes) - 1):
        rest = rest.reshape(full[k] * sizes[k], -1)
        u, s, vt = jnp.linalg.svd(rest, full_matrices=False)
        r = full[k + 1]
        cores.append(u[:, :r].reshape(full[k], sizes[k], r))
        rest = s[:r, None] * vt[:r]
    cores.append(rest.reshape(full[-2], sizes[-1], 1))
    return [c.astype(out_dtype) for c in cores]


def _check_cores(cores, ndim: int, what: str):
    if not 0 < len(cores) <= _MAX_CORES:
        raise ValueError(f"{what} needs 1 to {_MAX_CORES} cores, got {len(cores)}")
    for k, c in enumerate(cores):
        if c.ndim != ndim:
            raise ValueError(f"{what} core {k} must be {ndim}-d, got shape {c.shape}")


class _CoreChain:
    """Mixin: the flat parameter dict ``{"core_k": core k}`` of a chain of cores (TT, TT-matrix)."""

    def to_params(self) -> dict[str, jax.Array]:
        """Flat parameter dict, as the factorized layers store it."""
        return {f"core_{k}": c for k, c in enumerate(self.cores)}

    @classmethod
    def from_params(cls, params: dict[str, jax.Array]) -> Self:
        return cls(cores=tuple(params[f"core_{k}"] for k in range(len(params))))


@flax.struct.dataclass
class TT(_CoreChain, ModeOperator):
    """A tensor in tensor-train format.

    Attributes:
      cores: tuple of d cores, core k of shape (r_{k-1}, I_k, r_k), r_0 = r_d = 1.
    """

    cores: tuple[jax.Array, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(c.shape[1]) for c in self.cores)

    @property
    def ndim(self) -> int:
        return len(self.cores)

    @property
    def ranks(self) -> tuple[int, ...]:
        """Internal bond ranks (r_1, ..., r_{d-1})."""
        return tuple(int(c.shape[-1]) for c in self.cores[:-1])

    @property
    def num_params(self) -> int:
        """sum_k r_{k-1} I_k r_k."""
        return tt_num_params(self.shape, self.ranks)

    @staticmethod
    def resolve_ranks(shape: Any, rank: Any) -> tuple[int, ...]:
        """Internal bond ranks for a TT of ``shape``; see `resolve_bonds`."""
        return resolve_bonds(validation.check_shape(shape), rank)

    def _reconstruct_subscripts(self):
        d = self.ndim
        return [_BONDS[k] + _IN[k] + _BONDS[k + 1] for k in range(d)]

    def to_dense(self) -> jax.Array:
        """The full tensor, shape (I_1, ..., I_d)."""
        d = self.ndim
        expr = ",".join(self._reconstruct_subscripts()) + "->" + _IN[:d]
        if d == 1:
            return self.cores[0].reshape(self.shape)
        return contract_lib.contract(expr, *self.cores)

    @classmethod
    def from_dense(cls, x: jax.Array, rank: Any) -> TT:
        """TT-SVD (jit-able, rank static).

        Args:
          x: (I_1, ..., I_d) floating array, d <= 12.
          rank: see `resolve_bonds`.

        Returns:
          A left-orthogonal `TT` (every core but the last has orthonormal columns
          when reshaped to (r_{k-1} I_k, r_k)).
        """
        x = jnp.asarray(x)
        if not 0 < x.ndim <= _MAX_CORES:
            raise ValueError(f"x.ndim must be in [1, {_MAX_CORES}], got {x.ndim}")
        validation.check_dense_input(x)
        bonds = cls.resolve_ranks(x.shape, rank)
        return cls(cores=tuple(_tt_svd(x, bonds)))

    def _subscripts(self, n_in: int):
        d = self.ndim
        return _BATCH + _IN[:n_in], self._reconstruct_subscripts(), _IN[:d], _BATCH + _IN[n_in:d]

    def _operands(self) -> list[jax.Array]:
        return list(self.cores)


@flax.struct.dataclass
class TTMatrix(_CoreChain):
    """A matrix of shape (prod m_k, prod n_k) in TT-matrix format.

    Used as a dense kernel: ``y = x @ W`` maps (..., prod m_k) to (..., prod n_k).

    Attributes:
      cores: tuple of d cores, core k of shape (r_{k-1}, m_k, n_k, r_k), r_0 = r_d = 1.
    """

    cores: tuple[jax.Array, ...]

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(int(c.shape[1]) for c in self.cores)

    @property
    def out_shape(self) -> tuple[int, ...]:
        return tuple(int(c.shape[2]) for c in self.cores)

    @property
    def shape(self) -> tuple[int, int]:
        """(prod m_k, prod n_k)."""
        return (math.prod(self.in_shape), math.prod(self.out_shape))

    @property
    def ndim(self) -> int:
        return 2

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(int(c.shape[-1]) for c in self.cores[:-1])

    @property
    def num_params(self) -> int:
        sizes = tuple(m * n for m, n in zip(self.in_shape, self.out_shape))
        return tt_num_params(sizes, self.ranks)

    @staticmethod
    def resolve_ranks(in_shape: Any, out_shape: Any, rank: Any) -> tuple[int, ...]:
        """Internal bond ranks; mode k has size m_k n_k (see `resolve_bonds`)."""
        in_shape = validation.check_shape(in_shape, "in_shape")
        out_shape = validation.check_shape(out_shape, "out_shape")
        if len(in_shape) != len(out_shape):
            raise ValueError(
                f"in_shape={in_shape} and out_shape={out_shape} must have the same number of "
                "factors (one per core)"
            )
        return resolve_bonds(tuple(m * n for m, n in zip(in_shape, out_shape)), rank)

    def _subs(self):
        d = len(self.cores)
        return [_BONDS[k] + _IN[k] + _OUT[k] + _BONDS[k + 1] for k in range(d)]

    def to_dense(self) -> jax.Array:
        """The matrix W, shape (prod m_k, prod n_k)."""
        d = len(self.cores)
        expr = ",".join(self._subs()) + "->" + _IN[:d] + _OUT[:d]
        if d == 1:
            return self.cores[0].reshape(self.shape)
        return contract_lib.contract(expr, *self.cores).reshape(self.shape)

    @classmethod
    def from_dense(cls, w: jax.Array, in_shape: Any, out_shape: Any, rank: Any) -> TTMatrix:
        """TT-SVD of W reshaped to (m_1 n_1, ..., m_d n_d) (jit-able, shapes and rank static).

        Args:
          w: (M, N) matrix with M = prod(in_shape), N = prod(out_shape).
          in_shape: (m_1, ..., m_d).
          out_shape: (n_1, ..., n_d).
          rank: see `resolve_bonds`.

        Raises:
          ValueError: if a shape does not multiply to its dimension, or for bad ranks.
        """
        w = jnp.asarray(w)
        if w.ndim != 2:
            raise ValueError(f"w must be a matrix, got shape {w.shape}")
        validation.check_dense_input(w, "w")
        in_shape = validation.check_factorization(in_shape, w.shape[0], "in_shape")
        out_shape = validation.check_factorization(out_shape, w.shape[1], "out_shape")
        bonds = cls.resolve_ranks(in_shape, out_shape, rank)
        d = len(in_shape)
        if d > _MAX_CORES:
            raise ValueError(f"at most {_MAX_CORES} cores, got in_shape={in_shape}")
        t = w.reshape(in_shape + out_shape)
        t = jnp.transpose(t, [p for k in range(d) for p in (k, d + k)])
        t = t.reshape([m * n for m, n in zip(in_shape, out_shape)])
        cores = _tt_svd(t, bonds)
        full = (1, *bonds, 1)
        return cls(
            cores=tuple(
                c.reshape(full[k], in_shape[k], out_shape[k], full[k + 1])
                for k, c in enumerate(cores)
            )
        )

    def _apply_subscripts(self, transpose: bool):
        d = len(self.cores)
        ins, outs = (_OUT[:d], _IN[:d]) if transpose else (_IN[:d], _OUT[:d])
        return _BATCH + ins, self._subs(), _IN[:d] + _OUT[:d], _BATCH + outs

    def apply(
        self, x: jax.Array, method: str = "auto", precision=None, transpose: bool = False
    ) -> jax.Array:
        """``x @ W`` (or ``x @ W.T`` with ``transpose``) without building W.

        Args:
          x: (..., M), or (..., N) with ``transpose``.
          method: "auto" | "factorized" | "dense" (see `tensornets.contract`).

        Returns:
          (..., N), or (..., M) with ``transpose``.
        """
        m, n = self.shape
        (n_in, n_out), (s_in, s_out) = (
            ((n, m), (self.out_shape, self.in_shape))
            if transpose
            else ((m, n), (self.in_shape, self.out_shape))
        )
        if x.shape[-1] != n_in:
            raise ValueError(f"x.shape={x.shape} must end with the input dimension {n_in}")
        batch = x.shape[:-1]
        xb = x.reshape((-1, *s_in))
        x_sub, subs, w_sub, out_sub = self._apply_subscripts(transpose)
        y = contract_lib.factorized_apply(
            xb, x_sub, subs, list(self.cores), w_sub, out_sub, method, precision
        )
        return y.reshape(batch + (n_out,))

    def apply_costs(self, batch: int, transpose: bool = False) -> dict[str, int]:
        x_sub, subs, w_sub, out_sub = self._apply_subscripts(transpose)
        s_in = self.out_shape if transpose else self.in_shape
        return contract_lib.factorized_apply_costs(
            (batch, *s_in), x_sub, subs, [c.shape for c in self.cores], w_sub, out_sub
        )

    def flops(self, batch: int, method: str = "auto", transpose: bool = False) -> int:
        costs = self.apply_costs(batch, transpose)
        return costs[contract_lib.choose_method(costs["factorized"], costs["dense"], method)]

    def take(self, indices: jax.Array) -> jax.Array:
        """Rows ``W[indices]`` (an embedding lookup), shape ``indices.shape + (N,)``.

        Each row is the chain of core slices picked by the row's digits (i_1..i_d):
        cost per row sum_k r_{k-1} r_k prod(n_{<=k}), never the whole matrix.
        """
        digits = jnp.unravel_index(jnp.asarray(indices), self.in_shape)
        row = jnp.ones(jnp.shape(indices) + (1, 1), self.cores[0].dtype)  # (..., prod n, r)
        for k, core in enumerate(self.cores):
            piece = core[:, digits[k]]  # (r_{k-1}, ..., n_k, r_k)
            piece = jnp.moveaxis(piece, 0, -3)  # (..., r_{k-1}, n_k, r_k)
            row = jnp.einsum("...pa,...aqb->...pqb", row, piece)
            row = row.reshape(row.shape[:-3] + (-1, row.shape[-1]))
        return row[..., 0]
