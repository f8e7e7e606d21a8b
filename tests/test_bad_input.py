"""The bad-input catalogue: each wrong value users pass is a ValueError naming argument and value.

Every public entry point (masks, distributions, schedules, scores, algorithms,
transforms, export, soups, post-training pruners, tensornets formats, rank masks
and layers, pallas_kernels formats and ops, experiments data, models, train,
reproduce, distributed, launch) and every config key gets the mistakes people
make: sparsity < 0 or >= 1, N > M, shapes or blocks that do not divide, rank <= 0,
unknown names, a missing data folder, NaN weights or inputs, mask trees of other
keys or dtypes, wrong dtypes and types. For config keys the run is started on a
workdir that already holds a run, and nothing in it may change.
"""

from __future__ import annotations

import os
import re

import flax.linen as flax_nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import quickstart
from experiments import checkpoints, data, distributed, launch, models, optim, reproduce, train
from pallas_kernels import formats as pallas_formats
from pallas_kernels import ops
from sparsejax import (
    algorithms,
    distributions,
    export,
    masks,
    posttrain,
    schedules,
    scores,
    soups,
    transforms,
)
from tensornets import layers
from tensornets import rank as rank_lib
from tensornets.formats import CP, TT, TTMatrix, Tubal, Tucker

W = jnp.ones((8, 16))
PARAMS = {"dense": {"kernel": W, "bias": jnp.zeros(16)}}
NAN_PARAMS = {"dense": {"kernel": W.at[2, 3].set(jnp.nan), "bias": jnp.zeros(16)}}
T3 = jnp.ones((4, 5, 6))
BSR_W = pallas_formats.BSR.from_dense(np.ones((8, 16), np.float32), block_shape=(4, 4))


def _init_dense(**attributes):
    module = layers.FactorizedDense(**attributes)
    return module.init(jax.random.key(0), jnp.ones((1, 16)))


_RUNLOCAL = quickstart.get_config("runlocal")


def _enter(context_manager):
    with context_manager:
        pass


