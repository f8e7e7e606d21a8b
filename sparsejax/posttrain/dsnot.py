"""DSnoT: training-free prune-and-grow refinement of a pruned layer's mask."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sparsejax.posttrain import pattern as pattern_lib
from sparsejax.posttrain.wanda import wanda_scores

__all__ = ["dsnot"]


def dsnot(
    kernel: jax.Array,
    x: jax.Array,
    mask: jax.Array,
    *,
    n: int | None = None,
    m: int | None = None,
    max_cycles: int = 50,
    update_threshold: float = 0.1,
    variance_power: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """Refines ``mask`` by swapping pruned and kept weights of each output, without training.

    Args:
      kernel: the dense ``float[in, out]`` kernel (before pruning).
      x: calibration inputs ``float[tokens, in]``.
      mask: boolean ``[in, out]``, the kept entries chosen by any pruner (magnitude, Wanda,
        SparseGPT's mask).
      n, m: the N:M pattern of ``mask``, if it has one: swaps then stay inside an m-group.
      max_cycles: at most this many swaps per output.
      update_threshold: an output stops once its expected error |δ| is at most this.
      variance_power: growth scores are divided by Var[x_i] to this power.

    Returns:
      ``(pruned kernel, new mask)``: ``kernel * new_mask`` (the dense values of the kept
      weights, no weight update, as in the paper) and the refined mask, which keeps exactly
      as many entries per output (and per N:M group) as ``mask``.

    Raises:
      ValueError: for mismatched shapes, bad (n, m), a mask that keeps more than ``n`` of
        some ``m`` consecutive inputs, non-positive cycle counts, a negative or non-finite
        threshold or variance power, or NaN/inf or all-zero inputs.

    Reference: Zhang et al. 2024, "Dynamic Sparse No Training: Training-Free Fine-tuning for
    Sparse LLMs". For output r, removing weight W_ri changes its expected output by
    W_ri E[x_i]; the expected reconstruction error is δ_r = Σ_{i pruned} W_ri E[x_i]. Each
    cycle grows the pruned weight that reduces δ_r most, i.e. the largest
    sign(δ_r) W_ri E[x_i] / Var[x_i]^p (the variance penalizes inputs whose effect is not
    well described by their mean), and prunes a kept weight whose removal also moves δ_r
    towards 0 (sign(W_ri E[x_i]) = -sign(δ_r)) and has the smallest Wanda score
    |W_ri| ||x_i||; unstructured, both candidates come from the initial pruned / kept sets in
    that order. For N:M the pruned weight is the lowest-Wanda kept weight of the grown
    weight's group, and a swap must not flip the sign of δ_r. An output stops when |δ_r| is
    at most the threshold, when a swap is not possible, or after ``max_cycles``.
    """
    kernel, x, mask = jnp.asarray(kernel), jnp.asarray(x), jnp.asarray(mask, bool)
    if mask.shape != kernel.shape:
        raise ValueError(f"mask must have the kernel's shape {kernel.shape}, got {mask.shape}")
    pattern = pattern_lib.make_pattern(0.0, n, m)
    pattern_lib.check_layer(kernel, x, pattern)
    if isinstance(max_cycles, bool) or not isinstance(max_cycles, (int, np.integer)):
        raise ValueError(f"max_cycles must be a positive int, got {max_cycles!r}")
    if max_cycles <= 0:
        raise ValueError(f"max_cycles must be a positive int, got {max_cycles!r}")
    if not float(update_threshold) >= 0:
        raise ValueError(f"update_threshold must be >= 0, got {update_threshold!r}")
    if not 0 <= float(variance_power) < np.inf:
        raise ValueError(f"variance_power must be a finite number >= 0, got {variance_power!r}")
    if pattern.is_nm and not isinstance(mask, jax.core.Tracer):
        # Swaps stay inside a group, so a mask that is not N:M would stay not N:M.
        groups = np.asarray(mask).reshape(-1, pattern.m, mask.shape[1]).sum(axis=1)
        if groups.max(initial=0) > pattern.n:
            raise ValueError(
                f"mask keeps up to {int(groups.max())} of {pattern.m} consecutive inputs, so it "
                f"is not the n:m = {pattern.n}:{pattern.m} pattern given by n={n!r}, m={m!r}"
            )
    new_mask = _dsnot(
        kernel.astype(jnp.float32),
        x.astype(jnp.float32),
        mask,
        pattern.m,
        int(max_cycles),
        float(update_threshold),
        float(variance_power),
    )
    return jnp.where(new_mask, kernel, 0), new_mask


def _ordered(keys: jax.Array, members: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per row: member indices by ascending key (members first) and the member count."""
    order = jnp.argsort(jnp.where(members, keys, jnp.inf), axis=1, stable=True)
    return order, jnp.sum(members, axis=1)


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6))
def _dsnot(kernel, x, mask, group, max_cycles, threshold, power):
    w, kept = kernel.T, mask.T  # [outputs, inputs]
    initially_kept = kept
    rows = jnp.arange(w.shape[0])
    mean, var = jnp.mean(x, axis=0), jnp.var(x, axis=0)
    contribution = w * mean[None, :]  # expected output carried by each weight
    wanda = wanda_scores(kernel, x).T
    error = jnp.sum(jnp.where(kept, 0.0, contribution), axis=1)
    initial_sign = jnp.sign(error)
    growth = contribution / jnp.maximum(var, 1e-12)[None, :] ** power
    pruned = ~kept
    # Growth candidates: for δ > 0 the largest positive growth first, for δ < 0 the most
    # negative first. Pruning candidates (unstructured): lowest Wanda score first, among
    # kept weights whose contribution has the sign that moves δ towards zero.
    grow_up, n_grow_up = _ordered(-growth, pruned & (contribution > 0))
    grow_down, n_grow_down = _ordered(growth, pruned & (contribution < 0))
    prune_neg, n_prune_neg = _ordered(wanda, kept & (contribution < 0))
    prune_pos, n_prune_pos = _ordered(wanda, kept & (contribution > 0))

    def cycle(state):
        t, kept, error, active, g_up, g_down, p_neg, p_pos = state
        up = error > 0
        g_ptr = jnp.where(up, g_up, g_down)
        grow = jnp.where(
            up,
            grow_up[rows, jnp.minimum(g_up, w.shape[1] - 1)],
            grow_down[rows, jnp.minimum(g_down, w.shape[1] - 1)],
        )
        valid = g_ptr < jnp.where(up, n_grow_up, n_grow_down)
        if group is None:
            p_ptr = jnp.where(up, p_neg, p_pos)
            prune = jnp.where(
                up,
                prune_neg[rows, jnp.minimum(p_neg, w.shape[1] - 1)],
                prune_pos[rows, jnp.minimum(p_pos, w.shape[1] - 1)],
            )
            valid &= p_ptr < jnp.where(up, n_prune_neg, n_prune_pos)
        else:
            # The kept weight of the grown weight's group with the lowest Wanda score.
            start = grow - grow % group
            members = start[:, None] + jnp.arange(group)[None, :]
            # Only weights kept from the start: a weight grown earlier is not pruned again.
            in_group = (kept & initially_kept)[rows[:, None], members]
            scores = jnp.where(in_group, wanda[rows[:, None], members], jnp.inf)
            prune = start + jnp.argmin(scores, axis=1)
            valid &= jnp.any(in_group, axis=1)
        after = error + contribution[rows, prune] - contribution[rows, grow]
        update = active & valid & (jnp.abs(error) > threshold)
        if group is not None:
            update &= jnp.sign(after) == initial_sign
        kept = kept.at[rows, prune].set(jnp.where(update, False, kept[rows, prune]))
        kept = kept.at[rows, grow].set(jnp.where(update, True, kept[rows, grow]))
        error = jnp.where(update, after, error)
        # A used candidate is consumed whether or not the swap happened (as in the paper's
        # code); an output that stops updating stays stopped.
        g_up, g_down = g_up + (up & active), g_down + (~up & active)
        if group is None:
            p_neg, p_pos = p_neg + (up & active), p_pos + (~up & active)
        return t + 1, kept, error, update, g_up, g_down, p_neg, p_pos

    zeros = jnp.zeros(w.shape[0], jnp.int32)
    state = (0, kept, error, jnp.ones(w.shape[0], bool), zeros, zeros, zeros, zeros)
    state = lax.while_loop(lambda s: (s[0] < max_cycles) & jnp.any(s[3]), cycle, state)
    return state[1].T
