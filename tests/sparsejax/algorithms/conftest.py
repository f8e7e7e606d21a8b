"""A tiny two-layer network shared by the algorithm tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest


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


def loss(params, x, y):
    logits = apply(params, x)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


@pytest.fixture
def problem():
    key = jax.random.key(0)
    kp, kx, ky = jax.random.split(key, 3)
    params = init(kp)
    x = jax.random.normal(kx, (32, 12))
    y = jax.random.randint(ky, (32,), 0, 4)
    return params, x, y
