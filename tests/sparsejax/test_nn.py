"""`sparsejax.nn.SparseDense` equals a masked ``nn.Dense``; init, validation, jit, grads."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels import BSR, NM
from sparsejax import masks
from sparsejax import nn as snn

_SETTINGS = settings(max_examples=6, deadline=None, derandomize=True)
_TOL = dict(atol=1e-5, rtol=1e-5)


def _dense_and_mask(rng, k, n, block, density):
    w = rng.standard_normal((k, n)).astype(np.float32)
    blocks = rng.random((k // block[0], n // block[1])) < density
    return w, np.kron(blocks, np.ones(block, bool))


@_SETTINGS
@given(
    kb=st.integers(1, 3),
    nb=st.integers(1, 3),
    block=st.sampled_from([(8, 8), (16, 8)]),
    density=st.floats(0.0, 1.0),
    impl=st.sampled_from(["xla", "pallas_interpret"]),
    seed=st.integers(0, 999),
)
def test_sparse_dense_bsr_equals_masked_dense(kb, nb, block, density, impl, seed):
    rng = np.random.default_rng(seed)
    k, n = kb * block[0], nb * block[1]
    w, mask = _dense_and_mask(rng, k, n, block, density)
    bias = rng.standard_normal(n).astype(np.float32)
    x = jnp.asarray(rng.standard_normal((3, k)).astype(np.float32))
    want = nn.Dense(n).apply({"params": {"kernel": w * mask, "bias": bias}}, x)
    layer = snn.SparseDense(n, impl=impl)
    params = {"kernel": BSR.from_dense(w, mask, block_shape=block), "bias": bias}
    got = jax.jit(layer.apply)({"params": params}, x)
    chex.assert_trees_all_close(got, want, **_TOL)


def test_sparse_dense_nm_equals_masked_dense():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 6)).astype(np.float32)
    scores = rng.random((4, 4, 6))
    mask = (np.argsort(np.argsort(-scores, axis=1), axis=1) < 2).reshape(16, 6)
    x = jnp.asarray(rng.standard_normal((2, 5, 16)).astype(np.float32))
    bias = np.arange(6, dtype=np.float32)
    want = nn.Dense(6).apply({"params": {"kernel": w * mask, "bias": bias}}, x)
    for packed in (False, True):
        params = {"kernel": NM.from_dense(w, mask, n=2, m=4, packed=packed), "bias": bias}
        got = snn.SparseDense(6, format="nm").apply({"params": params}, x)
        chex.assert_trees_all_close(got, want, **_TOL)


@pytest.mark.parametrize("fmt", ["bsr", "nm"])
def test_init_gives_valid_kernel_and_trains(fmt):
    layer = snn.SparseDense(16, format=fmt, block_shape=(8, 8), n=2, m=4)
    x = jnp.ones((4, 32))
    params = jax.jit(layer.init)(jax.random.key(0), x)["params"]
    kernel = params["kernel"]
    assert isinstance(kernel, BSR if fmt == "bsr" else NM)
    assert kernel.shape == (32, 16) and params["bias"].shape == (16,)
    if fmt == "nm":  # the init pattern is N:M: exactly n nonzero candidates per group
        dense = np.asarray(kernel.to_dense()).reshape(8, 4, 16)
        assert np.all((dense != 0).sum(axis=1) <= 2)

    def loss(p):
        return jnp.sum(layer.apply({"params": p}, x) ** 2)

    grads = jax.grad(loss, allow_int=True)(params)
    assert type(grads["kernel"]) is type(kernel)
    assert grads["kernel"].values.shape == kernel.values.shape


def test_init_with_layout_and_validation():
    w, mask = _dense_and_mask(np.random.default_rng(1), 16, 16, (8, 8), 0.5)
    layout = BSR.from_dense(w, mask, block_shape=(8, 8)).layout
    params = snn.SparseDense(16, layout=layout).init(jax.random.key(1), jnp.ones((1, 16)))
    assert params["params"]["kernel"].layout == layout
    with pytest.raises(ValueError, match=r"layout shape \(16, 16\) must equal the kernel shape"):
        snn.SparseDense(16, layout=layout).init(jax.random.key(1), jnp.ones((1, 8)))
    with pytest.raises(ValueError, match=r"format must be one of \('bsr', 'nm'\), got 'csr'"):
        snn.SparseDense(4, format="csr")
    with pytest.raises(ValueError, match="features must be a positive int, got 0"):
        snn.SparseDense(0)
    with pytest.raises(ValueError, match=r"kernel shape \(16, 16\) does not match"):
        snn.SparseDense(8).apply(
            {
                "params": {
                    "kernel": BSR.from_dense(w, mask, block_shape=(8, 8)),
                    "bias": jnp.zeros(8),
                }
            },
            jnp.ones((1, 16)),
        )


def test_sparse_dense_calls_routes_plain_dense():
    rng = np.random.default_rng(2)
    w, mask = _dense_and_mask(rng, 16, 8, (8, 8), 0.5)

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(8, name="head")(nn.relu(nn.Dense(16, name="body")(x)))

    net = Net()
    x = jnp.asarray(rng.standard_normal((3, 4)).astype(np.float32))
    params = net.init(jax.random.key(0), x)["params"]
    params["head"]["kernel"] = jnp.asarray(w * mask)
    want = net.apply({"params": params}, x)
    sparse = dict(
        params, head=dict(params["head"], kernel=BSR.from_dense(w, mask, block_shape=(8, 8)))
    )
    with snn.sparse_dense_calls(impl="xla"):
        got = jax.jit(net.apply)({"params": sparse}, x)
    chex.assert_trees_all_close(got, want, **_TOL)


@pytest.mark.parametrize(
    "kernel_size, strides, padding, dilation",
    [
        ((3,), 2, ((1, 1),), 1),
        ((5,), 1, "SAME", 2),
        ((3, 2), (2, 1), "VALID", 1),
        ((3, 3), 1, 1, 1),
        (3, 1, "SAME", 1),  # an int is a 1-D window, as nn.Conv reads it
    ],
)
def test_sparse_conv_equals_masked_conv(kernel_size, strides, padding, dilation):
    """An nn.Conv whose kernel is the BSR of its masked im2col matrix gives the conv's output,
    values and gradients to the input."""
    window = (kernel_size,) if isinstance(kernel_size, int) else kernel_size
    rng = np.random.default_rng(len(window))
    spatial = (13,) * len(window)
    x = jnp.asarray(rng.standard_normal((3, *spatial, 4)).astype(np.float32))
    conv = nn.Conv(6, kernel_size, strides=strides, padding=padding, kernel_dilation=dilation)
    params = conv.init(jax.random.key(0), x)["params"]
    matrix_mask = masks.block_mask(
        jax.random.uniform(jax.random.key(1), (4 * int(np.prod(window)), 6)), 0.5, (2, 3)
    )
    # The mask in the kernel's own layout: invert conv_kernel_matrix's channel-major order.
    kernel_mask = jnp.moveaxis(matrix_mask.reshape(4, *window, 6), 0, -2)
    np.testing.assert_array_equal(snn.conv_kernel_matrix(kernel_mask), matrix_mask)
    dense = {"kernel": params["kernel"] * kernel_mask, "bias": params["bias"]}
    sparse = {
        "kernel": BSR.from_dense(
            snn.conv_kernel_matrix(params["kernel"]), matrix_mask, block_shape=(2, 3)
        ),
        "bias": params["bias"],
    }
    want = conv.apply({"params": dense}, x)
    with snn.sparse_dense_calls(impl="xla"):
        got = conv.apply({"params": sparse}, x)
        got_grad = jax.grad(lambda x: conv.apply({"params": sparse}, x).sum())(x)
    chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)
    want_grad = jax.grad(lambda x: conv.apply({"params": dense}, x).sum())(x)
    chex.assert_trees_all_close(got_grad, want_grad, atol=1e-5, rtol=1e-5)


def test_sparse_conv_rejects_what_it_cannot_run():
    x = jnp.ones((2, 8, 4))
    kernel = BSR.from_dense(np.ones((12, 6), np.float32), block_shape=(2, 3))
    for conv, match in [
        (nn.Conv(6, (3,), padding="CIRCULAR"), "padding='CIRCULAR'"),
        (nn.Conv(6, (3,), feature_group_count=2), "feature_group_count=1, got 2"),
        (nn.Conv(6, (2,)), r"BSR kernel shape \(12, 6\) does not match"),
    ]:
        with snn.sparse_dense_calls(), pytest.raises(ValueError, match=match):
            conv.apply({"params": {"kernel": kernel, "bias": jnp.zeros(6)}}, x)
    with pytest.raises(ValueError, match="kernel must be"):
        snn.conv_kernel_matrix(np.ones((3, 4)))
