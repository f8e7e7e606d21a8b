"""The unit-norm decoder transform: rows on the sphere after every step of any optimizer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparsejax.sae import decoder_norm
from tests.sparsejax.sae.conftest import D, N, normal


def _params(seed, n=N, d=D):
    return {
        "W_dec": normal(seed, (n, d), 3.0),  # far from unit norm to start with
        "W_enc": normal(seed + 1, (d, n)),
        "b_dec": jnp.zeros(d),
    }


# Momentum and Adam's moments keep pushing along directions the sphere forbids, and
# decoupled weight decay shrinks rows: each must still end on the sphere.
INNERS = {
    "momentum": optax.sgd(0.3, momentum=0.9),
    "adamw": optax.adamw(0.1, weight_decay=0.5),
}


@pytest.mark.parametrize("inner", sorted(INNERS))
def test_decoder_rows_are_unit_norm_after_every_step(inner):
    tx = decoder_norm.unit_norm_decoder(INNERS[inner])
    params = _params(0)
    state = tx.init(params)

    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for i in range(8):
        grads = jax.tree.map(lambda p, i=i: normal(10 + i, p.shape, 2.0), params)
        params, state = step(params, state, grads)
        np.testing.assert_allclose(jnp.linalg.norm(params["W_dec"], axis=-1), 1.0, atol=1e-5)


def test_parallel_gradient_component_is_removed_and_other_leaves_pass():
    params = _params(1)
    grads = jax.tree.map(lambda p: normal(2, p.shape), params)
    tx = decoder_norm.remove_parallel_gradient()
    out, _ = tx.update(grads, tx.init(params), params)
    rows = params["W_dec"] / jnp.linalg.norm(params["W_dec"], axis=-1, keepdims=True)
    np.testing.assert_allclose(jnp.sum(out["W_dec"] * rows, axis=-1), 0.0, atol=1e-5)
    # What remains is the tangent part: adding back the parallel part restores the gradient.
    parallel = jnp.sum(grads["W_dec"] * rows, axis=-1, keepdims=True) * rows
    np.testing.assert_allclose(out["W_dec"] + parallel, grads["W_dec"], atol=1e-5)
    for name in ("W_enc", "b_dec"):
        np.testing.assert_array_equal(out[name], grads[name])


def test_nested_params_and_a_custom_name():
    params = {"sae": {"dictionary": jnp.ones((4, 3)), "bias": jnp.ones(3)}}
    tx = decoder_norm.unit_norm_decoder(optax.sgd(1.0), name="dictionary")
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(jnp.linalg.norm(new["sae"]["dictionary"], axis=-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(new["sae"]["bias"], 0.0)


def test_errors_name_what_is_wrong():
    tx = decoder_norm.unit_norm_decoder(optax.sgd(1.0))
    params = {"W_enc": jnp.ones((3, 4))}
    with pytest.raises(ValueError, match="W_dec"):
        tx.update(params, tx.init(params), params)
    with pytest.raises(ValueError, match="needs params"):
        tx.update({"W_dec": jnp.ones((2, 2))}, tx.init(None))
    with pytest.raises(ValueError, match="^inner must"):
        decoder_norm.unit_norm_decoder("adam")
