"""Tensor dropout (Kolbeinsson et al. 2021): multipliers, unbiasedness, the layers' use of it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tensornets import CP, FactorizedDense, Tucker
from tensornets import regularizers as reg

KEY = jax.random.key(0, impl="rbg")
X = jax.random.normal(KEY, (6, 12))


def _params(fmt, rank):
    return FactorizedDense(10, fmt, rank).init(KEY, X)["params"]


@pytest.mark.parametrize("fmt,rank", [("cp", 6), ("tucker", (4, 4))])
def test_multipliers_are_zero_or_rescaled(fmt, rank):
    params = _params(fmt, rank)
    mult = reg.tensor_dropout_multipliers(params, 0.25, KEY)
    for v in mult.values():
        assert set(np.unique(np.asarray(v)).tolist()) <= {0.0, float(np.float32(1.0 / 0.75))}


def test_cp_dropout_drops_whole_rank_one_terms():
    params = _params("cp", 6)
    key = jax.random.key(3, impl="rbg")
    dropped = reg.tensor_dropout(params, 0.5, key)
    mult = reg.tensor_dropout_multipliers(params, 0.5, key)["rank"]
    factors = {k: v for k, v in params.items() if k != "bias"}
    expected = CP.from_params({**factors, "weights": factors["weights"] * mult}).to_dense()
    got = CP.from_params({k: v for k, v in dropped.items() if k != "bias"}).to_dense()
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(dropped["factor_0"], params["factor_0"])


def test_tucker_dropout_equals_masked_factors():
    """G x_n (U_n M_n) == (G x_n M_n) x_n U_n: the multipliers act on the core's fibres."""
    params = _params("tucker", (4, 4))
    key = jax.random.key(5, impl="rbg")
    mult = reg.tensor_dropout_multipliers(params, 0.4, key)
    dropped = reg.tensor_dropout(params, 0.4, key)
    expected = Tucker.from_params(
        {
            "core": params["core"],
            "factor_0": params["factor_0"] * mult["rank_0"],
            "factor_1": params["factor_1"] * mult["rank_1"],
        }
    ).to_dense()
    got = Tucker.from_params({k: v for k, v in dropped.items() if k != "bias"}).to_dense()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fmt,rank", [("cp", 6), ("tucker", (4, 4))])
def test_dropout_is_unbiased(fmt, rank):
    """E[dropped weight] == the weight: the Monte-Carlo mean over 4000 draws, 5 sigma."""
    params = _params(fmt, rank)
    cls = CP if fmt == "cp" else Tucker
    dense = lambda p: cls.from_params({k: v for k, v in p.items() if k != "bias"}).to_dense()  # noqa: E731
    keys = jax.random.split(jax.random.key(7), 4000)
    draws = jax.jit(jax.vmap(lambda k: dense(reg.tensor_dropout(params, 0.3, k))))(keys)
    mean, std = draws.mean(0), draws.std(0)
    bound = 5 * std / np.sqrt(len(keys)) + 1e-6
    assert np.all(np.abs(mean - dense(params)) <= bound)


def test_layer_applies_dropout_only_with_a_dropout_rng():
    layer = FactorizedDense(10, "cp", 6, rank_dropout=0.5)
    plain_layer = FactorizedDense(10, "cp", 6)
    params = layer.init(KEY, X)["params"]
    plain = plain_layer.apply({"params": params}, X)
    np.testing.assert_array_equal(layer.apply({"params": params}, X), plain)
    out = layer.apply({"params": params}, X, rngs={"dropout": jax.random.key(1, impl="rbg")})
    # The output is linear in the CP weights: recover the per-component multipliers and
    # check each is 0 (dropped) or 1 / (1 - 0.5) = 2 (kept and rescaled).
    terms = jnp.stack(
        [
            plain_layer.apply(
                {"params": {**params, "weights": params["weights"] * jax.nn.one_hot(r, 6)}}, X
            )
            - params["bias"]
            for r in range(6)
        ]
    ).reshape(6, -1)
    coef, *_ = np.linalg.lstsq(np.asarray(terms).T, np.asarray(out - params["bias"]).ravel())
    near = np.minimum(np.abs(coef), np.abs(coef - 2.0))
    assert np.all(near < 1e-3), coef
    assert not np.allclose(coef, 1.0)


def test_bad_inputs_raise():
    params = _params("cp", 6)
    with pytest.raises(ValueError, match="rate"):
        reg.tensor_dropout(params, 1.0, KEY)
    with pytest.raises(ValueError, match="rate"):
        reg.tensor_dropout(params, -0.1, KEY)
    tt = FactorizedDense(10, "tt", 3, in_shape=(4, 3), out_shape=(2, 5)).init(KEY, X)["params"]
    with pytest.raises(ValueError, match="tensor dropout"):
        reg.tensor_dropout(tt, 0.2, KEY)
    layer = FactorizedDense(10, "tt", 3, in_shape=(4, 3), out_shape=(2, 5), rank_dropout=0.2)
    with pytest.raises(ValueError, match="rank_dropout"):
        layer.init(KEY, X)
