"""A vmapped sweep over seeds reproduces single runs seed by seed."""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import quickstart
from experiments import data as data_lib
from experiments import sweep, train
from sparsejax import masks, transforms


@pytest.mark.parametrize("algorithm", ["rigl", "synflow"])
def test_seed_of_a_sweep_equals_the_single_run(tmp_path, algorithm):
    config = quickstart.get_config("runlocal")
    config.sparsity.algorithm = algorithm
    config.sparsity.rounds = 3
    result = sweep.train_seeds(config, [0, 1], progress=False, eval_every_steps=10)
    assert result.test_accuracy.shape == (2, 2) and result.steps == [10, 20]
    np.testing.assert_allclose(result.sparsity, config.sparsity.target, atol=1e-3)

    config.seed = 1
    record = train.train_and_evaluate(config, str(tmp_path))
    assert record["test_accuracy"] == pytest.approx(result.test_accuracy[1, -1], abs=1e-6)
    manager = ocp.CheckpointManager(os.path.join(tmp_path, "checkpoints"))
    single = manager.restore(20, args=ocp.args.StandardRestore())["params"]
    manager.close()
    for a, b in zip(
        jax.tree.leaves(single),
        jax.tree.leaves(jax.tree.map(lambda v: v[1], result.final_state.params)),
        strict=True,
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_a_seed_stack_starts_from_the_given_params_and_masks_and_shares_the_step():
    config = quickstart.get_config("runlocal")
    config.model = ml_collections.ConfigDict({"name": "mlp", "features": (16,)})
    config.sparsity = ml_collections.ConfigDict(
        {"algorithm": "static", "target": 0.5, "distribution": "uniform"}
    )
    config.total_steps, config.batch_size = 3, 8
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 40, 1)).astype(np.float32)
    y = rng.integers(0, 10, 32).astype(np.int32)
    dataset = data_lib.Dataset(x, y, x[:8], y[:8], 10)

    fresh = sweep.stack_seeds(config, [0, 1], dataset)
    flipped = jax.tree.map(
        lambda m: None if m is None else ~m,
        transforms.get_masks(fresh.state.opt_state),
        is_leaf=masks.is_none,
    )
    dense = jax.tree.map(lambda p: p + 1.0, fresh.state.params)  # nonzero almost surely
    stack = sweep.stack_seeds(config, [0, 1], dataset, initial_params=dense, initial_masks=flipped)
    assert stack.axes.step is None and stack.state.step.shape == ()
    np.testing.assert_array_equal(
        stack.indices[:, 1],
        data_lib.batch_indices(32, batch_size=8, seed=1, num_steps=config.total_steps),
    )
    # Every seed keeps its given mask, and its given params with the pruned entries zeroed.
    given, got = _by_path(flipped), _by_path(transforms.get_masks(stack.state.opt_state))
    start, new = _by_path(dense), _by_path(stack.state.params)
    assert given and set(given) == set(got)
    assert all(0 < m.mean() < 1 for m in given.values())
    for name, m in given.items():
        np.testing.assert_array_equal(got[name], m)
        np.testing.assert_array_equal(new[name], np.where(m, start[name], 0.0))
    state, metrics = stack.train_step(stack.state, stack.indices[0])
    assert int(state.step) == 1 and metrics["loss"].shape == (2,)


def _by_path(tree):
    """{path: numpy leaf} of a tree's array leaves (None leaves skipped)."""
    leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=masks.is_none)
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves if v is not None}
