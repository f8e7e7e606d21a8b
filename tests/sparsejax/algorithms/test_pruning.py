"""Gradual pruning (`sparsejax.algorithms.Prune`) reaches its target on any update grid."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

from sparsejax import algorithms, transforms
from tests.sparsejax.algorithms.conftest import init, loss


@pytest.mark.parametrize(("end_step", "every"), [(100, 40), (100, 25), (7, 3)])
def test_gradual_pruning_reaches_the_target_when_end_step_is_off_the_grid(end_step, every):
    # Before: the last update was the last grid step (80 for end 100, every 40), where
    # s(t) is still below the target (0.8991 of 0.9 for begin 0, end 1000, every 300).
    algo = algorithms.get(
        "magnitude",
        sparsity=0.9,
        distribution="uniform",
        begin_step=0,
        end_step=end_step,
        update_every_steps=every,
    )
    params = init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (16, 12))
    y = jax.random.randint(jax.random.key(2), (16,), 0, 4)
    tx = transforms.masked(optax.sgd(1e-2), algo)
    state = tx.init(params)

    @jax.jit
    def step(p, s):
        u, s = tx.update(jax.grad(loss)(p, x, y), s, p)
        return optax.apply_updates(p, u), s

    for _ in range(end_step + 1):
        params, state = step(params, state)
    kept = transforms.get_masks(state)
    for name in ("l1", "l2"):
        mask = np.asarray(kept[name]["kernel"])
        assert mask.sum() == round(0.1 * mask.size), name
