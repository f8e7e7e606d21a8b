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
    CP,
    TT,
    Factorized,
    FactorizedConv,
    FactorizedDense,
    FactorizedEmbedding,
    TTMatrix,
    Tubal,
    Tucker,
    balanced_factors,
    densify_params,
    factorize_params,
    factorized_dense_cost,
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


@pytest.mark.parametrize(
    "options",
    [
        dict(format="tt_matrix", rank=3, in_shape=(2, 3, 4), out_shape=(5, 3, 2)),
        dict(format="low_rank", rank=4),
    ],
)
def test_embedding_lookup_and_attend(options):
    module = nn.Embed(24, 30)
    layer = Factorized(module, **options)
    ids = jnp.array([[0, 5, 23], [7, 7, 1]])
    params = jax.jit(layer.init)(KEY, ids)["params"]
    table = densify_params({"e": params}, {"e": {"format": options["format"], "kind": "embed"}})
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
        FactorizedEmbedding(24, 30, **options).apply({"params": params}, q)


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
    ("low_rank", 8, None, None),
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
        (
            lambda: Factorized(nn.Conv(4, (3,)), format="low_rank", rank=2),
            (1, 5, 4),
            r"for an nn.Conv, got 'low_rank'",
        ),
        (
            lambda: FactorizedDense(10, "low_rank", 2, in_shape=(4, 6)),
            (2, 24),
            r"in_shape=\(4, 6\)",
        ),
        (lambda: FactorizedDense(10, "low_rank", 11), (2, 24), "rank=11 is larger"),
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


