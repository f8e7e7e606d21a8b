"""Spectral truncation through the config-driven trainer's state and step (`experiments.state`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import rank_adaptive_mnist1d
from experiments import data as data_lib
from experiments import models, sweep
from experiments import state as state_lib
from sparsejax import transforms


def _config():
    config = rank_adaptive_mnist1d.get_config("runlocal")
    config.total_steps = 41
    config.batch_size = 32
    config.sparsity.update(update_every_steps=20, begin_step=20, end_step=40, tau=0.3)
    return config


def _dataset():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 40, 1)).astype(np.float32)
    y = rng.integers(0, 10, 64).astype(np.int32)
    return data_lib.Dataset(x, y, x[:32], y[:32], 10)


def test_spectral_truncation_trains_from_the_config_and_cuts_ranks():
    config = _config()
    dataset = _dataset()
    model = models.make_model(config, dataset.num_classes)
    state, tx, algorithm = state_lib.create_train_state(config, model, dataset)
    assert type(algorithm).__name__ == "SpectralTruncation"
    step = jax.jit(state_lib.step_functions(model, tx, algorithm)[0])
    for t in range(config.total_steps):
        x, y = data_lib.batch_at(
            dataset.x_train, dataset.y_train, batch_size=config.batch_size, seed=0, step=t
        )
        state, _ = step(state, x, y)
    masks = transforms.get_masks(state.opt_state)
    live = [np.asarray(m) for m in jax.tree.leaves(masks)]
    assert live and sum(int((~m).sum()) for m in live) > 0, "tau=0.3 truncated nothing"
    # Truncated components are exactly zero in the params, and training stayed finite.
    params = dict(jax.tree_util.tree_leaves_with_path(state.params))
    for path, m in jax.tree_util.tree_leaves_with_path(masks):
        p = np.asarray(params[path])
        assert (p[~np.asarray(m)] == 0).all(), jax.tree_util.keystr(path)
    assert all(bool(jnp.isfinite(p).all()) for p in params.values())


def test_a_seed_sweep_refuses_spectral_truncation():
    with pytest.raises(ValueError, match="'spectral_truncation' rotates params"):
        sweep.train_seeds(_config(), [0, 1], dataset=_dataset(), progress=False)
