"""Rank-adaptive algorithms: spectral truncation (basis change, moments, tolerance) and
greedy growth (choice, budget, function preservation), through the masked transform."""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsejax import transforms
from tensornets import TT, FactorizedDense, GreedyGrowth, SpectralTruncation, Tucker
from tensornets import adaptive as A
from tensornets import rank as R

KEY = jax.random.key(0, impl="rbg")
X = jax.random.normal(KEY, (32, 12))
Y = jax.random.randint(jax.random.key(1, impl="rbg"), (32,), 0, 6)


class _Net:
    """Two factorized layers (low-rank + a second format) and a loss."""

    def __init__(self, fmt="cp", rank=6, **kw):
        self.l0 = FactorizedDense(16, "cp", 10)
        self.l1 = FactorizedDense(6, fmt, rank, **kw)

    def init(self, key):
        k0, k1 = jax.random.split(key)
        h = jnp.ones((1, 16))
        return {"l0": self.l0.init(k0, X[:1])["params"], "l1": self.l1.init(k1, h)["params"]}

    def apply(self, p, x):
        h = jnp.tanh(self.l0.apply({"params": p["l0"]}, x))
        return self.l1.apply({"params": p["l1"]}, h)

    def loss(self, p):
        return optax.softmax_cross_entropy_with_integer_labels(self.apply(p, X), Y).mean()


def _low_rank_weight(node):
    return (node["factor_0"] * node["weights"]) @ node["factor_1"].T


@settings(max_examples=20, deadline=None)
@given(
    values=st.lists(st.floats(0.0, 10.0), min_size=6, max_size=6),
    live=st.lists(st.booleans(), min_size=6, max_size=6),
    tau=st.floats(0.0, 0.9),
)
def test_truncation_keeps_the_fewest_top_values_within_tolerance(values, live, tau):
    s, live = np.asarray(values, np.float32), np.asarray(live)
    kept = np.asarray(A.truncation_mask(jnp.asarray(s), jnp.asarray(live), tau, 1))
    assert not np.any(kept & ~live)
    sl = np.where(live, s, 0.0)
    norm = np.sqrt(np.sum(sl**2))
    dropped = np.sqrt(np.sum(np.where(kept, 0.0, sl) ** 2))
    assert dropped <= tau * norm * (1 + 1e-5) + 1e-6
    if live.any():
        # Every kept value is at least every dropped live value (the top ones are kept) ...
        if kept.any() and (live & ~kept).any():
            assert sl[kept].min() >= sl[live & ~kept].max()
        # ... and one fewer would break the tolerance (minimality), unless at min_rank 1.
        if kept.sum() > 1:
            smallest = np.argmin(np.where(kept, sl, np.inf))
            tail = np.sqrt(dropped**2 + sl[smallest] ** 2)
            assert tail > tau * norm * (1 - 1e-5) - 1e-6


def test_reparametrize_keeps_weights_and_maps_gradients():
    net = _Net()
    params = net.init(KEY)
    algo = SpectralTruncation(tau=0.0, update_every_steps=1, layers=("l0",))
    rm = {"l0": {"rank": jnp.arange(10) < 7}}
    masks = R.param_masks(params, rm)
    params = R.apply_rank_masks(params, rm)
    grads = jax.grad(net.loss)(params)
    nu = jax.tree.map(jnp.square, grads)
    state = optax.ScaleByAdamState(jnp.zeros((), jnp.int32), mu=grads, nu=nu)
    new_params, new_state = algo.reparametrize(params, (state,), masks)
    np.testing.assert_allclose(
        _low_rank_weight(new_params["l0"]), _low_rank_weight(params["l0"]), atol=2e-5
    )
    np.testing.assert_array_equal(new_params["l1"]["weights"], params["l1"]["weights"])
    a = new_params["l0"]["factor_0"][:, :7]
    np.testing.assert_allclose(a.T @ a, np.eye(7), atol=1e-5)
    w = np.asarray(new_params["l0"]["weights"])
    assert np.all(w >= 0) and np.all(np.diff(w) <= 1e-6) and np.all(w[7:] < 1e-5)
    # First moments of the factors map like gradients: equal to the gradient at the new point.
    new_grads = jax.grad(net.loss)(new_params)
    for leaf in ("factor_0", "factor_1"):
        np.testing.assert_allclose(
            new_state[0].mu["l0"][leaf], new_grads["l0"][leaf], rtol=1e-3, atol=1e-5
        )
    for leaf in ("factor_0", "factor_1", "weights"):
        assert np.all(np.asarray(new_state[0].nu["l0"][leaf]) >= 0.0)
    np.testing.assert_array_equal(new_state[0].mu["l1"]["weights"], grads["l1"]["weights"])


