"""`sparsejax.export`: a trained masked model, exported to BSR / N:M, gives the same outputs.

The model is the quickstart's 1D CNN (tiny): its Dense head is exported to BSR or NM and
its conv kernels are exported as masked dense arrays (documented behaviour). Outputs must
equal the masked dense model's within ``atol = 1e-5`` (float32, logits of size O(1)) and
the predicted classes must agree exactly.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import models
from pallas_kernels import BSR, NM
from sparsejax import algorithms, export, masks, transforms
from sparsejax import nn as snn

_TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def trained():
    """A 4-channel CNN1D trained 30 RigL steps at 90% sparsity on a fixed random task."""
    model = models.CNN1D(channels=4, num_classes=10)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((64, 40, 1)).astype(np.float32))
    y = jnp.asarray(rng.integers(0, 10, 64))
    params = model.init(jax.random.key(0), x[:1])["params"]
    algo = algorithms.get("rigl", sparsity=0.9, update_every_steps=10, end_step=30)
    tx = transforms.masked(optax.adam(1e-2), algo, key=jax.random.key(1))
    state = tx.init(params)
    params = transforms.sparsify(params, state)

    @jax.jit
    def step(params, state):
        loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
            model.apply({"params": p}, x), y
        ).mean()
        grads = jax.grad(loss)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(30):
        params, state = step(params, state)
    return model, params, transforms.get_masks(state), x


def test_export_bsr_matches_masked_model(trained):
    model, params, mask_tree, x = trained
    masked = masks.apply_masks(params, mask_tree)
    want = model.apply({"params": masked}, x)
    # The head kernel is (5 * 4, 10): a (4, 5) block divides it.
    exported = export.export(params, mask_tree, format="bsr", block_shape=(4, 5))
    assert isinstance(exported["dense"]["kernel"], BSR)
    for conv in ("conv1", "conv2", "conv3"):  # convs stay dense, with the mask applied
        kernel = exported[conv]["kernel"]
        assert isinstance(kernel, jax.Array) and kernel.shape == params[conv]["kernel"].shape
        np.testing.assert_array_equal(np.asarray(kernel), np.asarray(masked[conv]["kernel"]))
    np.testing.assert_array_equal(
        np.asarray(exported["dense"]["kernel"].to_dense()), np.asarray(masked["dense"]["kernel"])
    )
    with snn.sparse_dense_calls():
        got = jax.jit(model.apply)({"params": exported}, x)
    chex.assert_trees_all_close(got, want, **_TOL)
    np.testing.assert_array_equal(np.argmax(got, -1), np.argmax(want, -1))
    summary = export.storage_summary(exported)
    assert set(summary) == {"dense/kernel"}
    assert summary["dense/kernel"]["ratio"] > 0


def test_export_nm_matches_masked_model(trained):
    model, params, _, x = trained
    # Replace the head's mask with a 2:4 mask along its input axis (K = 20).
    head = params["dense"]["kernel"]
    head_mask = masks.nm_mask(jnp.abs(head), 2, 4, axis=0)
    mask_tree = jax.tree.map(lambda p: None, params)
    mask_tree["dense"]["kernel"] = head_mask
    masked = masks.apply_masks(params, mask_tree)
    exported = export.export(params, mask_tree, format="nm", n=2, m=4)
    assert isinstance(exported["dense"]["kernel"], NM)
    assert exported["conv1"]["kernel"] is params["conv1"]["kernel"]  # unmasked: untouched
    with snn.sparse_dense_calls():
        got = model.apply({"params": exported}, x)
    chex.assert_trees_all_close(got, model.apply({"params": masked}, x), **_TOL)
    assert export.storage_summary(exported)["dense/kernel"]["ratio"] <= 0.63


def test_export_into_sparse_dense_model():
    """A Dense-only model: params exported from nn.Dense layers fit SparseDense layers."""
    import flax.linen as nn

    class Dense2(nn.Module):
        layer: type = nn.Dense

        @nn.compact
        def __call__(self, x):
            return self.layer(16, name="out")(nn.relu(self.layer(32, name="hidden")(x)))

    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((5, 64)).astype(np.float32))
    params = Dense2().init(jax.random.key(0), x)["params"]
    mask_tree = {
        "hidden": {"kernel": masks.block_mask(params["hidden"]["kernel"], 0.75, (16, 16)),
                   "bias": None},
        "out": {"kernel": masks.block_mask(params["out"]["kernel"], 0.5, (16, 16)), "bias": None},
    }  # fmt: skip
    want = Dense2().apply({"params": masks.apply_masks(params, mask_tree)}, x)
    exported = export.export(params, mask_tree, block_shape=(16, 16))
    sparse_model = Dense2(layer=snn.SparseDense)
    got = jax.jit(sparse_model.apply)({"params": exported}, x)
    chex.assert_trees_all_close(got, want, **_TOL)


def test_export_validation(trained):
    _, params, mask_tree, _ = trained
    with pytest.raises(ValueError, match=r"format must be one of \('bsr', 'nm'\), got 'coo'"):
        export.export(params, mask_tree, format="coo")
    with pytest.raises(ValueError, match=r"cannot export dense/kernel of shape \(20, 10\): "):
        export.export(params, mask_tree, block_shape=(32, 32))
    dense_head = dict(mask_tree, dense={"kernel": np.ones((20, 10), bool), "bias": None})
    with pytest.raises(ValueError, match="cannot export dense/kernel.*not 2:4 along axis 0"):
        export.export(params, dense_head, format="nm")
    with pytest.raises(
        ValueError, match=r"masks must have the structure of params: no entry for params\['conv1'\]"
    ):
        export.export(params, {"dense": mask_tree["dense"]})
    per_path = export.export(params, mask_tree, block_shape={"dense/kernel": (10, 10)})
    assert per_path["dense"]["kernel"].block_shape == (10, 10)


def test_export_convs_runs_the_whole_cnn_sparse(trained):
    """convs=True: every conv kernel becomes the BSR of its im2col matrix, run as patches
    times the sparse matrix; outputs equal the masked dense model's."""
    model, params, mask_tree, x = trained
    masked = masks.apply_masks(params, mask_tree)
    want = model.apply({"params": masked}, x)
    # im2col matrices: conv1 (1 * 5, 4), conv2 and conv3 (4 * 3, 4); the head (20, 10).
    blocks = {"conv1/kernel": (5, 2), "conv2/kernel": (3, 2), "conv3/kernel": (2, 4)}
    blocks["dense/kernel"] = (4, 5)
    exported = export.export(params, mask_tree, block_shape=blocks, convs=True)
    for conv in ("conv1", "conv2", "conv3"):
        kernel = exported[conv]["kernel"]
        assert isinstance(kernel, BSR)
        np.testing.assert_array_equal(
            np.asarray(kernel.to_dense()),
            np.asarray(snn.conv_kernel_matrix(masked[conv]["kernel"])),
        )
    with snn.sparse_dense_calls(impl="xla"):
        got = jax.jit(model.apply)({"params": exported}, x)
    chex.assert_trees_all_close(got, want, **_TOL)
    np.testing.assert_array_equal(np.argmax(got, -1), np.argmax(want, -1))
    assert set(export.storage_summary(exported)) == set(blocks)
    with pytest.raises(ValueError, match="convs=True needs format='bsr', got format='nm'"):
        export.export(params, mask_tree, format="nm", convs=True)
    with pytest.raises(ValueError, match=r"cannot export conv1/kernel .*im2col matrix \(5, 4\)"):
        export.export(params, mask_tree, block_shape=dict(blocks, **{"conv1/kernel": (2, 2)}),
                      convs=True)  # fmt: skip