# (id, call, the argument's name, its value as the message must show it)
API_CASES = [
    # masks
    ("topk_mask sparsity < 0", lambda: masks.topk_mask(W, -0.1), "sparsity", "-0.1"),
    ("topk_mask sparsity = 1", lambda: masks.topk_mask(W, 1.0), "sparsity", "1.0"),
    ("topk_mask sparsity NaN", lambda: masks.topk_mask(W, float("nan")), "sparsity", "nan"),
    ("topk_mask sparsity str", lambda: masks.topk_mask(W, "0.5"), "sparsity", "'0.5'"),
    ("nm_mask n > m", lambda: masks.nm_mask(W, 5, 4), "n", "5"),
    ("nm_mask n = 0", lambda: masks.nm_mask(W, 0, 4), "n", "0"),
    ("nm_mask n float", lambda: masks.nm_mask(W, 2.0, 4), "n", "2.0"),
    ("nm_mask m does not divide", lambda: masks.nm_mask(jnp.ones((8, 6)), 2, 4), "m", "4"),
    ("nm_mask axis out of range", lambda: masks.nm_mask(W, 2, 4, axis=5), "axis", "5"),
    (
        "block_mask block does not divide",
        lambda: masks.block_mask(W, 0.5, (3, 4)),
        "block_shape",
        "(3, 4)",
    ),
    ("block_mask block zero", lambda: masks.block_mask(W, 0.5, (0, 4)), "block_shape", "(0, 4)"),
    ("channel_mask axis", lambda: masks.channel_mask(W, 0.5, axis=3), "axis", "3"),
    ("channel_mask sparsity > 1", lambda: masks.channel_mask(W, 1.5), "sparsity", "1.5"),
    (
        "global_topk_masks sparsity = 1",
        lambda: masks.global_topk_masks(PARAMS, 1.0, {"dense": {"kernel": True, "bias": None}}),
        "sparsity",
        "1.0",
    ),
    # distributions, schedules, scores
    ("erk sparsity < 0", lambda: distributions.erk(PARAMS, -0.2), "sparsity", "-0.2"),
    ("uniform sparsity = 1", lambda: distributions.uniform(PARAMS, 1.0), "sparsity", "1.0"),
    ("distribution name", lambda: distributions.get("bogus"), "bogus", "'bogus'"),
    ("constant schedule", lambda: schedules.constant(1.2), "sparsity", "1.2"),
    ("periodic every 0", lambda: schedules.periodic(0, 100), "update_every_steps", "0"),
    (
        "drop fraction > 1",
        lambda: schedules.cosine_drop_fraction(1.5, 100),
        "initial_fraction",
        "1.5",
    ),
    ("score name", lambda: scores.get("bogus"), "bogus", "'bogus'"),
    # algorithms
    ("algorithm name", lambda: algorithms.get("bogus"), "algorithm", "'bogus'"),
    ("rigl sparsity = 1", lambda: algorithms.get("rigl", sparsity=1.0), "sparsity", "1.0"),
    ("static sparsity < 0", lambda: algorithms.get("static", sparsity=-0.5), "sparsity", "-0.5"),
    (
        "rigl update every 0",
        lambda: algorithms.get("rigl", sparsity=0.9, update_every_steps=0),
        "update_every_steps",
        "0",
    ),
    (
        "distribution name in an algorithm",
        lambda: algorithms.get("static", sparsity=0.9, distribution="bogus"),
        "distribution",
        "'bogus'",
    ),
    (
        "unknown algorithm argument",
        lambda: algorithms.get("static", sparsity=0.9, bogus=1),
        "bogus",
        "bogus",
    ),
    (
        "unknown sparsity config key",
        lambda: algorithms.from_config({"algorithm": "static", "nope": 1}, 100),
        "nope",
        "nope",
    ),
    # transforms
    (
        "masked inner not optax",
        lambda: transforms.masked("adam", algorithms.get("dense")),
        "inner",
        "str",
    ),
    (
        "masked packed not bool",
        lambda: transforms.masked(optax.sgd(1.0), algorithms.get("dense"), packed=1),
        "packed",
        "1",
    ),
    (
        "masked key not a typed key",
        lambda: transforms.masked(optax.sgd(1.0), algorithms.get("dense"), key=1),
        "key",
        "int",
    ),
    (
        "NaN weights to a pruner",
        lambda: transforms.masked(optax.sgd(1.0), algorithms.get("magnitude", sparsity=0.5)).init(
            NAN_PARAMS
        ),
        "params['dense']['kernel']",
        "NaN",
    ),
    (
        "integer weights",
        lambda: transforms.masked(optax.sgd(1.0), algorithms.get("static", sparsity=0.5)).init(
            {"w": jnp.ones((4, 4), jnp.int32)}
        ),
        "params['w']",
        "int32",
    ),
    (
        "masks of the wrong shape",
        lambda: transforms.masked(
            optax.sgd(1.0), algorithms.get("dense"), masks={"w": jnp.ones((4, 3), bool)}
        ).init({"w": jnp.ones((4, 4))}),
        "masks['w']",
        "(4, 3)",
    ),
    # tensornets
    ("CP rank 0", lambda: CP.from_dense(T3, 0), "rank", "0"),
    ("CP rank < 0", lambda: CP.from_dense(T3, -2), "rank", "-2"),
    ("Tucker rank 0", lambda: Tucker.from_dense(T3, 0), "rank", "0"),
    ("TT rank 0", lambda: TT.from_dense(T3, 0), "rank", "0"),
    ("Tubal rank 0", lambda: Tubal.from_dense(T3, 0), "rank", "0"),
    (
        "TT-matrix shape does not factor the matrix",
        lambda: TTMatrix.from_dense(jnp.ones((12, 16)), (3, 5), (4, 4), 2),
        "in_shape",
        "(3, 5)",
    ),
    (
        "layer format name",
        lambda: _init_dense(features=8, format="bogus", rank=2),
        "format",
        "'bogus'",
    ),
    ("layer rank 0", lambda: _init_dense(features=8, format="cp", rank=0), "rank", "0"),
    # pallas_kernels
    (
        "BSR block does not divide",
        lambda: pallas_formats.BSR.from_dense(np.ones((8, 16), np.float32), block_shape=(3, 4)),
        "block_shape",
        "(3, 4)",
    ),
    (
        "NM n > m",
        lambda: pallas_formats.NM.from_dense(np.ones((8, 16), np.float32), n=5, m=4),
        "n",
        "5",
    ),
    (
        "NM m does not divide",
        lambda: pallas_formats.NM.from_dense(np.ones((6, 16), np.float32), n=2, m=4),
        "m",
        "4",
    ),
    ("kernel impl name", lambda: ops.resolve_impl("bogus"), "impl", "'bogus'"),
    ("matmul inner dimension", lambda: ops.block_sparse_matmul(jnp.ones((2, 7)), BSR_W), "x", "7"),
    # experiments
    ("dataset name", lambda: data.load_dataset("bogus"), "name", "'bogus'"),
    (
        "missing data folder",
        lambda: data.load_cifar10("/nonexistent/cifar"),
        "data_dir",
        "/nonexistent/cifar",
    ),
    (
        "batch size 0",
        lambda: data.batch_at(np.ones((10, 3)), np.ones(10), batch_size=0, seed=0, step=0),
        "batch_size",
        "0",
    ),
    (
        "batch larger than the data",
        lambda: data.batch_at(np.ones((10, 3)), np.ones(10), batch_size=11, seed=0, step=0),
        "batch_size",
        "11",
    ),
    (
        "negative step",
        lambda: data.batch_at(np.ones((10, 3)), np.ones(10), batch_size=2, seed=0, step=-1),
        "step",
        "-1",
    ),
    ("teacher-student size", lambda: data.load_teacher_student(num_train=0), "num_train", "0"),
    ("model name", lambda: models.get_model("bogus", num_classes=10), "name", "'bogus'"),
    (
        "model width 0",
        lambda: models.get_model("mlp", num_classes=10, features=(0,)),
        "features",
        "0",
    ),
    (
        "table name",
        lambda: reproduce.run_table("bogus", workdir="/nonexistent"),
        "table",
        "'bogus'",
    ),
    (
        "optimizer name",
        lambda: optim.make_optimizer(
            ml_collections.ConfigDict({"optimizer": {"name": "bogus", "learning_rate": 0.1}}), 10
        ),
        "optimizer.name",
        "'bogus'",
    ),
    (
        "checkpoint that does not exist",
        lambda: checkpoints.load_checkpoint("/nonexistent/run", 3),
        "step",
        "3",
    ),
    # runs and their workdirs
    ("workdir empty", lambda: train.train_and_evaluate(_RUNLOCAL, ""), "workdir", "''"),
    ("workdir blank", lambda: train.train_and_evaluate(_RUNLOCAL, "  "), "workdir", "'  '"),
    ("workdir not a str", lambda: train.train_and_evaluate(_RUNLOCAL, 3), "workdir", "3"),
    ("lock of an empty workdir", lambda: _enter(checkpoints.lock_workdir("")), "workdir", "''"),
    (
        "lock process index",
        lambda: _enter(checkpoints.lock_workdir("/tmp/run", process_index=-1)),
        "process_index",
        "-1",
    ),
    # distributed, launch
    ("mesh data 0", lambda: distributed.make_mesh(data=0), "mesh.data", "0"),
    ("mesh larger than the devices", lambda: distributed.make_mesh(data=64), "mesh.data", "64"),
    ("mesh model 0", lambda: distributed.make_mesh(model=0), "mesh.model", "0"),
    (
        "sharding rule data size",
        lambda: distributed.partition_spec((4, 4), data_size=0),
        "data_size",
        "0",
    ),
    (
        "process id out of range",
        lambda: distributed.initialize("127.0.0.1:1", num_processes=2, process_id=5),
        "process_id",
        "5",
    ),
    (
        "coordinator address",
        lambda: distributed.initialize("host", 2, 0),
        "coordinator_address",
        "'host'",
    ),
    ("launcher process count", lambda: launch.process_env(0, 0, 1), "num_processes", "0"),
    (
        "launcher devices",
        lambda: launch.process_env(0, 1, 1, devices_per_process=0),
        "devices_per_process",
        "0",
    ),
]


