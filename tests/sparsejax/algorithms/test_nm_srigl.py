"""SRigL: constant fan-in dynamic sparse training with neuron ablation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparsejax import algorithms, transforms
from sparsejax.algorithms.srigl import fan_in_counts
from tests.sparsejax.algorithms.conftest import loss


def _constant_fan_in(mask) -> int:
    """The common fan-in of the active neurons (asserting there is one)."""
    counts = np.asarray(fan_in_counts(jnp.asarray(mask)))
    active = counts[counts > 0]
    assert active.size and np.all(active == active[0]), counts
    return int(active[0])


def test_init_masks_have_constant_fan_in(problem):
    params, _, _ = problem
    algo = algorithms.get("srigl", sparsity=0.75, distribution="uniform", end_step=100)
    m = algo.init_masks(params, jax.random.key(0))
    assert _constant_fan_in(m["l1"]["kernel"]) == 3  # 12 inputs at density 0.25
    assert _constant_fan_in(m["l2"]["kernel"]) == 4  # 16 inputs
    assert m["l1"]["bias"] is None


def test_training_keeps_constant_fan_in_and_the_layer_budget(problem):
    params, x, y = problem
    algo = algorithms.get(
        "srigl", sparsity=0.75, distribution="uniform", update_every_steps=2, end_step=20
    )
    tx = transforms.masked(optax.adam(1e-2), algo)
    state = tx.init(params)
    p = transforms.sparsify(params, state)
    budget = {k: int(transforms.get_masks(state)[k]["kernel"].sum()) for k in ("l1", "l2")}

    @jax.jit
    def step(p, s):
        u, s = tx.update(jax.grad(loss)(p, x, y), s, p)
        return optax.apply_updates(p, u), s

    changed = False
    first = transforms.get_masks(state)
    for _ in range(12):
        p, state = step(p, state)
        current = transforms.get_masks(state)
        for k in ("l1", "l2"):
            mask = np.asarray(current[k]["kernel"])
            k_fan = _constant_fan_in(mask)
            active = int((fan_in_counts(jnp.asarray(mask)) > 0).sum())
            # floor(L / A) per neuron: never over budget, at most A - 1 weights under it.
            assert budget[k] - active < k_fan * active <= budget[k]
            assert np.all(np.asarray(p[k]["kernel"])[~mask] == 0)
        changed |= bool(np.any(np.asarray(current["l1"]["kernel"]) != first["l1"]["kernel"]))
    assert changed  # connections did move


def test_grows_by_gradient_inside_each_neuron_and_ablates_dead_neurons():
    fan_in, out = 8, 4
    w = jnp.ones((fan_in, out)).at[:, 3].set(0.0)  # neuron 3 has no weight...
    g = jnp.zeros((fan_in, out)).at[:, :3].set(jnp.arange(fan_in, dtype=jnp.float32)[:, None])
    mask = jnp.zeros((fan_in, out), bool).at[:4].set(True)  # fan-in 4 everywhere
    params, grads, masks_tree = {"k": w}, {"k": g}, {"k": mask}
    algo = algorithms.get(
        "srigl", sparsity=0.5, distribution="uniform", drop_fraction=0.5, end_step=1000
    )
    new = algo.update_masks(masks_tree, params, grads, jnp.asarray(0), jax.random.key(0))["k"]
    counts = np.asarray(fan_in_counts(new))
    assert counts[3] == 0  # ...and no gradient: not salient, ablated
    # Its budget (16 weights over 3 neurons) gives the others floor(16 / 3) = 5 each.
    np.testing.assert_array_equal(counts[:3], 5)
    # Each neuron grows the inputs with the largest gradient (rows 7, 6, ...).
    assert bool(new[7, 0]) and bool(new[6, 0])
    # gamma_sal = 0 never ablates: every neuron keeps exactly 4.
    algo0 = algorithms.get(
        "srigl", sparsity=0.5, distribution="uniform", gamma_sal=0.0, end_step=1000
    )
    kept = algo0.update_masks(masks_tree, params, grads, jnp.asarray(0), jax.random.key(0))["k"]
    np.testing.assert_array_equal(np.asarray(fan_in_counts(kept)), 4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"gamma_sal": 1.5}, "gamma_sal must be in"),
        ({"distribution": "global"}, "fan-in constant"),
    ],
)
def test_bad_hyperparameters_raise_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        algorithms.get("srigl", **kwargs)
