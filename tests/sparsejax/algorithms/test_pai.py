"""Pruning at initialization: GraSP, SynFlow and SNIP scores and masks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparsejax import algorithms, masks, scores, transforms
from tests.sparsejax.algorithms.conftest import apply, loss, xent

EPS = 1e-5


def _flat(tree):
    return jnp.concatenate([jnp.ravel(v) for v in jax.tree.leaves(tree)])


def _to64(tree):
    return jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), tree)


def test_snip_scores_match_finite_differences(problem):
    # Float64 so the central differences are accurate to many digits.
    with jax.enable_x64(True):
        _check_snip(*map(_to64, problem[:2]), problem[2])


def test_grasp_scores_match_finite_difference_hessian_vector_product(problem):
    with jax.enable_x64(True):
        _check_grasp(*map(_to64, problem[:2]), problem[2])


def _check_snip(params, x, y):
    saliency = scores.saliency(params, jax.grad(loss)(params, x, y))
    # |dL/dc| for a mask c multiplying one weight, by central differences in c.
    kernel = params["l1"]["kernel"]
    for i, j in [(0, 0), (3, 5), (11, 15)]:

        def loss_at(c, i=i, j=j):
            scaled = kernel.at[i, j].multiply(c)
            return loss({**params, "l1": {**params["l1"], "kernel": scaled}}, x, y)

        fd = (loss_at(1.0 + EPS) - loss_at(1.0 - EPS)) / (2 * EPS)
        np.testing.assert_allclose(saliency["l1"]["kernel"][i, j], abs(fd), rtol=1e-6)


def _check_grasp(params, x, y):
    loss_fn = lambda p: loss(p, x, y)  # noqa: E731
    keep = scores.grasp(loss_fn, params)
    g = jax.grad(loss_fn)(params)
    # H g by central differences of the gradient along g.
    plus = jax.grad(loss_fn)(jax.tree.map(lambda p, v: p + EPS * v, params, g))
    minus = jax.grad(loss_fn)(jax.tree.map(lambda p, v: p - EPS * v, params, g))
    hg = jax.tree.map(lambda a, b: (a - b) / (2 * EPS), plus, minus)
    expected = jax.tree.map(lambda w, h: w * h, params, hg)
    np.testing.assert_allclose(_flat(keep), _flat(expected), rtol=1e-5, atol=1e-10)


def test_synflow_is_data_free_and_positive(problem):
    params, x, y = problem
    algo = algorithms.get("synflow", sparsity=0.9, rounds=5)
    key = jax.random.key(1)
    a = algo.masks_from_model(params, key=key, apply_fn=apply, input_shape=(12,))
    # Any loss or data given alongside changes nothing: SynFlow never looks at them.
    b = algo.masks_from_model(params, key=key, apply_fn=apply, batch=(x, y), loss_fn=xent)
    for m1, m2 in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(m1, m2)
    s = scores.synflow(apply, params, (12,))
    assert all(bool(jnp.all(v >= 0)) for v in jax.tree.leaves(s))
    # The score is |w| * dR/d|w|, so scaling the input scales every score alike.
    s2 = scores.synflow(lambda p, z: apply(p, 2.0 * z), params, (12,))
    np.testing.assert_allclose(_flat(s2)[_flat(s) > 0] / _flat(s)[_flat(s) > 0], 2.0, rtol=1e-4)


@pytest.mark.parametrize(
    "name, distribution", [("grasp", "global"), ("synflow", "uniform"), ("synflow", "erk")]
)
def test_model_masks_have_exact_counts_and_train_sparse(problem, name, distribution):
    params, x, y = problem
    algo = algorithms.get(name, sparsity=0.8, distribution=distribution, rounds=3)
    m = jax.jit(
        lambda p: algo.masks_from_model(
            p, key=jax.random.key(0), apply_fn=apply, batch=(x, y), loss_fn=xent
        )
    )(params)
    kernels = [m["l1"]["kernel"], m["l2"]["kernel"]]
    total = sum(k.size for k in kernels)
    assert sum(int(k.sum()) for k in kernels) == round(0.2 * total)
    if distribution == "uniform":
        assert [int(k.sum()) for k in kernels] == [round(0.2 * k.size) for k in kernels]
    assert m["l1"]["bias"] is None
    tx = transforms.masked(optax.adam(1e-2), algo, masks=m)
    state = tx.init(params)
    p = transforms.sparsify(params, state)

    @jax.jit
    def step(p, state):
        u, state = tx.update(jax.grad(loss)(p, x, y), state, p)
        return optax.apply_updates(p, u), state

    for _ in range(10):
        p, state = step(p, state)
    assert bool(jnp.all(jnp.where(m["l1"]["kernel"], True, p["l1"]["kernel"] == 0)))
    assert bool(jnp.all(jnp.where(m["l2"]["kernel"], True, p["l2"]["kernel"] == 0)))


def test_prune_at_init_without_masks_is_a_clear_error(problem):
    params, _, _ = problem
    tx = transforms.masked(optax.sgd(0.1), algorithms.get("grasp", sparsity=0.5))
    with pytest.raises(ValueError, match="masks_from_model"):
        tx.init(params)
    with pytest.raises(ValueError, match="rounds"):
        algorithms.get("synflow", rounds=0)
    with pytest.raises(ValueError, match="score"):
        algorithms.PruneAtInit(score="bogus")
    with pytest.raises(ValueError, match="temperature"):
        algorithms.get("grasp", temperature=0.0)
    with pytest.raises(ValueError, match="batch and loss_fn"):
        algorithms.get("grasp").masks_from_model(params, key=jax.random.key(0), apply_fn=apply)


def test_grasp_scores_the_loss_of_logits_over_its_temperature(problem):
    params, x, y = problem
    # The paper's T = 200 is the registered GraSP's default; every other score uses 1.
    assert algorithms.get("grasp").temperature == 200.0
    assert algorithms.PruneAtInit(score="snip").temperature == 1.0
    for t in (200.0, 3.0):
        algo = algorithms.get("grasp", sparsity=0.8, temperature=t)
        got = algo.masks_from_model(
            params, key=jax.random.key(0), apply_fn=apply, batch=(x, y), loss_fn=xent
        )
        grasp = scores.grasp(lambda p, t=t: xent(apply(p, x) / t, y), params)
        want = algo.score_masks(grasp, params)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(a, b)


def test_algorithms_without_model_masks_leave_them_to_init_masks(problem):
    params, x, y = problem
    for name in ("dense", "rigl", "nm_ste", "magnitude"):
        got = algorithms.get(name).masks_from_model(
            params, key=jax.random.key(0), apply_fn=apply, batch=(x, y), loss_fn=xent
        )
        assert got is None, name


def test_global_pruning_pools_layers(problem):
    params, _, _ = problem
    score_tree = {
        "l1": {"kernel": jnp.zeros((12, 16)), "bias": jnp.zeros(16)},
        "l2": {"kernel": jnp.ones((16, 4))},
    }
    selected = {"l1": {"kernel": 0.5, "bias": None}, "l2": {"kernel": 0.5}}
    m = masks.global_topk_masks(score_tree, 0.75, selected)
    # 25% of 256 weights = 64 survivors: exactly the 64 ones of l2.
    assert int(m["l2"]["kernel"].sum()) == 64 and int(m["l1"]["kernel"].sum()) == 0
    assert m["l1"]["bias"] is None
