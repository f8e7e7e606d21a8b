"""N:M training methods: STE, SR-STE, S-STE, Bi-Mask, decaying masks, one-shot, export."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pallas_kernels import NM
from sparsejax import algorithms, export, masks, transforms
from sparsejax.algorithms import nm_bimask, nm_ste
from tests.sparsejax.algorithms.conftest import loss


def _groups_of(mask, m, axis=-2):
    moved = np.moveaxis(np.asarray(mask), axis, -1)
    return moved.reshape(*moved.shape[:-1], moved.shape[-1] // m, m)


def _train(params, x, y, algo, steps, lr=0.05, opt=None):
    """Runs ``steps`` masked steps; returns params, state and the masks after each step."""
    tx = transforms.masked(opt or optax.sgd(lr, momentum=0.9), algo)
    state = tx.init(params)
    if not algo.straight_through:
        params = transforms.sparsify(params, state)

    @jax.jit
    def step(p, s):
        def objective(q):
            forward = algo.forward_params_with_state(q, transforms.get_masks(s), s.algo_state)
            return loss(forward, x, y)

        u, s = tx.update(jax.grad(objective)(p), s, p)
        return optax.apply_updates(p, u), s

    history = [transforms.get_masks(state)]
    for _ in range(steps):
        before = params
        params, state = step(params, state)
        history.append(transforms.get_masks(state))
    _train.params_before_last_step = before
    return params, state, history


def test_sr_ste_gradient_is_the_papers_formula():
    """dL/dW = dL/dW~ (at W~ = E ⊙ W) + lambda_w * (1 - E) ⊙ W, Zhou et al. 2021 Eq. (5)."""
    w = jnp.array([[0.5, -1.0], [0.1, 2.0], [-0.3, 0.2], [0.4, -0.05]])
    mask = masks.nm_mask(jnp.abs(w), 2, 4, axis=0)
    x = jnp.array([[1.0, 2.0, -1.0, 0.5], [0.3, -0.2, 0.7, 1.0]])
    lam = 0.1

    def objective(w_sparse):  # a nonlinear loss of the forward weights
        return jnp.sum(jnp.tanh(x @ w_sparse) ** 2)

    got = jax.grad(lambda v: objective(nm_ste.sr_ste_weights(v, mask, lam)))(w)
    w_tilde = jnp.where(mask, w, 0.0)
    h = jnp.tanh(x @ w_tilde)
    dl_dwtilde = x.T @ (2 * h * (1 - h**2))  # by hand
    expected = dl_dwtilde + lam * jnp.where(mask, 0.0, w)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    # Pruned entries differ from plain STE by exactly lambda_w * w; kept ones not at all.
    ste = jax.grad(lambda v: objective(nm_ste.sr_ste_weights(v, mask, 0.0)))(w)
    np.testing.assert_allclose(got - ste, lam * jnp.where(mask, 0.0, w), atol=1e-7)
    # The forward value is the N:M weight.
    np.testing.assert_array_equal(nm_ste.sr_ste_weights(w, mask, lam), w_tilde)


def test_sr_ste_algorithm_uses_lambda_w_on_pruned_weights(problem):
    params, x, y = problem
    algo = algorithms.get("sr_ste", n=1, m=4, lambda_w=0.5)
    state = algo.init_state(params)
    g_sr = jax.jit(jax.grad(lambda p: loss(algo.forward_params(p, state.masks), x, y)))(params)
    ste = algorithms.get("nm_ste", n=1, m=4)
    g_ste = jax.jit(jax.grad(lambda p: loss(ste.forward_params(p, state.masks), x, y)))(params)
    for k in ("l1", "l2"):
        m, w = state.masks[k]["kernel"], params[k]["kernel"]
        np.testing.assert_allclose(
            g_sr[k]["kernel"] - g_ste[k]["kernel"], 0.5 * jnp.where(m, 0.0, w), atol=1e-6
        )
    np.testing.assert_array_equal(g_sr["l1"]["bias"], g_ste["l1"]["bias"])


@pytest.mark.parametrize("name", ["nm_ste", "sr_ste", "s_ste", "bimask"])
def test_straight_through_methods_keep_dense_weights_and_nm_forward(problem, name):
    params, x, y = problem
    algo = algorithms.get(name, n=2, m=4)
    p, state, history = _train(params, x, y, algo, steps=6)
    # The last step ran on the masks of the weights it started from.
    before = _train.params_before_last_step
    forward = algo.forward_params_with_state(before, transforms.get_masks(state), state.algo_state)
    for k in ("l1", "l2"):
        kernel = forward[k]["kernel"]
        mask = transforms.get_masks(state)[k]["kernel"]
        np.testing.assert_array_equal(_groups_of(mask, 4).sum(-1), 2)
        assert np.all(np.asarray(kernel)[~np.asarray(mask)] == 0)  # the forward pass is N:M
        assert np.count_nonzero(np.asarray(p[k]["kernel"])) == p[k]["kernel"].size  # dense
        # Step t's mask is the magnitude N:M mask of the dense weights it starts from.
        w_then = before[k]["kernel"]
        np.testing.assert_array_equal(mask, masks.nm_mask(jnp.abs(w_then), 2, 4, -2))
    # The flip rate metric is the mean of the per-step mask changes.
    flips = [float(nm_ste.nm_flip_rate(a, b)) for a, b in zip(history[:-1], history[1:])]
    metrics = algo.metrics(state.algo_state)
    np.testing.assert_allclose(metrics["mask_flip_rate_mean"], np.mean(flips), rtol=1e-5)
    assert 0.0 <= float(metrics["mask_flip_rate"]) <= 1.0


def test_sr_ste_with_zero_lambda_is_ste(problem):
    params, x, y = problem
    a, _, _ = _train(params, x, y, algorithms.get("nm_ste", n=1, m=4), steps=4)
    b, _, _ = _train(params, x, y, algorithms.get("sr_ste", n=1, m=4, lambda_w=0.0), steps=4)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_nm_flip_rate_counts_changed_entries():
    old = {"a": jnp.array([True, False, True, False]), "b": None}
    new = {"a": jnp.array([False, False, True, True]), "b": None}
    assert float(nm_ste.nm_flip_rate(old, new)) == 0.5
    assert float(nm_ste.nm_flip_rate(old, old)) == 0.0


def test_transposable_option_gives_nm_along_both_axes(problem):
    params, x, y = problem
    algo = algorithms.get("nm_ste", n=2, m=4, transposable=True)
    _, state, _ = _train(params, x, y, algo, steps=3)
    for k in ("l1", "l2"):
        mask = transforms.get_masks(state)[k]["kernel"]
        np.testing.assert_array_equal(_groups_of(mask, 4, -2).sum(-1), 2)
        np.testing.assert_array_equal(_groups_of(mask, 4, -1).sum(-1), 2)


def test_soft_threshold_formula_and_continuity():
    w = jnp.array([[0.9, -0.2, 0.5, -0.7], [0.1, 0.1, -0.3, 0.0]]).T  # groups along axis 0
    s = nm_ste.soft_threshold_nm(w, 2, 4, axis=0)
    # Column 0: |w| = .9 .2 .5 .7, threshold .5 -> (.4, 0, 0, -.2).
    np.testing.assert_allclose(s[:, 0], [0.4, 0.0, 0.0, -0.2], atol=1e-7)
    # Column 1: |w| = .1 .1 .3 0, threshold .1 -> (0, 0, -.2, 0).
    np.testing.assert_allclose(s[:, 1], [0.0, 0.0, -0.2, 0.0], atol=1e-7)
    # Never more than n nonzeros per group; n == m is the identity.
    big = jax.random.normal(jax.random.key(0), (8, 5))
    assert np.all((_groups_of(nm_ste.soft_threshold_nm(big, 2, 4), 4) != 0).sum(-1) <= 2)
    np.testing.assert_array_equal(nm_ste.soft_threshold_nm(big, 4, 4), big)
    # Continuous: a tiny change of the weights moves S(w) by at most about as much
    # (unlike the hard N:M mask, which can jump by a whole weight).
    eps = 1e-4 * jax.random.normal(jax.random.key(1), big.shape)
    soft = nm_ste.soft_threshold_nm
    jump = jnp.max(jnp.abs(soft(big + eps, 2, 4) - soft(big, 2, 4)))
    assert float(jump) <= 2 * float(jnp.max(jnp.abs(eps))) + 1e-7


def test_s_ste_scale_is_frozen_least_squares_and_backward_is_scaled_identity(problem):
    params, x, y = problem
    algo = algorithms.get("s_ste", n=2, m=4)
    state0 = algo.init_state(params)
    w = params["l1"]["kernel"]
    s = nm_ste.soft_threshold_nm(w, 2, 4)
    beta = float(jnp.sum(w * s) / jnp.sum(s * s))
    np.testing.assert_allclose(state0.scales["l1"]["kernel"], beta, rtol=1e-5)
    assert beta > 1.0  # shrinking lowers the norm; the scale restores it
    _, state, _ = _train(params, x, y, algo, steps=4)
    jax.tree.map(np.testing.assert_array_equal, state.algo_state.scales, state0.scales)

    def through(p):
        return jnp.sum(algo.forward_params_with_state(p, state0.masks, state0)["l1"]["kernel"])

    grad = jax.grad(through)(params)["l1"]["kernel"]
    np.testing.assert_allclose(grad, jnp.full_like(w, beta), rtol=1e-5)


def test_bidirectional_matmul_value_and_gradients():
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (3, 5, 8))
    w = jax.random.normal(kw, (8, 8))
    fwd = masks.nm_mask(jnp.abs(w), 2, 4, axis=0)
    bwd = masks.nm_mask(jnp.abs(w), 2, 4, axis=1)
    g = jax.random.normal(jax.random.key(2), (3, 5, 8))
    y, vjp = jax.vjp(lambda a, b: nm_bimask.bidirectional_matmul(a, b, fwd, bwd), x, w)
    np.testing.assert_allclose(y, x @ jnp.where(fwd, w, 0.0), rtol=1e-5, atol=1e-5)
    dx, dw = vjp(g)
    np.testing.assert_allclose(dx, g @ jnp.where(bwd, w, 0.0).T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, x.reshape(-1, 8).T @ g.reshape(-1, 8), rtol=1e-5, atol=1e-4)
    # jit gives the same.
    bimm = nm_bimask.bidirectional_matmul
    dx_jit, _ = jax.jit(lambda a, b: jax.vjp(lambda p, q: bimm(p, q, fwd, bwd), a, b)[1](g))(x, w)
    np.testing.assert_allclose(dx_jit, dx, rtol=1e-5, atol=1e-5)


def test_bimask_context_changes_only_the_input_gradient_of_flax_dense_layers():
    from experiments import models  # a Flax MLP with hidden_0, hidden_1, output

    model = models.get_model("mlp", num_classes=10, features=(16, 16))
    x = jax.random.normal(jax.random.key(1), (5, 40, 1))
    params = model.init(jax.random.key(0), x)["params"]
    algo = algorithms.get("bimask", n=2, m=4)
    state = algo.init_state(params)

    def objective(p, bidirectional):
        forward = algo.forward_params_with_state(p, state.masks, state)
        if not bidirectional:
            return jnp.sum(model.apply({"params": forward}, x) ** 2)
        with algo.model_context(p, state.masks, state):
            return jnp.sum(model.apply({"params": forward}, x) ** 2)

    value_and_grad = jax.jit(jax.value_and_grad(objective), static_argnums=1)
    (l1, g1), (l0, g0) = (value_and_grad(params, b) for b in (True, False))
    np.testing.assert_allclose(l1, l0, rtol=1e-6)  # same forward pass
    # The last two layers' weight gradients are X^T dY either way; hidden_0's input is
    # reached through hidden_1's backward mask, so its gradient changes.
    np.testing.assert_allclose(g1["output"]["kernel"], g0["output"]["kernel"], rtol=1e-5)
    np.testing.assert_allclose(g1["hidden_1"]["kernel"], g0["hidden_1"]["kernel"], rtol=1e-5)
    assert float(jnp.max(jnp.abs(g1["hidden_0"]["kernel"] - g0["hidden_0"]["kernel"]))) > 1e-4
    backward = algo.backward_masks(params)
    assert backward["output"]["kernel"] is None  # 10 outputs: not 2:4 along the output axis
    np.testing.assert_array_equal(_groups_of(backward["hidden_1"]["kernel"], 4, -1).sum(-1), 2)


def test_mask_decay_schedules():
    lin = algorithms.get("nm_decay", decay_schedule="mask_linear", begin_step=10, end_step=30)
    np.testing.assert_allclose(
        [float(lin.alpha(t)) for t in (0, 10, 20, 29, 30, 99)],
        [1.0, 1.0, 0.5, 0.05, 0.0, 0.0],
        atol=1e-6,
    )
    exp = algorithms.get("nm_decay", end_step=100, decay_intervals=4, decay_rate=0.5)
    np.testing.assert_allclose(
        [float(exp.alpha(t)) for t in (0, 24, 25, 50, 99, 100)], [1.0, 1.0, 0.5, 0.25, 0.125, 0.0]
    )
    st = algorithms.get("nm_decay", n=1, m=8, decay_schedule="structure", end_step=40)
    assert st.stages() == (8, 4, 2, 1)
    assert [int(st.n_at(t)) for t in (0, 9, 10, 20, 30, 39, 40, 500)] == [8, 8, 4, 2, 1, 1, 1, 1]


def test_mask_decay_forward_scales_pruned_weights_and_their_gradient(problem):
    params, _, _ = problem
    algo = algorithms.get("nm_decay", n=1, m=4, decay_schedule="mask_linear", end_step=100)
    state = algo.init_state(params)._replace(num_steps=jnp.asarray(25, jnp.int32))
    mask = state.masks["l1"]["kernel"]
    forward = algo.forward_params_with_state(params, state.masks, state)
    w = params["l1"]["kernel"]
    np.testing.assert_allclose(forward["l1"]["kernel"], jnp.where(mask, w, 0.75 * w), rtol=1e-6)
    grad = jax.grad(
        lambda p: jnp.sum(algo.forward_params_with_state(p, state.masks, state)["l1"]["kernel"])
    )(params)["l1"]["kernel"]
    np.testing.assert_allclose(grad, jnp.where(mask, 1.0, 0.75), rtol=1e-6)
    # After the decay window the forward pass is exactly N:M.
    done = state._replace(num_steps=jnp.asarray(100, jnp.int32))
    final = algo.forward_params_with_state(params, done.masks, done)["l1"]["kernel"]
    np.testing.assert_array_equal(final, jnp.where(mask, w, 0.0))


def test_structure_decay_trains_through_the_stages_to_exact_nm(problem):
    params, x, y = problem
    algo = algorithms.get("nm_decay", n=1, m=4, decay_schedule="structure", end_step=6)
    _, state, history = _train(params, x, y, algo, steps=8)
    kept = [int(np.asarray(h["l1"]["kernel"]).sum()) for h in history]
    size = params["l1"]["kernel"].size
    assert kept[0] == size  # stage 4:4
    assert size // 2 in kept  # stage 2:4
    assert kept[-1] == size // 4  # 1:4 at the end
    np.testing.assert_array_equal(_groups_of(history[-1]["l1"]["kernel"], 4).sum(-1), 1)


def test_one_shot_prunes_once_and_keeps_pruned_weights_at_zero(problem):
    params, x, y = problem
    algo = algorithms.get("nm_oneshot", n=1, m=4, begin_step=3)
    p, state, history = _train(params, x, y, algo, steps=8, opt=optax.adam(1e-2))
    assert all(bool(np.asarray(h["l1"]["kernel"]).all()) for h in history[:3])
    final = history[-1]
    for h in history[4:]:
        jax.tree.map(np.testing.assert_array_equal, h, final)  # fixed after pruning
    for k in ("l1", "l2"):
        mask = np.asarray(final[k]["kernel"])
        np.testing.assert_array_equal(_groups_of(mask, 4).sum(-1), 1)
        assert np.all(np.asarray(p[k]["kernel"])[~mask] == 0)


def test_nm_methods_declare_their_pattern_and_others_none():
    for name in ("nm_ste", "sr_ste", "s_ste", "bimask", "nm_decay", "nm_oneshot"):
        assert algorithms.get(name, n=1, m=8).nm_pattern() == (1, 8), name
    for name in ("dense", "rigl", "srigl", "magnitude"):
        assert algorithms.get(name).nm_pattern() is None, name


def test_trained_nm_model_exports_to_the_compressed_format(problem):
    params, x, y = problem
    algo = algorithms.get("sr_ste", n=2, m=4)
    p, state, _ = _train(params, x, y, algo, steps=3)
    exported = export.export_trained(p, state, algo)
    for k in ("l1", "l2"):
        leaf = exported[k]["kernel"]
        assert isinstance(leaf, NM) and (leaf.n, leaf.m) == (2, 4)
        # The model computes with the N:M mask of its current weights (the stored masks
        # are those of the weights the last step started from), and so does the export.
        mask = masks.nm_mask(jnp.abs(p[k]["kernel"]), 2, 4, -2)
        np.testing.assert_array_equal(leaf.to_dense(), jnp.where(mask, p[k]["kernel"], 0.0))
        forward = algo.forward_params_with_state(p, transforms.get_masks(state), state.algo_state)
        np.testing.assert_array_equal(leaf.to_dense(), forward[k]["kernel"])
    np.testing.assert_array_equal(exported["l1"]["bias"], p["l1"]["bias"])


@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        ("nm_ste", {"n": 5, "m": 4}, "n must be <= m, got n=5, m=4"),
        ("nm_ste", {"n": 0}, "n must be a positive integer, got 0"),
        ("nm_ste", {"axis": 1.5}, "axis must be an integer, got axis=1.5"),
        ("sr_ste", {"lambda_w": -1.0}, "lambda_w must be >= 0, got lambda_w=-1.0"),
        ("nm_decay", {"decay_schedule": "cubic"}, "decay_schedule must be one of"),
        ("nm_decay", {"begin_step": 5, "end_step": 5}, "end_step must be > begin_step"),
        ("nm_decay", {"decay_rate": 1.0}, "decay_rate must be in"),
        ("nm_oneshot", {"begin_step": -1}, "begin_step must be a non-negative integer"),
        ("s_ste", {"transposable": True}, "transposable=True is not supported"),
    ],
)
def test_bad_hyperparameters_raise_naming_them(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        algorithms.get(name, **kwargs)


def test_a_leaf_that_m_does_not_divide_is_named(problem):
    params, _, _ = problem  # l1 kernel (12, 16), l2 kernel (16, 4)
    with pytest.raises(ValueError, match=r"l1/kernel of shape \(12, 16\) cannot be 1:8 along"):
        algorithms.get("nm_ste", n=1, m=8).init_masks(params, None)
    # keep_dense names the way out, and then the other layer is 1:8.
    got = algorithms.get("nm_ste", n=1, m=8, keep_dense=("l1",)).init_masks(params, None)
    assert got["l1"]["kernel"] is None
    np.testing.assert_array_equal(_groups_of(got["l2"]["kernel"], 8).sum(-1), 1)


@pytest.mark.parametrize(
    "name, kwargs",
    [("sr_ste", {}), ("nm_decay", {"decay_schedule": "structure", "end_step": 4})],
)
def test_masked_update_is_the_same_under_jit(problem, name, kwargs):
    params, x, y = problem
    algo = algorithms.get(name, n=1, m=4, **kwargs)
    tx = transforms.masked(optax.sgd(0.1), algo)

    def step(p, s):
        def objective(q):
            return loss(
                algo.forward_params_with_state(q, transforms.get_masks(s), s.algo_state), x, y
            )

        return tx.update(jax.grad(objective)(p), s, p)

    state = tx.init(params)
    for _ in range(2):  # the second step sees a mask update from trained weights
        eager = step(params, state)
        jitted = jax.jit(step)(params, state)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), eager, jitted
        )
        params, state = optax.apply_updates(params, eager[0]), eager[1]
