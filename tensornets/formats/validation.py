"""Validation of shapes and ranks, shared by the formats and the factorized layers.

Ranks are static Python integers: they fix array shapes, so every function here
runs once, at construction or trace time, and fails with a ValueError that names
the argument and the offending value.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Rank = Any  # int | float | Sequence[int]


def check_shape(shape: Any, name: str = "shape") -> tuple[int, ...]:
    """Returns ``shape`` as a tuple of positive ints, or raises ValueError naming it."""
    if isinstance(shape, numbers.Integral) and not isinstance(shape, bool):
        shape = (int(shape),)
    try:
        dims = tuple(shape)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of positive ints, got {shape!r}") from None
    if not dims or any(
        isinstance(d, bool) or not isinstance(d, numbers.Integral) or d <= 0 for d in dims
    ):
        raise ValueError(f"{name} must be a non-empty sequence of positive ints, got {shape!r}")
    return tuple(int(d) for d in dims)


def check_factorization(shape: Any, dim: int, name: str) -> tuple[int, ...]:
    """Checks that ``prod(shape) == dim``; returns the shape as a tuple of ints."""
    dims = check_shape(shape, name)
    if math.prod(dims) != dim:
        raise ValueError(
            f"{name}={dims} multiplies to {math.prod(dims)}, not to the dimension {dim} "
            "it must factorize"
        )
    return dims


def is_fraction(rank: Any) -> bool:
    """True for a float rank (a fraction of the dense parameter count)."""
    return isinstance(rank, numbers.Real) and not isinstance(rank, numbers.Integral | bool)


def check_int_rank(value: Any, name: str) -> int:
    """Returns ``value`` as a positive int (a rank, a size); a ValueError names ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return int(value)


def check_fraction(rank: float, name: str = "rank") -> float:
    # Above 1 the "fraction" would buy more parameters than the dense tensor has.
    if not math.isfinite(rank) or not 0 < rank <= 1:
        raise ValueError(
            f"{name} as a float is a fraction of the dense parameter count and must be in "
            f"(0, 1], got {rank!r}"
        )
    return float(rank)


def check_dense_input(x: Any, name: str = "x") -> None:
    """The tensor a ``from_dense`` fits: real floating, and finite where values are concrete.

    NaN or inf would turn every factor into NaN, and an integer or complex input is not
    the documented real floating array (integers: convert with ``x.astype(jnp.float32)``).
    Under jit only the dtype can be checked.

    Raises:
      ValueError: naming ``name``, its dtype, or the first non-finite entry.
    """
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{name} must be a real floating array, got dtype {dtype}")
    if isinstance(x, jax.core.Tracer):
        return
    finite = np.isfinite(np.asarray(x))
    if not finite.all():
        first = tuple(int(i) for i in np.argwhere(~finite)[0])
        raise ValueError(
            f"{name} holds NaN or inf values (first at index {first}: "
            f"{float(np.asarray(x)[first])})"
        )


def check_iterations(n_iter_max: Any, tol: Any) -> int:
    """A non-negative int ``n_iter_max`` and a finite ``tol >= 0``; returns ``n_iter_max``.

    Raises:
      ValueError: naming the argument and value.
    """
    if (
        isinstance(n_iter_max, bool)
        or not isinstance(n_iter_max, numbers.Integral)
        or n_iter_max < 0
    ):
        raise ValueError(f"n_iter_max must be a non-negative int, got {n_iter_max!r}")
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not 0 <= tol < math.inf:
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
    return int(n_iter_max)


def uniform_rank_for_budget(budget: float, num_params: Callable[[int], int], max_rank: int) -> int:
    """Largest uniform rank r in [1, max_rank] with ``num_params(r) <= budget`` (at least 1).

    ``num_params`` is non-decreasing in r, so a binary search finds it.
    """
    lo, hi = 1, max_rank
    if num_params(1) > budget:
        return 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if num_params(mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def check_rank_tuple(rank: Any, length: int, name: str) -> tuple[int, ...]:
    """Checks a per-mode / per-bond rank tuple: ``length`` positive ints."""
    if isinstance(rank, str) or not isinstance(rank, Sequence):
        raise ValueError(f"{name} must be an int, a float or a sequence of ints, got {rank!r}")
    if len(rank) != length:
        raise ValueError(f"{name} must have {length} entries, got {len(rank)}: {tuple(rank)!r}")
    return tuple(check_int_rank(r, f"{name}[{i}]") for i, r in enumerate(rank))
