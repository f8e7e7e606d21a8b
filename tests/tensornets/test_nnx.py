"""NNX factorized layers against their Linen twins, and compaction of their rank masks."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import tensornets as tn
from sparsejax import algorithms, transforms
from sparsejax import nnx as snnx
from tensornets import nnx as tnx


def _params(layer) -> dict:
    return nnx.to_pure_dict(nnx.state(layer, nnx.Param))


# (NNX layer, Linen layer, input) builders: dense, conv and embedding.
def _dense(rngs):
    return nnx.Linear(8, 12, rngs=rngs), nn.Dense(12), jax.random.normal(jax.random.key(1), (3, 8))


def _conv(rngs):
    layer = nnx.Conv(4, 6, (3, 3), strides=(2, 1), padding="VALID", rngs=rngs)
    linen = nn.Conv(6, (3, 3), strides=(2, 1), padding="VALID")
    return layer, linen, jax.random.normal(jax.random.key(1), (2, 7, 5, 4))


def _embed(rngs):
    return nnx.Embed(27, 8, rngs=rngs), nn.Embed(27, 8), jnp.array([[0, 5, 26], [3, 3, 1]])


CASES = [
    (_dense, "tucker", 4),
    (_dense, "tt_matrix", 3),
    (_dense, "cp", 5),
    (_dense, "low_rank", 3),
    (_conv, "tucker", 3),
    (_conv, "cp", 4),
    (_embed, "tt_matrix", 3),
]


@pytest.mark.parametrize("build,fmt,rank", CASES)
def test_factorized_equals_its_linen_twin_and_compacts(build, fmt, rank):
    rngs = nnx.Rngs(0)
    dense, linen_dense, x = build(rngs)
    layer = tnx.Factorized(dense, format=fmt, rank=rank, rngs=rngs)
    twin = tn.Factorized(linen_dense, format=fmt, rank=rank)
    params = _params(layer)
    # The factors are named and shaped as the Linen layer's params.
    linen_shapes = jax.tree.map(jnp.shape, twin.init(jax.random.key(2), x)["params"])
    assert jax.tree.map(jnp.shape, params) == linen_shapes
    np.testing.assert_allclose(layer(x), twin.apply({"params": params}, x), rtol=1e-5, atol=1e-6)

    # Kill component 1 of every rank axis: the compacted layer computes the masked one.
    rank_masks = jax.tree.map(lambda v: v.at[1].set(False), tn.init_rank_masks(params))
    small = tnx.compact(layer, rank_masks)
    masked = twin.apply({"params": tn.apply_rank_masks(params, rank_masks)}, x)
    np.testing.assert_allclose(small(x), masked, rtol=1e-4, atol=1e-5)
    size = lambda tree: sum(v.size for v in jax.tree.leaves(tree))  # noqa: E731
    assert size(_params(small)) == int(tn.num_live_params(params, rank_masks)) < size(params)
    jax.tree.map(np.testing.assert_array_equal, _params(layer), params)  # layer unchanged


class _LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(tn.Factorized(nn.Dense(16), format="tucker", rank=6, name="hidden")(x))
        return nn.Dense(8, name="head")(x)


class _NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.hidden = tnx.Factorized(
            nnx.Linear(12, 16, rngs=rngs), format="tucker", rank=6, rngs=rngs
        )
        self.head = nnx.Linear(16, 8, rngs=rngs)

    def __call__(self, x):
        return self.head(jax.nn.relu(self.hidden(x)))


def test_spectral_truncation_matches_linen_then_compacts():
    # Rank-adaptive training is masked training of the factors: the NNX model follows its
    # Linen twin through sparsejax.nnx, and the truncated layer compacts.
    linen = _LinenNet()
    params = linen.init(jax.random.key(1), jnp.zeros((1, 12)))["params"]
    model = _NNXNet(nnx.Rngs(3))
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    algorithm = algorithms.get("spectral_truncation", tau=0.3, update_every_steps=5, begin_step=5)
    tx = transforms.masked(optax.adam(1e-2), algorithm, key=jax.random.key(3))
    kx, ky = jax.random.split(jax.random.key(2))
    xs, ys = jax.random.normal(kx, (12, 16, 12)), jax.random.randint(ky, (12, 16), 0, 8)
    loss = lambda logits, y: optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()  # noqa: E731

    opt_state = tx.init(params)
    opt = snnx.optimizer(model, tx)

    @jax.jit
    def linen_step(params, opt_state, x, y):
        grads = jax.grad(lambda p: loss(linen.apply({"params": p}, x), y))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    @nnx.jit
    def nnx_step(model, opt, x, y):
        def loss_fn(model):
            with snnx.forward_context(model, opt, algorithm):
                return loss(model(x), y)

        opt.update(model, nnx.grad(loss_fn)(model))

    for x, y in zip(xs, ys):
        params, opt_state = linen_step(params, opt_state, x, y)
        nnx_step(model, opt, x, y)
    masks = snnx.get_masks(opt)
    jax.tree.map(np.testing.assert_array_equal, masks, transforms.get_masks(opt_state))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
        _params(model),
        params,
    )
    rank_masks = tn.rank.rank_masks_from_param_masks(masks, _params(model))
    assert sum(int(v.sum()) for v in jax.tree.leaves(rank_masks)) < 12  # truncated below 6 + 6
    small = tnx.compact(model.hidden, rank_masks["hidden"])
    x = xs[0]
    np.testing.assert_allclose(small(x), model.hidden(x), rtol=1e-4, atol=1e-5)


def test_errors_name_the_argument():
    rngs = nnx.Rngs(0)
    with pytest.raises(ValueError, match="layer must be an nnx.Linear"):
        tnx.Factorized(nnx.BatchNorm(4, rngs=rngs), format="cp", rank=2, rngs=rngs)
    masked_conv = nnx.Conv(4, 6, (3,), mask=jnp.ones((3, 4, 6)), rngs=rngs)
    with pytest.raises(ValueError, match="layer.mask"):
        tnx.Factorized(masked_conv, format="cp", rank=2, rngs=rngs)
    with pytest.raises(ValueError, match="format"):
        tnx.Factorized(nnx.Linear(4, 4, rngs=rngs), format="nope", rank=2, rngs=rngs)
    with pytest.raises(ValueError, match="layer must be a tensornets.nnx.Factorized"):
        tnx.compact(nnx.Linear(4, 4, rngs=rngs), {})


# --------------------------------------------------------- conversion of trained layers
def _grouped_conv(rngs):
    layer = nnx.Conv(4, 6, (3,), feature_group_count=2, rngs=rngs)
    linen = nn.Conv(6, (3,), feature_group_count=2)
    return layer, linen, jax.random.normal(jax.random.key(1), (2, 9, 4))


def _trained(build):
    """A layer with a nonzero bias, as a trained one has (a dropped bias would show)."""
    layer, linen, x = build(nnx.Rngs(0))
    if getattr(layer, "bias", None) is not None:
        layer.bias[...] = jax.random.normal(jax.random.key(5), layer.bias.shape)
    return layer, linen, x


# (builder, format, the largest rank the layer takes, extra options): every one is an exact
# decomposition there (SVD, HOOI at full multilinear rank, TT-SVD at full bonds).
FULL_RANK = [
    (_dense, "low_rank", 8, {}),
    (_dense, "tucker", (8, 8), {}),
    (_dense, "tt_matrix", (4, 6), {}),
    (_dense, "tt", (2, 8), {"in_shape": (2, 4)}),
    (_conv, "tucker", (4, 6), {}),
    (_conv, "tt_matrix", 9, {}),
    (_grouped_conv, "tucker", (2, 3), {}),
    (_embed, "tt_matrix", 6, {}),
    (_embed, "low_rank", 8, {}),
]


@pytest.mark.parametrize("build,fmt,rank,options", FULL_RANK)
def test_factorize_at_full_rank_reproduces_the_layer(build, fmt, rank, options):
    layer, _, x = _trained(build)
    before = _params(layer)
    factorized = tnx.factorize(layer, format=fmt, rank=rank, **options)
    assert isinstance(factorized, tnx.Factorized)
    np.testing.assert_allclose(factorized(x), layer(x), rtol=1e-4, atol=2e-5)
    jax.tree.map(np.testing.assert_array_equal, _params(layer), before)  # layer unchanged


# Below full rank: the same factors as the Linen conversion of the same kernel.
LOW_RANK = [
    (_dense, "low_rank", 3, {}),
    (_dense, "tucker", (3, 3), {}),
    (_dense, "tt_matrix", 2, {}),
    (_dense, "cp", 4, {}),
    (_conv, "tucker", 3, {}),
    (_conv, "tt_matrix", 3, {}),
    (_embed, "tt_matrix", 3, {}),
]


@pytest.mark.parametrize("build,fmt,rank,options", LOW_RANK)
def test_factorize_equals_the_linen_conversion_and_compacts(build, fmt, rank, options):
    layer, linen, x = _trained(build)
    factorized = tnx.factorize(layer, format=fmt, rank=rank, rngs=nnx.Rngs(3), **options)
    spec = {"layer": {"format": fmt, "rank": rank, **options}}
    # The trained layer's params are in the Linen layout factorize_params converts.
    converted = tn.factorize_params({"layer": _params(layer)}, spec)["layer"]
    params = _params(factorized)
    jax.tree.map(np.testing.assert_array_equal, params, converted)
    twin = tn.Factorized(linen, format=fmt, rank=rank, **options)
    np.testing.assert_allclose(
        factorized(x), twin.apply({"params": converted}, x), rtol=1e-5, atol=1e-6
    )
    # Compaction works on a converted layer as on an initialized one.
    rank_masks = jax.tree.map(lambda v: v.at[0].set(False), tn.init_rank_masks(params))
    small = tnx.compact(factorized, rank_masks)
    masked = twin.apply({"params": tn.apply_rank_masks(params, rank_masks)}, x)
    np.testing.assert_allclose(small(x), masked, rtol=1e-4, atol=1e-5)


def test_factorize_low_rank_is_the_truncated_svd():
    # Eckart & Young: the rank-r factorization's error is the norm of the dropped singular
    # values, the smallest any rank-r matrix reaches.
    layer, _, _ = _trained(_dense)
    kernel = np.asarray(layer.kernel[...], np.float64)
    sigma = np.linalg.svd(kernel, compute_uv=False)
    factors = _params(tnx.factorize(layer, format="low_rank", rank=3))
    rebuilt = tn.densify_params({"d": factors}, {"d": {"format": "low_rank"}})["d"]["kernel"]
    error = np.linalg.norm(np.asarray(rebuilt, np.float64) - kernel)
    np.testing.assert_allclose(error, np.linalg.norm(sigma[3:]), rtol=1e-4)


class _DenseNet(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.List([nnx.Linear(12, 16, rngs=rngs), nnx.Linear(16, 16, rngs=rngs)])
        self.head = nnx.Linear(16, 8, rngs=rngs)

    def __call__(self, x):
        for layer in self.hidden:
            x = jax.nn.relu(layer(x))
        return self.head(x)


def test_factorize_model_replaces_the_named_layers():
    model = _DenseNet(nnx.Rngs(0))
    before = _params(model)
    spec = {
        "hidden/1": {"format": "tucker", "rank": (16, 16)},
        "head": {"format": "low_rank", "rank": 8},
    }
    x = jax.random.normal(jax.random.key(1), (4, 12))
    full = tnx.factorize_model(model, spec)
    assert isinstance(full.hidden[1], tnx.Factorized) and isinstance(full.head, tnx.Factorized)
    assert isinstance(full.hidden[0], nnx.Linear)
    np.testing.assert_allclose(full(x), model(x), rtol=1e-4, atol=2e-5)
    jax.tree.map(np.testing.assert_array_equal, _params(model), before)  # model unchanged
    # Each layer is what factorize makes of it.
    small = tnx.factorize_model(model, {"head": {"format": "low_rank", "rank": 2}})
    alone = tnx.factorize(model.head, format="low_rank", rank=2)
    jax.tree.map(np.testing.assert_array_equal, _params(small.head), _params(alone))


def test_factorize_errors_name_the_argument():
    rngs = nnx.Rngs(0)
    with pytest.raises(ValueError, match="layer must be an nnx.Linear"):
        tnx.factorize(nnx.BatchNorm(4, rngs=rngs), format="cp", rank=2)
    with pytest.raises(ValueError, match="rank"):
        tnx.factorize(nnx.Linear(8, 12, rngs=rngs), format="low_rank", rank=9)
    with pytest.raises(ValueError, match="format must be one of"):
        tnx.factorize(nnx.Embed(8, 4, rngs=rngs), format="tucker", rank=2)
    model = _DenseNet(rngs)
    with pytest.raises(ValueError, match="model must be an nnx.Module"):
        tnx.factorize_model({"head": 1}, {})
    with pytest.raises(ValueError, match=r"names 'hidden/2', which is not one of the layers"):
        tnx.factorize_model(model, {"hidden/2": {"format": "cp", "rank": 2}})
    with pytest.raises(ValueError, match=r"spec\['head'\] has unknown keys \['to'\]"):
        tnx.factorize_model(model, {"head": {"format": "cp", "rank": 2, "to": "fc"}})
    with pytest.raises(ValueError, match=r"spec\['head'\]: .*rank"):
        tnx.factorize_model(model, {"head": {"format": "low_rank", "rank": 99}})
