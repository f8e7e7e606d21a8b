"""Calibration capture and the layer-by-layer driver on small Flax models."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import models
from sparsejax import posttrain


class _Net(nn.Module):
    """Dense -> relu -> Conv -> relu -> flatten -> Dense: both layer types in sequence."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(8, name="first")(x))
        x = nn.relu(nn.Conv(8, (3,), strides=(2,), padding=((1, 1),), name="conv")(x))
        return nn.Dense(4, name="head")(x.reshape(x.shape[0], -1))


def _setup():
    model = _Net()
    x = jax.random.normal(jax.random.key(0), (16, 12, 4)) + 0.3
    params = model.init(jax.random.key(1), x)["params"]
    return model, params, x


def test_conv_input_matrix_reproduces_the_conv():
    for conv, shape in [
        (nn.Conv(6, (3,), strides=(2,), padding=((1, 1),)), (2, 11, 4)),
        (nn.Conv(5, (3, 2), padding="SAME"), (2, 7, 6, 3)),
        (nn.Conv(5, 5, strides=2, padding="VALID", kernel_dilation=2), (3, 20, 2)),
    ]:
        x = jax.random.normal(jax.random.key(0), shape)
        variables = conv.init(jax.random.key(1), x)
        (call,) = posttrain.layer_calls(conv.apply, variables, x)
        patches = posttrain.input_matrix(call.module, x)
        kernel = variables["params"]["kernel"]
        y = conv.apply(variables, x)
        np.testing.assert_allclose(
            patches @ kernel.reshape(-1, kernel.shape[-1]) + variables["params"]["bias"],
            y.reshape(-1, y.shape[-1]),
            atol=1e-5,
        )


def test_layer_calls_in_order_and_capture():
    model, params, x = _setup()
    calls = posttrain.layer_calls(model.apply, {"params": params}, x)
    assert [c.name for c in calls] == ["first", "conv", "head"]
    np.testing.assert_array_equal(
        posttrain.capture_input(model.apply, {"params": params}, x, ("first",)), x
    )
    hidden = nn.relu(x @ params["first"]["kernel"] + params["first"]["bias"])
    np.testing.assert_allclose(
        posttrain.capture_input(model.apply, {"params": params}, x, ("conv",)), hidden, atol=1e-6
    )
    with pytest.raises(ValueError, match="no Dense or Conv layer"):
        posttrain.capture_input(model.apply, {"params": params}, x, ("nope",))


def test_vit_attention_and_mlp_layers_are_all_seen():
    model = models.ViT1D(patch_size=4, width=8, depth=2, num_heads=2, mlp_dim=16)
    x = jnp.zeros((2, 40, 1))
    params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    names = [c.name for c in posttrain.layer_calls(model.apply, {"params": params}, x)]
    block = [f"attention/{p}" for p in ("query", "key", "value", "out")] + ["mlp_in", "mlp_out"]
    expected = ["embed"] + [f"block_{i}/{n}" for i in range(2) for n in block] + ["head"]
    assert names == expected


def test_prune_model_is_sequential_and_exact():
    """Each layer is pruned on the inputs produced by the already pruned layers before it."""
    model, params, x = _setup()
    out = posttrain.prune_model(model.apply, params, x, method="wanda", sparsity=0.5)
    # Reference: prune layer by layer by hand.
    first, _ = posttrain.wanda(params["first"]["kernel"], x.reshape(-1, 4), sparsity=0.5)
    hidden = nn.relu(x @ first + params["first"]["bias"])
    conv_call = posttrain.layer_calls(model.apply, {"params": params}, x)[1]
    patches = posttrain.input_matrix(conv_call.module, hidden)
    conv_kernel = params["conv"]["kernel"]
    conv, _ = posttrain.wanda(conv_kernel.reshape(-1, 8), patches, sparsity=0.5)
    np.testing.assert_array_equal(out.params["first"]["kernel"], first)
    np.testing.assert_array_equal(out.params["conv"]["kernel"], conv.reshape(conv_kernel.shape))
    for name in ("first", "conv", "head"):
        mask = out.masks[name]["kernel"]
        kernel = out.params[name]["kernel"]
        assert mask.shape == kernel.shape and mask.dtype == jnp.bool_
        assert np.all(
            np.asarray(mask).reshape(-1, kernel.shape[-1]).sum(0)
            == mask.size // (2 * kernel.shape[-1])
        )
        assert bool(jnp.all(jnp.where(mask, True, kernel == 0)))
        assert out.masks[name]["bias"] is None
        np.testing.assert_array_equal(out.params[name]["bias"], params[name]["bias"])
        assert 0.0 < out.errors[name] < 1.0


