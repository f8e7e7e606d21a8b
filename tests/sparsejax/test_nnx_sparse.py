"""`SparseLinear` and `export_model` against the masked dense NNX / Linen layers they replace.

The sparse layer stores only kept blocks (BSR) or kept N:M entries, so every property is
stated against ``x @ (W * mask) + b``: outputs, gradients (to ``x``, and to the stored
values, which are the masked dense kernel gradient at the stored positions), training under
``nnx.Optimizer`` (structural zeros never appear), and whole-model export.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from pallas_kernels import BSR, NM
from sparsejax import export as export_lib
from sparsejax import masks as masks_lib
from sparsejax import nn as sparse_nn
from sparsejax import nnx as snnx
from sparsejax.nnx_sparse import SparseIndices, SparseLinear, export_model

K, N = 16, 24
ATOL = 1e-5  # float32 outputs of size O(1): summation order only


def _linear(seed: int = 0, k: int = K, n: int = N) -> nnx.Linear:
    layer = nnx.Linear(k, n, rngs=nnx.Rngs(seed))
    # A nonzero bias, so a dropped or misplaced bias shows.
    layer.bias[...] = jax.random.normal(jax.random.key(seed + 100), (n,))
    return layer


def _bsr_mask(block_shape, seed: int = 0, k: int = K, n: int = N) -> np.ndarray:
    """Unstructured entries inside a random half of the blocks: some blocks absent, and
    stored blocks holding structural zeros."""
    rng = np.random.default_rng(seed)
    bk, bn = block_shape
    blocks = rng.random((k // bk, n // bn)) < 0.5
    blocks[0, 0] = True
    entries = rng.random((k, n)) < 0.7
    return np.kron(blocks, np.ones(block_shape, bool)).astype(bool) & entries


def _nm_mask(layer: nnx.Linear, n: int = 2, m: int = 4) -> np.ndarray:
    return np.asarray(masks_lib.nm_mask(jnp.abs(layer.kernel[...]), n, m, axis=0))


def _masked_dense(layer: nnx.Linear, mask) -> nnx.Linear:
    out = nnx.clone(layer)
    out.kernel[...] = jnp.where(mask, layer.kernel[...], 0)
    return out


def _x(seed: int = 1, k: int = K) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (5, k))


CASES = [
    ("bsr", {"block_shape": (1, 1)}),
    ("bsr", {"block_shape": (4, 8)}),
    ("bsr", {"block_shape": (8, 4)}),
    ("bsr", {"block_shape": (16, 24)}),
    ("nm", {}),
    ("nm", {"packed": True}),
]


def _case(fmt, options, layer):
    mask = _bsr_mask(options["block_shape"]) if fmt == "bsr" else _nm_mask(layer)
    return mask, SparseLinear.from_linear(layer, mask, format=fmt, **options)


@pytest.mark.parametrize("fmt,options", CASES)
def test_outputs_equal_the_masked_dense_layer(fmt, options):
    layer, x = _linear(), _x()
    mask, sparse = _case(fmt, options, layer)
    want = _masked_dense(layer, mask)(x)
    np.testing.assert_allclose(sparse(x), want, atol=ATOL, rtol=1e-5)
    # The Linen twin: nn.Dense on the masked params, and SparseDense on the same kernel.
    params = {"kernel": jnp.where(mask, layer.kernel[...], 0), "bias": layer.bias[...]}
    np.testing.assert_allclose(sparse(x), nn.Dense(N).apply({"params": params}, x), atol=ATOL)
    linen_sparse = sparse_nn.SparseDense(N).apply(
        {"params": {"kernel": sparse.kernel, "bias": sparse.bias[...]}}, x
    )
    np.testing.assert_array_equal(sparse(x), linen_sparse)
    # Only the kept structure is stored: the values are the Param, nothing else is float.
    params = nnx.to_pure_dict(nnx.state(sparse, nnx.Param))
    assert sorted(params) == ["bias", "values"]
    if fmt == "bsr":
        bk, bn = options["block_shape"]
        kept_blocks = int(mask.reshape(K // bk, bk, N // bn, bn).any(axis=(1, 3)).sum())
        assert sparse.values.shape == (kept_blocks, bk, bn)
    else:
        assert sparse.values.shape == (K // 2, N)
        assert isinstance(sparse.indices, SparseIndices)
    np.testing.assert_array_equal(np.asarray(sparse.kernel.to_dense()) != 0, mask)


@pytest.mark.parametrize("fmt,options", [CASES[1], CASES[2], CASES[4]])
def test_gradients_equal_the_masked_dense_gradients(fmt, options):
    layer, x = _linear(2), _x(3)
    mask, sparse = _case(fmt, options, layer)
    dense = _masked_dense(layer, mask)
    target = jax.random.normal(jax.random.key(4), (5, N))
    loss = lambda y: jnp.sum(jnp.tanh(y) * target)  # noqa: E731

    dx_sparse = jax.grad(lambda x: loss(sparse(x)))(x)
    dx_dense = jax.grad(lambda x: loss(dense(x)))(x)
    np.testing.assert_allclose(dx_sparse, dx_dense, atol=ATOL, rtol=1e-5)

    grads = nnx.grad(lambda s: loss(s(x)))(sparse)
    # d loss / d W at W = W * mask: the masked dense layer's kernel gradient before masking.
    dense_grads = nnx.grad(lambda d: loss(d(x)))(dense)
    dw = dense_grads["kernel"][...]
    if fmt == "bsr":
        # Every entry of a stored block is trainable (kept entries and the zeros beside
        # them): its gradient is dW there. At the kept entries that is the masked model's.
        bk, bn = options["block_shape"]
        stored = np.kron(
            mask.reshape(K // bk, bk, N // bn, bn).any(axis=(1, 3)), np.ones((bk, bn))
        ).astype(bool)
        want = BSR.from_dense(np.asarray(dw), stored, block_shape=(bk, bn)).values
    else:
        want = NM.from_dense(np.asarray(dw) * mask, mask, n=2, m=4).values
    np.testing.assert_allclose(grads["values"][...], want, atol=ATOL, rtol=1e-5)
    np.testing.assert_allclose(grads["bias"][...], dense_grads["bias"][...], atol=ATOL)


@pytest.mark.parametrize("fmt,options", [CASES[1], CASES[5]])
def test_jit_equals_eager_and_traces_once(fmt, options):
    layer = _linear()
    _, sparse = _case(fmt, options, layer)

    traces = []

    @nnx.jit
    def apply(model, x):
        traces.append(1)
        return model(x)

    for seed in (1, 2, 3):
        x = _x(seed)
        np.testing.assert_allclose(apply(sparse, x), sparse(x), atol=ATOL, rtol=1e-6)
    assert len(traces) == 1


@pytest.mark.parametrize("fmt,options", [CASES[1], CASES[4]])
def test_optimizer_trains_the_stored_values_only(fmt, options):
    layer = _linear(5)
    mask, sparse = _case(fmt, options, layer)
    before = np.asarray(sparse.kernel.to_dense())
    indices = None if sparse.indices is None else np.asarray(sparse.indices[...])
    x, target = _x(6), jax.random.normal(jax.random.key(7), (5, N))
    loss = lambda s: jnp.mean((s(x) - target) ** 2)  # noqa: E731
    opt = nnx.Optimizer(sparse, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt):
        value, grads = nnx.value_and_grad(loss)(model)
        opt.update(model, grads)
        return value

    losses = [float(step(sparse, opt)) for _ in range(20)]
    assert losses[-1] < 0.9 * losses[0]
    after = np.asarray(sparse.kernel.to_dense())
    stored = np.asarray(SparseLinear.from_linear(layer, mask, format=fmt, **options).kernel.values)
    assert sparse.values.shape == stored.shape
    assert not np.allclose(after, before)
    if fmt == "bsr":
        # Entries outside the stored blocks do not exist, so they are zero whatever happened.
        bk, bn = options["block_shape"]
        absent = ~mask.reshape(K // bk, bk, N // bn, bn).any(axis=(1, 3))
        assert absent.any()
        np.testing.assert_array_equal(
            after.reshape(K // bk, bk, N // bn, bn).transpose(0, 2, 1, 3)[absent], 0
        )
    else:
        np.testing.assert_array_equal(sparse.indices[...], indices)  # positions fixed
        assert np.all(after[~mask] == 0)  # at most n of every m per column
        assert int((after.reshape(K // 4, 4, N) != 0).sum(axis=1).max()) <= 2
    # The Linen-layout optimizer of sparsejax.nnx trains it the same way.
    twin = SparseLinear.from_linear(layer, mask, format=fmt, **options)
    twin_opt = snnx.optimizer(twin, optax.adam(1e-2))
    for _ in range(20):
        step(twin, twin_opt)
    np.testing.assert_allclose(twin.values[...], sparse.values[...], atol=1e-6)


def test_constructor_initializes_a_fixed_structure():
    layout = BSR.from_dense(np.ones((K, N)), _bsr_mask((4, 8)), block_shape=(4, 8)).layout
    x = _x()
    for layer in (
        SparseLinear(K, N, layout=layout, rngs=nnx.Rngs(0)),
        SparseLinear(K, N, block_shape=(8, 8), use_bias=False, rngs=nnx.Rngs(0)),
        SparseLinear(K, N, format="nm", n=1, m=4, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)),
    ):
        dense = layer.kernel.to_dense().astype(jnp.float32)
        bias = 0 if layer.bias is None else layer.bias[...]
        want = jnp.dot(x, dense, precision="highest") + bias
        np.testing.assert_allclose(layer(x).astype(jnp.float32), want, atol=1e-2, rtol=1e-2)
    assert layer.values.dtype == jnp.bfloat16 and layer.values.shape == (K // 4, N)
    assert SparseLinear(K, N, layout=layout, rngs=nnx.Rngs(0)).layout == layout


def test_from_sparse_runs_linen_exported_params():
    # A Linen model's exported kernel drops into SparseLinear, as into SparseDense.
    params = nn.Dense(N).init(jax.random.key(0), jnp.zeros((1, K)))["params"]
    mask = _bsr_mask((4, 4))
    exported = export_lib.export(
        {"dense": params}, {"dense": {"kernel": mask, "bias": None}}, block_shape=(4, 4)
    )["dense"]
    layer = SparseLinear.from_sparse(exported["kernel"], exported["bias"])
    x = _x()
    with sparse_nn.sparse_dense_calls():
        want = nn.Dense(N).apply({"params": exported}, x)
    np.testing.assert_array_equal(layer(x), want)
    assert layer.kernel.layout == exported["kernel"].layout


class _MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(2, 4, (3,), rngs=rngs)
        self.hidden = nnx.List([nnx.Linear(32, 32, rngs=rngs), nnx.Linear(32, 16, rngs=rngs)])
        self.head = nnx.Linear(16, 8, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.relu(self.conv(x)).reshape(x.shape[0], -1)
        for layer in self.hidden:
            x = jax.nn.relu(layer(x))
        return self.head(x)


@pytest.mark.parametrize("fmt", ["bsr", "nm"])
def test_exported_model_equals_its_masked_dense_self(fmt):
    model = _MLP(nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    shapes = {("hidden", 0): (8, 8), ("hidden", 1): (8, 4), ("head",): (4, 4)}

    def kernel_mask(kernel, shape):
        if fmt == "bsr":
            return masks_lib.block_mask(jnp.abs(kernel), 0.5, shape)
        return masks_lib.nm_mask(jnp.abs(kernel), 2, 4, axis=0)

    masks = jax.tree.map(lambda p: None, params)
    for path, shape in shapes.items():
        node, layer = masks, params
        for key in path:
            node, layer = node[key], layer[key]
        node["kernel"] = kernel_mask(layer["kernel"], shape)
    masks["conv"]["kernel"] = jnp.abs(params["conv"]["kernel"]) > 0.2  # stays dense, masked
    block_shape = {"/".join(map(str, path)) + "/kernel": s for path, s in shapes.items()}
    options = {"block_shape": block_shape} if fmt == "bsr" else {}
    x = jax.random.normal(jax.random.key(1), (3, 8, 2))
    dense = nnx.clone(model)
    nnx.update(dense, masks_lib.apply_masks(params, masks))

    sparse = export_model(model, masks, format=fmt, **options)
    np.testing.assert_allclose(sparse(x), dense(x), atol=ATOL, rtol=1e-5)
    assert isinstance(sparse.hidden[0], SparseLinear) and isinstance(sparse.head, SparseLinear)
    assert isinstance(sparse.conv, nnx.Conv)
    np.testing.assert_array_equal(sparse.conv.kernel[...], dense.conv.kernel[...])
    # The input model is unchanged, and the export runs under jit.
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(model)), params)
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(sparse, x), sparse(x), atol=ATOL)
    stored = sum(v.size for v in jax.tree.leaves(nnx.state(sparse, nnx.Param)))
    assert stored < sum(v.size for v in jax.tree.leaves(params))


def test_errors_name_the_argument():
    rngs, layer = nnx.Rngs(0), _linear()
    kernel = SparseLinear(K, N, block_shape=(4, 4), rngs=rngs).kernel
    with pytest.raises(ValueError, match="in_features must be a positive int"):
        SparseLinear(0, N, rngs=rngs)
    with pytest.raises(ValueError, match="out_features must be a positive int"):
        SparseLinear(K, True, rngs=rngs)
    with pytest.raises(ValueError, match="format must be one of"):
        SparseLinear(K, N, format="csr", rngs=rngs)
    with pytest.raises(ValueError, match="impl must be one of"):
        SparseLinear(K, N, block_shape=(4, 4), impl="fast", rngs=rngs)
    with pytest.raises(ValueError, match=r"layout shape \(16, 24\) must equal"):
        SparseLinear(K, 2 * N, layout=kernel.layout, rngs=rngs)
    with pytest.raises(ValueError, match="block_shape"):
        SparseLinear(K, N, block_shape=(5, 4), rngs=rngs)
    with pytest.raises(ValueError, match="linear must be an nnx.Linear"):
        SparseLinear.from_linear(nnx.Conv(2, 2, (3,), rngs=rngs))
    with pytest.raises(ValueError, match="mask must be boolean"):
        SparseLinear.from_linear(layer, np.ones((K, N)), block_shape=(4, 4))
    with pytest.raises(ValueError, match="mask shape"):
        SparseLinear.from_linear(layer, np.ones((K, 2), bool))
    with pytest.raises(ValueError, match="cannot convert linear.*not 2:4"):
        SparseLinear.from_linear(layer, np.ones((K, N), bool), format="nm")
    with pytest.raises(ValueError, match="kernel must be a pallas_kernels.BSR or NM"):
        SparseLinear.from_sparse(np.ones((K, N)))
    with pytest.raises(ValueError, match=r"bias must have shape \(24,\)"):
        SparseLinear.from_sparse(kernel, jnp.zeros(3))
    with pytest.raises(ValueError, match="x must have 16 features"):
        SparseLinear.from_sparse(kernel)(jnp.zeros((2, 3)))

    model = _MLP(rngs)
    masks = jax.tree.map(lambda p: p != 0, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    with pytest.raises(ValueError, match="model must be an nnx.Module"):
        export_model({"a": 1}, masks)
    with pytest.raises(ValueError, match="masks"):
        export_model(model, {"head": masks["head"]})
    with pytest.raises(ValueError, match="block_shape has no entry for 'hidden/0/kernel'"):
        export_model(model, masks, block_shape={"head/kernel": (4, 4)})
    with pytest.raises(ValueError, match="cannot export head/kernel.*not 2:4"):
        export_model(model, masks, format="nm")
