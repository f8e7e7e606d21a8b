"""Block-sparse execution: conversion, execution, and training equal to the masked mode."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparsejax import algorithms, transforms
from sparsejax import block_sparse as bs

_TOL = dict(rtol=1e-5, atol=1e-5)


class MLP(nn.Module):
    """Two hidden layers; tanh, whose smoothness keeps two float32 runs close.

    With ReLU, a pre-activation within rounding of zero flips sign between two
    summation orders now and then, and the runs part by ~1e-3 (chaotic, not a bug).
    """

    hidden: int = 256

    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.Dense(self.hidden)(x))
        x = nn.tanh(nn.Dense(self.hidden)(x))
        return nn.Dense(10)(x)


def _data(n=512, d=128, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((n, d)), jnp.float32)
    return x, jnp.asarray(rng.integers(0, 10, n))


def _loss_fn(model):
    def loss(p, batch):
        logits = model.apply({"params": p}, batch[0])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

    return loss


def _algo(name="rigl", block=(32, 32), **kw):
    kw = {"sparsity": 0.9, "keep_dense": ("Dense_2",), "structure": "block", **kw}
    if name != "static":
        kw = {"update_every_steps": 20, "end_step": 150, "drop_fraction": 0.3, **kw}
    return algorithms.get(name, block_shape=block, **kw)


def _batch(x, y, t, size=64):
    i = (t * size) % x.shape[0]
    return x[i : i + size], y[i : i + size]


def _setup(seed=1):
    model = MLP()
    x, y = _data()
    params = model.init(jax.random.key(seed), x[:1])["params"]
    return model, params, x, y


@pytest.fixture(autouse=True)
def _fresh_trace_counter():
    # assert_max_traces counts by the step's code, shared by every test here.
    chex.clear_trace_counter()


def _is_layout(x):
    return isinstance(x, (bs.CooBlocks, bs.FanInBlocks))


def _same_masks(a, b):
    return all(bool(jnp.array_equal(u, v)) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ----------------------------------------------------------------------------- conversion


@pytest.mark.parametrize("name", ["rigl", "static"])
def test_coo_conversion_keeps_the_masked_modes_initial_blocks(name):
    algo = _algo(name)
    _, params, _, _ = _setup()
    key = jax.random.key(3)
    values, layouts = bs.to_block_sparse(params, algo, key=key)
    opt_state = transforms.masked(optax.adam(1e-3), algo, key=key).init(params)
    masks = transforms.get_masks(opt_state)
    assert _same_masks(bs.masks_from_layouts(layouts), masks)
    chex.assert_trees_all_equal(
        bs.to_dense(values, layouts), transforms.sparsify(params, opt_state)
    )
    # Only kept blocks are stored: the values of a layer hold its exact kept count.
    for lay, m in zip(jax.tree.leaves(layouts, is_leaf=_is_layout), jax.tree.leaves(masks)):
        assert lay.rows.shape[0] * 32 * 32 == int(m.sum())
    assert values["Dense_2"]["kernel"].shape == params["Dense_2"]["kernel"].shape


def test_fan_in_conversion_has_constant_fan_in_preferring_the_initial_blocks():
    algo = _algo()
    _, params, _, _ = _setup()
    values, layouts = bs.to_block_sparse(params, algo, key=jax.random.key(3), layout="fan_in")
    masks = algo.init_masks(params, jax.random.split(jax.random.key(3))[0])
    for name in ("Dense_0", "Dense_1"):
        lay, grid = layouts[name]["kernel"], np.asarray(masks[name]["kernel"])[::32, ::32]
        nbc, f = lay.rows.shape
        assert f == max(1, round(grid.sum() / nbc))
        rows = np.asarray(lay.rows)
        assert all(len(set(r)) == f for r in rows)  # distinct rows in every column
        for j in range(nbc):  # a column keeps the initial mask's blocks while they last
            chosen, initial = set(rows[j]), set(np.nonzero(grid[:, j])[0])
            assert chosen <= initial if len(initial) >= f else initial <= chosen
        assert values[name]["kernel"].shape == (nbc, f, 32, 32)
    dense = bs.to_dense(values, layouts)
    mask = bs.masks_from_layouts(layouts)["Dense_0"]["kernel"]
    np.testing.assert_array_equal(dense["Dense_0"]["kernel"], params["Dense_0"]["kernel"] * mask)


def test_conversion_refuses_what_it_cannot_hold():
    _, params, _, _ = _setup()
    with pytest.raises(ValueError, match="gradual pruning"):
        bs.to_block_sparse(
            params,
            algorithms.get(
                "magnitude", structure="block", block_shape=(32, 32), keep_dense=("Dense_2",)
            ),
        )
    with pytest.raises(ValueError, match="structure='block'"):
        bs.to_block_sparse(params, algorithms.get("rigl", sparsity=0.9))
    with pytest.raises(ValueError, match="layout must be one of"):
        bs.to_block_sparse(params, _algo(), layout="csr")
    conv = {"conv": {"kernel": jnp.ones((3, 32, 32)), "bias": jnp.zeros(32)}}
    algo3 = algorithms.get("static", structure="block", block_shape=(32, 32), sparsity=0.5)
    with pytest.raises(ValueError, match="conv/kernel .* 2-D nn.Dense kernels"):
        bs.to_block_sparse(conv, algo3)
    unblocked = jax.tree.map(lambda p: p, params)
    masks = jax.tree.map(lambda p: None, params)
    masks["Dense_0"]["kernel"] = np.eye(128, 256, dtype=bool)
    with pytest.raises(ValueError, match="not constant on"):
        bs.to_block_sparse(unblocked, _algo(), masks=masks)


# ----------------------------------------------------------------------------- execution


@pytest.mark.parametrize("layout", ["coo", "fan_in"])
def test_calls_run_the_dense_model_of_the_blocks(layout):
    model, params, x, y = _setup()
    values, layouts = bs.to_block_sparse(params, _algo(block=(16, 32)), layout=layout)
    dense = bs.to_dense(values, layouts)
    xs = x[:6].reshape(2, 3, -1)  # leading axes pass through

    @jax.jit
    def sparse_apply(v, lays, x):
        with bs.block_sparse_calls(lays):
            return model.apply({"params": v}, x)

    chex.assert_trees_all_close(
        sparse_apply(values, layouts, xs), model.apply({"params": dense}, xs), **_TOL
    )
    loss = _loss_fn(model)

    def sparse_loss(v):
        with bs.block_sparse_calls(layouts):
            return loss(v, (x[:32], y[:32]))

    # Values gradients are the dense gradient read at the stored blocks.
    g_values = jax.grad(sparse_loss)(values)
    g_dense = jax.grad(loss)(dense, (x[:32], y[:32]))
    masks = bs.masks_from_layouts(layouts)
    chex.assert_trees_all_close(
        bs.to_dense(g_values, layouts),
        jax.tree.map(
            lambda g, m: g if m is None else g * m, g_dense, masks, is_leaf=lambda t: t is None
        ),
        **_TOL,
    )
    # The probe gives the dense gradient everywhere, absent blocks included.
    probe = jax.jit(lambda v: bs.dense_gradients(loss, v, layouts, (x[:32], y[:32])))(values)
    chex.assert_trees_all_close(probe, g_dense, **_TOL)


def test_calls_check_the_layer_shape():
    model, params, x, _ = _setup()
    values, layouts = bs.to_block_sparse(params, _algo())
    with pytest.raises(ValueError, match="do not match its block layout"):
        with bs.block_sparse_calls(layouts):
            MLP(hidden=128).apply({"params": values}, x[:2])


# ----------------------------------------------------------------------------- training


def _masked_step(loss, tx):
    @jax.jit
    def step(p, o, batch):
        value, g = jax.value_and_grad(loss)(p, batch)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, value

    return step


@pytest.mark.parametrize(
    ("name", "block", "steps"), [("rigl", (32, 32), 200), ("set", (16, 16), 80)]
)
def test_coo_training_equals_the_masked_mode(name, block, steps):
    algo = _algo(name, block=block)
    model, params, x, y = _setup()
    loss, key = _loss_fn(model), jax.random.key(7)
    values, layouts = bs.to_block_sparse(params, algo, key=key)
    tx = bs.sparse_blocks(optax.adam(1e-3), algo, layouts, key=key)
    opt_state = tx.init(values)
    step = jax.jit(chex.assert_max_traces(bs.make_train_step(loss, tx), n=1))
    masked_tx = transforms.masked(optax.adam(1e-3), algo, key=key)
    m_state = masked_tx.init(params)
    m_params, m_step = transforms.sparsify(params, m_state), _masked_step(loss, masked_tx)
    changed = []
    for t in range(steps):
        batch = _batch(x, y, t)
        before = bs.masks_from_layouts(bs.get_layouts(opt_state))
        values, opt_state, _ = step(values, opt_state, batch)
        m_params, m_state, _ = m_step(m_params, m_state, batch)
        after = bs.masks_from_layouts(bs.get_layouts(opt_state))
        assert _same_masks(after, transforms.get_masks(m_state)), f"blocks differ at step {t}"
        if not _same_masks(before, after):
            changed.append(t)
    # Blocks move on update steps only (late ones may swap none: the drop fraction decays).
    assert changed and all(algo.is_update_step(t) for t in changed), changed
    dense = bs.to_dense(values, bs.get_layouts(opt_state))
    for a, b in zip(jax.tree.leaves(dense), jax.tree.leaves(m_params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(b))))


def test_update_step_grows_zero_blocks_with_zero_moments_and_skips_the_step():
    algo = _algo()
    model, params, x, y = _setup()
    values, layouts = bs.to_block_sparse(params, algo)
    tx = bs.sparse_blocks(optax.adam(1e-3), algo, layouts)
    opt_state = tx.init(values)
    step = jax.jit(bs.make_train_step(_loss_fn(model), tx))
    for t in range(20):
        values, opt_state, _ = step(values, opt_state, _batch(x, y, t))
    old_lay, old_vals = bs.get_layouts(opt_state)["Dense_1"]["kernel"], values
    new_vals, opt_state, _ = step(values, opt_state, _batch(x, y, 20))  # count 20: an update
    lay = bs.get_layouts(opt_state)["Dense_1"]["kernel"]
    moved = np.asarray((lay.rows != old_lay.rows) | (lay.cols != old_lay.cols))
    assert moved.any()
    v_new, v_old = (
        np.asarray(new_vals["Dense_1"]["kernel"]),
        np.asarray(old_vals["Dense_1"]["kernel"]),
    )
    np.testing.assert_array_equal(v_new[moved], 0.0)
    np.testing.assert_array_equal(v_new[~moved], v_old[~moved])  # step skipped: unchanged
    np.testing.assert_array_equal(new_vals["Dense_1"]["bias"], old_vals["Dense_1"]["bias"])
    adam = opt_state.inner_state[0]
    for slot in (adam.mu, adam.nu):
        kernel = np.asarray(slot["Dense_1"]["kernel"])
        np.testing.assert_array_equal(kernel[moved], 0.0)
        assert np.all(kernel[~moved].any(axis=(1, 2)))
        # The optimizer state holds values-shaped slots only, no dense kernel.
        chex.assert_trees_all_equal_shapes(slot, values)


def test_fan_in_training_keeps_exact_fan_in_in_one_trace():
    # f of 2 to 5 blocks a column, so round(f(t) * f) swaps some at every update.
    algo = _algo(block=(16, 16), sparsity=0.7, drop_fraction=0.5)
    model, params, x, y = _setup()
    values, layouts = bs.to_block_sparse(params, algo, layout="fan_in")
    tx = bs.sparse_blocks(optax.adam(3e-3), algo, layouts)
    opt_state = tx.init(values)
    step = jax.jit(chex.assert_max_traces(bs.make_train_step(_loss_fn(model), tx), n=1))
    first, losses, moves = bs.get_layouts(opt_state), [], 0
    for t in range(120):
        prev = bs.get_layouts(opt_state)
        values, opt_state, loss = step(values, opt_state, _batch(x, y, t % 2))
        losses.append(float(loss))
        for a, b in zip(jax.tree.leaves(prev), jax.tree.leaves(bs.get_layouts(opt_state))):
            moves += int(jnp.sum(jnp.sort(a, axis=1) != jnp.sort(b, axis=1)))
    for lay0, lay in zip(
        jax.tree.leaves(first, is_leaf=_is_layout),
        jax.tree.leaves(bs.get_layouts(opt_state), is_leaf=_is_layout),
    ):
        rows = np.asarray(lay.rows)
        assert rows.shape == lay0.rows.shape  # exact per-column counts
        assert all(len(set(r)) == rows.shape[1] for r in rows)
    for mask in jax.tree.leaves(bs.masks_from_layouts(bs.get_layouts(opt_state))):
        grid = np.asarray(mask)[::16, ::16]
        np.testing.assert_array_equal(grid.sum(axis=0), grid.sum(axis=0)[0])
    assert moves > 0
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10])


@pytest.mark.parametrize("layout", ["coo", "fan_in"])
def test_the_update_cond_carries_block_positions_not_values_or_moments(layout):
    # Ordinary steps must not pass values and Adam moments through a cond (a copy of the
    # whole state every step on XLA:CPU); the dense gradient stays inside it.
    algo = _algo()
    model, params, x, y = _setup()
    values, layouts = bs.to_block_sparse(params, algo, layout=layout)
    tx = bs.sparse_blocks(optax.adam(1e-3), algo, layouts)
    opt_state = tx.init(values)
    step = bs.make_train_step(_loss_fn(model), tx)
    jaxpr = jax.make_jaxpr(step)(values, opt_state, _batch(x, y, 0))
    conds = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "cond"]
    assert len(conds) == 1
    assert {str(v.aval.dtype) for v in conds[0].outvars} == {"int32", "bool"}
    # The branch taken on update steps holds the dense products of the dense gradient.
    update_branch = str(conds[0].params["branches"][1])
    assert "dot_general" in update_branch


def test_static_training_keeps_its_blocks():
    algo = _algo("static")
    model, params, x, y = _setup()
    values, layouts = bs.to_block_sparse(params, algo)
    tx = bs.sparse_blocks(optax.sgd(0.1), algo, layouts)
    opt_state = tx.init(values)
    step = jax.jit(bs.make_train_step(_loss_fn(model), tx))
    for t in range(3):
        values, opt_state, _ = step(values, opt_state, _batch(x, y, t))
    chex.assert_trees_all_equal(bs.get_layouts(opt_state), layouts)
    assert int(opt_state.count) == 3


def test_transform_refusals():
    algo = _algo()
    _, params, _, _ = _setup()
    values, layouts = bs.to_block_sparse(params, algo)
    tx = bs.sparse_blocks(optax.adam(1e-3), algo, layouts)
    with pytest.raises(ValueError, match="needs values of shape"):
        tx.init(params)
    state = tx.init(values)
    grads = jax.tree.map(jnp.zeros_like, values)
    with pytest.raises(ValueError, match="needs dense_grads"):
        tx.update(grads, state, values)
    with pytest.raises(ValueError, match="needs params"):
        tx.update(grads, state)
    with pytest.raises(ValueError, match="no SparseBlocksState"):
        bs.get_layouts(optax.adam(1e-3).init(values))
    with pytest.raises(ValueError, match="structure='block'"):
        bs.sparse_blocks(optax.adam(1e-3), algorithms.get("snfs", sparsity=0.9), layouts)
    with pytest.raises(ValueError, match="must be an optax.GradientTransformation"):
        bs.sparse_blocks(lambda g: g, algo, layouts)