def _adam_state_of(grads):
    """An Adam state whose moments are one gradient: mu = g, nu = g**2."""
    return optax.ScaleByAdamState(
        jnp.zeros((), jnp.int32), mu=grads, nu=jax.tree.map(jnp.square, grads)
    )


@pytest.mark.parametrize("live", [10, 7])
def test_low_rank_first_moments_map_exactly_for_every_leaf(live):
    # mu = the gradient at the rotation point must become the gradient at the new point,
    # the weights' too: dL/dw' = diag(T_A^T M T_B) needs the off-diagonal entries of
    # M = A^T G B, which dL/dw does not hold (random factors, so T_A, T_B mix components).
    net = _Net()
    params = net.init(KEY)
    rm = {"l0": {"rank": jnp.arange(10) < live}}
    masks = R.param_masks(params, rm)
    params = R.apply_rank_masks(params, rm)
    grads = jax.grad(net.loss)(params)
    algo = SpectralTruncation(tau=0.0, update_every_steps=1, layers=("l0",))
    new_params, (new_state,) = algo.reparametrize(params, (_adam_state_of(grads),), masks)
    new_grads = jax.grad(net.loss)(new_params)
    for leaf in ("factor_0", "factor_1", "weights"):
        # Components beyond the live ones have singular value 0 and are cut next.
        np.testing.assert_allclose(
            new_state.mu["l0"][leaf][..., :live],
            new_grads["l0"][leaf][..., :live],
            rtol=1e-3,
            atol=2e-6,
        )


