"""SLTrain layer: both contractions equal the float64 reference, the support is fixed and exact."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from sparsejax import masks
from tensornets import sltrain


def _params(layer, x, key=0, perturb=True):
    params = layer.init(jax.random.key(key), x)["params"]
    if perturb:  # b starts at zero; move it so the low-rank part contributes
        params = dict(params)
        params["b"] = 0.3 * jax.random.normal(jax.random.key(key + 1), params["b"].shape)
    return params


@settings(max_examples=6, deadline=None)
@given(
    n_in=st.integers(1, 13),
    n_out=st.integers(1, 9),
    batch=st.integers(1, 4),
    density=st.sampled_from([0.0, 0.07, 0.5, 1.0]),
    data=st.data(),
)
def test_both_contractions_equal_the_reference(n_in, n_out, batch, density, data):
    rank = data.draw(st.integers(1, min(n_in, n_out)))
    alpha = data.draw(st.sampled_from([None, 2.0]))
    x = jax.random.normal(jax.random.key(3), (batch, n_in))
    layer = sltrain.SLTrainDense(n_out, rank, density, alpha=alpha)
    params = _params(layer, x)
    indices = layer.bind({"params": params}).support(n_in)
    scale = (rank if alpha is None else alpha) / rank
    want = sltrain.sltrain_reference(
        x, params["a"], params["b"], params["values"], indices, scale, params["bias"]
    )
    for method in ("dense", "factorized"):
        got = sltrain.SLTrainDense(n_out, rank, density, alpha=alpha, contraction=method).apply(
            {"params": params}, x
        )
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_support_has_the_exact_count_and_is_fixed_across_inits_and_calls():
    x = jnp.ones((2, 30))
    layer = sltrain.SLTrainDense(20, 4, 0.1)
    p0 = layer.init(jax.random.key(0), x)["params"]
    p1 = layer.init(jax.random.key(1), x)["params"]
    want = masks.num_kept(600, 0.9)
    assert want == 60
    assert p0["values"].shape == p1["values"].shape == (want,)
    idx = layer.bind({"params": p0}).support(30)
    np.testing.assert_array_equal(idx, layer.bind({"params": p1}).support(30))
    assert np.all(np.diff(idx) > 0) and idx.min() >= 0 and idx.max() < 600
    mask = sltrain.support_mask((30, 20), idx)
    assert mask.sum() == want
    # The support is a trace-time constant: jit and eager see the same one.
    y_eager = layer.apply({"params": p0}, x)
    y_jit = jax.jit(layer.apply)({"params": p0}, x)
    np.testing.assert_allclose(np.asarray(y_eager), np.asarray(y_jit), rtol=1e-6, atol=1e-6)


def test_layers_of_one_model_get_different_supports_and_seed_changes_it():
    class Two(nn.Module):
        seed: int = 0

        @nn.compact
        def __call__(self, x):
            h = sltrain.SLTrainDense(16, 2, 0.2, support_seed=self.seed, name="first")(x)
            return sltrain.SLTrainDense(16, 2, 0.2, support_seed=self.seed, name="second")(h)

    x = jnp.ones((1, 16))
    supports = {}

    def grab(next_fun, args, kwargs, context):
        if isinstance(context.module, sltrain.SLTrainDense) and context.method_name == "__call__":
            supports[(context.module.support_seed, context.module.name)] = context.module.support(
                16
            )
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(grab):
        Two(0).init(jax.random.key(0), x)
        Two(1).init(jax.random.key(0), x)
    assert not np.array_equal(supports[(0, "first")], supports[(0, "second")])
    assert not np.array_equal(supports[(0, "first")], supports[(1, "first")])
    assert all(s.size == masks.num_kept(256, 0.8) for s in supports.values())


def test_initialization_follows_the_paper():
    n_in = 64
    x = jnp.ones((1, n_in))
    layer = sltrain.SLTrainDense(48, 8, 0.25)
    params = layer.init(jax.random.key(0), x)["params"]
    bound = 1 / np.sqrt(n_in)
    assert np.all(np.asarray(params["b"]) == 0)  # so the layer starts as its sparse part
    for name in ("a", "values"):
        v = np.asarray(params[name])
        assert np.abs(v).max() <= bound and v.std() > 0.4 * bound
    idx = layer.bind({"params": params}).support(n_in)
    dense_s = np.zeros(n_in * 48)
    dense_s[idx] = np.asarray(params["values"])
    y = layer.apply({"params": params}, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(x) @ dense_s.reshape(n_in, 48), atol=1e-5)


@pytest.mark.parametrize("method", ["dense", "factorized"])
def test_gradients_match_finite_differences(method):
    x = jax.random.normal(jax.random.key(0), (3, 9))
    layer = sltrain.SLTrainDense(5, 2, 0.3, alpha=3.0, contraction=method)
    params = _params(layer, x)

    def f(a, b, values, xx):
        p = {**params, "a": a, "b": b, "values": values}
        return jnp.sum(jnp.tanh(layer.apply({"params": p}, xx)))

    check_grads(
        f,
        (params["a"], params["b"], params["values"], x),
        order=1,
        modes=("rev",),
        atol=2e-2,
        rtol=2e-2,
    )


def test_gradients_of_the_two_contractions_agree():
    x = jax.random.normal(jax.random.key(0), (4, 12))
    layers = [sltrain.SLTrainDense(10, 3, 0.2, contraction=m) for m in ("dense", "factorized")]
    params = _params(layers[0], x)
    grads = [
        jax.grad(lambda p, lyr=lyr: jnp.sum(lyr.apply({"params": p}, x) ** 2))(params)
        for lyr in layers
    ]
    jax.tree.map(
        lambda g, h: np.testing.assert_allclose(np.asarray(g), np.asarray(h), rtol=1e-4, atol=1e-5),
        grads[0],
        grads[1],
    )


def test_cost_counts_params_and_flops():
    layer = sltrain.SLTrainDense(30, 4, 0.1)
    cost = sltrain.sltrain_cost(layer, 50)
    params = layer.init(jax.random.key(0), jnp.ones((1, 50)))["params"]
    assert cost["params"] == sum(p.size for p in jax.tree.leaves(params))
    assert cost["nnz"] == params["values"].size == 150
    assert cost["flops"] == 2 * (4 * 80 + 150) + 30


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rank": 0}, "rank"),
        ({"rank": 9}, "rank=9"),
        ({"density": 1.5}, "density"),
        ({"density": -0.1}, "density"),
        ({"alpha": 0.0}, "alpha"),
        ({"features": 0}, "features"),
    ],
)
def test_bad_arguments_are_value_errors(kwargs, match):
    args = {"features": 8, "rank": 2, "density": 0.2, **kwargs}
    with pytest.raises(ValueError, match=match):
        sltrain.SLTrainDense(**args).init(jax.random.key(0), jnp.ones((1, 8)))