# Inputs that used to give a silent wrong result or an exception of the wrong kind.
TWO = {"a": jnp.ones((4, 4)), "b": jnp.ones((4, 4))}
CP_PARAMS = {"l": CP.from_dense(T3, 2).to_params()}
CP_RANK_MASK = {"rank": jnp.ones(2, bool)}
NAN_T3 = T3.at[1, 2, 3].set(jnp.nan)
KERNEL = jax.random.normal(jax.random.key(0), (16, 8))
CALIBRATION = jax.random.normal(jax.random.key(1), (64, 16))


class _MLP(flax_nn.Module):
    @flax_nn.compact
    def __call__(self, x):
        return flax_nn.Dense(4, name="out")(flax_nn.relu(flax_nn.Dense(8, name="hidden")(x)))


MLP_PARAMS = _MLP().init(jax.random.key(0), jnp.ones((1, 16)))["params"]


def _prune_mlp(x, params=MLP_PARAMS, method="wanda"):
    return posttrain.prune_model(_MLP().apply, params, x, method=method, sparsity=0.5)


def _masked_update(grads):
    tx = transforms.masked(optax.sgd(1.0), algorithms.get("static", sparsity=0.5))
    return tx.update(grads, tx.init(TWO), TWO)


API_CASES += [
    # masks and mask trees
    (
        "global_topk_masks selected False",
        lambda: masks.global_topk_masks(PARAMS, 0.5, {"dense": {"kernel": True, "bias": False}}),
        "selected['dense']['bias']",
        "False",
    ),
    (
        "apply_masks float mask",
        lambda: masks.apply_masks({"w": jnp.ones(3)}, {"w": jnp.array([0.3, 0.0, 1.0])}),
        "masks['w']",
        "float32",
    ),
    (
        "masked float masks",
        lambda: transforms.masked(
            optax.sgd(1.0), algorithms.get("dense"), masks={"w": jnp.full((4, 4), 0.3)}
        ).init({"w": jnp.ones((4, 4))}),
        "masks['w']",
        "float32",
    ),
    (
        "summary with the masks of another tree",
        lambda: masks.summary({"a": jnp.ones(3)}, {"b": jnp.ones(3, bool)}),
        "masks",
        "['b']",
    ),
    (
        "export masks named differently",
        lambda: export.export(TWO, {"b": jnp.ones((4, 4), bool), "c": None}, block_shape=(2, 2)),
        "masks",
        "['c']",
    ),
    ("block_mask int block", lambda: masks.block_mask(W, 0.5, 4), "block_shape", "4"),
    # rank masks and formats
    (
        "compact of params without the layer",
        lambda: rank_lib.compact({}, {"l": CP_RANK_MASK}),
        "rank_masks",
        "['l']",
    ),
    (
        "apply_rank_masks unknown layer",
        lambda: rank_lib.apply_rank_masks(CP_PARAMS, {"zz": CP_RANK_MASK}),
        "rank_masks",
        "['zz']",
    ),
    (
        "param_masks unknown layer",
        lambda: rank_lib.param_masks(CP_PARAMS, {"zz": CP_RANK_MASK}),
        "rank_masks",
        "['zz']",
    ),
    (
        "apply_rank_masks float mask",
        lambda: rank_lib.apply_rank_masks(CP_PARAMS, {"l": {"rank": jnp.full(2, 0.5)}}),
        "rank_masks['l']['rank']",
        "float32",
    ),
    (
        "compact_ranks bonds not numbered from 0",
        lambda: rank_lib.compact_ranks(
            {"l": {"bond_0": jnp.ones(2, bool), "bond_2": jnp.ones(2, bool)}}
        ),
        "rank_masks['l']",
        "bond_2",
    ),
    ("CP NaN input", lambda: CP.from_dense(NAN_T3, 2), "x", "nan"),
    ("Tucker NaN input", lambda: Tucker.from_dense(NAN_T3, 2), "x", "nan"),
    ("Tubal NaN input", lambda: Tubal.from_dense(NAN_T3, 2), "a", "nan"),
    ("TT NaN input", lambda: TT.from_dense(NAN_T3, 2), "x", "nan"),
    ("CP int32 input", lambda: CP.from_dense(jnp.ones((4, 5, 6), jnp.int32), 2), "x", "int32"),
    ("CP n_iter_max < 0", lambda: CP.from_dense(T3, 2, n_iter_max=-1), "n_iter_max", "-1"),
    ("Tucker n_iter_max < 0", lambda: Tucker.from_dense(T3, 2, n_iter_max=-1), "n_iter_max", "-1"),
    ("CP fraction rank > 1", lambda: CP.from_dense(T3, 1.5), "rank", "1.5"),
    (
        "layer fraction rank > 1",
        lambda: _init_dense(features=8, format="cp", rank=1.5),
        "rank",
        "1.5",
    ),
    # post-training pruning
    (
        "sparsegpt without dampening on too few tokens",
        lambda: posttrain.sparsegpt(KERNEL, CALIBRATION[:4], sparsity=0.5, dampening=0.0),
        "dampening",
        "0.0",
    ),
    (
        "sparsegpt NaN calibration",
        lambda: posttrain.sparsegpt(KERNEL, CALIBRATION.at[3, 2].set(jnp.nan), sparsity=0.5),
        "x",
        "nan",
    ),
    (
        "wanda inf calibration",
        lambda: posttrain.wanda(KERNEL, CALIBRATION.at[3, 2].set(jnp.inf), sparsity=0.5),
        "x",
        "inf",
    ),
    (
        "wanda empty calibration",
        lambda: posttrain.wanda(KERNEL, CALIBRATION[:0], sparsity=0.5),
        "x",
        "(0, 16)",
    ),
    (
        "wanda all-zero calibration",
        lambda: posttrain.wanda(KERNEL, jnp.zeros_like(CALIBRATION), sparsity=0.5),
        "x",
        "zero on every token",
    ),
    (
        "magnitude NaN weight",
        lambda: posttrain.magnitude(KERNEL.at[0, 0].set(jnp.nan), sparsity=0.5),
        "kernel",
        "nan",
    ),
    (
        "dsnot variance_power NaN",
        lambda: posttrain.dsnot(KERNEL, CALIBRATION, KERNEL > 0, variance_power=float("nan")),
        "variance_power",
        "nan",
    ),
    (
        "dsnot N:M on a mask that is not N:M",
        lambda: posttrain.dsnot(KERNEL, CALIBRATION, jnp.ones((16, 8), bool), n=2, m=4),
        "mask",
        "n=2",
    ),
    (
        "prune_model all-zero batch",
        lambda: _prune_mlp(jnp.zeros((8, 16)), method="magnitude"),
        "x",
        "zero on every token",
    ),
    ("prune_model empty batch", lambda: _prune_mlp(jnp.zeros((0, 16))), "x", "(0, 16)"),
    ("prune_model wrong width", lambda: _prune_mlp(jnp.ones((8, 12))), "x", "(8, 12)"),
    ("prune_model empty params", lambda: _prune_mlp(jnp.ones((8, 16)), params={}), "params", "{}"),
    # soups
    (
        "soup of different masks without a mask",
        lambda: soups.average({"w": jnp.array([[1.0, 0.0, 2.0], [0.0, 3.0, 2.0]])}),
        "stacked_params['w']",
        "ingredient 1",
    ),
    (
        "swa_update negative count",
        lambda: soups.swa_update({"w": jnp.ones(3)}, {"w": jnp.ones(3)}, -1),
        "count",
        "-1",
    ),
    # exceptions of the wrong kind, messages naming the wrong thing
    (
        "erk keep_dense None",
        lambda: distributions.erk(PARAMS, 0.5, keep_dense=None),
        "keep_dense",
        "None",
    ),
    ("distribution name a list", lambda: distributions.get(["erk"]), "distribution", "['erk']"),
    (
        "er filter selecting a bias",
        lambda: distributions.er(PARAMS, 0.5, filter_fn=lambda name, p: True),
        "filter_fn",
        "'dense/bias'",
    ),
    (
        "algorithm keep_dense int",
        lambda: algorithms.get("static", keep_dense=5),
        "keep_dense",
        "5",
    ),
    (
        "masked algorithm by name",
        lambda: transforms.masked(optax.adam(1e-3), "rigl"),
        "algorithm",
        "'rigl'",
    ),
    (
        "rigl drop_fraction > 1",
        lambda: algorithms.get("rigl", drop_fraction=1.5),
        "drop_fraction",
        "1.5",
    ),
    (
        "gradient leaf missing",
        lambda: _masked_update({"a": jnp.ones((4, 4))}),
        "updates",
        "params['b']",
    ),
    (
        "gradient leaf misshapen",
        lambda: _masked_update({"a": jnp.ones((4, 4)), "b": jnp.ones((4, 3))}),
        "updates['b']",
        "(4, 3)",
    ),
]


