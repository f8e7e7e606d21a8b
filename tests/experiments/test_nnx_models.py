"""The NNX models of the experiments against their Linen twins (`experiments.nnx_models`).

Same params tree, same outputs on the same params, and through the trainer the same run:
`NNXAdapter.init` is defined as the Linen init for the same key, so a config trained with
``config.model.api = "nnx"`` must reach exactly the params of its Linen run.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import pathlib
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from configs import rigl_mnist1d, rigl_nnx_cnn_mnist1d
from experiments import models, nnx_models, sweep, train
from experiments import state as state_lib
from sparsejax import algorithms, transforms
from sparsejax import masks as masks_lib

REPO = pathlib.Path(__file__).resolve().parents[2]

# (name, attributes, input shape): MNIST-1D's shapes and odd ones.
CASES = [
    ("mlp", {}, (3, 40, 1)),
    ("mlp", {"features": [7, 5], "num_classes": 4}, (2, 5, 3)),
    ("mlp", {"features": ()}, (2, 9)),
    ("cnn1d", {"channels": 8}, (3, 40, 1)),
    ("cnn1d", {"channels": 5, "num_classes": 3}, (2, 23, 2)),
    ("cnn1d", {"channels": 4}, (1, 3, 1)),  # the shortest input the convs take
]


def _config(name: str, api: str, **attributes) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"model": {"name": name, "api": api, **attributes}})


def _named(tree) -> dict:
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=masks_lib.is_none)[0]
    return {masks_lib.path_name(path): leaf for path, leaf in leaves}


def _layout(tree) -> dict:
    """``{path: (shape, dtype)}``: what a params tree is, apart from its values."""
    return {k: (tuple(v.shape), jnp.dtype(v.dtype)) for k, v in _named(tree).items()}


def _assert_trees_equal(a, b):
    a, b = _named(a), _named(b)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)


@pytest.mark.parametrize("name, attributes, shape", CASES)
def test_the_nnx_model_has_the_linen_params_tree(name, attributes, shape):
    twin = models.get_model(name, **attributes)
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    linen = jax.eval_shape(twin.init, jax.random.key(0), x)["params"]
    adapter = nnx_models.adapt(name, twin)
    model = nnx.eval_shape(lambda: adapter.nnx_model(x, rngs=nnx.Rngs(0)))
    assert _layout(nnx.to_pure_dict(nnx.state(model, nnx.Param))) == _layout(linen)
    assert _layout(jax.eval_shape(adapter.init, jax.random.key(0), x)["params"]) == _layout(linen)


def test_the_nnx_classes_have_the_documented_layout():
    """Built directly (as a library user would), with their own init."""
    mlp = nnx_models.MLP(40, (100, 100), rngs=nnx.Rngs(0))
    cnn = nnx_models.CNN1D(channels=25, rngs=nnx.Rngs(0))
    assert _layout(nnx.to_pure_dict(nnx.state(mlp, nnx.Param))) == {
        "hidden_0/kernel": ((40, 100), jnp.float32),
        "hidden_0/bias": ((100,), jnp.float32),
        "hidden_1/kernel": ((100, 100), jnp.float32),
        "hidden_1/bias": ((100,), jnp.float32),
        "output/kernel": ((100, 10), jnp.float32),
        "output/bias": ((10,), jnp.float32),
    }
    cnn_params = nnx.to_pure_dict(nnx.state(cnn, nnx.Param))
    assert cnn_params["conv1"]["kernel"].shape == (5, 1, 25)
    assert cnn_params["conv3"]["kernel"].shape == (3, 25, 25)
    assert cnn_params["dense"]["kernel"].shape == (5 * 25, 10)  # 40 -> 19 -> 10 -> 5
    # Their own init: lecun normal kernels (std 1/sqrt(fan_in)), zero biases.
    kernel = np.asarray(mlp.hidden_1.kernel[...])
    assert abs(kernel.std() * np.sqrt(100) - 1.0) < 0.05
    assert not np.any(np.asarray(mlp.hidden_1.bias[...]))
    assert cnn(jnp.ones((2, 40, 1))).shape == (2, 10)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: nnx_models.MLP(0, rngs=nnx.Rngs(0)), "in_features must be a positive int"),
        (lambda: nnx_models.MLP(4, (3, 0), rngs=nnx.Rngs(0)), "every entry of features"),
        (lambda: nnx_models.MLP(4, "ab", rngs=nnx.Rngs(0)), "features must be a sequence"),
        (lambda: nnx_models.CNN1D(channels=True, rngs=nnx.Rngs(0)), "channels must be"),
        (lambda: nnx_models.CNN1D(length=2, rngs=nnx.Rngs(0)), "length must be at least 3"),
    ],
)
def test_bad_nnx_model_arguments_are_value_errors(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize("name, attributes, shape", CASES)
def test_given_the_linen_params_the_nnx_model_computes_the_linen_outputs(name, attributes, shape):
    twin = models.get_model(name, **attributes)
    x = jax.random.normal(jax.random.key(1), shape)
    params = twin.init(jax.random.key(2), x)["params"]
    want = twin.apply({"params": params}, x)
    adapter = nnx_models.adapt(name, twin)
    # Through the adapter (what the trainer runs), eager and jitted.
    np.testing.assert_allclose(adapter.apply({"params": params}, x), want, rtol=1e-6, atol=1e-6)
    jitted = jax.jit(adapter.apply)({"params": params}, x)
    np.testing.assert_allclose(jitted, jax.jit(twin.apply)({"params": params}, x), 1e-6, 1e-6)
    # And the NNX module itself, loaded with the Linen params.
    model = adapter.nnx_model(x, rngs=nnx.Rngs(3))
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    np.testing.assert_allclose(model(x), want, rtol=1e-6, atol=1e-6)
    # Gradients too: the trainer differentiates through the adapter.
    loss = lambda apply: lambda p: jnp.sum(apply({"params": p}, x) ** 2)  # noqa: E731
    grads = jax.grad(loss(adapter.apply))(params)
    for key, g in _named(jax.grad(loss(twin.apply))(params)).items():
        np.testing.assert_allclose(_named(grads)[key], g, rtol=1e-5, atol=1e-6, err_msg=key)


def test_the_adapter_init_is_the_linen_init_of_the_same_key():
    adapter = models.make_model(_config("cnn1d", "nnx", channels=8), 10)
    twin = models.make_model(_config("cnn1d", "linen", channels=8), 10)
    x = jnp.zeros((1, 40, 1))
    for seed in (0, 1):
        key = jax.random.key(seed)
        _assert_trees_equal(adapter.init(key, x), twin.init(key, x))
    assert adapter == models.make_model(_config("cnn1d", "nnx", channels=8), 10)
    hash(adapter)  # hashable like a Linen module
    with pytest.raises(ValueError, match=r"variables must be \{'params'"):
        adapter.apply({"params": {}, "batch_stats": {}}, x)


def test_make_model_selects_the_api_and_refuses_what_has_no_nnx_version():
    assert isinstance(models.make_model(_config("mlp", "linen"), 10), nn.Module)
    assert isinstance(models.make_model(_config("mlp", "nnx"), 10), nnx_models.NNXAdapter)
    no_key = ml_collections.ConfigDict({"model": {"name": "mlp"}})  # tables build these
    assert isinstance(models.make_model(no_key, 10), nn.Module)
    with pytest.raises(ValueError, match=r"config.model.api='jax' is unknown.*'linen', 'nnx'"):
        models.make_model(_config("mlp", "jax"), 10)
    with pytest.raises(ValueError, match=r"api='nnx'.*\['cnn1d', 'mlp'\].*name='vit1d'"):
        models.make_model(_config("vit1d", "nnx"), 10)
    factorized = _config("mlp", "nnx", factorize={"hidden_1": {"format": "cp", "rank": 2}})
    with pytest.raises(ValueError, match="config.model.factorize is not supported"):
        models.make_model(factorized, 10)
    assert nnx_models.NNX_MODELS == ("cnn1d", "mlp")


def test_every_training_config_has_the_api_key_and_overrides_it_when_locked():
    names = sorted(p.stem for p in (REPO / "configs").glob("*.py"))
    for name in names:
        if name in ("__init__", "base"):
            continue
        config = importlib.import_module(f"configs.{name}").get_config()
        if "total_steps" not in config:  # compression and SAE configs do not train a model
            continue
        expected = "nnx" if name == "rigl_nnx_cnn_mnist1d" else "linen"
        assert config.model.api == expected, name
        config.lock()
        config.model.api = "nnx"  # what --config.model.api=nnx does


def test_the_nnx_config_is_the_rigl_config_on_the_nnx_cnn():
    for arg in (None, "runlocal"):
        config, rigl = rigl_nnx_cnn_mnist1d.get_config(arg), rigl_mnist1d.get_config(arg)
        assert config.model.api == "nnx"
        config.model.api = "linen"
        assert config.to_dict() == rigl.to_dict()


def _bimask_config():
    config = rigl_nnx_cnn_mnist1d.get_config("runlocal")
    config.model = ml_collections.ConfigDict({"name": "mlp", "api": "nnx", "features": (16,)})
    config.sparsity = ml_collections.ConfigDict({"algorithm": "bimask", "n": 2, "m": 4})
    return config


def test_an_algorithm_with_a_linen_interceptor_is_refused_for_nnx(tmp_path):
    """Bi-Mask's backward mask is a Linen interceptor on nn.Dense: nnx.Linear would escape it."""
    config = _bimask_config()
    algorithm = algorithms.from_config(config.sparsity, config.total_steps)
    adapter = models.make_model(config, 10)
    match = r"config.model.api='nnx' cannot train with algorithm=BiMask.*forward_context"
    with pytest.raises(ValueError, match=match):
        nnx_models.check_algorithm(adapter, algorithm)
    with pytest.raises(ValueError, match=match):  # what the sweep and the tables build
        state_lib.step_functions(adapter, None, algorithm)
    workdir = tmp_path / "bimask"
    with pytest.raises(ValueError, match=match):
        train.train_and_evaluate(config, str(workdir))
    assert not workdir.exists()
    config.model.api = "linen"
    nnx_models.check_algorithm(models.make_model(config, 10), algorithm)
    # Straight-through algorithms need no interceptor: their forward params are pure.
    ste = algorithms.from_config({"algorithm": "sr_ste", "n": 2, "m": 4}, 10)
    nnx_models.check_algorithm(adapter, ste)


