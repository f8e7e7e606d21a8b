"""SNFS (momentum redistribution) and straight-through magnitude pruning."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparsejax import algorithms, transforms
from tests.sparsejax.algorithms.conftest import loss


def _masks_for(params, algo):
    return algo.init_masks(params, jax.random.key(3))


def test_snfs_moves_capacity_toward_the_layer_with_larger_momentum(problem):
    params, _, _ = problem
    algo = algorithms.get("snfs", sparsity=0.75, distribution="uniform", end_step=1000)
    masks = _masks_for(params, algo)
    # Layer l1 keeps moving (large momentum), layer l2 has settled.
    key1, key2 = jax.random.split(jax.random.key(4))
    momentum = {
        "l1": {"kernel": 1.0 + jax.random.uniform(key1, (12, 16)), "bias": jnp.zeros(16)},
        "l2": {"kernel": 1e-3 * jax.random.uniform(key2, (16, 4)), "bias": None},
    }
    momentum = {"l1": momentum["l1"], "l2": {"kernel": momentum["l2"]["kernel"]}}
    new = algo.update_masks(masks, params, None, jnp.asarray(100), jax.random.key(5), momentum)
    before = [int(masks[k]["kernel"].sum()) for k in ("l1", "l2")]
    after = [int(new[k]["kernel"].sum()) for k in ("l1", "l2")]
    assert sum(after) == sum(before)  # The total budget is conserved exactly.
    assert after[0] > before[0] and after[1] < before[1]
    # Regrowth picks the missing weights with the largest momentum.
    grown = new["l1"]["kernel"] & ~masks["l1"]["kernel"]
    missing_not_grown = ~new["l1"]["kernel"] & ~masks["l1"]["kernel"]
    if int(grown.sum()) and int(missing_not_grown.sum()):
        mom = momentum["l1"]["kernel"]
        assert float(mom[grown].min()) >= float(mom[missing_not_grown].max())


def test_snfs_keeps_total_density_and_zeros_through_training(problem):
    params, x, y = problem
    algo = algorithms.get(
        "snfs", sparsity=0.8, distribution="erk", update_every_steps=5, end_step=40
    )
    tx = transforms.masked(optax.sgd(0.1, momentum=0.9), algo)
    state = tx.init(params)
    p = transforms.sparsify(params, state)

    @jax.jit
    def step(p, state):
        u, state = tx.update(jax.grad(loss)(p, x, y), state, p)
        return optax.apply_updates(p, u), state

    total = None
    for _ in range(30):
        p, state = step(p, state)
        m = transforms.get_masks(state)
        live = int(m["l1"]["kernel"].sum()) + int(m["l2"]["kernel"].sum())
        total = live if total is None else total
        assert live == total
        for k in ("l1", "l2"):
            assert bool(jnp.all(jnp.where(m[k]["kernel"], True, p[k]["kernel"] == 0)))
    # The momentum of the dense gradient lives in the state, shaped like the params.
    assert jax.tree.structure(state.algo_state) == jax.tree.structure(params)


@pytest.mark.parametrize(
    "field, value, shown",
    [
        ("prune_rate", 1.5, "1.5"),
        ("prune_rate", -0.1, "-0.1"),
        ("prune_rate", "0.5", "'0.5'"),
        ("prune_rate", True, "True"),
        ("momentum", 1.0, "1.0"),
        ("momentum", "0.9", "'0.9'"),
    ],
)
def test_snfs_names_its_own_field_for_a_bad_value(field, value, shown):
    # prune_rate goes on to the drop-fraction schedule, whose argument is called
    # initial_fraction: the message must name the SNFS field the user set.
    with pytest.raises(ValueError, match=f"^{field} ") as info:
        algorithms.get("snfs", sparsity=0.5, **{field: value})
    assert shown in str(info.value)


def test_ste_forward_is_masked_and_backward_is_straight_through(problem):
    params, x, y = problem
    algo = algorithms.get("ste", sparsity=0.5, distribution="uniform")
    masks = algo.init_masks(params, jax.random.key(0))
    fwd = algo.forward_params(params, masks)
    np.testing.assert_array_equal(
        fwd["l1"]["kernel"], jnp.where(masks["l1"]["kernel"], params["l1"]["kernel"], 0.0)
    )
    # d/dw L(forward(w)) equals dL/dv evaluated at v = w * m, at every entry.
    through = jax.grad(lambda p: loss(algo.forward_params(p, masks), x, y))(params)
    direct = jax.grad(loss)(fwd, x, y)
    for a, b in zip(jax.tree.leaves(through), jax.tree.leaves(direct), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_ste_keeps_dense_weights_and_lets_pruned_weights_return(problem):
    params, x, y = problem
    algo = algorithms.get("ste", sparsity=0.5, distribution="uniform")
    tx = transforms.masked(optax.sgd(0.5), algo)
    state = tx.init(params)
    first = transforms.get_masks(state)

    @jax.jit
    def step(p, state):
        m = transforms.get_masks(state)
        g = jax.grad(lambda q: loss(algo.forward_params(q, m), x, y))(p)
        u, state = tx.update(g, state, p)
        return optax.apply_updates(p, u), state

    p = params
    for _ in range(20):
        p, state = step(p, state)
    m = transforms.get_masks(state)
    # Pruned weights are not zeroed: they keep learning under the straight-through gradient.
    assert int((~m["l1"]["kernel"] & (p["l1"]["kernel"] != 0)).sum()) > 0
    # The mask is the top half by magnitude of the current dense weights, exactly.
    k = p["l1"]["kernel"]
    assert int(m["l1"]["kernel"].sum()) == k.size // 2
    assert float(jnp.abs(k)[m["l1"]["kernel"]].min()) >= float(jnp.abs(k)[~m["l1"]["kernel"]].max())
    # ... and it moved: some pruned weights came back.
    assert bool(jnp.any(m["l1"]["kernel"] & ~first["l1"]["kernel"]))