@pytest.mark.parametrize(
    ("call", "name", "value"), [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES]
)
def test_entry_point_rejects_bad_value(call, name, value):
    with pytest.raises(ValueError) as info:
        call()
    message = str(info.value)
    assert name in message, message
    assert value in message, message


# (config key, bad value, the name the message must show, the value as shown)
CONFIG_CASES = [
    ("seed", -1, "seed", "-1"),
    ("seed", "0", "seed", "'0'"),
    ("dataset.name", "bogus", "name", "'bogus'"),
    ("model.name", "bogus", "name", "'bogus'"),
    ("model.channels", 0, "channels", "0"),
    ("optimizer.name", "bogus", "optimizer.name", "'bogus'"),
    ("optimizer.learning_rate", -1e-3, "optimizer.learning_rate", "-0.001"),
    ("optimizer.learning_rate", "0.1", "optimizer.learning_rate", "'0.1'"),
    ("optimizer.schedule", "bogus", "optimizer.schedule", "'bogus'"),
    ("optimizer.warmup_steps", -5, "optimizer.warmup_steps", "-5"),
    ("optimizer.weight_decay", -0.1, "optimizer.weight_decay", "-0.1"),
    ("optimizer.momentum", 1.5, "optimizer.momentum", "1.5"),
    ("optimizer.grad_clip_norm", -1.0, "optimizer.grad_clip_norm", "-1.0"),
    ("sparsity.algorithm", "bogus", "algorithm", "'bogus'"),
    ("sparsity.target", 1.0, "sparsity", "1.0"),
    ("sparsity.target", -0.1, "sparsity", "-0.1"),
    ("sparsity.distribution", "bogus", "distribution", "'bogus'"),
    ("sparsity.update_every_steps", 0, "update_every_steps", "0"),
    ("sparsity.end_fraction", 1.5, "end_fraction", "1.5"),
    ("sparsity.no_such_key", 1, "no_such_key", "no_such_key"),
    ("total_steps", 0, "total_steps", "0"),
    ("total_steps", 10.5, "total_steps", "10.5"),
    ("batch_size", 0, "batch_size", "0"),
    ("batch_size", 5000, "batch_size", "5000"),
    ("log_every_steps", 0, "log_every_steps", "0"),
    ("eval_every_steps", -1, "eval_every_steps", "-1"),
    ("checkpoint_every_steps", 0, "checkpoint_every_steps", "0"),
    ("keep_checkpoints", 0, "keep_checkpoints", "0"),
    ("on_nonfinite", "ignore", "on_nonfinite", "'ignore'"),
    ("max_consecutive_skipped_steps", 0, "max_consecutive_skipped_steps", "0"),
    ("max_consecutive_skipped_steps", 2.5, "max_consecutive_skipped_steps", "2.5"),
    ("max_consecutive_skipped_steps", True, "max_consecutive_skipped_steps", "True"),
    ("dataset.data_dir", "/nonexistent/c10", "dataset.data_dir", "'/nonexistent/c10'"),
    ("pack_masks", "yes", "pack_masks", "'yes'"),
    ("mesh.data", 2, "mesh.data", "2"),
    ("mesh.model", 0, "mesh.model", "0"),
    ("mesh.fsdp_min_size", 0, "fsdp_min_size", "0"),
]


