"""Schedules: training step -> target sparsity (or drop fraction), and when masks update.

A `SparsitySchedule` pairs two pure functions of the step, both jit-able:
``sparsity(step)`` gives the target sparsity (a scale in [0, 1] applied to each
layer's final sparsity by the algorithms) and ``is_update_step(step)`` says
whether masks are recomputed at that step.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax.numpy as jnp

from sparsejax.masks import validate_sparsity

__all__ = [
    "SparsitySchedule",
    "constant",
    "cosine_drop_fraction",
    "one_shot",
    "periodic",
    "polynomial",
]


class SparsitySchedule(NamedTuple):
    """Two functions of the (integer, possibly traced) step."""

    sparsity: Callable[[Any], Any]
    is_update_step: Callable[[Any], Any]


def _check_step(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return value


def constant(sparsity: float) -> SparsitySchedule:
    """The same sparsity at every step; masks are set at step 0 only.

    Args:
      sparsity: target in [0, 1).
    """
    validate_sparsity(sparsity)
    return SparsitySchedule(
        sparsity=lambda step: jnp.asarray(sparsity, jnp.float32),
        is_update_step=lambda step: jnp.asarray(step) == 0,
    )


def one_shot(sparsity: float, step: int = 0) -> SparsitySchedule:
    """Dense until ``step``, then ``sparsity``; masks are computed once, at ``step``.

    Args:
      sparsity: target in [0, 1).
      step: the step at which pruning happens.
    """
    validate_sparsity(sparsity)
    prune_step = _check_step(step, "step")
    return SparsitySchedule(
        sparsity=lambda t: jnp.where(jnp.asarray(t) >= prune_step, sparsity, 0.0).astype(
            jnp.float32
        ),
        is_update_step=lambda t: jnp.asarray(t) == prune_step,
    )


def polynomial(
    final_sparsity: float,
    begin_step: int,
    end_step: int,
    update_every_steps: int,
    initial_sparsity: float = 0.0,
    power: float = 3.0,
) -> SparsitySchedule:
    """Gradual pruning schedule of Zhu & Gupta 2017.

    s_t = s_f + (s_i - s_f) * (1 - (t - t_0) / (t_end - t_0)) ** power for
    t_0 <= t <= t_end, s_i before t_0 and s_f after; masks are updated every
    ``update_every_steps`` steps from t_0, and at t_end (also when t_end - t_0 is
    not a multiple of Δt), so the last update reaches s_f.

    Args:
      final_sparsity: s_f in [0, 1).
      begin_step: t_0.
      end_step: t_end > t_0.
      update_every_steps: Δt, the pruning frequency.
      initial_sparsity: s_i in [0, 1).
      power: the exponent (3 in the paper), a finite number > 0.

    Reference: Zhu & Gupta 2017, "To prune, or not to prune: exploring the
    efficacy of pruning for model compression".
    """
    validate_sparsity(final_sparsity, "final_sparsity")
    validate_sparsity(initial_sparsity, "initial_sparsity")
    begin = _check_step(begin_step, "begin_step")
    end = _check_step(end_step, "end_step")
    if end <= begin:
        raise ValueError(f"end_step must be > begin_step, got end_step={end}, begin_step={begin}")
    every = _check_step(update_every_steps, "update_every_steps")
    if every == 0:
        raise ValueError("update_every_steps must be positive, got 0")
    if isinstance(power, bool) or not isinstance(power, numbers.Real) or not math.isfinite(power):
        # NaN passed `power <= 0` and made every s_t NaN: layers were pruned entirely.
        raise ValueError(f"power must be a finite number, got {power!r}")
    if power <= 0:
        raise ValueError(f"power must be positive, got {power!r}")

    def sparsity(t):
        t = jnp.asarray(t)
        # The remaining fraction (t_end - t) / (t_end - t_0) is formed directly (the step
        # difference is exact) rather than as 1 - progress: near t_end the subtraction would
        # cancel, and a power below 1 magnifies that relative error into the result.
        remaining = jnp.clip((end - t).astype(jnp.float32) / (end - begin), 0.0, 1.0)
        t = t.astype(jnp.float32)
        value = final_sparsity + (initial_sparsity - final_sparsity) * remaining**power
        # Hold s_i and s_f exactly: XLA turns the division by the constant t_end - t_0 into
        # a multiplication by its float32 reciprocal, so progress at t_end can be 1 - 1 ulp
        # (then s_t misses s_f by (1 ulp) ** power), and s_f + (s_i - s_f) need not be s_i.
        value = jnp.where(t <= begin, initial_sparsity, jnp.where(t >= end, final_sparsity, value))
        return value.astype(jnp.float32)

    def is_update_step(t):
        t = jnp.asarray(t)
        # t_end is an update step even off the grid: the grid's last step (900 for t_0 = 0,
        # t_end = 1000, Δt = 300) is still short of s_f, and no update would follow it.
        on_grid = (t - begin) % every == 0
        return (t >= begin) & (t <= end) & (on_grid | (t == end))

    return SparsitySchedule(sparsity=sparsity, is_update_step=is_update_step)


def periodic(update_every_steps: int, end_step: int, begin_step: int = 0) -> Callable[[Any], Any]:
    """Predicate for dynamic sparse training: update every Δt steps in [begin, end).

    Step ``begin_step`` itself is not an update step (masks are set at init).

    Args:
      update_every_steps: Δt (100 in RigL).
      end_step: T_end; no updates at or after it.
      begin_step: first step counted.
    """
    every = _check_step(update_every_steps, "update_every_steps")
    if every == 0:
        raise ValueError("update_every_steps must be positive, got 0")
    end = _check_step(end_step, "end_step")
    begin = _check_step(begin_step, "begin_step")

    def is_update_step(t):
        t = jnp.asarray(t)
        return (t > begin) & (t < end) & ((t - begin) % every == 0)

    return is_update_step


def cosine_drop_fraction(initial_fraction: float, end_step: int) -> Callable[[Any], Any]:
    """Cosine-decayed drop fraction of dynamic sparse training.

    f(t) = α / 2 * (1 + cos(π t / T_end)) for t < T_end and 0 afterwards.

    Args:
      initial_fraction: α in [0, 1] (0.3 in RigL).
      end_step: T_end > 0.

    Reference: Evci et al. 2020, "Rigging the Lottery: Making All Tickets Winners".
    """
    if not 0.0 <= initial_fraction <= 1.0:
        raise ValueError(f"initial_fraction must be in [0, 1], got {initial_fraction!r}")
    end = _check_step(end_step, "end_step")
    if end == 0:
        raise ValueError("end_step must be positive, got 0")

    def fraction(t):
        t = jnp.asarray(t, jnp.float32)
        value = 0.5 * initial_fraction * (1.0 + jnp.cos(jnp.pi * jnp.minimum(t, end) / end))
        return jnp.where(t < end, value, 0.0).astype(jnp.float32)

    return fraction
