"""The foundation's properties for the algorithms added after it.

For SNFS, random pruning, SNIP, GraSP, SynFlow and STE, through every optax
optimizer: the weights the model uses are exactly zero wherever the mask is
False at every step, mask counts are exact at every step, and the update is
the same with and without jit.
"""

from __future__ import annotations

import chex
import jax
import numpy as np
import optax
import pytest
from absl.testing import parameterized

from sparsejax import algorithms, masks, transforms
from tests.sparsejax.algorithms.conftest import apply, init, loss, scan_step, xent

STEPS = 50
SPARSITY = 0.75
OPTIMIZERS = {
    "sgd": lambda: optax.sgd(0.1),
    "momentum": lambda: optax.sgd(0.1, momentum=0.9),
    "adam": lambda: optax.adam(1e-2),
    "adamw": lambda: optax.adamw(1e-2, weight_decay=0.1),
    "lion": lambda: optax.lion(1e-3),
}
ALGORITHMS = {
    "snfs": lambda: algorithms.get(
        "snfs", sparsity=SPARSITY, update_every_steps=10, end_step=40, distribution="erk"
    ),
    "random": lambda: algorithms.get(
        "random", sparsity=SPARSITY, begin_step=5, end_step=25, update_every_steps=10
    ),
    "snip": lambda: algorithms.get("snip", sparsity=SPARSITY, distribution="global"),
    "grasp": lambda: algorithms.get("grasp", sparsity=SPARSITY),
    "synflow": lambda: algorithms.get("synflow", sparsity=SPARSITY, rounds=5),
    "ste": lambda: algorithms.get("ste", sparsity=SPARSITY, update_every_steps=5),
}


def _data():
    kx, ky = jax.random.split(jax.random.key(7))
    return jax.random.normal(kx, (32, 12)), jax.random.randint(ky, (32,), 0, 4)


def _setup(algo_name, opt_name):
    algo = ALGORITHMS[algo_name]()
    params = init(jax.random.key(1))
    x, y = _data()
    start_masks = algo.masks_from_model(
        params, key=jax.random.key(2), apply_fn=apply, batch=(x, y), loss_fn=xent
    )
    tx = transforms.masked(OPTIMIZERS[opt_name](), algo, key=jax.random.key(3), masks=start_masks)
    state = tx.init(params)
    if not algo.straight_through:
        params = transforms.sparsify(params, state)
    return algo, tx, params, state, x, y


def _expected_counts(algo_name, algo, params, t):
    """(per-layer counts or None, total count or None) of the masks after step t."""
    layer_s = [algo.layer_sparsities(params)[n]["kernel"] for n in ("l1", "l2")]
    sizes = [params[n]["kernel"].size for n in ("l1", "l2")]
    if algo_name == "random":  # Gradual: the schedule's target at the last update step <= t.
        last = max([s for s in (5, 15, 25) if s <= t], default=None)
        if last is None:
            return sizes, None
        frac = float(algo.sparsity_schedule().sparsity(last)) / SPARSITY
        return [masks.num_kept(n, s * frac) for n, s in zip(sizes, layer_s, strict=True)], None
    if algo_name in ("snfs", "snip", "grasp", "synflow"):
        return None, round((1 - SPARSITY) * sum(sizes))  # Layers move; the total does not.
    return [masks.num_kept(n, s) for n, s in zip(sizes, layer_s, strict=True)], None


@pytest.mark.parametrize("algo_name", list(ALGORITHMS))
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_used_weights_are_exactly_zero_and_counts_exact_every_step(algo_name, opt_name):
    algo, tx, params, state, x, y = _setup(algo_name, opt_name)
    _, (used, mask_history) = jax.jit(
        lambda c: jax.lax.scan(scan_step(algo, tx, x, y), c, None, length=STEPS)
    )((params, state))
    names = ("l1", "l2")
    for t in range(STEPS):
        ms = [np.asarray(mask_history[n]["kernel"][t]) for n in names]
        ws = [np.asarray(used[n]["kernel"][t]) for n in names]
        for m, w in zip(ms, ws, strict=True):
            assert m.dtype == bool
            assert (w[~m] == 0.0).all(), (t, algo_name, opt_name)
        per_layer, total = _expected_counts(algo_name, algo, params, t)
        if per_layer is not None:
            assert [int(m.sum()) for m in ms] == per_layer, t
        if total is not None:
            assert sum(int(m.sum()) for m in ms) == total, t
    assert mask_history["l1"]["bias"] is None


class JitEqualsEagerTest(chex.TestCase):
    """Ten updates, with and without jit, give the same states (mask updates included)."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*[(n, n) for n in ("snfs", "random", "ste", "synflow")])
    def test_update_jit_equals_eager(self, algo_name):
        algo, tx, params, state, x, y = _setup(algo_name, "adam")
        update = self.variant(tx.update)
        reference = jax.jit(tx.update)
        p = params
        for _ in range(12):
            m = transforms.get_masks(state)
            g = jax.grad(lambda q, m=m: loss(algo.forward_params(q, m), x, y))(p)
            got_u, got_s = update(g, state, p)
            want_u, want_s = reference(g, state, p)
            for a, b in zip(jax.tree.leaves(got_s), jax.tree.leaves(want_s), strict=True):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
            for a, b in zip(jax.tree.leaves(got_u), jax.tree.leaves(want_u), strict=True):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
            p, state = optax.apply_updates(p, want_u), want_s