def test_prune_at_init_scores_the_nnx_model_as_the_linen_one():
    """GraSP calls ``model.apply`` (second-order, through the adapter) to choose its masks."""
    config = rigl_nnx_cnn_mnist1d.get_config("runlocal")
    config.sparsity = ml_collections.ConfigDict({"algorithm": "grasp", "target": 0.8})
    algorithm = algorithms.from_config(config.sparsity, config.total_steps)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 40, 1)).astype(np.float32)
    y = rng.integers(0, 10, 16).astype(np.int32)
    states = {}
    for api in ("linen", "nnx"):
        config.model.api = api
        model = models.make_model(config, 10)
        init = functools.partial(state_lib.init_state, config, model, algorithm)
        states[api] = jax.jit(init)(jax.random.key(0), jnp.asarray(x[:1]), (x, y))
    masks = {api: transforms.get_masks(s.opt_state) for api, s in states.items()}
    _assert_trees_equal(masks["nnx"], masks["linen"])
    _assert_trees_equal(states["nnx"].params, states["linen"].params)


@pytest.mark.slow
def test_a_sweep_over_seeds_of_the_nnx_config_is_the_linen_sweep():
    """`experiments.sweep` (the tables' trainer) vmaps the adapter's init and steps.

    About 20 s on 2 cores (run with -m slow); its fast twin is the single run below,
    through the same step functions.
    """
    results = {}
    for module in (rigl_nnx_cnn_mnist1d, rigl_mnist1d):
        config = module.get_config("runlocal")
        config.total_steps = 5
        results[module] = sweep.train_seeds(config, [0, 1], progress=False)
    nnx_result, linen_result = results[rigl_nnx_cnn_mnist1d], results[rigl_mnist1d]
    _assert_trees_equal(nnx_result.final_state, linen_result.final_state)
    np.testing.assert_array_equal(nnx_result.test_accuracy, linen_result.test_accuracy)


