"""IMP with rewinding to step k: theta_k from the full dense run, rounds resumed at step k.

Frankle et al. 2020, "Linear Mode Connectivity and the Lottery Ticket Hypothesis":
rewinding to iteration k sets the surviving weights to their values at step k of
the (full-length) dense run and trains from iteration k to T, so the learning-rate
schedule and the data order continue from step k.
"""

from __future__ import annotations

import math

import jax
import ml_collections
import numpy as np
import optax
import pytest

from configs.base import get_base_config
from experiments import data as data_lib
from experiments import lottery, sweep
from sparsejax import masks

TOTAL, REWIND, LR = 12, 5, 0.1


def _config(target: float | None = None) -> ml_collections.ConfigDict:
    """SGD (no momentum) with a cosine schedule: an update is -lr(t) * gradient."""
    config = get_base_config()
    config.progress_bar = False
    config.model = ml_collections.ConfigDict({"name": "mlp", "features": (16,)})
    config.optimizer.name = "sgd"
    config.optimizer.learning_rate = LR
    config.optimizer.schedule = "cosine"
    config.total_steps, config.batch_size, config.eval_every_steps = TOTAL, 8, TOTAL
    if target is not None:
        config.sparsity = ml_collections.ConfigDict(
            {"algorithm": "static", "target": target, "distribution": "uniform"}
        )
    return config


def _dataset() -> data_lib.Dataset:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 40, 1)).astype(np.float32)
    y = rng.integers(0, 10, 32).astype(np.int32)
    return data_lib.Dataset(x, y, x[:8], y[:8], 10)


def _cosine(step: int) -> float:
    """The full run's learning rate at ``step`` (cosine decay over TOTAL steps, to 0)."""
    return LR * 0.5 * (1.0 + math.cos(math.pi * step / TOTAL))


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_rewinding_to_step_k_takes_the_full_dense_runs_weights_and_resumes_at_k(monkeypatch):
    dataset, seeds = _dataset(), [0, 1]
    calls = []
    real = sweep.train_seeds

    def spy(config, run_seeds, **kwargs):
        result = real(config, run_seeds, **kwargs)
        calls.append((config, kwargs, result))
        return result

    monkeypatch.setattr(sweep, "train_seeds", spy)
    lottery.run_imp(_config(), seeds, rounds=1, rewind_step=REWIND, dataset=dataset, progress=False)

    # The reference: the full-length dense run of the same seeds, stopped after k steps.
    stack = sweep.stack_seeds(_config(target=0.0), seeds, dataset)
    state = stack.state
    for t in range(REWIND):
        state, _ = stack.train_step(state, stack.indices[t])
    theta_k = state.params

    dense_config, dense_kwargs, _ = calls[0]
    assert dense_config.total_steps == TOTAL and dense_kwargs.get("start_step", 0) == 0
    ticket_kwargs, ticket = calls[1][1], calls[1][2]
    for got, want in zip(_leaves(ticket_kwargs["initial_params"]), _leaves(theta_k), strict=True):
        np.testing.assert_array_equal(got, want)
    # The ticket and both controls resume at step k and train the T - k steps left.
    for config, kwargs, result in calls[1:]:
        assert config.total_steps == TOTAL and kwargs["start_step"] == REWIND
        assert result.steps == [TOTAL] and int(result.final_state.step) == TOTAL
    # The ticket runs theta_k under the pruned masks (20% of each layer's weights gone).
    kept = [m for m in jax.tree.leaves(ticket_kwargs["initial_masks"], is_leaf=masks.is_none)]
    assert kept and all(m is None or 0 < np.mean(m) < 1 for m in kept)
    pruned_theta_k = jax.tree.map(
        lambda m, p: p if m is None else np.where(m, p, 0.0),
        ticket_kwargs["initial_masks"],
        theta_k,
        is_leaf=masks.is_none,
    )
    for start, want in zip(_leaves(ticket.initial_params), _leaves(pruned_theta_k), strict=True):
        np.testing.assert_array_equal(start, want)


def test_a_round_started_at_step_k_has_the_full_schedules_learning_rate_and_batches():
    dataset = _dataset()
    config = _config(target=0.0)  # all weights live: the update is -lr * the whole gradient
    full = sweep.stack_seeds(config, [0], dataset)
    resumed = sweep.stack_seeds(config, [0], dataset, start_step=REWIND)
    # The batches of steps k .. T - 1 of the full run, and the counters at k.
    np.testing.assert_array_equal(resumed.indices, full.indices[REWIND:])
    assert int(resumed.state.step) == REWIND
    assert int(resumed.state.opt_state.count) == REWIND

    state, batch = resumed.state, resumed.indices[0]
    x, y = dataset.x_train[batch[0]], dataset.y_train[batch[0]]
    params = jax.tree.map(lambda p: p[0], state.params)

    def loss(p):
        logits = resumed.model.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    grads = jax.grad(loss)(params)
    new, _ = resumed.train_step(state, batch)
    lr_k = _cosine(REWIND)
    assert lr_k < 0.75 * LR  # the schedule has moved: lr(k) is not lr(0)
    for p_new, p_old, g in zip(
        _leaves(jax.tree.map(lambda p: p[0], new.params)),
        _leaves(params),
        _leaves(grads),
        strict=True,
    ):
        np.testing.assert_allclose(p_new - p_old, -lr_k * g, rtol=2e-4, atol=1e-7)


@pytest.mark.parametrize("bad", [-1, TOTAL, 2.5, True])
def test_a_rewind_step_out_of_range_is_refused_by_name(bad):
    with pytest.raises(ValueError, match="rewind_step must be an integer in"):
        lottery.run_imp(_config(), [0], rounds=1, rewind_step=bad, dataset=_dataset())


@pytest.mark.parametrize("bad", [-1, TOTAL])
def test_a_start_step_out_of_range_is_refused_by_name(bad):
    with pytest.raises(ValueError, match="start_step must be an integer in"):
        sweep.stack_seeds(_config(target=0.0), [0], _dataset(), start_step=bad)


@pytest.mark.parametrize("bad", [REWIND - 1, TOTAL + 1, "3"])
def test_a_snapshot_step_out_of_range_is_refused_by_name(bad):
    with pytest.raises(ValueError, match="snapshot_steps must be integers in"):
        sweep.train_seeds(
            _config(target=0.0),
            [0],
            dataset=_dataset(),
            start_step=REWIND,
            snapshot_steps=(bad,),
            progress=False,
        )
