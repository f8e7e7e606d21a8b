"""The formats with a single rank, CP's R and the tubal rank k: rank tuple, size, resolution."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

from tensornets.formats import validation

__all__ = ["SingleRank", "resolve_single_rank"]


class SingleRank:
    """Mixin: ``ranks`` and ``num_params`` of a format with one rank.

    A format using it has ``shape`` and ``rank`` properties and a static
    ``num_params_for(shape, rank)``.
    """

    @property
    def ranks(self) -> tuple[int]:
        """(rank,): the one rank, as a 1-tuple like the other formats' rank tuples."""
        return (self.rank,)

    @property
    def num_params(self) -> int:
        """Parameter count, ``num_params_for(shape, rank)``."""
        return self.num_params_for(self.shape, self.rank)


def resolve_single_rank(
    shape: tuple[int, ...],
    rank: Any,
    bound: int,
    num_params: Callable[[int], int],
    *,
    what: str,
    bound_name: str,
) -> int:
    """A format's one rank (CP's R, the tubal k) from an int, a 1-tuple or a float fraction.

    Args:
      shape: the dense shape, already checked (`validation.check_shape`).
      rank: an int (or numpy integer), a 1-sequence of one, or a float fraction of
        prod(shape): the largest rank whose ``num_params(rank)`` fits that budget.
      bound: the largest rank allowed.
      num_params: rank -> parameter count, non-decreasing.
      what, bound_name: complete the message for a rank above ``bound``: "rank=... is larger
        than allowed for {what}: at most {bound_name} = {bound}".

    Returns:
      The rank, an int in [1, bound].

    Raises:
      ValueError: for a fraction outside (0, 1], a rank that is not a positive int or a
        1-sequence of one, or a rank above ``bound``, naming the value.
    """
    if validation.is_fraction(rank):
        budget = validation.check_fraction(rank) * math.prod(shape)
        return validation.uniform_rank_for_budget(budget, num_params, bound)
    if not isinstance(rank, numbers.Integral):
        (rank,) = validation.check_rank_tuple(rank, 1, "rank")
    rank = validation.check_int_rank(rank, "rank")
    if rank > bound:
        raise ValueError(
            f"rank={rank} is larger than allowed for {what}: at most {bound_name} = {bound}"
        )
    return rank
