"""``config.sparsity.execution="bsr"``: the trainer runs block-sparse (block_execution).

The runs use ``configs/block_sparse_mlp.py:runlocal``: a 64-256-256-10 ReLU MLP on
teacher-student data, block RigL at 90% of 32x32 blocks, masks moved every 5 of 20 steps.
"""

from __future__ import annotations

import json
import os
import shutil

import chex
import jax
import ml_collections
import numpy as np
import pytest

from configs import block_sparse_mlp
from experiments import block_execution, checkpoints, sweep, train
from experiments import data as data_lib
from experiments import models as models_lib
from experiments import state as state_lib
from sparsejax import block_sparse, transforms


def _config(**overrides) -> ml_collections.ConfigDict:
    config = block_sparse_mlp.get_config("runlocal")
    for key, value in overrides.items():
        section, leaf = key.split(".") if "." in key else (None, key)
        (config[section] if section else config)[leaf] = value
    return config


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _setup(config):
    dataset = data_lib.load_from_config(config)
    model = models_lib.make_model(config, dataset.num_classes)
    return dataset, model


def _final_state(config, workdir, tmp_path):
    """The workdir's latest checkpoint restored into the config's own state structure."""
    dataset, model = _setup(config)
    template, _, _ = state_lib.create_train_state(config, model, dataset)
    manager = checkpoints.open_manager(workdir, max_to_keep=3)
    try:
        state, step = checkpoints.restore_latest(
            manager, template, quarantine_dir=str(tmp_path / "quarantine")
        )
    finally:
        manager.close()
    assert step == config.total_steps
    return state


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The runlocal config trained once in each mode from the same seed."""
    out = {}
    for execution in ("bsr", "masked"):
        workdir = str(tmp_path_factory.mktemp(execution))
        record = train.train_and_evaluate(_config(**{"sparsity.execution": execution}), workdir)
        out[execution] = (workdir, record)
    return out


def test_bsr_run_trains_end_to_end_with_the_layouts_exact_sparsity(runs, tmp_path):
    workdir, record = runs["bsr"]
    config = _config()
    assert config.sparsity.execution == "bsr"
    records = _records(workdir)
    assert [r["step"] for r in records] == [10, 20] and records[-1] == record
    assert all(np.isfinite(r["train_loss"]) and 0 <= r["test_accuracy"] <= 1 for r in records)
    state = _final_state(config, workdir, tmp_path)
    layouts = block_sparse.get_layouts(state.opt_state)
    # The fraction of unstored weights, counted from the masks the layouts cover.
    kernels = [m for m in jax.tree.leaves(block_sparse.masks_from_layouts(layouts))]
    assert len(kernels) == 2  # hidden_0 and hidden_1; the output stays dense
    stored = sum(int(np.sum(np.asarray(m))) for m in kernels)
    total = sum(m.size for m in kernels)
    want = np.float32(1.0 - stored / total)
    assert all(r["sparsity"] == float(want) for r in records)
    assert float(block_execution.layout_sparsity(layouts)) == float(want)
    assert abs(want - config.sparsity.target) < 0.02  # whole 32x32 blocks per layer


def test_masked_and_bsr_runs_pick_the_same_blocks_and_reach_the_same_params(runs, tmp_path):
    """COO RigL in both modes from one seed: the same masks exactly, params up to rounding.

    The MLP is ReLU (`experiments.models.MLP` has no other activation), whose kinks can
    amplify the different summation order of the block products; over 20 steps (three
    mask updates) the runs stay within 1e-4, well under the weights' scale (~0.05).
    """
    bsr = _final_state(_config(), runs["bsr"][0], tmp_path / "b")
    masked_config = _config(**{"sparsity.execution": "masked"})
    masked = _final_state(masked_config, runs["masked"][0], tmp_path / "m")
    layouts = block_sparse.get_layouts(bsr.opt_state)
    bsr_masks = block_sparse.masks_from_layouts(layouts)
    masked_masks = transforms.get_masks(masked.opt_state)
    for name in ("hidden_0", "hidden_1"):
        np.testing.assert_array_equal(
            np.asarray(bsr_masks[name]["kernel"]), np.asarray(masked_masks[name]["kernel"])
        )
    assert masked_masks["output"]["kernel"] is None and bsr_masks["output"]["kernel"] is None
    dense = block_sparse.to_dense(bsr.params, layouts)
    chex.assert_trees_all_close(dense, masked.params, atol=1e-4, rtol=1e-4)
    a, b = runs["bsr"][1], runs["masked"][1]
    assert abs(a["test_loss"] - b["test_loss"]) < 1e-4


def test_bsr_resume_gives_the_same_state_as_an_uninterrupted_run(runs, tmp_path):
    """The whole state (values, CooBlocks layouts, moments, counters) round-trips orbax."""
    workdir, _ = runs["bsr"]
    resumed = str(tmp_path / "resumed")
    shutil.copytree(workdir, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "20"))
    record = train.train_and_evaluate(_config(), resumed)
    assert record["step"] == 20 and [r["step"] for r in _records(resumed)] == [10, 20]
    expected = _final_state(_config(), workdir, tmp_path / "e")
    got = _final_state(_config(), resumed, tmp_path / "g")
    assert jax.tree.structure(expected) == jax.tree.structure(got)
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("layout", ["coo", "fan_in"])
def test_bsr_train_step_is_traced_once_across_mask_updates(layout):
    config = _config(**{"sparsity.block_layout": layout})
    if layout == "fan_in":
        # At these sizes fan-in keeps one block per column; 30% of one rounds to no swap.
        config.sparsity.drop_fraction = 0.9
    dataset, model = _setup(config)
    state, tx, algorithm = state_lib.create_train_state(config, model, dataset)
    train_body, eval_body, sparsity = state_lib.step_functions(
        model, tx, algorithm, execution="bsr"
    )
    chex.clear_trace_counter()  # the counter is keyed by the body's code, shared by both params
    train_step = jax.jit(chex.assert_max_traces(train_body, n=1))
    start = block_sparse.get_layouts(state.opt_state)
    for step in range(11):  # mask updates at steps 5 and 10
        x, y = data_lib.batch_at(
            dataset.x_train, dataset.y_train, batch_size=config.batch_size, seed=0, step=step
        )
        state, metrics = train_step(state, x, y)
        assert np.isfinite(float(metrics["loss"]))
    moved = block_sparse.get_layouts(state.opt_state)
    assert any(
        not np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(moved), strict=True)
    ), "no mask update moved a block"
    assert float(jax.jit(sparsity)(state)) == float(block_execution.layout_sparsity(moved))
    loss, correct = jax.jit(eval_body)(state, dataset.x_test, dataset.y_test)
    assert np.isfinite(float(loss)) and 0 <= int(correct) <= len(dataset.y_test)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"sparsity.execution": "sparse"}, "config.sparsity.execution='sparse' is unknown"),
        ({"sparsity.block_layout": "csr"}, "config.sparsity.block_layout='csr' is unknown"),
        ({"sparsity.structure": "unstructured"}, "config.sparsity.execution='bsr'.*structure"),
        ({"sparsity.algorithm": "magnitude"}, "config.sparsity.execution='bsr'.*number of"),
        ({"sparsity.algorithm": "sr_ste"}, "config.sparsity.execution='bsr'"),
        ({"model.api": "nnx"}, "config.sparsity.execution='bsr' runs Linen models only"),
        ({"pack_masks": True}, "config.sparsity.execution='bsr'.*pack_masks"),
    ],
)
def test_bad_execution_configs_are_refused_before_anything_is_written(tmp_path, overrides, message):
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match=message):
        train.train_and_evaluate(_config(**overrides), str(workdir))
    assert not workdir.exists()


def test_a_factorized_model_is_refused_in_bsr_mode(tmp_path):
    config = _config()
    config.model.factorize = {"hidden_1": {"format": "tt_matrix", "rank": 0.1}}
    with pytest.raises(ValueError, match="config.sparsity.execution='bsr' cannot run a factor"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_the_masked_default_is_unchanged_and_a_sweep_refuses_bsr():
    from configs import base

    assert base.get_base_config().sparsity.execution == "masked"
    config = _config()
    dataset, _ = _setup(config)
    with pytest.raises(ValueError, match="config.sparsity.execution='bsr'"):
        sweep.stack_seeds(config, [0, 1], dataset)