def _snapshot(workdir):
    return {
        os.path.relpath(os.path.join(root, name), workdir): open(
            os.path.join(root, name), "rb"
        ).read()
        for root, _, files in os.walk(workdir)
        for name in files
    }


@pytest.fixture
def previous_run(tmp_path):
    """A workdir holding an earlier run's files, which a bad config must leave alone."""
    workdir = tmp_path / "run"
    (workdir / "checkpoints").mkdir(parents=True)
    (workdir / "config.json").write_text('{"seed": 7}\n')
    (workdir / "metrics.jsonl").write_text('{"step": 10, "test_accuracy": 0.5}\n')
    return str(workdir)


@pytest.mark.parametrize(
    ("key", "value", "name", "shown"),
    CONFIG_CASES,
    ids=[f"{c[0]}={c[1]!r}" for c in CONFIG_CASES],
)
def test_config_key_rejects_bad_value_and_leaves_the_workdir_alone(
    previous_run, key, value, name, shown
):
    # type_safe=False: a config file (or code) may hold any type; the trainer must check.
    config = ml_collections.ConfigDict(quickstart.get_config("runlocal").to_dict(), type_safe=False)
    target = config
    *parents, leaf = key.split(".")
    for p in parents:
        target = target[p]
    target[leaf] = value
    before = _snapshot(previous_run)
    with pytest.raises(ValueError) as info:
        train.train_and_evaluate(config, previous_run)
    message = str(info.value)
    assert name in message, message
    assert shown in message, message
    assert _snapshot(previous_run) == before


