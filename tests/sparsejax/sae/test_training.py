"""Training: dictionary recovery, one trace, unit-norm decoder every step, dead counts in
tokens, thresholds, warm-ups, and fit's errors."""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import sae as sae_lib
from sparsejax.sae import losses, training
from tests.sparsejax.sae.conftest import SAMPLE, D, K, N

B = 16


def _x(seed=0, tokens=B):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((tokens, D)), jnp.float32)


# One set of options for most tests, so each kind's train step compiles once for the file.
OPTIONS = {
    "learning_rate": 0.05,
    "aux_coeff": 1 / 32,
    "dead_after_tokens": 2 * B,
    "lr_warmup_steps": 4,
    "sparsity_warmup_steps": 5,
}


@functools.cache
def _compiled(kind, options):
    spec = sae_lib.make_spec(kind, d_in=D, n_latents=N, k=K if kind != "relu_l1" else None)
    o = training.resolve_options(training.TrainOptions(batch_size=B, **dict(options)), spec, 20)
    tx = training.make_optimizer(o, 20)
    return spec, o, tx, training.make_train_step(spec, o, tx)


def _setup(kind, **options):
    """A fresh train state and the (cached) step of ``kind`` under OPTIONS + ``options``."""
    spec, o, tx, step = _compiled(kind, tuple(sorted({**OPTIONS, **options}.items())))
    state = training.init_train_state(jax.random.key(0), spec, _x(99, SAMPLE), o, tx)
    return state, step, o


RECOVERY = {"kind": "topk", "n_latents": 48, "k": 3, "steps": 500, "batch_size": 256}


