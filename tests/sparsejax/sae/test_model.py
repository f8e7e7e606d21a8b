"""The SAE pytree: specs and their errors, encode/decode, jit == eager, normalisation."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import sae as sae_lib
from tests.sparsejax.sae.conftest import SAMPLE, D, K, N
from tests.sparsejax.sae.conftest import normal as _normal

KIND_ARGS = {
    "relu_l1": {},
    "jumprelu": {},
    "topk": {"k": K},
    "batchtopk": {"k": K},
    "abstopk": {"k": K},
    "feature_choice": {"k": K},
    "mutual_choice": {"k": K},
    "matryoshka": {"k": K},
    "multi_k": {"k": K},
}


@functools.cache
def _sae(kind):
    spec = sae_lib.make_spec(kind, d_in=D, n_latents=N, **KIND_ARGS[kind])
    sae = sae_lib.init_sae(jax.random.key(0), spec, _normal(1, (SAMPLE, D), 3.0, 1.0))
    # Thresholds as training would leave them, so inference selects something nontrivial.
    return sae.replace(threshold=jnp.linspace(0.0, 0.5, N))


def test_every_kind_is_listed_and_builds():
    assert sorted(KIND_ARGS) == sorted(sae_lib.KINDS)


@pytest.mark.parametrize("kind", sorted(KIND_ARGS))
def test_encode_is_the_same_under_jit_and_decode_inverts_the_shapes(kind):
    sae = _sae(kind)
    x = _normal(2, (7, D), 3.0, 1.0)
    z = sae.encode(x)
    assert z.shape == (7, N)
    z_jit = jax.jit(lambda s, x: s.encode(x))(sae, x)
    np.testing.assert_array_equal(np.asarray(z_jit) != 0, np.asarray(z) != 0)
    np.testing.assert_allclose(z_jit, z, rtol=1e-6, atol=1e-6)
    assert sae.decode(z).shape == (7, D)
    assert sae.decoder.shape == (N, D)
    np.testing.assert_allclose(jnp.linalg.norm(sae.decoder, axis=-1), 1.0, atol=1e-6)
    # A leading batch shape goes through the per-token and threshold rules alike.
    np.testing.assert_allclose(
        sae.encode(x[:6].reshape(2, 3, D)).reshape(6, N), z[:6], rtol=1e-6, atol=1e-6
    )


def test_inference_of_batch_rules_uses_the_thresholds():
    sae = _sae("batchtopk")
    x = _normal(3, (9, D), 3.0, 1.0)
    pre = sae.pre_activations(sae.normalize(x))
    z = sae.encode(x)
    np.testing.assert_array_equal(np.asarray(z) != 0, np.asarray(pre > sae.threshold) & (pre > 0))
    # In training the same SAE picks exactly k * tokens over the batch instead.
    shifted = jnp.abs(pre) + 0.1
    assert int(jnp.sum(sae.select(shifted, training=True) != 0)) == K * 9


def test_encode_k_overrides_the_budget_of_per_token_rules():
    x = _normal(4, (6, D), 3.0, 1.0) + 10.0 * _sae("topk").decoder[0]  # all positive on latent 0
    for kind in ("topk", "multi_k", "abstopk"):
        sae = _sae(kind)
        assert np.all(np.asarray(jnp.sum(sae.encode(x, k=1) != 0, axis=-1)) <= 1)
    with pytest.raises(ValueError, match="k can override only"):
        _sae("batchtopk").encode(x, k=2)


def test_initialisation_follows_the_references():
    sae = _sae("topk")
    np.testing.assert_array_equal(sae.params["W_enc"], sae.params["W_dec"].T)
    np.testing.assert_array_equal(sae.params["b_enc"], 0.0)
    sample = _normal(1, (SAMPLE, D), 3.0, 1.0)
    normalized = sae.normalize(sample)
    np.testing.assert_allclose(jnp.mean(jnp.sum(normalized**2, -1)), D, rtol=1e-5)
    np.testing.assert_allclose(
        sae.params["b_dec"], sae_lib.geometric_median(normalized), rtol=1e-5, atol=1e-6
    )
    spec = _sae("topk").spec
    centred = sae_lib.init_sae(
        jax.random.key(0), spec, sample, center_input=True, b_dec_init="mean"
    )
    normalized = centred.normalize(sample)
    np.testing.assert_allclose(jnp.mean(normalized, 0), 0.0, atol=1e-5)
    np.testing.assert_allclose(jnp.mean(jnp.sum(normalized**2, -1)), D, rtol=1e-5)
    np.testing.assert_allclose(centred.params["b_dec"], 0.0, atol=1e-5)
    assert "log_threshold" in _sae("jumprelu").params
    np.testing.assert_allclose(_sae("jumprelu").jump_threshold(), 0.001, rtol=1e-5)


def test_decode_undoes_the_normalisation():
    sae = _sae("relu_l1")
    z = jnp.zeros((2, N))
    expected = sae.params["b_dec"] / sae.input_scale + sae.input_mean
    np.testing.assert_allclose(sae.decode(z), jnp.broadcast_to(expected, (2, D)), rtol=1e-6)


def test_kind_spellings():
    for spelling, kind in [
        ("relu", "relu_l1"),
        ("TopK", "topk"),
        ("batch_topk", "batchtopk"),
        ("Batch-TopK", "batchtopk"),
        ("multik", "multi_k"),
        ("mutual-choice", "mutual_choice"),
    ]:
        assert sae_lib.make_spec(spelling, d_in=2, n_latents=4, k=1).kind == kind


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"kind": "topk", "k": N + 1}, rf"^k must be at most n_latents={N}, got k={N + 1}"),
        ({"kind": "topk"}, r"^k is required"),
        ({"kind": "topk", "k": 0}, r"^k must be a positive int"),
        ({"kind": "gated", "k": 2}, r"^kind must be one of \['abstopk', 'batchtopk', .*'topk'\]"),
        ({"kind": "topk", "k": 2, "n_latents": 0}, r"^n_latents must"),
        ({"kind": "topk", "k": 2, "d_in": -1}, r"^d_in must"),
        ({"kind": "topk", "k": 2, "selection": "gated"}, r"^selection must be one of"),
        ({"kind": "matryoshka", "k": 2, "prefixes": (4, 3)}, r"^prefixes must increase"),
        ({"kind": "topk", "k": 2, "prefixes": (4,)}, r"^prefixes apply only"),
        ({"kind": "multi_k", "k": 4, "ks": (2, 8)}, r"^ks must increase"),
        ({"kind": "multi_k", "k": 4, "selection": "batchtopk"}, r"^selection must be one of"),
        ({"kind": "jumprelu", "bandwidth": 0.0}, r"^bandwidth must"),
        ({"kind": "topk", "k": 2, "tokens_per_latent": 3}, r"^tokens_per_latent applies"),
    ],
)
def test_spec_errors_name_the_argument(kwargs, pattern):
    kwargs = {"d_in": D, "n_latents": N, **kwargs}
    with pytest.raises(ValueError, match=pattern):
        sae_lib.make_spec(**kwargs)


def test_wrong_shapes_name_the_argument():
    sae = _sae("topk")
    with pytest.raises(ValueError, match=rf"^x must be \[\.\.\., d_in={D}\]"):
        sae.encode(jnp.ones((3, D + 1)))
    with pytest.raises(ValueError, match=rf"^z must be \[\.\.\., n_latents={N}\]"):
        sae.decode(jnp.ones((3, D)))
    with pytest.raises(ValueError, match="^sample must"):
        sae_lib.init_sae(jax.random.key(0), sae.spec, jnp.ones((4, D + 1)))
    with pytest.raises(ValueError, match="^b_dec_init must"):
        sae_lib.init_sae(jax.random.key(0), sae.spec, b_dec_init="median")
