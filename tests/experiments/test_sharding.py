"""Sharded training: rules, meshes, bit-packed masks, and 1 vs 4 (fake) devices agreeing.

Tests that need several devices run a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=4`` (the device count is fixed
when JAX starts, so this test session itself keeps its single CPU device).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from jax.sharding import PartitionSpec

from experiments import distributed
from sparsejax import algorithms, transforms

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(1, 64), min_size=0, max_size=4),
    data_size=st.sampled_from([1, 2, 3, 4, 8]),
    model_size=st.sampled_from([1, 2, 4]),
    min_size=st.sampled_from([1, 16, 512]),
)
def test_partition_spec_only_splits_axes_the_mesh_divides(shape, data_size, model_size, min_size):
    spec = distributed.partition_spec(
        shape, data_size=data_size, model_size=model_size, min_size=min_size
    )
    entries = tuple(spec) + (None,) * (len(shape) - len(spec))
    assert len(entries) == len(shape)
    if len(shape) < 2 or np.prod(shape) < min_size:
        assert entries == (None,) * len(shape)
        return
    sizes = {distributed.DATA_AXIS: data_size, distributed.MODEL_AXIS: model_size}
    for dim, axis in zip(shape, entries, strict=True):
        if axis is not None:
            assert dim % sizes[axis] == 0
    assert entries.count(distributed.DATA_AXIS) <= 1 and entries.count(distributed.MODEL_AXIS) <= 1
    if model_size > 1:
        assert (entries[-1] == distributed.MODEL_AXIS) == (shape[-1] % model_size == 0)
    free = [d for d, a in zip(shape, entries, strict=True) if a != distributed.MODEL_AXIS]
    if data_size > 1 and any(d % data_size == 0 for d in free):
        # FSDP: the largest divisible axis carries the data split.
        data_dim = shape[entries.index(distributed.DATA_AXIS)]
        assert data_dim == max(d for d in free if d % data_size == 0)
    else:
        assert distributed.DATA_AXIS not in entries


def test_partition_spec_of_a_kernel():
    assert distributed.partition_spec((256, 1024), data_size=4, model_size=2) == PartitionSpec(
        distributed.DATA_AXIS, distributed.MODEL_AXIS
    )
    assert distributed.partition_spec((1024, 256), data_size=4) == PartitionSpec(
        distributed.DATA_AXIS, None
    )
    assert distributed.partition_spec((1024,), data_size=4) == PartitionSpec()


def test_make_mesh_on_one_device_and_its_errors():
    mesh = distributed.make_mesh()
    assert mesh.shape == {distributed.DATA_AXIS: 1, distributed.MODEL_AXIS: 1}
    with pytest.raises(ValueError, match=r"mesh\.data \* mesh\.model = 2 \* 1 exceeds"):
        distributed.make_mesh(data=2)
    with pytest.raises(ValueError, match="mesh.model must be a positive integer, got 0"):
        distributed.make_mesh(model=0)
    with pytest.raises(ValueError, match="mesh.data must be a positive integer or -1, got -2"):
        distributed.make_mesh(data=-2)


def test_host_to_global_and_back():
    mesh = distributed.make_mesh()
    x = np.arange(12.0).reshape(4, 3)
    g = distributed.host_to_global({"x": x}, distributed.batch_sharding(mesh))
    assert g["x"].sharding == distributed.batch_sharding(mesh)
    np.testing.assert_array_equal(distributed.to_host(g)["x"], x)


def test_initialize_with_one_process_does_nothing_and_checks_values(monkeypatch):
    for env in (distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID):
        monkeypatch.delenv(env, raising=False)
    assert distributed.initialize() is False
    assert distributed.initialize(num_processes=1) is False
    with pytest.raises(ValueError, match="process_id must lie in"):
        distributed.initialize("127.0.0.1:1", num_processes=2, process_id=2)
    with pytest.raises(ValueError, match="coordinator_address must be 'host:port', got 'nohost'"):
        distributed.initialize("nohost", num_processes=2, process_id=0)
    with pytest.raises(ValueError, match="num_processes must be positive, got -1"):
        distributed.initialize("127.0.0.1:1", num_processes=-1, process_id=0)
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "two")
    with pytest.raises(ValueError, match="num_processes must be an integer, got 'two'"):
        distributed.initialize()


def _tree_bytes(tree):
    return sum(int(np.asarray(x).nbytes) for x in jax.tree.leaves(tree))


def test_packed_masks_train_identically_with_one_bit_a_weight():
    params = {
        "a": {"kernel": jax.random.normal(jax.random.key(0), (33, 17)), "bias": jnp.zeros(17)},
        "b": {"kernel": jax.random.normal(jax.random.key(1), (17, 9)), "bias": jnp.zeros(9)},
    }
    algo = algorithms.get("rigl", sparsity=0.8, update_every_steps=2, end_step=8)
    results = []
    for packed in (False, True):
        tx = transforms.masked(optax.adam(1e-2), algo, key=jax.random.key(3), packed=packed)
        state = tx.init(params)
        p = transforms.sparsify(params, state)

        @jax.jit
        def step(p, state, t, tx=tx):
            grads = jax.tree.map(lambda w: jnp.sin(w * (t + 1.0)), p)
            updates, state = tx.update(grads, state, p)
            return optax.apply_updates(p, updates), state

        for t in range(6):
            p, state = step(p, state, t)
        results.append((p, state))
    (p0, s0), (p1, s1) = results
    for x, y in zip(jax.tree.leaves(p0), jax.tree.leaves(p1), strict=True):
        np.testing.assert_array_equal(x, y)
    m0, m1 = transforms.get_masks(s0), transforms.get_masks(s1)
    for x, y in zip(jax.tree.leaves(m0), jax.tree.leaves(m1), strict=True):
        assert y.dtype == jnp.bool_
        np.testing.assert_array_equal(x, y)
    assert isinstance(s1.masks["a"]["kernel"], transforms.PackedMask)
    assert s1.masks["a"]["bias"] is None
    # 1 bit a weight, padded to whole bytes along the last axis.
    assert _tree_bytes(s1.masks) == 33 * 3 + 17 * 2
    assert _tree_bytes(s0.masks) == 33 * 17 + 17 * 9


@pytest.mark.parametrize("shape", [(), (7,), (3, 8), (2, 3, 13)])
def test_pack_unpack_round_trip(shape):
    m = jax.random.bernoulli(jax.random.key(len(shape)), 0.4, shape)
    packed = transforms.pack_masks({"m": m, "n": None})
    assert packed["n"] is None
    np.testing.assert_array_equal(transforms.unpack_masks(packed)["m"], m)
    unpacked = jax.jit(transforms.unpack_masks)(packed)["m"]
    assert unpacked.shape == shape and unpacked.dtype == jnp.bool_


# Trains a small static-sparse MLP with bit-packed masks on 1 device, on a 4-way
# data mesh and on a 2x2 data x model mesh, and reports params and shardings.
_SCRIPT = r"""
import json, sys
import jax, ml_collections, numpy as np
from configs.base import get_base_config
from experiments import checkpoints, state, train

