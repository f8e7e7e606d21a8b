"""The run's optimizer from its config: the dense optax chain and its masked wrapper."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs.base import get_base_config
from experiments import optim
from sparsejax import algorithms, transforms

PARAMS = {
    "dense": {"kernel": jnp.linspace(-1.0, 1.0, 48).reshape(6, 8), "bias": jnp.zeros(8)},
}


def _config(**sparsity):
    config = get_base_config()
    config.total_steps = 10
    config.sparsity = ml_collections.ConfigDict({"algorithm": "dense", **sparsity})
    return config


def test_masked_optimizer_with_the_dense_algorithm_updates_as_the_dense_chain():
    config = _config()
    grads = jax.tree.map(lambda p: jnp.cos(3.0 * p) + 0.5, PARAMS)
    dense = optim.make_optimizer(config, config.total_steps)
    masked = optim.make_masked_optimizer(config, algorithms.Dense())
    want, _ = dense.update(grads, dense.init(PARAMS), PARAMS)
    got, state = masked.update(grads, masked.init(PARAMS), PARAMS)
    assert isinstance(state, transforms.MaskedState)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("packed", [False, True])
def test_pack_masks_keeps_the_masks_bit_packed_in_the_state(packed):
    config = _config(algorithm="static", target=0.5, distribution="uniform")
    config.pack_masks = packed
    algorithm = algorithms.from_config(config.sparsity, config.total_steps)
    tx = optim.make_masked_optimizer(config, algorithm, key=jax.random.key(0))
    state = tx.init(PARAMS)
    stored = jax.tree.leaves(state.masks)
    assert stored and all((x.dtype == jnp.bool_) != packed for x in stored)
    mask = transforms.get_masks(state)["dense"]["kernel"]
    assert mask.dtype == jnp.bool_ and int(mask.sum()) == 24


def test_masked_optimizer_starts_from_the_masks_it_is_given():
    config = _config(algorithm="static", target=0.5, distribution="uniform")
    algorithm = algorithms.from_config(config.sparsity, config.total_steps)
    given = {"dense": {"kernel": jnp.arange(48).reshape(6, 8) % 3 == 0, "bias": None}}
    tx = optim.make_masked_optimizer(config, algorithm, key=jax.random.key(0), masks=given)
    got = transforms.get_masks(tx.init(PARAMS))
    np.testing.assert_array_equal(np.asarray(got["dense"]["kernel"]), given["dense"]["kernel"])


def test_pack_masks_must_be_a_bool():
    config = _config()
    assert optim.packs_masks(config) is False
    config.pack_masks = True
    assert optim.packs_masks(config) is True
    unchecked = ml_collections.ConfigDict(config.to_dict(), type_safe=False)
    unchecked.pack_masks = 1
    with pytest.raises(ValueError, match="pack_masks must be a bool, got 1"):
        optim.make_masked_optimizer(unchecked, algorithms.Dense())


def test_unknown_optimizer_lists_the_known_ones():
    config = _config()
    config.optimizer.name = "adagrad"
    with pytest.raises(ValueError, match="'adagrad'") as info:
        optim.make_optimizer(config, 10)
    assert all(name in str(info.value) for name in optim.OPTIMIZERS)


def test_schedules_follow_the_config():
    config = _config()
    config.optimizer.update(name="sgd", learning_rate=1.0, schedule="cosine", warmup_steps=0)
    tx = optim.make_optimizer(config, 4)
    grads = {"w": jnp.ones(())}
    state = tx.init(grads)
    steps = []
    for _ in range(5):
        updates, state = tx.update(grads, state)
        steps.append(-float(updates["w"]))
    want = [float(optax.cosine_decay_schedule(1.0, 4)(t)) for t in range(5)]
    np.testing.assert_allclose(steps, want, rtol=1e-6)