# ------------------------------------------------------------------ end to end
RUNLOCAL = f"--config={REPO}/configs/rigl_nnx_cnn_mnist1d.py:runlocal"


def _main(*args):
    return subprocess.run(
        [sys.executable, "-m", "experiments.main", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _records(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _restore(workdir, step: int):
    manager = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"))
    try:
        return manager.restore(step, args=ocp.args.StandardRestore())
    finally:
        manager.close()


@pytest.fixture(scope="module")
def nnx_run(tmp_path_factory):
    """``python -m experiments.main --config=configs/rigl_nnx_cnn_mnist1d.py:runlocal``."""
    workdir = str(tmp_path_factory.mktemp("nnx"))
    proc = _main(RUNLOCAL, f"--workdir={workdir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir


@pytest.fixture(scope="module")
def linen_run(tmp_path_factory):
    """The same config and seed with the Linen CNN, in process."""
    workdir = str(tmp_path_factory.mktemp("linen"))
    train.train_and_evaluate(rigl_mnist1d.get_config("runlocal"), workdir)
    return workdir


def test_the_nnx_config_trains_end_to_end_to_exact_sparsity(nnx_run):
    records = _records(nnx_run)
    assert [r["step"] for r in records] == [10, 20]
    with open(os.path.join(nnx_run, "config.json")) as f:
        assert json.load(f)["model"]["api"] == "nnx"
    # Exact: the logged sparsity is the fraction of zeros in the kernels (ERK masks every
    # kernel, biases stay dense) of the checkpointed params, to float precision.
    kernels = [
        np.asarray(v)
        for k, v in _named(_restore(nnx_run, 20)["params"]).items()
        if k.endswith("kernel")
    ]
    zeros = sum(int(np.sum(k == 0)) for k in kernels) / sum(k.size for k in kernels)
    assert records[-1]["sparsity"] == pytest.approx(zeros, abs=1e-6)
    for r in records:
        assert np.isfinite(r["train_loss"]) and 0.0 <= r["test_accuracy"] <= 1.0
        assert abs(r["sparsity"] - 0.9) < 1e-3


def test_an_nnx_run_reaches_the_params_of_its_linen_run(nnx_run, linen_run):
    """Same init (the adapter's is the Linen one), same masks, same steps: same run."""
    _assert_trees_equal(_restore(nnx_run, 20), _restore(linen_run, 20))
    drop = lambda r: {k: v for k, v in r.items() if k != "steps_per_second"}  # noqa: E731
    assert [drop(r) for r in _records(nnx_run)] == [drop(r) for r in _records(linen_run)]


def test_an_nnx_run_resumes_as_if_uninterrupted(nnx_run, tmp_path):
    resumed = str(tmp_path / "resumed")
    shutil.copytree(nnx_run, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "20"))  # resume from step 10
    record = train.train_and_evaluate(rigl_nnx_cnn_mnist1d.get_config("runlocal"), resumed)
    assert record["step"] == 20
    _assert_trees_equal(_restore(resumed, 20), _restore(nnx_run, 20))


def test_main_refuses_a_bad_api_before_writing_anything(tmp_path):
    workdir = tmp_path / "run"
    proc = _main(RUNLOCAL, f"--workdir={workdir}", "--config.model.api=jax")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: config.model.api='jax' is unknown; known: ['linen', 'nnx']"]
    assert not workdir.exists()