assert jax.device_count() == 4, jax.devices()
out = {}
used = {}
make_step_functions = state.make_step_functions

def spy(*args, **kwargs):
    # The shardings the train step is really compiled with.
    used["state_sharding"] = kwargs["state_sharding"]
    return make_step_functions(*args, **kwargs)

state.make_step_functions = spy

def _name(path):
    return "/".join(
        str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path
    )

for name, data, model in (("one", 1, 1), ("data4", 4, 1), ("data2_model2", 2, 2)):
    config = get_base_config()
    config.model = ml_collections.ConfigDict({"name": "mlp", "features": (64, 64)})
    config.sparsity.algorithm = "static"
    config.sparsity.target = 0.8
    config.sparsity.distribution = "erk"
    config.optimizer.name = "momentum"
    config.optimizer.learning_rate = 0.05
    config.total_steps = 6
    config.batch_size = 32
    config.log_every_steps = 3
    config.eval_every_steps = 6
    config.checkpoint_every_steps = 6
    config.progress_bar = False
    config.pack_masks = True
    config.mesh.data, config.mesh.model = data, model
    config.mesh.fsdp_min_size = 512
    workdir = sys.argv[1] + "/" + name
    record = train.train_and_evaluate(config, workdir)
    saved = checkpoints.load_checkpoint(workdir)
    flat = jax.tree_util.tree_flatten_with_path(used["state_sharding"])[0]
    out[name] = {
        "record": record,
        "params": jax.tree.map(lambda x: np.asarray(x).tolist(), saved["params"]),
        "specs": {_name(path): list(x.spec) for path, x in flat},
        "devices": {_name(path): len(x.device_set) for path, x in flat},
    }
with open(sys.argv[1] + "/out.json", "w") as f:
    json.dump(out, f)
