"""Properties of `tensornets.layers`: same outputs as the dense layer they factorize,
conv settings kept exactly, variance-preserving init, errors, and no global side effects."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tensornets import (
    Factorized,
    FactorizedConv,
    FactorizedDense,
    FactorizedEmbedding,
    balanced_factors,
    densify_params,
)

# RngBitGenerator keys: XLA on CPU compiles threefry hashing slowly (seconds per jit), and
# these tests compile many small inits. Keys are explicit, so nothing global changes.
KEY = jax.random.key(0, impl="rbg")
DENSE_CASES = [
    ("cp", 5, (4, 6), (2, 5)),
    ("tucker", 3, (4, 6), (2, 5)),
    ("tt", 3, (4, 6), (2, 5)),
    ("tt_matrix", 3, (2, 3, 4), (1, 2, 5)),
    ("cp", 4, None, None),
    ("tt_matrix", (2, 2), None, None),
]


def dense_reference(params_f, spec, module, x):
    """The wrapped dense module applied with the kernel rebuilt from the factors."""
    dense = densify_params({"layer": params_f}, {"layer": spec})["layer"]
    return jax.jit(module.apply)({"params": dense}, x)


def init_apply(layer, x):
    """Params and output, jitted (one compile instead of many eager op compiles)."""
    params = jax.jit(layer.init)(KEY, x)["params"]
    return params, jax.jit(layer.apply)({"params": params}, x)


@pytest.mark.parametrize(
    "fmt, rank, in_shape, out_shape, contraction",
    [(*case, "factorized") for case in DENSE_CASES]
    + [(*DENSE_CASES[0], "dense"), (*DENSE_CASES[3], "dense"), (*DENSE_CASES[1], "auto")],
)
def test_dense_equals_nn_dense_with_reconstructed_kernel(
    fmt, rank, in_shape, out_shape, contraction
):
    x = jax.random.normal(KEY, (3, 2, 24))
    module = nn.Dense(10)
    layer = Factorized(
        module,
        format=fmt,
        rank=rank,
        in_shape=in_shape,
        out_shape=out_shape,
        contraction=contraction,
    )
    params, y = init_apply(layer, x)
    assert y.shape == jax.eval_shape(module.init_with_output, KEY, x)[0].shape
    spec = {"format": fmt, "in_shape": in_shape}
    np.testing.assert_allclose(y, dense_reference(params, spec, module, x), atol=1e-4, rtol=1e-4)


CONV_SETTINGS = [
    dict(strides=(2, 3), padding="SAME"),
    dict(padding=((1, 2), (0, 1)), kernel_dilation=(2, 1)),
    dict(padding="CIRCULAR", feature_group_count=2),
    dict(padding=((0, 1), (2, 0)), input_dilation=(2, 1), strides=(1, 2)),
    dict(padding="REFLECT", strides=2, feature_group_count=3, use_bias=False),
    dict(padding="VALID", kernel_dilation=(1, 2), strides=(3, 1)),
]


@settings(max_examples=6, deadline=None, derandomize=True)
@given(
    conv=st.sampled_from(CONV_SETTINGS),
    fmt=st.sampled_from(["cp", "tucker", "tt"]),
    rank=st.integers(1, 4),
)
def test_conv_equals_nn_conv_with_reconstructed_kernel(conv, fmt, rank):
    x = jax.random.normal(KEY, (2, 9, 11, 6))
    module = nn.Conv(6, (3, 2), **conv)
    if fmt == "tucker":  # an int Tucker rank above every channel mode is an error
        rank = min(rank, 6 // conv.get("feature_group_count", 1))
    layer = Factorized(module, format=fmt, rank=rank)
    params, y = init_apply(layer, x)
    spec = {"format": fmt, "kind": "conv", "kernel_size": (3, 2)}
    expected = dense_reference(params, spec, module, x)
    assert y.shape == expected.shape == jax.eval_shape(module.init_with_output, KEY, x)[0].shape
    np.testing.assert_allclose(y, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fmt, dims", [("cp", 1), ("tucker", 3), ("tt", 3), ("cp", 3)])
def test_conv_1d_causal_and_3d(fmt, dims):
    if dims == 1:
        x, ks = jax.random.normal(KEY, (2, 10, 4)), (3,)
        module = nn.Conv(5, ks, padding="CAUSAL", kernel_dilation=2)
    else:
        x, ks = jax.random.normal(KEY, (1, 5, 6, 4, 2)), (2, 3, 2)
        module = nn.Conv(4, ks, strides=(1, 2, 2), padding="SAME")
    layer = Factorized(module, format=fmt, rank=2)
    params, y = init_apply(layer, x)
    spec = {"format": fmt, "kind": "conv", "kernel_size": ks}
    np.testing.assert_allclose(y, dense_reference(params, spec, module, x), atol=1e-4, rtol=1e-4)


def test_conv_unbatched_and_multi_batch_inputs():
    module = nn.Conv(4, (3, 3), strides=2)
    layer = FactorizedConv(4, (3, 3), "tucker", 2, strides=2)
    x = jax.random.normal(KEY, (2, 3, 8, 8, 3))
    params, y = init_apply(layer, x)
    assert y.shape == jax.eval_shape(module.init_with_output, KEY, x)[0].shape
    assert jax.eval_shape(layer.apply, {"params": params}, x[0, 0]).shape == (4, 4, 4)


def test_embedding_lookup_and_attend():
    module = nn.Embed(24, 30)
    layer = Factorized(module, format="tt_matrix", rank=3, in_shape=(2, 3, 4), out_shape=(5, 3, 2))
    ids = jnp.array([[0, 5, 23], [7, 7, 1]])
    params = jax.jit(layer.init)(KEY, ids)["params"]
    table = densify_params({"e": params}, {"e": {"format": "tt_matrix", "kind": "embed"}})
    dense = {"params": table["e"]}
    np.testing.assert_allclose(
        layer.apply({"params": params}, ids), module.apply(dense, ids), atol=1e-5
    )
    q = jax.random.normal(KEY, (4, 30))
    np.testing.assert_allclose(
        layer.apply({"params": params}, q, method="attend"),
        module.apply(dense, q, method="attend"),
        atol=1e-4,
        rtol=1e-4,
    )
    with pytest.raises(ValueError, match="integers"):
        FactorizedEmbedding(24, 30, 3, (2, 3, 4), (5, 3, 2)).apply({"params": params}, q)


def _output_second_moment(layer, x, n_inits):
    """Per init, mean_j y_j^2; returned over ``n_inits`` independent inits."""
    keys = jax.random.split(jax.random.key(1, impl="rbg"), n_inits)
    ys = jax.jit(jax.vmap(lambda k: layer.apply(layer.init(k, x), x)))(keys)
    return np.asarray(jnp.mean(ys.reshape(n_inits, -1) ** 2, axis=1))


VARIANCE_CASES = [
    ("cp", 8, (4, 4, 4), (4, 4, 3)),
    ("tucker", 3, (4, 4, 4), (4, 4, 3)),
    ("tt", 4, (4, 4, 4), (4, 4, 3)),
    ("tt_matrix", 4, (4, 4, 4), (4, 4, 3)),
    ("tt_matrix", 16, (4, 4, 4), (4, 4, 3)),
]


@pytest.mark.parametrize("fmt, rank, in_shape, out_shape", VARIANCE_CASES)
def test_init_preserves_dense_output_variance(fmt, rank, in_shape, out_shape):
    # E[y_j^2] = ||x||^2 E[W_ij^2] = ||x||^2 / fan_in for lecun_normal; the estimate over
    # 2000 independent inits must contain 1 within 4 standard errors and be within 15%
    # (products of many Gaussian factors are heavy-tailed, hence the many inits).
    x = jax.random.normal(KEY, (4, 64))
    target = float(jnp.mean(jnp.sum(x**2, -1))) / 64
    layer = FactorizedDense(48, fmt, rank, in_shape=in_shape, out_shape=out_shape, use_bias=False)
    ratios = _output_second_moment(layer, x, 2000) / target
    mean, se = ratios.mean(), ratios.std(ddof=1) / math.sqrt(len(ratios))
    assert abs(mean - 1) < max(4 * se, 0.02) and abs(mean - 1) < 0.15, (mean, se)
    # calibration: the dense layer measured the same way
    dense = nn.Dense(48, use_bias=False)
    dense_ratio = _output_second_moment(dense, x, 100).mean() / target
    assert abs(dense_ratio - 1) < 0.15


def test_conv_and_embedding_init_preserve_variance():
    x = jax.random.normal(KEY, (2, 6, 6, 8))
    target = 1.0  # unit-variance inputs, E[K^2] = 1 / fan_in, fan_in terms per output
    for fmt, rank in (("cp", 6), ("tucker", 4), ("tt", 4)):
        layer = FactorizedConv(8, (3, 3), fmt, rank, padding="VALID", use_bias=False)
        ratios = _output_second_moment(layer, x, 150) / target
        mean, se = ratios.mean(), ratios.std(ddof=1) / math.sqrt(len(ratios))
        assert abs(mean - 1) < max(4 * se, 0.05) and abs(mean - 1) < 0.2, (fmt, mean, se)
    emb = FactorizedEmbedding(64, 48, 4, in_shape=(4, 4, 4), out_shape=(4, 4, 3))
    keys = jax.random.split(jax.random.key(2, impl="rbg"), 200)
    ids = jnp.arange(64)
    rows = jax.jit(jax.vmap(lambda k: emb.apply(emb.init(k, ids), ids)))(keys)
    assert abs(float(jnp.mean(rows**2)) * 48 - 1) < 0.15


def test_custom_kernel_init_variance_is_matched():
    x = jax.random.normal(KEY, (4, 64))
    module = nn.Dense(48, use_bias=False, kernel_init=nn.initializers.normal(0.5))
    layer = Factorized(module, format="tt_matrix", rank=4, in_shape=(4, 4, 4), out_shape=(4, 4, 3))
    target = float(jnp.mean(jnp.sum(x**2, -1))) * 0.25
    ratios = _output_second_moment(layer, x, 200) / target
    assert abs(ratios.mean() - 1) < 0.15


def test_float_rank_is_a_fraction_of_dense_params():
    x = jnp.ones((1, 256))
    for fmt in ("cp", "tucker", "tt", "tt_matrix"):
        shapes = dict(in_shape=(4, 8, 8), out_shape=(4, 8, 8))
        layer = FactorizedDense(256, fmt, 0.05, use_bias=False, **shapes)
        n = sum(p.size for p in jax.tree.leaves(jax.eval_shape(layer.init, KEY, x)))
        assert n <= 0.05 * 256 * 256, (fmt, n)


def test_jit_traces_once_and_matches_eager():
    layer = FactorizedDense(64, "tt_matrix", 4)
    x = jax.random.normal(KEY, (8, 64))
    params = layer.init(KEY, x)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, x):
        return jax.grad(lambda p: jnp.sum(layer.apply(p, x) ** 2))(params)

    g1 = step(params, x)
    step(params, x + 1)
    chex.assert_trees_all_close(
        g1, jax.grad(lambda p: jnp.sum(layer.apply(p, x) ** 2))(params), atol=1e-4, rtol=1e-4
    )


def test_balanced_factors():
    assert balanced_factors(1024, 3) == (8, 8, 16)
    assert balanced_factors(30, 2) == (5, 6)
    assert balanced_factors(7, 3) == (1, 1, 7)


@pytest.mark.parametrize(
    "make, x, match",
    [
        (
            lambda: FactorizedDense(10, "tt_matrix", 2, in_shape=(2, 3, 5)),
            (2, 24),
            r"in_shape=\(2, 3, 5\) multiplies to 30",
        ),
        (
            lambda: FactorizedDense(10, "cp", 2, out_shape=(3, 3)),
            (2, 24),
            r"out_shape=\(3, 3\) multiplies to 9",
        ),
        (lambda: FactorizedDense(10, "svd", 2), (2, 24), "format must be one of"),
        (lambda: FactorizedDense(10, "cp", 0), (2, 24), "rank must be positive"),
        (lambda: FactorizedDense(10, "tucker", (11, 2)), (2, 24), r"rank\[0\]=11 is larger"),
        (lambda: FactorizedDense(10, "tt", 2, in_shape=(4, 6), out_shape=(10,)), (2, 24), None),
        (
            lambda: FactorizedConv(6, (3, 3), "cp", 2, feature_group_count=4),
            (1, 5, 5, 6),
            "feature_group_count=4 must divide",
        ),
        (lambda: FactorizedConv(6, (3, 3), "tucker", -1), (1, 5, 5, 6), "rank"),
        (lambda: Factorized(nn.Embed(10, 4), format="cp", rank=2), None, "nn.Embed"),
        (lambda: Factorized(nn.LayerNorm(), format="cp", rank=2), (2, 4), "nn.Dense, nn.Conv"),
    ],
)
def test_bad_arguments_raise(make, x, match):
    inputs = jnp.zeros(x) if x is not None else jnp.zeros((2,), jnp.int32)
    if match is None:  # a valid configuration, for contrast
        make().init(KEY, inputs)
        return
    with pytest.raises(ValueError, match=match):
        make().init(KEY, inputs)


_PURITY_SCRIPT = textwrap.dedent(
    """
    import sys
    import jax, jax.numpy as jnp, flax.linen as nn
    {pre}
    import tensornets as tn
    x = jnp.ones((4, 5, 6))
    for fmt in {formats}:
        fmt.from_dense(x, 2).to_dense()
    layer = tn.Factorized(nn.Dense(8), format="tt_matrix", rank=2)
    y = layer.apply(layer.init(jax.random.key(0), jnp.ones((2, 8))), jnp.ones((2, 8)))
    assert y.dtype == jnp.float32, y.dtype
    assert not jax.config.jax_enable_x64
    {post}
    print("ok")
    """
)


@pytest.mark.parametrize(
    "pre, post",
    [
        ("", "assert 'tensorly' not in sys.modules, 'tensornets imported tensorly'"),
        ("import tensorly as tl", "assert tl.get_backend() == 'numpy', tl.get_backend()"),
    ],
)
def test_import_and_use_have_no_global_side_effects(pre, post):
    # the first run (the one that could import tensorly) also exercises every from_dense
    formats = "(tn.TT, tn.Tubal)" if pre else "(tn.CP, tn.Tucker, tn.TT, tn.Tubal)"
    script = _PURITY_SCRIPT.format(pre=pre, post=post, formats=formats)
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]
