"""Tests for experiments/models.py: shapes, parameter layout, registry, jit == eager."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from experiments import models


def _init(model, x):
    """Real initial parameters. RBG keys: XLA compiles threefry-based init of a ResNet-20 in
    ~10 s on 2 CPU cores but RBG-based init in ~2 s; the properties tested do not depend on
    the PRNG implementation."""
    return jax.jit(model.init)(jax.random.key(0, impl="rbg"), x)


def _init_shapes(model, input_shape):
    """Parameter shapes via abstract evaluation (no FLOPs spent)."""
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(input_shape, jnp.float32))
    return jax.tree.map(lambda leaf: leaf.shape, variables)


def _num_params(model, input_shape) -> int:
    shapes = _init_shapes(model, input_shape)
    return sum(
        int(np.prod(s)) for s in jax.tree.leaves(shapes, is_leaf=lambda s: isinstance(s, tuple))
    )


@pytest.mark.parametrize(
    "name, kwargs, input_shape",
    [
        ("mlp", {}, (3, 40, 1)),
        ("mlp", {"features": [7], "num_classes": 4}, (2, 5, 2)),
        ("mlp", {"features": ()}, (2, 9)),
        ("cnn1d", {}, (3, 40, 1)),
        ("cnn1d", {"channels": 8, "num_classes": 3}, (2, 40, 1)),
        ("resnet", {}, (2, 32, 32, 3)),
        ("resnet", {"norm": "group", "num_classes": 100}, (2, 32, 32, 3)),
        ("resnet", {"num_blocks_per_stage": 1}, (2, 17, 9, 3)),
    ],
)
def test_output_shape_and_dtype(name, kwargs, input_shape):
    model = models.get_model(name, **kwargs)
    x = jax.ShapeDtypeStruct(input_shape, jnp.float32)
    logits = jax.eval_shape(lambda x: model.apply(model.init(jax.random.key(0), x), x), x)
    assert logits.shape == (input_shape[0], kwargs.get("num_classes", 10))
    assert logits.dtype == jnp.float32


@pytest.mark.parametrize("channels", [1, 25, 64])
def test_cnn1d_param_shapes(channels):
    shapes = _init_shapes(models.CNN1D(channels=channels), (1, 40, 1))
    assert set(shapes) == {"params"}
    params = shapes["params"]
    assert set(params) == {"conv1", "conv2", "conv3", "dense"}
    assert params["conv1"]["kernel"] == (5, 1, channels)
    assert params["conv2"]["kernel"] == (3, channels, channels)
    assert params["conv3"]["kernel"] == (3, channels, channels)
    assert params["dense"]["kernel"] == (5 * channels, 10)


@settings(max_examples=15, deadline=None)
@given(length=st.integers(5, 80))
def test_cnn1d_lengths_follow_the_conv_arithmetic(length):
    # L' = (L + 2 - k) // 2 + 1 per layer, as in the paper's PyTorch model with padding=1.
    expected = length
    for kernel in (5, 3, 3):
        expected = (expected + 2 - kernel) // 2 + 1
    shapes = _init_shapes(models.CNN1D(channels=4), (1, length, 1))
    assert shapes["params"]["dense"]["kernel"] == (4 * expected, 10)


def test_mlp_param_shapes_flatten_the_input():
    params = _init_shapes(models.MLP(), (1, 40, 1))["params"]
    assert params["hidden_0"]["kernel"] == (40, 100)
    assert params["hidden_1"]["kernel"] == (100, 100)
    assert params["output"]["kernel"] == (100, 10)


def test_resnet20_structure_and_size():
    model = models.ResNet()
    params = _init_shapes(model, (1, 32, 32, 3))["params"]
    blocks = [k for k in params if k.startswith("stage")]
    assert len(blocks) == 9  # 3 stages x 3 blocks: 6 * 3 + 2 = 20 layers.
    assert params["stem"]["kernel"] == (3, 3, 3, 16)
    assert params["stage2_block1"]["conv1"]["kernel"] == (3, 3, 16, 32)
    assert params["stage3_block3"]["conv2"]["kernel"] == (3, 3, 64, 64)
    assert params["head"]["kernel"] == (64, 10)
    # He et al. report 0.27M parameters for ResNet-20 (option A shortcuts).
    assert 0.26e6 < _num_params(model, (1, 32, 32, 3)) < 0.28e6
    group = _init_shapes(models.ResNet(norm="group"), (1, 32, 32, 3))["params"]
    assert "scale" in group["stage1_block1"]["norm2"]
    assert "bias" not in group["stage1_block1"]["conv1"]


def test_resnet_without_norm_keeps_initial_logits_bounded():
    # The 1/sqrt(blocks) residual scaling keeps the forward pass O(1) at initialization.
    model = models.ResNet()
    x = jax.random.normal(jax.random.key(1), (8, 32, 32, 3))
    logits = jax.jit(model.apply)(_init(model, x), x)
    assert bool(jnp.all(jnp.isfinite(logits)))
    assert 0.01 < float(jnp.std(logits)) < 10.0


def test_get_model_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match="transformer") as info:
        models.get_model("transformer")
    for name in ("cnn1d", "mlp", "resnet"):
        assert name in str(info.value)


def test_get_model_builds_the_named_class_with_config_values():
    model = models.get_model("mlp", features=[32, 16], num_classes=3)
    assert isinstance(model, models.MLP) and model.features == (32, 16)
    assert isinstance(models.get_model("cnn1d", channels=8), models.CNN1D)
    assert isinstance(models.get_model("resnet", norm="group"), models.ResNet)


@pytest.mark.parametrize(
    "build, argument",
    [
        (lambda: models.ResNet(norm="batch"), "norm"),
        (lambda: models.ResNet(norm="group", num_groups=5), "num_groups"),
        (lambda: models.CNN1D(channels=0), "channels"),
        (lambda: models.MLP(features=(10, -1)), "features"),
        (lambda: models.get_model("mlp", num_classes=2.5), "num_classes"),
    ],
)
def test_bad_attributes_raise_at_construction(build, argument):
    with pytest.raises(ValueError, match=argument):
        build()


@pytest.mark.parametrize(
    "name, kwargs, input_shape",
    [
        ("mlp", {}, (4, 40, 1)),
        ("cnn1d", {"channels": 16}, (4, 40, 1)),
        ("resnet", {"num_blocks_per_stage": 1, "norm": "group"}, (2, 16, 16, 3)),
    ],
)
def test_jit_equals_eager(name, kwargs, input_shape):
    model = models.get_model(name, **kwargs)
    x = jax.random.normal(jax.random.key(1), input_shape)
    params = _init(model, x)
    jitted = jax.jit(model.apply)(params, x)
    with jax.disable_jit():
        eager = model.apply(params, x)
    # XLA may fuse and reorder float32 sums differently from op-by-op execution.
    np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-5)