def test_topk_sae_recovers_a_known_dictionary(synthetic_data):
    data = synthetic_data
    sae = sae_lib.fit(jax.random.key(2), data.x, **RECOVERY)
    assert sae_lib.mmcs(data.dictionary, sae.decoder) >= 0.9
    rec = sae_lib.recovery(sae, data.x, data.codes, data.dictionary)
    assert rec["mcc"] >= 0.8, rec
    ev = sae_lib.evaluate(sae, data.x)
    assert ev["fvu"] < 0.15 and ev["l0"] <= 3.0, ev
    z = sae.encode(data.x[:100])
    assert z.shape == (100, 48) and sae.decode(z).shape == (100, 16)
    # A legacy uint32 key with the same bits and numpy data train the same SAE.
    again = sae_lib.fit(jax.random.PRNGKey(2), np.asarray(data.x), **RECOVERY)
    for a, b in zip(jax.tree.leaves(sae), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kind", ["topk", "batchtopk", "relu_l1"])
def test_decoder_rows_are_unit_norm_after_every_train_step(kind):
    state, step, _ = _setup(kind)
    for i in range(8):
        state, metrics = step(state, _x(i))
        norms = jnp.linalg.norm(state.sae.decoder, axis=-1)
        np.testing.assert_allclose(norms, 1.0, atol=1e-5)
        assert np.isfinite(float(metrics["loss"]))


def test_the_train_step_traces_once(monkeypatch):
    traces = []
    original = losses.sae_loss

    def counting(*args, **kwargs):
        traces.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(losses, "sae_loss", counting)
    state, _, o = _setup("batchtopk")
    tx = training.make_optimizer(o, 20)
    step = training.make_train_step(state.sae.spec, o, tx)  # a new step, traced here
    for i in range(4):
        state, _ = step(state, _x(i))
    assert len(traces) == 1


@pytest.mark.parametrize("kind", ["topk", "batchtopk"])
def test_training_selection_spends_exactly_the_budget(kind):
    state, step, _ = _setup(kind)
    # A large encoder bias makes every pre-activation positive, so selected == nonzero.
    params = dict(state.sae.params, b_enc=state.sae.params["b_enc"] + 100.0)
    state = state._replace(sae=state.sae.replace(params=params))
    _, metrics = step(state, _x(1))
    np.testing.assert_allclose(metrics["l0"], K)  # BatchTopK: k * B over the batch


def test_dead_latents_are_counted_in_tokens():
    state, step, o = _setup("topk")
    expected = np.zeros(N, np.int64)
    for i in range(4):
        sae = state.sae
        z = sae.select(sae.pre_activations(sae.normalize(_x(i))), training=True)
        fired = np.asarray(jnp.any(z != 0, axis=0))
        expected = np.where(fired, 0, expected + B)
        state, metrics = step(state, _x(i))
        np.testing.assert_array_equal(state.tokens_since_fired, expected)
        dead = expected >= 2 * B
        np.testing.assert_allclose(metrics["dead_fraction"], dead.mean())
    assert dead.any()  # k = 2 of 24 latents on 16 tokens leaves some unfired
    # With dead latents, AuxK contributes to the loss.
    _, metrics = step(state, _x(9))
    assert float(metrics["aux"]) > 0


@pytest.mark.parametrize("kind", ["batchtopk", "feature_choice"])
def test_inference_threshold_is_a_running_average_of_the_smallest_kept_code(kind):
    state, step, o = _setup(kind)
    sae = state.sae
    z = sae.select(sae.pre_activations(sae.normalize(_x(0))), training=True)
    positive = jnp.where(z > 0, z, jnp.inf)
    smallest = jnp.min(positive, axis=0) if kind == "feature_choice" else jnp.min(positive)
    state, _ = step(state, _x(0))
    decay = min(o.threshold_decay, 1 / 10)  # the first step averages fast
    expected = jnp.broadcast_to((1 - decay) * smallest, (N,))
    expected = jnp.where(jnp.isfinite(expected), expected, 0.0)  # latents that kept nothing
    np.testing.assert_allclose(state.sae.threshold, expected, rtol=1e-5)


def test_learning_rate_and_sparsity_warm_up():
    state, step, o = _setup("relu_l1")
    assert o.sparsity_coeff == 5.0
    before = jax.tree.map(np.asarray, state.sae.params)  # the step donates its input state
    state, metrics = step(state, _x(0))
    # The learning rate starts at 0: the first step leaves the params where they were.
    for name in ("W_enc", "b_enc", "b_dec"):
        np.testing.assert_array_equal(state.sae.params[name], before[name])
    np.testing.assert_allclose(metrics["sparsity_coeff"], 5.0 / 5)
    for i in range(1, 6):
        state, metrics = step(state, _x(i))
        np.testing.assert_allclose(metrics["sparsity_coeff"], 5.0 * min(1.0, (i + 1) / 5))
    assert not np.array_equal(state.sae.params["W_enc"], before["W_enc"])


def test_reference_defaults_are_filled_in():
    spec = sae_lib.make_spec("topk", d_in=64, n_latents=2**16, k=32)
    o = training.resolve_options(training.TrainOptions(), spec, 1000)
    assert o.aux_k == 32 and o.aux_coeff == 1 / 32 and o.dead_after_tokens == 10_000_000
    np.testing.assert_allclose(o.learning_rate, 1e-4)  # 2e-4 / sqrt(2**16 / 2**14)
    assert o.sparsity_coeff == 0.0 and o.batch_size == 4096
    relu = sae_lib.make_spec("relu_l1", d_in=64, n_latents=256)
    o = training.resolve_options(training.TrainOptions(), relu, 1000)
    assert o.aux_coeff == 0.0 and o.sparsity_warmup_steps == 50 and o.sparsity_coeff == 5.0


def test_fit_takes_an_iterator_of_batches_and_warns_when_it_ends():
    batches = [_x(i) for i in range(3)]
    with pytest.warns(UserWarning, match="ran out of batches after 3"):
        sae = sae_lib.fit(jax.random.key(0), iter(batches), kind="topk", n_latents=N, k=K, steps=4)
    assert sae.encode(_x(0)).shape == (B, N)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sae_lib.fit(jax.random.key(0), batches + [_x(3)], kind="topk", n_latents=N, k=K, steps=4)


def test_fit_refuses_to_return_a_diverged_sae():
    with pytest.raises(FloatingPointError, match="training diverged"):
        sae_lib.fit(
            jax.random.key(0), _x(0), kind="topk", n_latents=N, k=K, steps=4, learning_rate=1e38
        )


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"k": N + 1}, r"^k must be at most n_latents=24, got k=25"),
        ({"kind": "gated"}, r"^kind must be one of \['abstopk', 'batchtopk', 'feature_choice'"),
        ({"x": jnp.ones(D)}, r"^x must be a non-empty \[tokens, d_in\] array, got shape \(8,\)"),
        ({"x": jnp.ones((2, 3, D))}, r"^x must be a non-empty \[tokens, d_in\] array"),
        # Batches and steps as in the iterator test above: its compiled step is reused.
        ({"x": [_x(0), jnp.ones((B, D + 1))], "steps": 4}, r"^x's batch 1 must"),
        ({"x": 3.0}, r"^x must be a \[tokens, d_in\] array or an iterable"),
        ({"x": _x(0).at[3, 2].set(jnp.nan)}, r"^x must be finite"),
        ({"steps": 0}, r"^steps must be a positive int"),
        ({"n_latents": 0}, r"^n_latents must be a positive int"),
        ({"key": 0}, r"^key must be a jax.random.key"),
        ({"lr": 0.1}, r"^unknown option\(s\) \['lr'\]; known options: \['adam_b1'"),
        ({"learning_rate": -1.0}, r"^learning_rate must be positive"),
        ({"batch_size": 0}, r"^batch_size must be positive"),
        ({"aux_k": 0}, r"^aux_k must be positive"),
        ({"b_dec_init": "median"}, r"^b_dec_init must be one of"),
        ({"kind": "batchtopk", "sparse_decode": True}, r"^sparse_decode applies"),
        ({"lr_warmup_steps": 8}, r"^lr_warmup_steps \+ lr_decay_steps must be at most steps=5"),
    ],
)
def test_fit_errors_name_the_argument(kwargs, pattern):
    args = {"key": jax.random.key(0), "x": _x(0), "kind": "topk", "n_latents": N, "k": K}
    args.update(steps=5)
    args.update(kwargs)
    key, x = args.pop("key"), args.pop("x")
    with pytest.raises(ValueError, match=pattern):
        sae_lib.fit(key, x, **args)
