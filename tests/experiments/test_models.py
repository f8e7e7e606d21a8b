"""Tests for experiments/models.py: shapes, parameter layout, registry, jit == eager."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tensornets
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


def test_make_model_builds_the_model_a_run_config_names():
    config = ml_collections.ConfigDict({"model": {"name": "mlp", "features": [32, 16]}})
    model = models.make_model(config, num_classes=3)
    assert isinstance(model, models.MLP) and model.features == (32, 16)
    assert model.num_classes == 3
    config.model.name = "transformer"
    with pytest.raises(ValueError, match="'transformer'"):
        models.make_model(config, num_classes=3)


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


# ------------------------------------------------------------------ factorized models
_HIDDEN_FACTORS = {
    "cp": {"weights", "factor_0", "factor_1", "factor_2", "factor_3"},
    "low_rank": {"weights", "factor_0", "factor_1"},
    "tt": {"core_0", "core_1", "core_2", "core_3"},
    "tt_matrix": {"core_0", "core_1", "core_2"},
    "tubal": {"u", "s", "v"},
    "tucker": {"core", "factor_0", "factor_1", "factor_2", "factor_3"},
}
_SHAPES_16 = {
    "cp": {"in_shape": (4, 4), "out_shape": (4, 4)},
    "tt": {"in_shape": (4, 4), "out_shape": (4, 4)},
    "tt_matrix": {"in_shape": (2, 2, 4), "out_shape": (2, 2, 4)},
    "tubal": {"in_shape": (4, 4), "out_shape": (4, 4)},
    "tucker": {"in_shape": (4, 4), "out_shape": (4, 4)},
}


@pytest.mark.parametrize("fmt", models.FACTORIZE_FORMATS)
def test_factorized_mlp_keeps_shapes_and_readable_paths(fmt):
    factorize = {"hidden_1": {"format": fmt, "rank": 2, **_SHAPES_16.get(fmt, {})}}
    model = models.get_model("mlp", features=(16, 16), factorize=factorize)
    x = jax.ShapeDtypeStruct((3, 40, 1), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    logits = jax.eval_shape(model.apply, variables, x)
    assert logits.shape == (3, 10) and logits.dtype == jnp.float32
    params = variables["params"]
    assert set(params) == {"hidden_0", "hidden_1", "output"}
    assert set(params["hidden_1"]) == _HIDDEN_FACTORS[fmt] | {"bias"}
    assert params["hidden_0"]["kernel"].shape == (40, 16)
    assert params["output"]["kernel"].shape == (16, 10)


@pytest.mark.parametrize("fmt", ["cp", "tucker", "tt"])
def test_factorized_cnn1d_and_residual_mlp(fmt):
    cnn = models.CNN1D(channels=8, factorize={"conv2": {"format": fmt, "rank": 2}})
    params = _init_shapes(cnn, (2, 40, 1))["params"]
    assert "kernel" not in params["conv2"] and params["conv2"]["bias"] == (8,)
    assert params["conv3"]["kernel"] == (3, 8, 8)
    res = models.ResidualMLP(features=16, factorize={"hidden_1": {"format": fmt, "rank": 2}})
    assert "kernel" not in _init_shapes(res, (2, 40))["params"]["hidden_1"]
    for model, shape in ((cnn, (2, 40, 1)), (res, (2, 40))):
        x = jax.ShapeDtypeStruct(shape, jnp.float32)
        out = jax.eval_shape(lambda x, m=model: m.apply(m.init(jax.random.key(0), x), x), x)
        assert out.shape == (2, 10)


# The tensorizations of experiments.reproduce's tensor table (a 256 x 256 kernel).
_SHAPES_256 = {
    "cp": {"in_shape": (16, 16), "out_shape": (16, 16)},
    "tucker": {"in_shape": (16, 16), "out_shape": (16, 16)},
    "tt": {"in_shape": (16, 16), "out_shape": (16, 16)},
    "tt_matrix": {"in_shape": (4, 8, 8), "out_shape": (4, 8, 8)},
    "tubal": {"in_shape": (32, 8), "out_shape": (32, 8)},
}


@pytest.mark.parametrize("fmt", models.FACTORIZE_FORMATS)
@pytest.mark.parametrize("budget", [0.05, 0.1, 0.25])
def test_float_rank_is_the_parameter_budget(fmt, budget):
    # A float rank is a fraction of the dense kernel: the factors fit within it and use
    # most of it (uniform ranks are coarse: Tucker's core grows like r^4).
    factorize = {"hidden_1": {"format": fmt, "rank": budget, **_SHAPES_256.get(fmt, {})}}
    model = models.MLP(features=(256, 256), factorize=factorize)
    hidden = _init_shapes(model, (1, 40))["params"]["hidden_1"]
    n = sum(int(np.prod(s)) for k, s in hidden.items() if k != "bias")
    assert 0.6 * budget * 256 * 256 <= n <= budget * 256 * 256
    if fmt == "low_rank":  # W = U diag(w) V^T: the largest r with r (256 + 256 + 1) <= budget
        assert n == int(budget * 256 * 256 // 513) * 513
    dense = models.num_params(models.MLP(features=(256, 256)), jnp.zeros((1, 40)))
    total = models.num_params(model, jnp.zeros((1, 40)))
    assert total == dense - 256 * 256 + n


_FULL_RANK = [
    ("mlp", {"features": (12, 12)}, {"hidden_1": {"format": "low_rank", "rank": 12}}),
    (
        "mlp",
        {"features": (12, 12)},
        {"hidden_1": {"format": "cp", "rank": 36, "in_shape": (3, 4), "out_shape": (3, 4)}},
    ),
    (
        "mlp",
        {"features": (12, 12)},
        {
            "hidden_0": {"format": "tucker", "rank": 8, "in_shape": (5, 8), "out_shape": (3, 4)},
            "hidden_1": {
                "format": "tt_matrix",
                "rank": 9,
                "in_shape": (3, 4),
                "out_shape": (3, 4),
            },
        },
    ),
    (
        "cnn1d",
        {"channels": 6},
        {
            "conv2": {"format": "tucker", "rank": 6},
            "conv3": {"format": "cp", "rank": 18},
            "dense": {"format": "low_rank", "rank": 10},
        },
    ),
    ("cnn1d", {"channels": 6}, {"conv2": {"format": "tt", "rank": 3}}),
]


@pytest.mark.parametrize("name, kwargs, factorize", _FULL_RANK)
def test_full_rank_factorized_model_equals_the_dense_model(name, kwargs, factorize):
    # Decomposing the dense model's kernels at full rank (factorize_spec + tensornets
    # .factorize_params) and running the factorized model gives the dense logits.
    x = jax.random.normal(jax.random.key(1), (4, 40, 1))
    dense = models.get_model(name, **kwargs)
    dense_params = _init(dense, x)["params"]
    model = models.get_model(name, factorize=factorize, **kwargs)
    params = tensornets.factorize_params(dense_params, models.factorize_spec(factorize))
    expected = jax.tree.map(jnp.shape, jax.eval_shape(model.init, jax.random.key(0), x))
    assert jax.tree.map(jnp.shape, {"params": params}) == expected
    np.testing.assert_allclose(
        jax.jit(model.apply)({"params": params}, x),
        jax.jit(dense.apply)({"params": dense_params}, x),
        atol=2e-4,
        rtol=1e-3,
    )


def test_full_rank_tubal_model_equals_the_dense_model_with_block_circulant_kernel():
    # A t-product layer is a block-circulant dense layer (Newman et al. 2018): at full
    # tubal rank the decomposed model equals the dense model whose kernel is projected
    # onto block-circulant kernels (and only then, unlike the other formats).
    factorize = {
        "hidden_1": {"format": "tubal", "rank": 4, "in_shape": (4, 3), "out_shape": (4, 3)}
    }
    x = jax.random.normal(jax.random.key(1), (4, 40, 1))
    dense = models.MLP(features=(12, 12))
    dense_params = _init(dense, x)["params"]
    model = models.MLP(features=(12, 12), factorize=factorize)
    params = tensornets.factorize_params(dense_params, models.factorize_spec(factorize))
    projected = tensornets.densify_params(params, {"hidden_1": {"format": "tubal"}})
    y = jax.jit(model.apply)({"params": params}, x)
    np.testing.assert_allclose(y, dense.apply({"params": projected}, x), atol=2e-4, rtol=1e-3)
    assert not np.allclose(projected["hidden_1"]["kernel"], dense_params["hidden_1"]["kernel"])


def test_factorize_from_a_config_is_frozen_and_hashable():
    import ml_collections

    spec = {"hidden_1": {"format": "tt_matrix", "rank": 0.1, "in_shape": [4, 4, 4]}}
    from_config = models.get_model(
        "mlp", features=[64, 64], factorize=ml_collections.ConfigDict(spec)
    )
    from_dict = models.MLP(features=(64, 64), factorize=spec)
    assert from_config.factorize == from_dict.factorize == models.freeze_factorize(spec)
    assert from_config.factorize == (
        ("hidden_1", (("format", "tt_matrix"), ("in_shape", (4, 4, 4)), ("rank", 0.1))),
    )
    hash(from_config.factorize)
    assert models.freeze_factorize(from_config.factorize) == from_config.factorize
    assert models.factorize_spec({"output": {"format": "low_rank", "rank": 2}}) == {
        "output": {"format": "cp", "rank": 2}
    }


def test_tensor_mnist1d_config_builds_a_tt_matrix_mlp_at_ten_percent():
    from configs import tensor_mnist1d

    for arg, width in ((None, 256), ("runlocal", 64)):
        config = tensor_mnist1d.get_config(arg)
        model = models.make_model(config, num_classes=10)
        hidden = _init_shapes(model, (1, 40, 1))["params"]["hidden_1"]
        assert "core_2" in hidden
        n = sum(int(np.prod(s)) for k, s in hidden.items() if k != "bias")
        assert 0.05 * width * width < n <= 0.1 * width * width


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: models.MLP(factorize={"hidden_7": {"format": "cp", "rank": 2}}), "hidden_7"),
        (lambda: models.MLP(factorize={"output": {"format": "svd", "rank": 2}}), "svd"),
        (lambda: models.MLP(factorize={"output": {"format": "cp"}}), "needs 'rank'"),
        (
            lambda: models.MLP(factorize={"output": {"format": "cp", "rank": 2, "ranks": 3}}),
            "unknown keys",
        ),
        (
            lambda: models.MLP(
                factorize={"output": {"format": "low_rank", "rank": 2, "in_shape": (10, 10)}}
            ),
            "low_rank",
        ),
        (lambda: models.CNN1D(factorize={"conv1": {"format": "tubal", "rank": 2}}), "conv1"),
        (lambda: models.CNN1D(factorize={"conv1": {"format": "low_rank", "rank": 2}}), "Dense"),
        (lambda: models.get_model("mlp", factorize=[("output", "cp")]), "factorize"),
    ],
)
def test_bad_factorize_raises_at_construction(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_factorize_is_validated_by_tensornets_with_the_layer_keys():
    # One validator: the model's message is tensornets.check_factorize_spec's.
    cases = [
        (models.MLP, {"output": {"format": "cp", "rank": 2, "to": "head"}}, None),
        (
            models.CNN1D,
            {"conv1": {"format": "low_rank", "rank": 2}},
            {"conv1": "conv", "conv2": "conv", "conv3": "conv", "dense": "dense"},
        ),
    ]
    for model, factorize, kinds in cases:
        with pytest.raises(ValueError) as ours:
            model(factorize=factorize)
        with pytest.raises(ValueError) as theirs:
            tensornets.check_factorize_spec(
                factorize, name="factorize", keys=tensornets.LAYER_KEYS, kinds=kinds
            )
        assert str(ours.value) == str(theirs.value)
    assert models.FACTORIZE_FORMATS == tuple(sorted(tensornets.FORMATS))


def test_vit1d_shapes_layers_and_errors():
    model = models.get_model("vit1d", patch_size=4, width=8, depth=2, num_heads=2, mlp_dim=16)
    x = jax.random.normal(jax.random.key(0), (3, 40, 1))
    variables = _init(model, x)
    params = variables["params"]
    assert params["position"].shape == (10, 8)
    assert params["embed"]["kernel"].shape == (4, 8)
    for i in range(2):
        for name in ("query", "key", "value", "out"):
            assert params[f"block_{i}"]["attention"][name]["kernel"].shape == (8, 8)
        assert params[f"block_{i}"]["mlp_in"]["kernel"].shape == (8, 16)
        assert params[f"block_{i}"]["mlp_out"]["kernel"].shape == (16, 8)
    logits = model.apply(variables, x)
    assert logits.shape == (3, 10) and logits.dtype == jnp.float32
    np.testing.assert_allclose(jax.jit(model.apply)(variables, x), logits, rtol=1e-5, atol=1e-5)
    # Tokens attend to each other: changing one position changes every token's output.
    y = model.apply(variables, x.at[:, 0].add(1.0))
    assert not np.allclose(y, logits)
    with pytest.raises(ValueError, match="num_heads must divide width"):
        models.ViT1D(width=10, num_heads=4)
    with pytest.raises(ValueError, match="patch_size=3 must divide"):
        models.ViT1D(patch_size=3).init(jax.random.key(0), x)


def _mlp_hidden(model, variables, x):
    """{block: (mlp_in's output, mlp_out's input)} of one forward pass."""
    seen = {}

    def capture(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and context.module.name in ("mlp_in", "mlp_out"):
            block = context.module.path[0]
            value = out if context.module.name == "mlp_in" else args[0]
            seen.setdefault(block, {})[context.module.name] = value
        return out

    with nn.intercept_methods(capture):
        model.apply(variables, x)
    return {block: (v["mlp_in"], v["mlp_out"]) for block, v in seen.items()}


def test_vit1d_activation_is_gelu_by_default_relu_on_request_and_set_from_a_config():
    x = jax.random.normal(jax.random.key(0), (3, 40, 1))
    sizes = {"patch_size": 4, "width": 8, "depth": 2, "num_heads": 2, "mlp_dim": 16}
    assert models.get_model("vit1d", **sizes).activation == "gelu"
    variables = _init(models.get_model("vit1d", **sizes), x)
    for activation, fn in (("gelu", nn.gelu), ("relu", nn.relu)):
        config = ml_collections.ConfigDict({"model": {"name": "vit1d", **sizes}})
        config.model.activation = activation
        model = models.make_model(config, num_classes=10)
        assert model.activation == activation
        hidden = _mlp_hidden(model, variables, x)  # the same params: activations have none
        assert sorted(hidden) == ["block_0", "block_1"]
        for pre, post in hidden.values():
            # "gelu" is flax's default (tanh-approximate) GELU, as before the attribute existed.
            np.testing.assert_allclose(post, fn(pre), rtol=1e-6, atol=1e-6)
            zeros = float(jnp.mean(post == 0))
            assert 0.2 < zeros < 0.8 if activation == "relu" else zeros == 0.0
    with pytest.raises(
        ValueError, match=r"^activation must be one of \['gelu', 'relu'\], got 'tanh'"
    ):
        models.ViT1D(activation="tanh")
