"""The train state and its steps (`experiments.state`), on a tiny MLP."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import quickstart
from experiments import data as data_lib
from experiments import models
from experiments import state as state_lib
from sparsejax import algorithms


def _setup():
    config = quickstart.get_config("runlocal")
    config.model = ml_collections.ConfigDict({"name": "mlp", "features": (16,)})
    config.batch_size = 8
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 40, 1)).astype(np.float32)
    y = rng.integers(0, 10, 32).astype(np.int32)
    dataset = data_lib.Dataset(x, y, x[:8], y[:8], 10)
    model = models.make_model(config, dataset.num_classes)
    algorithm = algorithms.from_config(config.sparsity, config.total_steps)
    return config, dataset, model, algorithm


def _assert_trees_equal(a, b):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def test_init_state_is_a_pure_function_of_the_key_and_vmaps_over_seeds():
    config, dataset, model, algorithm = _setup()
    x, cal = jnp.asarray(dataset.x_train[:1]), (dataset.x_train[:8], dataset.y_train[:8])

    def init(key_data):
        key = jax.random.wrap_key_data(key_data)
        return state_lib.init_state(config, model, algorithm, key, x, cal)

    keys = jnp.stack([jax.random.key_data(jax.random.key(s)) for s in (0, 1)])
    stacked = jax.vmap(init)(keys)
    for i in range(2):
        _assert_trees_equal(jax.tree.map(lambda v, i=i: v[i], stacked), jax.jit(init)(keys[i]))
    assert not np.array_equal(
        stacked.params["hidden_0"]["kernel"][0], stacked.params["hidden_0"]["kernel"][1]
    )


def test_jitted_steps_match_the_bodies_and_evaluate_averages_the_eval_step():
    config, dataset, model, algorithm = _setup()
    state, tx, algorithm = state_lib.create_train_state(config, model, dataset)
    assert int(state.step) == 0
    train_body, eval_body, _ = state_lib.step_functions(model, tx, algorithm)
    train_step, eval_step, sparsity = state_lib.make_step_functions(model, tx, algorithm)
    x, y = data_lib.batch_at(dataset.x_train, dataset.y_train, batch_size=8, seed=0, step=0)
    want, _ = jax.jit(train_body)(state, x, y)
    got, metrics = train_step(jax.tree.map(jnp.copy, state), x, y)  # train_step donates
    _assert_trees_equal(want, got)
    assert int(got.step) == 1 and set(metrics) == {"loss", "accuracy"}
    assert abs(float(sparsity(got)) - config.sparsity.target) < 0.05
    record = state_lib.evaluate(eval_step, got, dataset.x_test, dataset.y_test, batch_size=3)
    loss, correct = eval_body(got, dataset.x_test, dataset.y_test)
    assert record["test_loss"] == pytest.approx(float(loss) / 8, rel=1e-5)
    assert record["test_accuracy"] == int(correct) / 8
    assert state_lib.algo_state_of(got.opt_state) == state_lib.algo_state_of(state.opt_state)


def test_fsdp_min_size_reads_the_mesh_config():
    config = quickstart.get_config("runlocal")
    assert state_lib.fsdp_min_size(config) == 2**16
    config.mesh.fsdp_min_size = 512
    assert state_lib.fsdp_min_size(config) == 512
    config.mesh.fsdp_min_size = 0
    with pytest.raises(ValueError, match="fsdp_min_size must be a positive integer, got 0"):
        state_lib.fsdp_min_size(config)
