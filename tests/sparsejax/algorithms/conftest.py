"""A tiny two-layer network shared by the algorithm tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import pytest

from sparsejax import transforms


def apply(params, x):
    h = jax.nn.relu(x @ params["l1"]["kernel"] + params["l1"]["bias"])
    return h @ params["l2"]["kernel"]


def init(key, d_in=12, hidden=16, d_out=4):
    k1, k2 = jax.random.split(key)
    return {
        "l1": {
            "kernel": jax.random.normal(k1, (d_in, hidden)) / jnp.sqrt(d_in),
            "bias": jnp.zeros(hidden),
        },
        "l2": {"kernel": jax.random.normal(k2, (hidden, d_out)) / jnp.sqrt(hidden)},
    }


def xent(logits, y):
    """Mean cross-entropy of integer labels ``y`` under ``logits``."""
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


def loss(params, x, y):
    return xent(apply(params, x), y)


def scan_step(algo, tx, x, y):
    """One masked training step for `jax.lax.scan` over ``(params, opt_state)``.

    Each step records the weights the model computed with and the stored masks.
    """

    def step(carry, _):
        p, state = carry
        m = transforms.get_masks(state)
        g = jax.grad(lambda q: loss(algo.forward_params(q, m), x, y))(p)
        u, state = tx.update(g, state, p)
        p = optax.apply_updates(p, u)
        return (p, state), (algo.forward_params(p, transforms.get_masks(state)), state.masks)

    return step


@pytest.fixture
def problem():
    key = jax.random.key(0)
    kp, kx, ky = jax.random.split(key, 3)
    params = init(kp)
    x = jax.random.normal(kx, (32, 12))
    y = jax.random.randint(ky, (32,), 0, 4)
    return params, x, y
