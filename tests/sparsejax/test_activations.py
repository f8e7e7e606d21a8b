"""Activation sparsity: nonzero fractions (Lazy Neuron), TEAL thresholds, top-k activations."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import activations


class MLP(nn.Module):
    """A two-layer MLP whose down projection reads the post-activation hidden layer."""

    hidden: int = 32
    gelu: bool = False

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(self.hidden, name="up")(x)
        h = nn.gelu(h, approximate=False) if self.gelu else nn.relu(h)
        return nn.Dense(4, name="down")(h)


def _setup(gelu=False, tokens=256):
    model = MLP(gelu=gelu)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((tokens, 8)), jnp.float32)
    variables = model.init(jax.random.key(0), x)
    return model, variables, x


def _hidden(variables, x, gelu=False):
    p = variables["params"]
    h = x @ p["up"]["kernel"] + p["up"]["bias"]
    return nn.gelu(h, approximate=False) if gelu else nn.relu(h)


def test_nonzero_fraction_counts_entries_above_eps():
    a = jnp.array([[0.0, 1.0, -0.5], [0.05, 0.0, 2.0]])
    np.testing.assert_allclose(activations.nonzero_fraction(a), 4 / 6)
    np.testing.assert_allclose(activations.nonzero_fraction(a, eps=0.1), 3 / 6)


def test_nonzero_fractions_measure_the_post_activation_hidden_layer():
    model, variables, x = _setup()
    fractions = activations.nonzero_fractions(model.apply, variables, x)
    assert list(fractions) == ["up", "down"]
    assert fractions["up"] == 1.0  # the raw inputs
    expected = float(jnp.mean(_hidden(variables, x) > 0))
    assert fractions["down"] == pytest.approx(expected)
    assert 0.2 < fractions["down"] < 0.8  # a ReLU at init zeroes about half
    # GELU is never exactly zero; near-zero entries need an eps.
    model, variables, x = _setup(gelu=True)
    gelu = activations.nonzero_fractions(model.apply, variables, x, paths=[("down",)])
    assert gelu == {"down": 1.0}
    near = activations.nonzero_fractions(model.apply, variables, x, paths=[("down",)], eps=0.05)
    assert near["down"] < 0.9


@pytest.mark.parametrize("sparsity", [0.25, 0.5])
def test_teal_zeroes_the_calibrated_fraction_of_each_projection_input(sparsity):
    model, variables, x = _setup(gelu=True)
    thresholds = activations.teal_thresholds(model.apply, variables, x, sparsity=sparsity)
    assert set(thresholds) == {("up",), ("down",)}
    inputs = activations.dense_inputs(model.apply, variables, x)
    for path, t in thresholds.items():
        zeroed = float(jnp.mean(jnp.abs(inputs[path]) <= t))
        assert abs(zeroed - sparsity) <= 2 / inputs[path].size
    # Under the interceptor the model computes exactly the thresholded layers.
    with activations.teal(thresholds):
        out = model.apply(variables, x)
    p = variables["params"]
    xs = jnp.where(jnp.abs(x) > thresholds[("up",)], x, 0)
    h = nn.gelu(xs @ p["up"]["kernel"] + p["up"]["bias"], approximate=False)
    hs = jnp.where(jnp.abs(h) > thresholds[("down",)], h, 0)
    np.testing.assert_allclose(
        out, hs @ p["down"]["kernel"] + p["down"]["bias"], rtol=1e-5, atol=1e-5
    )

    def run(variables, x):
        with activations.teal(thresholds):
            return model.apply(variables, x)

    np.testing.assert_allclose(jax.jit(run)(variables, x), out, rtol=1e-5, atol=1e-5)


def test_teal_at_zero_sparsity_and_on_chosen_layers():
    model, variables, x = _setup()
    dense = model.apply(variables, x)
    thresholds = activations.teal_thresholds(model.apply, variables, x, sparsity=0.0)
    with activations.teal(thresholds):
        np.testing.assert_array_equal(model.apply(variables, x), dense)
    only_down = activations.teal_thresholds(
        model.apply, variables, x, sparsity=0.9, paths=[("down",)]
    )
    assert list(only_down) == [("down",)]
    with activations.teal(only_down):
        sparse = model.apply(variables, x)
    assert not np.allclose(sparse, dense)


def test_topk_activations_keep_exactly_k_per_token():
    h = jnp.asarray(np.abs(np.random.default_rng(1).standard_normal((3, 5, 16))) + 0.1)
    out = activations.topk_activations(h, 4)
    np.testing.assert_array_equal(jnp.sum(out != 0, axis=-1), 4)
    kept = np.asarray(out) != 0
    np.testing.assert_array_equal(np.asarray(out)[kept], np.asarray(h)[kept])
    fourth = np.sort(np.asarray(h), axis=-1)[..., -4]
    assert np.all(np.where(kept, np.asarray(h) >= fourth[..., None], True))
    g = jax.grad(lambda h: jnp.sum(activations.topk_activations(h, 4)))(h)
    np.testing.assert_array_equal(np.asarray(g) != 0, kept)


def test_bad_input_names_the_argument():
    model, variables, x = _setup(tokens=4)
    with pytest.raises(ValueError, match=r"^sparsity must be in \[0, 1\), got 1.0"):
        activations.teal_thresholds(model.apply, variables, x, sparsity=1.0)
    with pytest.raises(ValueError, match=r"^paths \['mid'\] are not Dense layers"):
        activations.nonzero_fractions(model.apply, variables, x, paths=[("mid",)])
    with pytest.raises(ValueError, match="^eps must"):
        activations.nonzero_fraction(x, eps=-1.0)
    with pytest.raises(ValueError, match=r"^k must be an int in \[1, features=8\]"):
        activations.topk_activations(x, 9)


def test_teal_thresholds_can_be_jit_arguments_one_program_for_every_sparsity():
    model, variables, x = _setup(gelu=True)
    traces = []

    @jax.jit
    def run(variables, x, thresholds):
        traces.append(1)
        with activations.teal(thresholds):
            return model.apply(variables, x)

    for sparsity in (0.25, 0.5):
        thresholds = activations.teal_thresholds(model.apply, variables, x, sparsity=sparsity)
        with activations.teal(thresholds):
            expected = model.apply(variables, x)
        as_arrays = {p: jnp.float32(t) for p, t in thresholds.items()}
        np.testing.assert_allclose(run(variables, x, as_arrays), expected, rtol=1e-5, atol=1e-5)
    assert len(traces) == 1


@pytest.mark.parametrize("rate", [0.0, 0.3, 0.7, 1.0])
def test_random_drop_zeroes_the_rate_of_entries_at_random_and_keeps_the_rest(rate):
    model, variables, x = _setup(gelu=True, tokens=512)
    key = jax.random.key(3)
    rates = {("up",): rate, ("down",): rate}
    seen, outputs = {}, {}

    def record(next_fun, args, kwargs, context):  # runs after the drop: entered inside it
        seen[tuple(context.module.path)] = args[0]
        outputs[tuple(context.module.path)] = next_fun(*args, **kwargs)
        return outputs[tuple(context.module.path)]

    with activations.random_drop(key, rates), nn.intercept_methods(record):
        out = model.apply(variables, x)
    # What each layer would have received without its own drop (upstream drops included).
    inputs = {("up",): x, ("down",): nn.gelu(outputs[("up",)], approximate=False)}
    for path, original in inputs.items():
        dropped = np.asarray(seen[path]) == 0
        if rate == 1:
            assert dropped.all()
            continue
        # Among entries that were nonzero (a token whose inputs were all dropped upstream
        # reaches GELU(bias) = 0), Binomial(n, rate): within 5 standard deviations.
        nonzero = np.asarray(original) != 0
        n = nonzero.sum()
        assert n > dropped.size // 2
        fraction = dropped[nonzero].mean()
        assert abs(fraction - rate) <= 5 * np.sqrt(rate * (1 - rate) / n) + 1e-9
        np.testing.assert_array_equal(
            np.asarray(seen[path])[~dropped], np.asarray(original)[~dropped]
        )
    if rate == 0:
        np.testing.assert_array_equal(out, model.apply(variables, x))
    # The two layers draw different masks, and a jitted run with traced rates and key agrees.
    if 0 < rate < 1:
        up, down = (np.asarray(seen[p]) == 0 for p in (("up",), ("down",)))
        assert not np.array_equal(up, down[:, : up.shape[1]])

    @jax.jit
    def run(variables, x, key, rates):
        with activations.random_drop(key, rates):
            return model.apply(variables, x)

    traced = {p: jnp.float32(r) for p, r in rates.items()}
    np.testing.assert_allclose(run(variables, x, key, traced), out, rtol=1e-5, atol=1e-5)


def test_random_drop_touches_only_the_listed_layers_and_depends_on_the_key():
    model, variables, x = _setup(gelu=True)
    seen = {}

    def record(next_fun, args, kwargs, context):
        seen[tuple(context.module.path)] = np.asarray(args[0])
        return next_fun(*args, **kwargs)

    masks = []
    for key in (0, 0, 1):
        with activations.random_drop(jax.random.key(key), {("down",): 0.5}):
            with nn.intercept_methods(record):
                model.apply(variables, x)
        np.testing.assert_array_equal(seen[("up",)], x)  # not listed: untouched
        masks.append(seen[("down",)] == 0)
    np.testing.assert_array_equal(masks[0], masks[1])  # one key, one mask
    assert not np.array_equal(masks[0], masks[2])
    p = variables["params"]
    with activations.random_drop(jax.random.key(0), {("down",): 1.0}):
        out = model.apply(variables, x)
    np.testing.assert_allclose(out, jnp.broadcast_to(p["down"]["bias"], out.shape))


def test_random_drop_names_a_bad_rate():
    with pytest.raises(ValueError, match=r"^rates\['down'\] must be in \[0, 1\], got 1.5"):
        activations.random_drop_interceptor(jax.random.key(0), {("down",): 1.5})
    with pytest.raises(ValueError, match=r"^rates\['up'\] must be in \[0, 1\], got 'half'"):
        activations.random_drop_interceptor(jax.random.key(0), {("up",): "half"})


def test_teal_thresholds_from_inputs_match_one_sparsity_at_a_time_and_jnp_quantile():
    model, variables, x = _setup(gelu=True)
    inputs = activations.dense_inputs(model.apply, variables, x)
    sparsities = [0.0, 0.25, 0.4, 0.5]
    together = activations.teal_thresholds_from_inputs(inputs, sparsities)
    assert list(together) == sparsities
    for sparsity in sparsities:
        alone = activations.teal_thresholds(model.apply, variables, x, sparsity=sparsity)
        assert together[sparsity] == alone
        for path, a in inputs.items():
            reference = -1.0 if sparsity == 0 else jnp.quantile(jnp.abs(a), sparsity)
            np.testing.assert_allclose(together[sparsity][path], reference, rtol=1e-6)
    with pytest.raises(ValueError, match=r"^sparsity must be in \[0, 1\), got 1.5"):
        activations.teal_thresholds_from_inputs(inputs, [0.5, 1.5])


@pytest.mark.parametrize("features", [1, 7, 64])
def test_random_drop_on_odd_widths_and_batched_tokens(features):
    layer = nn.Dense(3)
    x = jnp.asarray(np.random.default_rng(2).uniform(1, 2, (5, 301, features)), jnp.float32)
    variables = layer.init(jax.random.key(0), x)
    seen = {}

    def record(next_fun, args, kwargs, context):
        seen["x"] = np.asarray(args[0])
        return next_fun(*args, **kwargs)

    with activations.random_drop(jax.random.key(4), {(): 0.123}), nn.intercept_methods(record):
        out = layer.apply(variables, x)
    assert out.shape == (5, 301, 3) and seen["x"].shape == x.shape
    dropped = seen["x"] == 0
    assert abs(dropped.mean() - 0.123) <= 5 * np.sqrt(0.123 * 0.877 / x.size)
    # Every position of the last axis is drawn (the 16-bit halves cover odd widths too).
    assert features == 1 or dropped.any(axis=(0, 1)).all()
