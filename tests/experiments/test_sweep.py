"""A vmapped sweep over seeds reproduces single runs seed by seed."""

from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import quickstart
from experiments import sweep, train


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