def test_prune_model_skip_nm_dsnot_and_sparsity_zero():
    model, params, x = _setup()
    out = posttrain.prune_model(
        model.apply, params, x, method="sparsegpt", n=2, m=4, dsnot=True, skip=("head",)
    )
    assert out.masks["head"]["kernel"] is None
    np.testing.assert_array_equal(out.params["head"]["kernel"], params["head"]["kernel"])
    conv_mask = np.asarray(out.masks["conv"]["kernel"])  # [window, in, out]: 2:4 over inputs
    assert np.all(conv_mask.reshape(3, 2, 4, 8).sum(axis=2) == 2)
    for method in posttrain.METHODS:
        same = posttrain.prune_model(model.apply, params, x, method=method, sparsity=0.0)
        jax.tree.map(np.testing.assert_array_equal, same.params, params)


def test_prune_model_errors():
    model, params, x = _setup()
    with pytest.raises(ValueError, match="method='obs' is unknown"):
        posttrain.prune_model(model.apply, params, x, method="obs", sparsity=0.5)
    with pytest.raises(ValueError, match="skip names layers"):
        posttrain.prune_model(model.apply, params, x, method="wanda", sparsity=0.5, skip=("x",))
    with pytest.raises(ValueError, match="m=8 must divide"):
        posttrain.prune_model(model.apply, params, x, method="wanda", n=4, m=8)


class _Blocks(nn.Module):
    """Two blocks of two Dense layers each: paths ``block_i/inner`` and ``block_i/outer``."""

    @nn.compact
    def __call__(self, x):
        for i in range(2):
            block = _Block(name=f"block_{i}")
            x = block(x)
        return x


class _Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(6, name="outer")(nn.relu(nn.Dense(6, name="inner")(x)))


def test_capture_inputs_matches_capture_input_and_names_missing_paths():
    model, params, x = _setup()
    paths = [("first",), ("conv",), ("head",)]
    captured = posttrain.capture_inputs(model.apply, {"params": params}, x, paths)
    assert sorted(captured) == sorted(paths)
    for path in paths:
        np.testing.assert_array_equal(
            captured[path], posttrain.capture_input(model.apply, {"params": params}, x, path)
        )
    with pytest.raises(ValueError, match="nope"):
        posttrain.capture_inputs(model.apply, {"params": params}, x, [("first",), ("nope",)])


def test_block_depth_calibrates_a_block_on_the_inputs_of_the_pruned_earlier_blocks():
    model = _Blocks()
    x = jax.random.normal(jax.random.key(0), (32, 6))
    params = model.init(jax.random.key(1), x)["params"]
    out = posttrain.prune_model(
        model.apply, params, x, method="sparsegpt", sparsity=0.5, block_depth=1
    )
    # Reference, block by block: both layers of a block see the block's dense forward pass.
    expected = params
    for i in range(2):
        name = f"block_{i}"
        variables = {"params": expected}
        inner_x = posttrain.capture_input(model.apply, variables, x, (name, "inner"))
        outer_x = posttrain.capture_input(model.apply, variables, x, (name, "outer"))
        block = dict(expected[name])
        for layer, inputs in (("inner", inner_x), ("outer", outer_x)):
            kernel, _ = posttrain.sparsegpt(expected[name][layer]["kernel"], inputs, sparsity=0.5)
            block[layer] = {**expected[name][layer], "kernel": kernel}
        expected = {**expected, name: block}
    jax.tree.map(np.testing.assert_array_equal, out.params, expected)
    # Layer by layer differs: the outer layer then sees the pruned inner layer's outputs.
    sequential = posttrain.prune_model(model.apply, params, x, method="sparsegpt", sparsity=0.5)
    np.testing.assert_array_equal(
        sequential.params["block_0"]["inner"]["kernel"], out.params["block_0"]["inner"]["kernel"]
    )
    assert not np.array_equal(
        sequential.params["block_0"]["outer"]["kernel"], out.params["block_0"]["outer"]["kernel"]
    )
    # Depth 2 makes every layer its own block: the layer-by-layer result.
    per_layer = posttrain.prune_model(
        model.apply, params, x, method="sparsegpt", sparsity=0.5, block_depth=2
    )
    jax.tree.map(np.testing.assert_array_equal, per_layer.params, sequential.params)


