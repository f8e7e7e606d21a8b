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
    """Returns a float rank (a fraction of the dense parameter count) after checking it is > 0."""
    if not math.isfinite(rank) or rank <= 0:
        raise ValueError(
            f"{name} as a float is a fraction of the dense parameter count and must be > 0, "
            f"got {rank!r}"
        )
    return float(rank)


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
