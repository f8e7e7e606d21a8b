"""Losses: AuxK touches only dead latents, multi-budget objectives, the sparse decode."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import sae as sae_lib
from sparsejax.sae import losses
from tests.sparsejax.sae.conftest import SAMPLE, D, K, N
from tests.sparsejax.sae.conftest import normal as _normal


def _sae(kind, **spec):
    spec = sae_lib.make_spec(kind, d_in=D, n_latents=N, **spec)
    return sae_lib.init_sae(jax.random.key(0), spec, _normal(100, (SAMPLE, D)))


def _x(seed=1, tokens=10):
    return _normal(seed, (tokens, D))


def _x_n(sae, x):
    """``sae.normalize(x)`` in numpy: no compilation per SAE kind."""
    mean, scale = np.asarray(sae.input_mean), np.asarray(sae.input_scale)
    return jnp.asarray((np.asarray(x) - mean) * scale, jnp.float32)


# The library functions under jit: one compilation per SAE kind, not one per eager op.
_loss = jax.jit(losses.sae_loss, static_argnames=("k_aux", "aux_coeff", "sparse_decode"))
_aux_k = jax.jit(losses.aux_k_loss, static_argnames=("k_aux",))


@jax.jit
def _forward_parts(sae, x_n):
    pre = sae.pre_activations(x_n)
    out = losses.forward(sae, x_n)
    if sae.spec.objective == "matryoshka":
        per_prefix = [sae.decode_normalized(out.z * (jnp.arange(N) < m)) for m in sae.spec.prefixes]
        return out, losses.matryoshka_reconstructions(sae, out.z), per_prefix
    recons, z = losses.multi_k_reconstructions(sae, pre)
    per_k = [sae.decode_normalized(sae.select(pre, k=kj)) for kj in sae.spec.ks]
    return (z, sae.select(pre)), recons, per_k


@jax.jit
def _aux(params, sae, x_n, dead):
    residual = x_n - sae.decode_normalized(sae.select(sae.pre_activations(x_n), training=True))
    s = sae.replace(params=params)
    return losses.aux_k_loss(s, s.pre_activations(x_n), residual, dead, k_aux=4)


_aux_and_grad = jax.jit(jax.value_and_grad(_aux))


@pytest.mark.parametrize("n_dead", [1, 3, 9])
def test_aux_k_uses_only_dead_latents(n_dead):
    sae = _sae("topk", k=K)
    x_n = _x_n(sae, _x())
    dead = jnp.zeros(N, bool).at[jnp.arange(0, 2 * n_dead, 2)[:n_dead]].set(True)
    value, grads = _aux_and_grad(sae.params, sae, x_n, dead)
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
    np.testing.assert_allclose(_aux(moved, sae, x_n, dead), value, rtol=1e-6)


def test_aux_k_is_zero_without_dead_latents():
    sae = _sae("topk", k=K)
    x_n = _x_n(sae, _x())
    pre = np.asarray(x_n - sae.params["b_dec"]) @ np.asarray(sae.encoder)
    loss = _aux_k(sae, jnp.asarray(pre), x_n, jnp.zeros(N, bool), k_aux=8)
    assert float(loss) == 0.0


def test_aux_k_enters_the_training_loss_with_its_coefficient():
    sae = _sae("topk", k=K)
    x_n = _x_n(sae, _x())
    dead = jnp.arange(N) % 3 == 0
    base, (terms, _) = _loss(sae.params, sae, x_n, dead=dead, k_aux=4, aux_coeff=0.0)
    full, (terms_aux, _) = _loss(sae.params, sae, x_n, dead=dead, k_aux=4, aux_coeff=1 / 32)
    np.testing.assert_allclose(full, base + terms_aux["aux"] / 32, rtol=1e-6)
    assert float(terms["aux"]) == 0.0 and float(terms_aux["aux"]) > 0


def test_matryoshka_reconstructs_from_every_prefix():
    sae = _sae("matryoshka", k=K, prefixes=(2, 5, 11))
    assert sae.spec.prefixes == (2, 5, 11, N)
    x_n = _x_n(sae, _x())
    out, recons, per_prefix = _forward_parts(sae, x_n)
    for r, expected in zip(recons, per_prefix, strict=True):
        np.testing.assert_allclose(r, expected, rtol=1e-5, atol=1e-5)
    errors = [np.mean(np.sum((np.asarray(x_n) - np.asarray(r)) ** 2, -1)) for r in recons]
    np.testing.assert_allclose(out.recon, np.mean(errors), rtol=1e-5)
    np.testing.assert_allclose(out.x_hat, recons[-1])


@pytest.mark.parametrize("selection", ["topk", "abstopk"])
def test_multi_k_reconstructs_at_every_budget(selection):
    sae = _sae("multi_k", k=6, ks=(1, 3), selection=selection)
    assert sae.spec.ks == (1, 3, 6)
    (z, z_main), recons, per_k = _forward_parts(sae, _x_n(sae, _x()))
    for r, dense in zip(recons, per_k, strict=True):
        np.testing.assert_allclose(r, dense, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(z, z_main)


def test_l1_penalty_is_weighted_by_decoder_row_norms():
    z = jnp.array([[1.0, -2.0, 0.0], [0.0, 0.5, 3.0]])
    decoder = jnp.array([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]])  # norms 5, 1, 2
    np.testing.assert_allclose(losses.l1_penalty(z, decoder), ((5 + 2) + (0.5 + 6)) / 2)


def test_jumprelu_loss_counts_l0_and_trains_the_thresholds():
    sae = _sae("jumprelu", bandwidth=2.0)  # a window wide enough to hold pre-activations
    x_n = _x_n(sae, _x(tokens=32))
    loss, (terms, out) = _loss(sae.params, sae, x_n, sparsity_coeff=0.5)
    np.testing.assert_allclose(terms["sparsity"], np.mean(np.sum(np.asarray(out.z) != 0, -1)))
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


@pytest.mark.parametrize("selection", ["topk", "abstopk"])
def test_sparse_decode_gives_the_dense_loss_and_gradients(selection):
    sae = _sae(selection, k=K)
    x_n = _x_n(sae, _x(tokens=12))
    dead = jnp.arange(N) % 4 == 0  # AuxK included

    @jax.jit
    def both(params):
        return [
            jax.value_and_grad(
                lambda p, sparse=sparse: losses.sae_loss(
                    p, sae, x_n, dead=dead, k_aux=5, aux_coeff=1 / 32, sparse_decode=sparse
                )[0]
            )(params)
            for sparse in (False, True)
        ]

    dense, sparse = both(sae.params)
    for a, b in zip(jax.tree.leaves(dense), jax.tree.leaves(sparse), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="^sparse_decode applies"):
        losses.forward(_sae("batchtopk", k=K), x_n, sparse_decode=True)