# ------------------------------------------------------------------- tubal (t-product)
def _block_circulant_of(kernel, n3):
    """K (n2 n3, n1 n3) as [j, s, i, t] and the same kernel rebuilt from its s = 0 rows."""
    n_in, n_out = kernel.shape
    k4 = np.asarray(kernel).reshape(n_in // n3, n3, n_out // n3, n3)
    first = k4[:, 0]  # [j, i, t] = W[i, j, t]
    shift = (np.arange(n3)[None, :] - np.arange(n3)[:, None]) % n3  # [s, t]
    rebuilt = np.transpose(first[:, :, shift], (0, 2, 1, 3))  # [j, s, i, t]
    return k4, rebuilt


TUBAL_CASES = [(3, 5, 4, 2), (2, 3, 5, 2), (4, 4, 1, 3), (5, 2, 6, 2), (3, 3, 7, 3)]


@pytest.mark.parametrize(
    "n1, n2, n3, k, contraction",
    [(*case, "factorized") for case in TUBAL_CASES]
    + [(*TUBAL_CASES[0], "dense"), (*TUBAL_CASES[3], "auto")],
)
def test_tubal_dense_is_a_block_circulant_dense_layer(n1, n2, n3, k, contraction):
    # y = W * x (t-product, Newman et al. 2018) is x @ K with K[(j, s), (i, t)] =
    # W[i, j, (t - s) mod n3]: the layer equals nn.Dense with the densified kernel,
    # and that kernel is block-circulant.
    x = jax.random.normal(KEY, (3, 2, n2 * n3))
    module = nn.Dense(n1 * n3)
    layer = Factorized(
        module,
        format="tubal",
        rank=k,
        in_shape=(n2, n3),
        out_shape=(n1, n3),
        contraction=contraction,
    )
    params, y = init_apply(layer, x)
    assert {name: v.shape for name, v in params.items()} == {
        "u": (n1, k, n3),
        "s": (k, n3),
        "v": (n2, k, n3),
        "bias": (n1 * n3,),
    }
    np.testing.assert_allclose(
        y, dense_reference(params, {"format": "tubal"}, module, x), atol=1e-4, rtol=1e-4
    )
    kernel = densify_params({"l": params}, {"l": {"format": "tubal"}})["l"]["kernel"]
    k4, rebuilt = _block_circulant_of(kernel, n3)
    np.testing.assert_allclose(k4, rebuilt, atol=1e-6)


@settings(max_examples=8, deadline=None, derandomize=True)
@given(n1=st.integers(1, 5), n2=st.integers(1, 5), n3=st.integers(1, 6), seed=st.integers(0, 99))
def test_tubal_factorize_projects_onto_t_product_operators(n1, n2, n3, seed):
    # factorize_params at full tubal rank is the orthogonal projection P onto
    # block-circulant kernels: P(K) is block-circulant, K - P(K) is orthogonal to every
    # block-circulant kernel, and P fixes block-circulant kernels.
    key = jax.random.key(seed, impl="rbg")
    kernel = jax.random.normal(key, (n2 * n3, n1 * n3))
    shapes = {"in_shape": (n2, n3), "out_shape": (n1, n3)}
    spec = {"l": {"format": "tubal", "rank": min(n1, n2), **shapes}}
    back = {"l": {"format": "tubal"}}

    def project(k):
        factors = factorize_params({"l": {"kernel": k}}, spec)
        return np.asarray(densify_params(factors, back)["l"]["kernel"])

    p = project(kernel)
    k4, rebuilt = _block_circulant_of(p, n3)
    np.testing.assert_allclose(k4, rebuilt, atol=1e-5)
    layer = FactorizedDense(n1 * n3, "tubal", min(n1, n2), use_bias=False, **shapes)
    other = layer.init(jax.random.fold_in(key, 1), jnp.zeros((1, n2 * n3)))["params"]
    circulant = np.asarray(densify_params({"l": other}, back)["l"]["kernel"])
    scale = np.linalg.norm(kernel) * np.linalg.norm(circulant)
    assert abs(np.vdot(np.asarray(kernel) - p, circulant)) <= 1e-5 * scale
    np.testing.assert_allclose(project(jnp.asarray(circulant)), circulant, atol=1e-5)


def test_tubal_truncation_is_the_best_tubal_rank_k_kernel():
    # Kilmer & Martin 2011 (Thm 4.3) on the projected tensor, and ||bcirc(A)||_F^2 =
    # n3 ||A||_F^2 with an orthogonal projection: truncating beats any other tubal-rank-k
    # operator, e.g. a random one or one with a perturbed factor.
    n1, n2, n3, k = 4, 6, 5, 2
    kernel = jax.random.normal(KEY, (n2 * n3, n1 * n3))
    shapes = {"in_shape": (n2, n3), "out_shape": (n1, n3)}
    factors = factorize_params(
        {"l": {"kernel": kernel}}, {"l": {"format": "tubal", "rank": k, **shapes}}
    )
    best = densify_params(factors, {"l": {"format": "tubal"}})["l"]["kernel"]
    err = float(jnp.linalg.norm(kernel - best))
    for i in range(5):
        noisy = jax.tree.map(
            lambda a, i=i: a + 0.05 * jax.random.normal(jax.random.key(i, impl="rbg"), a.shape),
            factors,
        )
        other = densify_params(noisy, {"l": {"format": "tubal"}})["l"]["kernel"]
        assert err <= float(jnp.linalg.norm(kernel - other)) + 1e-5


def test_tubal_init_preserves_dense_output_variance():
    x = jax.random.normal(KEY, (4, 64))
    target = float(jnp.mean(jnp.sum(x**2, -1))) / 64
    layer = FactorizedDense(48, "tubal", 3, in_shape=(16, 4), out_shape=(12, 4), use_bias=False)
    ratios = _output_second_moment(layer, x, 2000) / target
    mean, se = ratios.mean(), ratios.std(ddof=1) / math.sqrt(len(ratios))
    assert abs(mean - 1) < max(4 * se, 0.02) and abs(mean - 1) < 0.15, (mean, se)


def test_tubal_float_rank_is_a_fraction_of_the_dense_kernel():
    x = jnp.ones((1, 256))
    for budget in (0.05, 0.1, 0.25):
        for n3 in (4, 8):
            shapes = dict(in_shape=(256 // n3, n3), out_shape=(256 // n3, n3))
            layer = FactorizedDense(256, "tubal", budget, use_bias=False, **shapes)
            n = sum(p.size for p in jax.tree.leaves(jax.eval_shape(layer.init, KEY, x)))
            per_rank = (2 * 256 // n3 + 1) * n3
            assert n <= budget * 256 * 256 < n + per_rank, (budget, n3, n)
    # the default tube: largest common divisor <= sqrt(min(in, out))
    params = jax.eval_shape(FactorizedDense(10, "tubal", 1).init, KEY, jnp.ones((1, 40)))
    assert params["params"]["u"].shape == (5, 1, 2)


@pytest.mark.parametrize(
    "make, x, match",
    [
        (lambda: FactorizedConv(6, (3, 3), "tubal", 2), (1, 5, 5, 6), "format must be one of"),
        (
            lambda: FactorizedDense(10, "tubal", 2, in_shape=(6, 4), out_shape=(5, 2)),
            (2, 24),
            "same tube",
        ),
        (lambda: FactorizedDense(12, "tubal", 2, in_shape=(6, 4)), (2, 24), "or neither"),
        (
            lambda: FactorizedDense(12, "tubal", 4, in_shape=(6, 4), out_shape=(3, 4)),
            (2, 24),
            "rank=4 is larger",
        ),
    ],
)
def test_tubal_bad_arguments_raise(make, x, match):
    with pytest.raises(ValueError, match=match):
        make().init(KEY, jnp.zeros(x))


def test_tubal_factorize_refuses_conv_kernels():
    with pytest.raises(ValueError, match="dense kernels only"):
        factorize_params(
            {"c": {"kernel": jnp.ones((3, 4, 4))}}, {"c": {"format": "tubal", "rank": 1}}
        )


@pytest.mark.parametrize(
    "fmt, rank, in_shape, out_shape",
    [*DENSE_CASES, ("tubal", 2, (6, 4), (5, 4)), ("tubal", 0.3, None, None)],
)
def test_factorized_dense_cost_counts_params_and_flops(fmt, rank, in_shape, out_shape):
    n_out = 20 if fmt == "tubal" else 10
    layer = FactorizedDense(n_out, fmt, rank, in_shape=in_shape, out_shape=out_shape)
    x = jnp.zeros((1, 24))
    params = jax.eval_shape(layer.init, KEY, x)["params"]
    cost = factorized_dense_cost(layer, 24)
    assert cost["params"] == sum(math.prod(p.shape) for p in jax.tree.leaves(params))
    # the contraction the layer runs on one example, through the format's own counter
    fmt_params = {k: jnp.zeros(v.shape) for k, v in params.items() if k != "bias"}
    if fmt == "tubal":
        expected = min(Tubal.from_params(fmt_params).apply_costs(1).values())
    elif fmt == "tt_matrix":
        expected = TTMatrix.from_params(fmt_params).flops(1)
    else:
        n_in = 1 if in_shape is None else len(in_shape)
        cls = {"cp": CP, "tucker": Tucker, "tt": TT}[fmt]
        expected = cls.from_params(fmt_params).flops(1, n_in)
    assert cost["flops"] == expected + n_out


# ------------------------------------------------------------ low_rank (W = U diag(w) V^T)
@pytest.mark.parametrize("contraction", ["factorized", "dense"])
def test_low_rank_dense_equals_its_dense_reconstruction(contraction):
    x = jax.random.normal(KEY, (3, 2, 5))
    module = nn.Dense(8)
    layer = Factorized(module, format="low_rank", rank=2, contraction=contraction)
    params, y = init_apply(layer, x)
    assert {name: v.shape for name, v in params.items()} == {
        "weights": (2,),
        "factor_0": (5, 2),
        "factor_1": (8, 2),
        "bias": (8,),
    }
    np.testing.assert_allclose(
        y, dense_reference(params, {"format": "low_rank"}, module, x), atol=1e-5, rtol=1e-5
    )
    kernel = densify_params({"l": params}, {"l": {"format": "low_rank"}})["l"]["kernel"]
    assert kernel.shape == (5, 8) and np.linalg.matrix_rank(np.asarray(kernel)) == 2


def test_low_rank_is_the_two_factor_cp_of_the_matrix():
    # The same params, init and outputs as "cp" without in_shape / out_shape, bit for bit:
    # models built with "low_rank" before it was a tensornets format keep their numbers.
    x = jax.random.normal(KEY, (4, 12))
    for rank in (3, 0.2):
        low_rank, y_low_rank = init_apply(FactorizedDense(7, "low_rank", rank), x)
        cp, y_cp = init_apply(FactorizedDense(7, "cp", rank), x)
        chex.assert_trees_all_equal(low_rank, cp)
        np.testing.assert_array_equal(y_low_rank, y_cp)


@settings(max_examples=8, deadline=None, derandomize=True)
@given(n_in=st.integers(1, 7), n_out=st.integers(1, 7), seed=st.integers(0, 99))
def test_low_rank_at_full_rank_represents_any_dense_kernel(n_in, n_out, seed):
    # At r = min(in, out), U diag(w) V^T spans every (in, out) matrix: factorize_params
    # finds it, the layer then computes the dense layer, and densify_params gives the
    # kernel back.
    key = jax.random.key(seed, impl="rbg")
    dense = {
        "kernel": jax.random.normal(key, (n_in, n_out)),
        "bias": jax.random.normal(jax.random.fold_in(key, 1), (n_out,)),
    }
    rank = min(n_in, n_out)
    spec = {"l": {"format": "low_rank", "rank": rank}}
    params = factorize_params({"l": dense}, spec)["l"]
    back = densify_params({"l": params}, spec)["l"]
    np.testing.assert_allclose(back["kernel"], dense["kernel"], atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(back["bias"], dense["bias"])
    x = jax.random.normal(jax.random.fold_in(key, 2), (4, n_in))
    layer = Factorized(nn.Dense(n_out), format="low_rank", rank=rank)
    np.testing.assert_allclose(
        jax.jit(layer.apply)({"params": params}, x),
        nn.Dense(n_out).apply({"params": dense}, x),
        atol=1e-4,
        rtol=1e-4,
    )


def test_low_rank_embedding_params_and_init_variance():
    params = jax.eval_shape(
        Factorized(nn.Embed(24, 30), format="low_rank", rank=4).init, KEY, jnp.arange(3)
    )
    assert {name: v.shape for name, v in params["params"].items()} == {
        "weights": (4,),
        "factor_0": (24, 4),
        "factor_1": (30, 4),
    }
    # E[E_ij^2] = 1 / D, as Flax's default embedding init
    emb = FactorizedEmbedding(64, 48, 4, format="low_rank")
    keys = jax.random.split(jax.random.key(2, impl="rbg"), 200)
    ids = jnp.arange(64)
    rows = jax.jit(jax.vmap(lambda k: emb.apply(emb.init(k, ids), ids)))(keys)
    assert abs(float(jnp.mean(rows**2)) * 48 - 1) < 0.15


METHODS_SHOWN = "('auto', 'factorized', 'dense')"


@pytest.mark.parametrize(
    "fmt, rank",
    [(f, 2) for f in ("cp", "tucker", "tt", "tt_matrix")]
    + [
        ("tubal", 1),
        ("low_rank", 2),
    ],
)
def test_contraction_is_checked_at_init_naming_it_and_the_allowed_values(fmt, rank):
    x = jnp.ones((2, 24))
    for make in (
        lambda: FactorizedDense(12, fmt, rank, contraction="bogus"),
        lambda: Factorized(nn.Dense(12), format=fmt, rank=rank, contraction="bogus"),
    ):
        with pytest.raises(ValueError, match=r"^contraction must be one of") as info:
            make().init(KEY, x)
        assert METHODS_SHOWN in str(info.value) and "'bogus'" in str(info.value)
        with pytest.raises(ValueError, match=r"^contraction must be one of"):
            jax.eval_shape(make().init, KEY, x)  # at trace time, before any contraction runs
    with pytest.raises(ValueError, match=r"^contraction must be one of .*'bogus'"):
        factorized_dense_cost(FactorizedDense(12, fmt, rank, contraction="bogus"), 24)


def test_contraction_is_for_dense_layers_only():
    # A conv or an embedding has no contraction to choose: a value other than "auto"
    # would be silently ignored, so the wrapper refuses it.
    conv = Factorized(nn.Conv(4, (3,)), format="cp", rank=2, contraction="dense")
    with pytest.raises(ValueError, match=r"contraction='dense' is for dense layers"):
        conv.init(KEY, jnp.ones((1, 5, 4)))
    conv = Factorized(nn.Conv(4, (3,)), format="cp", rank=2, contraction="bogus")
    with pytest.raises(ValueError, match=r"^contraction must be one of .*'bogus'"):
        conv.init(KEY, jnp.ones((1, 5, 4)))
    embed = Factorized(nn.Embed(10, 4), format="low_rank", rank=2, contraction="factorized")
    with pytest.raises(ValueError, match=r"contraction='factorized' is for dense layers"):
        embed.init(KEY, jnp.arange(3))
    Factorized(nn.Conv(4, (3,)), format="cp", rank=2).init(KEY, jnp.ones((1, 5, 4)))


@pytest.mark.parametrize(
    "rate, shown",
    [
        (1.5, "1.5"),
        (-0.1, "-0.1"),
        (1.0, "1.0"),
        ("0.1", "'0.1'"),
        (True, "True"),
        (float("nan"), "nan"),
    ],
)
def test_rank_dropout_is_checked_at_init_naming_it(rate, shown):
    cases = [
        (lambda: FactorizedDense(6, "cp", 2, rank_dropout=rate), jnp.ones((2, 12))),
        (
            lambda: Factorized(nn.Dense(6), format="tucker", rank=2, rank_dropout=rate),
            jnp.ones((2, 12)),
        ),
        (lambda: FactorizedConv(6, (3,), "cp", 2, rank_dropout=rate), jnp.ones((1, 5, 4))),
        (
            lambda: Factorized(nn.Conv(6, (3,)), format="cp", rank=2, rank_dropout=rate),
            jnp.ones((1, 5, 4)),
        ),
    ]
    for make, x in cases:
        # at init (no dropout rng, nothing is dropped yet) ...
        with pytest.raises(ValueError, match=r"^rank_dropout must be a float in \[0, 1\)") as info:
            make().init(KEY, x)
        assert shown in str(info.value)
        # ... and at apply, where the rate is used.
        params = make().clone(rank_dropout=0.0).init(KEY, x)
        with pytest.raises(ValueError, match=r"^rank_dropout must be a float in \[0, 1\)"):
            make().apply(params, x, rngs={"dropout": KEY})


class _TwoLayers(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = FactorizedDense(6, "cp", 3, name="fc")(x)
        return Factorized(nn.Dense(4), format="tucker", rank=2, name="head")(h)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.int32, jnp.bfloat16])
def test_layers_refuse_rank_masks_that_are_not_boolean(dtype):
    # A float mask would scale the factors (a 0.5 entry halves a component) instead of
    # selecting components; the layer refuses it, naming itself and the axis.
    x = jnp.ones((2, 12))
    net = _TwoLayers()
    params = net.init(KEY, x)["params"]
    good = {
        "fc": {"rank": jnp.ones(3, bool)},
        "head": {"rank_0": jnp.ones(2, bool), "rank_1": jnp.ones(2, bool)},
    }
    net.apply({"params": params, "rank_masks": good}, x)
    bad = {**good, "fc": {"rank": jnp.array([1, 0.5, 1], dtype)}}
    with pytest.raises(ValueError, match=r"rank_masks of 'fc'\['rank'\] must be boolean") as info:
        net.apply({"params": params, "rank_masks": bad}, x)
    assert str(jnp.dtype(dtype)) in str(info.value)
    bad = {**good, "head": {**good["head"], "rank_1": jnp.ones(2, dtype)}}
    with pytest.raises(ValueError, match=r"rank_masks of 'head'\['rank_1'\] must be boolean"):
        jax.jit(net.apply)({"params": params, "rank_masks": bad}, x)  # traced masks too
    emb = FactorizedEmbedding(24, 8, 2, format="low_rank")
    p = emb.init(KEY, jnp.arange(3))["params"]
    with pytest.raises(ValueError, match=r"rank_masks of the top-level FactorizedEmbedding"):
        emb.apply({"params": p, "rank_masks": {"rank": jnp.ones(2, dtype)}}, jnp.arange(3))
