"""Sizes, draws and synthetic data shared by the SAE tests, so compilations are shared too."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.sae import synthetic

# One SAE size for the unit tests (d_in, n_latents, k) and one sample size for its
# initialisation, so each compiled function is built once for the whole directory.
D, N, K, SAMPLE = 8, 24, 2, 64


def normal(seed: int, shape, scale: float = 1.0, shift: float = 0.0) -> jax.Array:
    """float32 normal draws from numpy (eager jax.random would compile per new shape)."""
    rng = np.random.default_rng(seed)
    return jnp.asarray(scale * rng.standard_normal(shape) + shift, jnp.float32)


# 16 features active at most among 24, in 16 dimensions; enough tokens for firing rates
# within a few thousandths.
SYNTHETIC = {"n_tokens": 16384, "d": 16, "n_features": 24}


@pytest.fixture(scope="session")
def synthetic_data():
    """`synthetic.SyntheticData` with Zipf rates summing to 3 active features a token."""
    return synthetic.generate(jax.random.key(0), mean_active=3.0, **SYNTHETIC)


@pytest.fixture(scope="session")
def synthetic_draw():
    """``draw(**kwargs)``: generator draws of the shared sizes, cached per keyword set."""
    cache = {}

    def draw(**kwargs):
        key = tuple(sorted(kwargs.items()))
        if key not in cache:
            cache[key] = synthetic.generate(jax.random.key(0), **SYNTHETIC, **kwargs)
        return cache[key]

    return draw