@pytest.mark.parametrize("depth", [0, -1, 1.5, True, "1"])
def test_bad_block_depth(depth):
    model, params, x = _setup()
    with pytest.raises(ValueError, match="block_depth"):
        posttrain.prune_model(
            model.apply, params, x, method="wanda", sparsity=0.5, block_depth=depth
        )


def test_outlier_ratios_find_a_scaled_input_feature():
    model, params, x = _setup()
    x = x.at[..., 2].multiply(50.0)  # one input feature far larger than the rest
    ratios = posttrain.outlier_ratios(model.apply, {"params": params}, x, [("first",), ("conv",)])
    norms = np.linalg.norm(np.asarray(x).reshape(-1, 4), axis=0)
    np.testing.assert_allclose(ratios["first"], norms.max() / np.median(norms), rtol=1e-5)
    assert ratios["first"] > 20


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_block_shape_drops_whole_blocks_by_their_summed_scores(method):
    model = _Blocks()
    x = jax.random.normal(jax.random.key(0), (32, 6)) * jnp.arange(1.0, 7.0)
    params = model.init(jax.random.key(1), x)["params"]
    out = posttrain.prune_model(
        model.apply, params, x, method=method, sparsity=0.5, block_shape=(2, 3), block_depth=1
    )
    for i in range(2):
        for layer in ("inner", "outer"):
            mask = np.asarray(out.masks[f"block_{i}"][layer]["kernel"])
            blocks = mask.reshape(3, 2, 2, 3).transpose(0, 2, 1, 3).reshape(3, 2, 6)
            assert np.all(blocks.all(-1) | ~blocks.any(-1)), "constant on every block"
            assert blocks.all(-1).sum() == 3  # half of the 6 blocks
            kernel = np.asarray(out.params[f"block_{i}"][layer]["kernel"])
            np.testing.assert_array_equal(kernel == 0, ~mask)
    # The first layer sees x itself: its blocks are ranked by summed |W| (* ||x_i|| for Wanda).
    w = np.asarray(params["block_0"]["inner"]["kernel"])
    scores = np.abs(w) * (
        np.linalg.norm(np.asarray(x), axis=0)[:, None] if method == "wanda" else 1
    )
    sums = scores.reshape(3, 2, 2, 3).sum(axis=(1, 3))
    kept = np.asarray(out.masks["block_0"]["inner"]["kernel"]).reshape(3, 2, 2, 3)[:, 0, :, 0]
    assert sums[kept].min() >= sums[~kept].max()


def test_block_shape_refuses_what_works_per_weight():
    model, params, x = _setup()
    with pytest.raises(ValueError, match="block_shape.*method='sparsegpt'"):
        posttrain.prune_model(
            model.apply, params, x, method="sparsegpt", sparsity=0.5, block_shape=(2, 2)
        )
    with pytest.raises(ValueError, match="not N:M or DSnoT"):
        posttrain.prune_model(
            model.apply, params, x, method="wanda", sparsity=0.5, dsnot=True, block_shape=(2, 2)
        )
    with pytest.raises(ValueError, match=r"layer 'first': block_shape=\(5, 5\)"):
        posttrain.prune_model(
            model.apply, params, x, method="wanda", sparsity=0.5, block_shape=(5, 5)
        )
