"""Losses: AuxK touches only dead latents, multi-budget objectives, the sparse decode."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import sae as sae_lib
from sparsejax.sae import losses

D, N = 6, 16


def _normal(seed, shape):
    # numpy draws: eager jax.random would compile a kernel for every new shape.
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _sae(kind, **spec):
    spec = sae_lib.make_spec(kind, d_in=D, n_latents=N, **spec)
    return sae_lib.init_sae(jax.random.key(0), spec, _normal(100, (64, D)))


def _x(seed=1, tokens=10):
    return _normal(seed, (tokens, D))


@pytest.mark.parametrize("n_dead", [1, 3, 9])
def test_aux_k_uses_only_dead_latents(n_dead):
    sae = _sae("topk", k=3)
    x_n = sae.normalize(_x())
    dead = jnp.zeros(N, bool).at[jnp.arange(0, 2 * n_dead, 2)[:n_dead]].set(True)
    pre = sae.pre_activations(x_n)
    residual = x_n - sae.decode_normalized(sae.select(pre, training=True))

    def aux(params):
        s = sae.replace(params=params)
        return losses.aux_k_loss(s, s.pre_activations(x_n), residual, dead, k_aux=4)

    value, grads = jax.jit(jax.value_and_grad(aux))(sae.params)
    assert float(value) > 0
    alive = ~np.asarray(dead)
    # No live latent's encoder column, bias or decoder row gets any gradient ...
    np.testing.assert_array_equal(np.asarray(grads["W_dec"])[alive], 0.0)
    np.testing.assert_array_equal(np.asarray(grads["W_enc"])[:, alive], 0.0)
    np.testing.assert_array_equal(np.asarray(grads["b_enc"])[alive], 0.0)
    # ... and some dead latent does (k_aux = 4 picks up to 4 of them per token).
    assert np.abs(np.asarray(grads["W_dec"])[~alive]).sum() > 0
    # Changing a live latent's decoder row leaves the loss unchanged.
    moved = dict(sae.params, W_dec=sae.params["W_dec"].at[alive].multiply(-3.0))
    np.testing.assert_allclose(jax.jit(aux)(moved), value, rtol=1e-6)


def test_aux_k_is_zero_without_dead_latents():
    sae = _sae("topk", k=3)
    x_n = sae.normalize(_x())
    pre = sae.pre_activations(x_n)
    loss = losses.aux_k_loss(sae, pre, x_n, jnp.zeros(N, bool), 8)
    assert float(loss) == 0.0


def test_aux_k_enters_the_training_loss_with_its_coefficient():
    sae = _sae("topk", k=3)
    x_n = sae.normalize(_x())
    dead = jnp.arange(N) % 3 == 0
    base, (terms, _) = losses.sae_loss(sae.params, sae, x_n)
    full, (terms_aux, _) = losses.sae_loss(
        sae.params, sae, x_n, dead=dead, k_aux=4, aux_coeff=1 / 32
    )
    np.testing.assert_allclose(full, base + terms_aux["aux"] / 32, rtol=1e-6)
    assert float(terms["aux"]) == 0.0 and float(terms_aux["aux"]) > 0


def test_matryoshka_reconstructs_from_every_prefix():
    sae = _sae("matryoshka", k=3, prefixes=(2, 5, 11))
    assert sae.spec.prefixes == (2, 5, 11, N)
    x_n = sae.normalize(_x())
    z = jnp.abs(_normal(5, (10, N)))
    recons = losses.matryoshka_reconstructions(sae, z)
    for m, r in zip(sae.spec.prefixes, recons, strict=True):
        masked = z * (jnp.arange(N) < m)
        np.testing.assert_allclose(r, sae.decode_normalized(masked), rtol=1e-5, atol=1e-5)
    out = losses.forward(sae, x_n)
    expected = np.mean(
        [losses.reconstruction_error(x_n, r) for r in losses.matryoshka_reconstructions(sae, out.z)]
    )
    np.testing.assert_allclose(out.recon, expected, rtol=1e-5)


@pytest.mark.parametrize("selection", ["topk", "abstopk"])
def test_multi_k_reconstructs_at_every_budget(selection):
    sae = _sae("multi_k", k=6, ks=(1, 3), selection=selection)
    assert sae.spec.ks == (1, 3, 6)
    x_n = sae.normalize(_x())
    pre = sae.pre_activations(x_n)
    recons, z = losses.multi_k_reconstructions(sae, pre)
    for kj, r in zip(sae.spec.ks, recons, strict=True):
        dense = sae.decode_normalized(sae.select(pre, k=kj))
        np.testing.assert_allclose(r, dense, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(z, sae.select(pre))


def test_l1_penalty_is_weighted_by_decoder_row_norms():
    z = jnp.array([[1.0, -2.0, 0.0], [0.0, 0.5, 3.0]])
    decoder = jnp.array([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]])  # norms 5, 1, 2
    np.testing.assert_allclose(losses.l1_penalty(z, decoder), ((5 + 2) + (0.5 + 6)) / 2)


def test_jumprelu_loss_counts_l0_and_trains_the_thresholds():
    sae = _sae("jumprelu", bandwidth=2.0)  # a window wide enough to hold pre-activations
    x_n = sae.normalize(_x(tokens=32))
    loss, (terms, out) = losses.sae_loss(sae.params, sae, x_n, sparsity_coeff=0.5)
    np.testing.assert_allclose(terms["sparsity"], jnp.mean(jnp.sum(out.z != 0, axis=-1)))
    grads = jax.jit(jax.grad(lambda p: losses.sae_loss(p, sae, x_n, sparsity_coeff=0.5)[0]))(
        sae.params
    )
    assert float(jnp.abs(grads["log_threshold"]).sum()) > 0


@pytest.mark.parametrize("shape", [(5, 3), (2, 4, 7), (1, 1)])
def test_sparse_decode_matches_the_dense_reference_values_and_gradients(shape):
    *lead, k = shape
    n, d = 20, 9
    rng = np.random.default_rng(sum(shape))
    values = _normal(1, shape)
    indices = np.stack([rng.choice(n, k, replace=False) for _ in range(int(np.prod(lead)))])
    indices = jnp.asarray(indices.reshape(shape), jnp.int32)
    decoder = _normal(2, (n, d))
    g_out = _normal(3, (*lead, d))

    @jax.jit
    def both(values, decoder):
        out = {}
        for name, fn in (
            ("sparse", sae_lib.sparse_decode),
            ("dense", sae_lib.sparse_decode_reference),
        ):
            out[name] = jax.value_and_grad(
                lambda v, w, fn=fn: jnp.sum(fn(v, indices, w) * g_out), argnums=(0, 1)
            )(values, decoder)
        return out

    out = both(values, decoder)
    np.testing.assert_allclose(
        sae_lib.sparse_decode(values, indices, decoder),
        sae_lib.sparse_decode_reference(values, indices, decoder),
        rtol=1e-5,
        atol=1e-5,
    )
    for a, b in zip(jax.tree.leaves(out["sparse"]), jax.tree.leaves(out["dense"]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