def test_low_rank_second_moments_map_exactly_for_orthonormal_factors():
    # With orthonormal factors and distinct |w| the rotation only permutes (and flips)
    # components, so the elementwise second moments map exactly too.
    net = _Net()
    params = net.init(KEY)
    ka, kb = jax.random.split(jax.random.key(7, impl="rbg"))
    qa, _ = jnp.linalg.qr(jax.random.normal(ka, (12, 10)))
    qb, _ = jnp.linalg.qr(jax.random.normal(kb, (16, 10)))
    w = jnp.array([0.3, -1.7, 0.9, 2.2, -0.5, 1.1, 0.05, -1.3, 0.7, 1.5])
    params["l0"] = {**params["l0"], "factor_0": qa, "factor_1": qb, "weights": w}
    masks = R.param_masks(params, {"l0": {"rank": jnp.ones(10, bool)}})
    grads = jax.grad(net.loss)(params)
    algo = SpectralTruncation(tau=0.0, update_every_steps=1, layers=("l0",))
    new_params, (new_state,) = algo.reparametrize(params, (_adam_state_of(grads),), masks)
    np.testing.assert_allclose(new_params["l0"]["weights"], np.sort(np.abs(w))[::-1], rtol=1e-5)
    new_grads = jax.grad(net.loss)(new_params)
    for leaf in ("factor_0", "factor_1", "weights"):
        g = new_grads["l0"][leaf]
        np.testing.assert_allclose(new_state.mu["l0"][leaf], g, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(new_state.nu["l0"][leaf], g**2, rtol=1e-4, atol=1e-10)


def test_low_rank_second_moments_follow_the_squared_coefficients_of_the_first():
    # The documented approximation for general factors: nu maps through every stage of
    # the first moments' linear map with squared coefficients. Pinned on one-hot moments:
    # a unit first moment at one entry maps to column c of the map; its square at that
    # entry must map to c**2 (stage by stage, so it is c**2 exactly where one stage
    # contributes: the factors, and the weights' own diagonal).
    net = _Net()
    params = net.init(KEY)
    masks = R.param_masks(params, {"l0": {"rank": jnp.ones(10, bool)}})
    algo = SpectralTruncation(tau=0.0, update_every_steps=1, layers=("l0",))
    zeros = jax.tree.map(jnp.zeros_like, params)
    for leaf, index in (("factor_0", (3, 2)), ("factor_1", (5, 7)), ("weights", (4,))):
        one = {**zeros, "l0": {**zeros["l0"], leaf: zeros["l0"][leaf].at[index].set(1.0)}}
        state = optax.ScaleByAdamState(jnp.zeros((), jnp.int32), mu=one, nu=one)
        _, (mapped,) = algo.reparametrize(params, (state,), masks)
        for out in ("factor_0", "factor_1", "weights"):
            mu, nu = mapped.mu["l0"][out], mapped.nu["l0"][out]
            assert np.all(np.asarray(nu) >= 0.0)
            if out == "weights" and leaf != "weights":
                # Two stages (M's cross terms from one factor entry, then T_A^T M T_B):
                # mu' sums r - 1 terms and nu' their squares, so mu'^2 <= (r - 1) nu'
                # (Cauchy-Schwarz), and a cross term is never missing from nu'.
                assert np.any(np.abs(np.asarray(mu)) > 1e-3)
                assert np.all(np.asarray(mu) ** 2 <= 9 * np.asarray(nu) * (1 + 1e-4) + 1e-12)
                continue
            np.testing.assert_allclose(nu, mu**2, rtol=1e-4, atol=1e-9)


def _train(net, algo, steps, params=None, lr=1e-2):
    tx = transforms.masked(optax.adam(lr), algo)
    params = net.init(KEY) if params is None else params
    state = tx.init(params)
    params = transforms.sparsify(params, state)

    @jax.jit
    def step(p, s):
        loss, g = jax.value_and_grad(net.loss)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    history = []
    for _ in range(steps):
        before = params
        params, state, loss = step(params, state)
        history.append((before, params, state, float(loss)))
    return history


def test_spectral_training_truncates_with_exact_zeros_and_keeps_the_function():
    net = _Net()
    algo = SpectralTruncation(tau=0.3, update_every_steps=5, begin_step=5)
    history = _train(net, algo, 16)
    ranks = []
    for t, (before, after, state, _) in enumerate(history):
        rm = R.rank_masks_from_param_masks(state.masks, after)
        ranks.append(R.compact_ranks(rm))
        dead_values = jax.tree.map(
            lambda m, p: None if m is None else np.asarray(p)[~np.asarray(m)],
            state.masks,
            after,
            is_leaf=lambda m: m is None,
        )
        for v in jax.tree.leaves(dead_values):
            assert np.all(v == 0.0)  # dead entries exactly zero
        if t in (5, 10, 15):
            # Mask steps skip the gradient step: the weight becomes the truncated SVD of the
            # weight before the step (the best approximation at the new rank).
            for layer in ("l0", "l1"):
                k = ranks[-1][layer]
                u, sv, vt = np.linalg.svd(np.asarray(_low_rank_weight(before[layer])))
                best = (u[:, :k] * sv[:k]) @ vt[:k]
                np.testing.assert_allclose(_low_rank_weight(after[layer]), best, atol=1e-4)
    assert ranks[4] == {"l0": 10, "l1": 6}
    assert ranks[-1]["l0"] < 10 and ranks[-1]["l1"] < 6
    for a, b in zip(ranks, ranks[1:]):
        assert b["l0"] <= a["l0"] and b["l1"] <= a["l1"]


def test_greedy_growth_picks_the_largest_gate_gradient_within_budget():
    net = _Net()
    params = net.init(KEY)
    algo = GreedyGrowth(budget=1.0, initial_rank=2, update_every_steps=1)
    masks = algo.init_masks(params, KEY)
    grads = jax.tree.map(jnp.zeros_like, params)
    grads["l0"]["weights"] = grads["l0"]["weights"].at[6].set(3.0).at[0].set(100.0)
    grads["l1"]["weights"] = grads["l1"]["weights"].at[4].set(2.0)
    new = algo.update_masks(masks, params, grads, 1, KEY)
    rm = R.rank_masks_from_param_masks(new, params)
    # Component 0 is already live; the best dead one is l0's component 6.
    np.testing.assert_array_equal(np.flatnonzero(rm["l0"]["rank"]), [0, 1, 6])
    np.testing.assert_array_equal(np.flatnonzero(rm["l1"]["rank"]), [0, 1])
    assert new["l0"]["factor_0"] is None  # only the gate is masked
    # With a budget that only fits l1's cheaper component, l1 grows instead.
    factors = sum(np.size(v) for k, v in params["l0"].items() if k != "bias")
    factors += sum(np.size(v) for k, v in params["l1"].items() if k != "bias")
    used = 2 * (12 + 16 + 1) + 2 * (16 + 6 + 1)
    tight = GreedyGrowth(budget=(used + 23.5) / factors, initial_rank=2, update_every_steps=1)
    rm = R.rank_masks_from_param_masks(tight.update_masks(masks, params, grads, 1, KEY), params)
    np.testing.assert_array_equal(np.flatnonzero(rm["l0"]["rank"]), [0, 1])
    np.testing.assert_array_equal(np.flatnonzero(rm["l1"]["rank"]), [0, 1, 4])
    # And none fits: nothing grows.
    none = GreedyGrowth(budget=(used + 22.5) / factors, initial_rank=2, update_every_steps=1)
    rm = R.rank_masks_from_param_masks(none.update_masks(masks, params, grads, 1, KEY), params)
    assert int(rm["l0"]["rank"].sum()) == 2 and int(rm["l1"]["rank"].sum()) == 2


@pytest.mark.parametrize(
    "fmt,rank,kw",
    [("tucker", (3, 3), {}), ("tt", 3, {"in_shape": (4, 4), "out_shape": (2, 3)})],
)
def test_greedy_growth_trains_every_format_within_budget(fmt, rank, kw):
    net = _Net(fmt, rank, **kw)
    algo = GreedyGrowth(budget=0.6, initial_rank=1, update_every_steps=2)
    history = _train(net, algo, 24, lr=3e-2)
    first, last = history[0], history[-1]
    rm = R.rank_masks_from_param_masks(last[2].masks, last[1])
    factors = {k: {n: v for n, v in node.items() if n != "bias"} for k, node in last[1].items()}
    full = sum(np.size(v) for v in jax.tree.leaves(factors))
    assert int(R.num_live_params(factors, rm)) <= 0.6 * full
    start = R.rank_masks_from_param_masks(first[2].masks, first[1])
    grew = sum(int(v.sum()) for v in jax.tree.leaves(rm)) > sum(
        int(v.sum()) for v in jax.tree.leaves(start)
    )
    assert grew
    assert last[3] < first[3]
    # Growing is function-preserving: the masked model (gates zero) equals the compact one.
    compacted = R.compact(last[1], rm)
    ranks = R.compact_ranks(rm)
    small = _Net.__new__(_Net)
    small.l0 = FactorizedDense(16, "cp", ranks["l0"])
    small.l1 = FactorizedDense(6, fmt, ranks["l1"], **kw)
    np.testing.assert_allclose(
        small.apply(compacted, X), net.apply(last[1], X), atol=1e-5, rtol=1e-5
    )


def test_bad_hyperparameters_raise():
    with pytest.raises(ValueError, match="tau"):
        SpectralTruncation(tau=1.0)
    with pytest.raises(ValueError, match="update_every_steps"):
        SpectralTruncation(update_every_steps=0)
    with pytest.raises(ValueError, match="budget"):
        GreedyGrowth(budget=0.0)
    with pytest.raises(ValueError, match="initial_rank"):
        GreedyGrowth(initial_rank=0)
    params = {"dense": {"kernel": jnp.ones((3, 4))}}
    with pytest.raises(ValueError, match="no low-rank"):
        SpectralTruncation().init_masks(params, KEY)
    with pytest.raises(ValueError, match="no factorized"):
        GreedyGrowth().init_masks(params, KEY)


def _reparametrize_one_layer(layer, x, tau):
    """Spectral truncation's basis change of one factorized layer ``t`` under Adam moments.

    The moments are one gradient of a cross-entropy on ``(x, Y % 10)`` (`_adam_state_of`).

    Returns:
      ``(algo, masks, params, new params, new Adam state, loss)``.
    """
    params = {"t": layer.init(KEY, x)["params"]}

    def loss(p):
        logits = layer.apply({"params": p["t"]}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, Y % 10).mean()

    algo = SpectralTruncation(tau=tau)
    masks = algo.init_masks(params, KEY)
    state = _adam_state_of(jax.grad(loss)(params))
    new, (new_state,) = algo.reparametrize(params, (state,), masks)
    return algo, masks, params, new, new_state, loss


def _dense_of(fmt, params):
    """The kernel of layer ``t`` as a dense tensor, through the format class ``fmt``."""
    return fmt.from_params({k: v for k, v in params["t"].items() if k != "bias"}).to_dense()


def test_tucker_hosvd_rotation_keeps_the_tensor_and_maps_gradients_exactly():
    layer = FactorizedDense(10, "tucker", (4, 3, 3), in_shape=(4, 3), out_shape=(10,))
    algo, masks, params, new, new_state, loss = _reparametrize_one_layer(layer, X, tau=0.3)
    np.testing.assert_allclose(_dense_of(Tucker, new), _dense_of(Tucker, params), atol=1e-5)
    for k in range(3):
        u = new["t"][f"factor_{k}"]
        np.testing.assert_allclose(u.T @ u, np.eye(u.shape[1]), atol=1e-5)
        # All-orthogonality: the core's mode-k slices are orthogonal to each other.
        core = jnp.moveaxis(new["t"]["core"], k, 0).reshape(u.shape[1], -1)
        gram = np.asarray(core @ core.T)
        np.testing.assert_allclose(gram - np.diag(np.diag(gram)), 0.0, atol=1e-5)
    # With every component live the moment maps are exact for the core and the factors.
    new_grads = jax.grad(loss)(new)
    for leaf in ("core", "factor_0", "factor_1", "factor_2"):
        np.testing.assert_allclose(
            new_state.mu["t"][leaf], new_grads["t"][leaf], rtol=1e-3, atol=1e-5
        )
    # Truncation per mode by the slice norms (the mode-k singular values).
    rm = R.rank_masks_from_param_masks(algo.update_masks(masks, new, None, 0, None), new)
    for k in range(3):
        s = np.asarray(A.unfolding_norms(new["t"]["core"], k))
        kept = np.asarray(rm["t"][f"rank_{k}"])
        assert 1 <= kept.sum() <= s.size
        assert np.sqrt(np.sum(s[~kept] ** 2)) <= 0.3 * np.sqrt(np.sum(s**2)) + 1e-6


def test_importing_tensornets_registers_the_rank_algorithms_into_sparsejax():
    code = (
        "import sys, sparsejax\n"
        "from sparsejax import algorithms\n"
        "assert 'tensornets' not in sys.modules\n"
        "assert 'greedy_growth' not in algorithms.names()\n"
        "import tensornets\n"
        "a = algorithms.from_config({'algorithm': 'greedy_growth', 'budget': 0.4,"
        " 'end_fraction': 0.5}, 100)\n"
        "assert type(a) is tensornets.GreedyGrowth and a.end_step == 50 and a.budget == 0.4\n"
        "s = algorithms.from_config({'algorithm': 'spectral_truncation', 'tau': 0.2,"
        " 'update_every_steps': 7}, 100)\n"
        "assert type(s) is tensornets.SpectralTruncation and s.reparametrizes\n"
        "assert s.update_every_steps == 7 and s.tau == 0.2\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_tau_zero_keeps_the_weight_whatever_the_layout_of_the_live_components():
    layer = FactorizedDense(10, "cp", 6)
    params = {"l": layer.init(KEY, X)["params"]}
    rm = {"l": {"rank": jnp.array([1, 0, 1, 1, 0, 1], bool)}}
    tx = transforms.masked(
        optax.sgd(0.0),
        SpectralTruncation(tau=0.0, update_every_steps=1),
        masks=R.param_masks(params, rm),
    )
    state = tx.init(params)._replace(count=jnp.ones((), jnp.int32))  # an update step
    params = R.apply_rank_masks(params, rm)
    updates, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(_low_rank_weight(new["l"]), _low_rank_weight(params["l"]), atol=1e-5)
    live = R.rank_masks_from_param_masks(state.masks, new)["l"]["rank"]
    np.testing.assert_array_equal(live, [True, True, True, True, False, False])


def test_tt_rounding_sweeps_give_bond_singular_values_and_exact_moment_maps():
    x = jax.random.normal(KEY, (32, 24))
    layer = FactorizedDense(10, "tt", (2, 5, 4), in_shape=(2, 3, 4), out_shape=(10,))
    algo, masks, params, new, new_state, loss = _reparametrize_one_layer(layer, x, tau=0.2)
    full = np.asarray(_dense_of(TT, params))
    np.testing.assert_allclose(_dense_of(TT, new), full, atol=1e-5)
    norms = A.tt_bond_norms(new["t"])
    for b in range(3):
        unfolding = full.reshape(int(np.prod(full.shape[: b + 1])), -1)
        s = np.linalg.svd(unfolding, compute_uv=False)[: norms[f"bond_{b}"].size]
        np.testing.assert_allclose(norms[f"bond_{b}"], s, rtol=1e-4, atol=1e-5)
    new_grads = jax.grad(loss)(new)
    for k in range(4):
        leaf = f"core_{k}"
        np.testing.assert_allclose(
            new_state.mu["t"][leaf], new_grads["t"][leaf], rtol=1e-3, atol=1e-5
        )
    rm = R.rank_masks_from_param_masks(algo.update_masks(masks, new, None, 0, None), new)
    for b in range(3):
        s, kept = np.asarray(norms[f"bond_{b}"]), np.asarray(rm["t"][f"bond_{b}"])
        assert np.sqrt(np.sum(s[~kept] ** 2)) <= 0.2 * np.sqrt(np.sum(s**2)) + 1e-6