"""


def test_one_and_four_fake_devices_train_the_same_params(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(tmp_path / "out.json") as f:
        out = json.load(f)

    one = out["one"]
    assert set(one["devices"].values()) == {1}
    data4, both = out["data4"]["specs"], out["data2_model2"]["specs"]
    # hidden_0 (40x64) and hidden_1 (64x64): FSDP over data on their 64-wide axis;
    # the output kernel (64x10, 640 entries) too; biases replicated.
    assert data4["params/hidden_0/kernel"] == [None, "data"]
    assert data4["params/hidden_1/kernel"] == ["data", None]
    assert data4["params/output/kernel"] == ["data", None]
    assert data4["params/hidden_0/bias"] == []
    # The momentum trace follows its kernel; packed masks [64, 8] split on rows.
    (trace,) = [k for k in data4 if k.endswith("trace/hidden_1/kernel")]
    assert data4[trace] == ["data", None]
    assert data4["opt_state/masks/hidden_1/kernel/bits"] == ["data", None]
    assert both["params/hidden_1/kernel"] == ["data", "model"]
    assert max(out["data4"]["devices"].values()) == 4

    for name in ("data4", "data2_model2"):
        other = out[name]
        assert other["record"]["sparsity"] == pytest.approx(one["record"]["sparsity"], abs=1e-7)
        assert other["record"]["test_accuracy"] == pytest.approx(
            one["record"]["test_accuracy"], abs=2e-3
        )
        for x, y in zip(
            jax.tree.leaves(one["params"]), jax.tree.leaves(other["params"]), strict=True
        ):
            np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-4, atol=1e-5)


# Steps on a mesh of 4 CPU devices of one process: XLA:CPU runs their collectives in
# process and deadlocks when the next step is dispatched while one still runs (see
# `distributed.steps_must_block`), so these steps must come back finished.
_BLOCKING_SCRIPT = r"""
import jax
from configs import quickstart
from experiments import data, distributed, models, state

assert jax.device_count() == 4, jax.devices()
mesh = distributed.make_mesh()
assert distributed.steps_must_block(mesh)
assert not distributed.steps_must_block(distributed.make_mesh(data=1))
assert not distributed.steps_must_block(None)

config = quickstart.get_config()  # the full 64-channel model: a step takes milliseconds
dataset = data.load_from_config(config)
model = models.make_model(config, dataset.num_classes)
train_state, tx, algorithm = state.create_train_state(config, model, dataset, mesh=mesh)
train_step, eval_step, sparsity = state.make_step_functions(
    model, tx, algorithm, mesh=mesh, state_sharding=jax.tree.map(lambda x: x.sharding, train_state)
)
for step in range(4):
    batch = data.batch_at(
        dataset.x_train, dataset.y_train, batch_size=config.batch_size, seed=0, step=step
    )
    x, y = distributed.host_to_global(batch, distributed.batch_sharding(mesh))
    train_state, metrics = train_step(train_state, x, y)
    pending = [leaf for leaf in jax.tree.leaves((train_state, metrics)) if not leaf.is_ready()]
    assert not pending, f"train step {step} returned {len(pending)} unfinished arrays"
    for out in (eval_step(train_state, x, y), sparsity(train_state)):
        assert all(leaf.is_ready() for leaf in jax.tree.leaves(out)), "eval or sparsity ran ahead"
print("ok")
"""


def _four_devices_env(**extra):
    env = dict(os.environ, JAX_PLATFORMS="cpu", **extra)
    # Abort a stuck collective after 15 s instead of XLA's default 40 s.
    env["XLA_FLAGS"] = (
        "--xla_force_host_platform_device_count=4 "
        "--xla_cpu_collective_call_terminate_timeout_seconds=15"
    )
    return env


def test_steps_on_several_cpu_devices_of_one_process_wait_until_finished():
    """The fast twin of the 4-device run below: each step on the mesh returns finished."""
    proc = subprocess.run(
        [sys.executable, "-c", _BLOCKING_SCRIPT],
        cwd=REPO,
        env=_four_devices_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip().endswith("ok")


@pytest.mark.slow
def test_quickstart_on_four_cpu_devices_crosses_evaluations_and_checkpoints(tmp_path):
    """The README's 4-device command, 2000 steps: before the trainer waited for each step it
    aborted in an all-reduce ("only 3 of them arrived") after about 500 steps."""
    workdir = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.main",
            "--config=configs/quickstart.py",
            f"--workdir={workdir}",
            "--config.total_steps=2000",
            "--config.eval_every_steps=250",
            "--config.checkpoint_every_steps=500",
            "--config.progress_bar=False",
        ],
        cwd=REPO,
        env=_four_devices_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(workdir / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == list(range(250, 2001, 250))
    assert records[-1]["test_accuracy"] >= 0.6
    steps = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
    assert steps == [1500, 2000]  # keep_checkpoints = 2