def test_missing_data_folder_in_a_config(previous_run):
    config = quickstart.get_config("runlocal")
    config.dataset = ml_collections.ConfigDict({"name": "cifar10", "data_dir": "/nonexistent/c10"})
    before = _snapshot(previous_run)
    with pytest.raises(ValueError, match=re.escape("/nonexistent/c10")) as info:
        train.train_and_evaluate(config, previous_run)
    assert "data_dir" in str(info.value)
    assert _snapshot(previous_run) == before


@pytest.mark.parametrize("data_dir", [None, ""], ids=["no key", "empty"])
def test_cifar10_without_a_data_folder_in_a_config(previous_run, data_dir):
    config = quickstart.get_config("runlocal")
    dataset = {"name": "cifar10"} if data_dir is None else {"name": "cifar10", "data_dir": ""}
    config.dataset = ml_collections.ConfigDict(dataset)
    before = _snapshot(previous_run)
    with pytest.raises(ValueError, match=re.escape("config.dataset.data_dir=''")):
        train.train_and_evaluate(config, previous_run)
    assert _snapshot(previous_run) == before


def test_a_workdir_that_is_a_file(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("x")
    for workdir in (path, path / "run"):
        with pytest.raises(ValueError, match=re.escape(f"workdir={str(workdir)!r}")):
            train.train_and_evaluate(quickstart.get_config("runlocal"), str(workdir))
    assert path.read_text() == "x" and os.listdir(tmp_path) == ["a_file"]


# Messages that named the wrong thing or came only at apply time: the factorized layers'
# contraction and rank_dropout (checked when a layer is set up), rank masks that are not
# boolean inside a layer (a float scales the factors), SNFS's prune_rate.
def _apply_dense_with_rank_mask(mask):
    module = layers.FactorizedDense(features=4, format="cp", rank=2)
    x = jnp.ones((1, 16))
    params = module.init(jax.random.key(0), x)["params"]
    return module.apply({"params": params, "rank_masks": {"rank": mask}}, x)


NAMING_CASES = [
    (
        "layer contraction",
        lambda: _init_dense(features=4, format="cp", rank=2, contraction="fast"),
        "contraction must be one of ('auto', 'factorized', 'dense')",
        "'fast'",
    ),
    (
        "low_rank layer contraction",
        lambda: _init_dense(features=4, format="low_rank", rank=2, contraction="fast"),
        "contraction must be one of ('auto', 'factorized', 'dense')",
        "'fast'",
    ),
    (
        "layer cost contraction",
        lambda: layers.factorized_dense_cost(
            layers.FactorizedDense(4, "tt_matrix", 2, contraction="fast"), 16
        ),
        "contraction",
        "'fast'",
    ),
    (
        "spec contraction",
        lambda: layers.check_factorize_spec(
            {"fc": {"format": "cp", "rank": 2, "contraction": "fast"}}
        ),
        "spec['fc']: contraction",
        "'fast'",
    ),
    (
        "layer rank_dropout at init",
        lambda: _init_dense(features=4, format="cp", rank=2, rank_dropout=1.5),
        "rank_dropout",
        "1.5",
    ),
    (
        "conv rank_dropout at init",
        lambda: layers.FactorizedConv(4, (3,), "cp", 2, rank_dropout=-0.1).init(
            jax.random.key(0), jnp.ones((1, 5, 3))
        ),
        "rank_dropout",
        "-0.1",
    ),
    (
        "float rank mask inside a layer",
        lambda: _apply_dense_with_rank_mask(jnp.array([1.0, 0.5])),
        "rank_masks of the top-level FactorizedDense['rank'] must be boolean",
        "float32",
    ),
    (
        "int rank mask inside a layer",
        lambda: _apply_dense_with_rank_mask(jnp.array([1, 0], jnp.int32)),
        "must be boolean",
        "int32",
    ),
    ("snfs prune_rate > 1", lambda: algorithms.get("snfs", prune_rate=1.5), "prune_rate", "1.5"),
]


@pytest.mark.parametrize(
    ("call", "name", "value"), [c[1:] for c in NAMING_CASES], ids=[c[0] for c in NAMING_CASES]
)
def test_entry_point_names_the_right_argument(call, name, value):
    test_entry_point_rejects_bad_value(call, name, value)
