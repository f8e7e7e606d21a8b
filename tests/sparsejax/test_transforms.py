"""Properties of `sparsejax.transforms.masked` through real optax optimizers.

Every trajectory runs 50 steps in one jitted `lax.scan` and records the parameters, the
masks and the inner optimizer state after each step, so one compilation per (optimizer,
algorithm) pair serves every invariant checked on it.
"""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsejax import algorithms, masks, schedules, transforms
from sparsejax.masks import is_none

STEPS = 50
SPARSITY = 0.6
KERNELS = (("dense1", (6, 8)), ("dense2", (8, 5)), ("head", (1, 5, 3)))  # distinct shapes

OPTIMIZERS = {
    "sgd": lambda: optax.sgd(0.1),
    "momentum": lambda: optax.sgd(0.1, momentum=0.9),
    "nesterov": lambda: optax.sgd(0.1, momentum=0.9, nesterov=True),
    "adam": lambda: optax.adam(1e-2),
    "adamw": lambda: optax.adamw(1e-2, weight_decay=0.1),
    "lion": lambda: optax.lion(1e-3),
}

# Magnitude pruning updates at 5, 15, 25, 35, 45 (reaching its target at 45); SET and RigL
# update at 10, 20, 30 and stop at 40.
ALGORITHMS = {
    "static": lambda: algorithms.get("static", sparsity=SPARSITY),
    "magnitude": lambda: algorithms.get(
        "magnitude", sparsity=SPARSITY, begin_step=5, end_step=45, update_every_steps=10
    ),
    "set": lambda: algorithms.get("set", sparsity=SPARSITY, update_every_steps=10, end_step=40),
    "rigl": lambda: algorithms.get("rigl", sparsity=SPARSITY, update_every_steps=10, end_step=40),
}
_WITH_DENSE = {**ALGORITHMS, "dense": lambda: algorithms.get("dense")}


def _params(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    params = {
        name: {"kernel": (0.5 * rng.standard_normal(shape)).astype(np.float32)}
        for name, shape in KERNELS
    }
    params["dense1"]["bias"] = np.zeros(8, np.float32)
    params["dense2"]["bias"] = (0.1 * rng.standard_normal(5)).astype(np.float32)
    return jax.tree.map(jnp.asarray, params)


_DATA_RNG = np.random.default_rng(1)
X = jnp.asarray(_DATA_RNG.standard_normal((16, 6)), jnp.float32)
Y = jnp.asarray(_DATA_RNG.standard_normal((16, 3)), jnp.float32)


def loss_fn(params, x=X, y=Y):
    """A tiny tanh MLP with a rank-3 (1-D conv like) head under a squared loss."""
    h = jnp.tanh(x @ params["dense1"]["kernel"] + params["dense1"]["bias"])
    h = jnp.tanh(h @ params["dense2"]["kernel"] + params["dense2"]["bias"])
    return jnp.mean((h @ params["head"]["kernel"][0] - y) ** 2)


def _kernels(tree) -> dict:
    """{layer name: kernel leaf} of a params-shaped tree."""
    return {name: np.asarray(tree[name]["kernel"]) for name, _ in KERNELS}


@functools.cache
def _trajectory(opt_name: str, algo_name: str | None):
    """(initial params, initial state, per-step params, per-step state) of 50 jitted steps.

    ``algo_name=None`` runs the inner optimizer alone. Cached: one compilation per pair.
    """
    inner = OPTIMIZERS[opt_name]()
    tx = inner if algo_name is None else transforms.masked(inner, _WITH_DENSE[algo_name]())
    params = _params()
    state = tx.init(params)
    if algo_name is not None:
        params = transforms.sparsify(params, state)

    @jax.jit
    def run(params, state):
        def step(carry, _):
            params, state = carry
            updates, state = tx.update(jax.grad(loss_fn)(params), state, params)
            params = optax.apply_updates(params, updates)
            return (params, state), (params, state)

        return jax.lax.scan(step, (params, state), length=STEPS)[1]

    trajectory = jax.device_get(run(params, state))
    return jax.device_get(params), jax.device_get(state), *trajectory


def _at(tree, t):
    """Step t of a stacked trajectory tree."""
    return jax.tree.map(lambda x: x[t], tree)


def _target_counts(algo, params) -> dict:
    """{layer: round((1 - s_l) * n_l)} from the algorithm's distribution."""
    sparsities = algo.layer_sparsities(params)
    return {
        name: int(round((1.0 - sparsities[name]["kernel"]) * int(np.prod(shape))))
        for name, shape in KERNELS
    }


@functools.cache
def _magnitude_counts(algo) -> list[dict]:
    """Live count of each layer after each step of gradual magnitude pruning.

    The mask of the last update step u <= t keeps round((1 - s_l * s(u) / s) * n_l) weights,
    with the schedule evaluated in float32 under jit as inside the transform.
    """
    schedule = schedules.polynomial(
        algo.sparsity, algo.begin_step, algo.end_step, algo.update_every_steps, power=algo.power
    )
    steps = jnp.arange(STEPS)
    is_update = np.asarray(jax.jit(schedule.is_update_step)(steps))
    # s(u) / s inside jit, as the algorithm computes it (XLA multiplies by 1 / s there).
    progress = np.asarray(jax.jit(lambda t: schedule.sparsity(t) / algo.sparsity)(steps))
    sparsities = algo.layer_sparsities(_params())
    counts, last = [], None
    for t in range(STEPS):
        last = t if is_update[t] else last
        counts.append({})
        for name, shape in KERNELS:
            n, s_l = int(np.prod(shape)), sparsities[name]["kernel"]
            if last is None:
                counts[t][name] = n
                continue
            counts[t][name] = int(masks.num_kept(n, s_l * jnp.float32(progress[last])))
            # The same count from the float64 formula, to float32 accuracy.
            p = (last - algo.begin_step) / (algo.end_step - algo.begin_step)
            real = (1.0 - s_l * (1.0 - (1.0 - min(p, 1.0)) ** algo.power)) * n
            assert abs(counts[t][name] - real) <= 0.5 + 1e-5 * n
    return counts


def _slots(inner_state) -> dict:
    """{layer: [slot arrays]}: optimizer-state leaves shaped like that layer's kernel."""
    by_shape = {shape: name for name, shape in KERNELS}
    slots = {name: [] for name, _ in KERNELS}
    for leaf in jax.tree.leaves(inner_state):
        if np.shape(leaf) in by_shape:
            slots[by_shape[np.shape(leaf)]].append(np.asarray(leaf))
    return slots


def _assert_dst_update_steps(algo, state0, params_t, state_t):
    """SET/RigL: masks change only on update steps, where the ordinary step is skipped (live
    weights keep their exact values), grown weights are 0 with zeroed optimizer slots, and
    each layer keeps its number of live weights."""
    update_steps = [t for t in range(STEPS) if algo.is_update_step(t)]
    assert update_steps == [10, 20, 30]
    grown_total = 0
    for t in range(1, STEPS):
        old_p, new_p = _kernels(_at(params_t, t - 1)), _kernels(_at(params_t, t))
        old_m, new_m = _kernels(_at(state_t, t - 1).masks), _kernels(_at(state_t, t).masks)
        if t not in update_steps:
            for name in old_m:
                np.testing.assert_array_equal(new_m[name], old_m[name])
            continue
        slots = _slots(_at(state_t, t).inner_state)
        for name in old_m:
            stay, grown = old_m[name] & new_m[name], new_m[name] & ~old_m[name]
            assert new_m[name].sum() == old_m[name].sum()
            np.testing.assert_array_equal(new_p[name][stay], old_p[name][stay])
            assert (new_p[name][grown] == 0.0).all()
            assert algo.reset_grown_moments
            for slot in slots[name]:
                assert (slot[grown] == 0.0).all(), (t, name)
            grown_total += grown.sum()
    assert grown_total > 0, "no connection was ever regrown"


@pytest.mark.parametrize("algo_name", list(ALGORITHMS))
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_pruned_weights_are_exactly_zero_and_counts_exact_at_every_step(opt_name, algo_name):
    params0, state0, params_t, state_t = _trajectory(opt_name, algo_name)
    algo = ALGORITHMS[algo_name]()
    targets = _target_counts(algo, params0)
    init_masks = _kernels(state0.masks)

    for name in targets:
        assert init_masks[name].sum() == (
            np.prod(init_masks[name].shape) if algo_name == "magnitude" else targets[name]
        )
        assert (_kernels(params0)[name][~init_masks[name]] == 0.0).all()

    previous = init_masks
    for t in range(STEPS):
        p, m = _kernels(_at(params_t, t)), _kernels(_at(state_t, t).masks)
        expected = _magnitude_counts(algo)[t] if algo_name == "magnitude" else targets
        for name in targets:
            assert m[name].dtype == bool
            assert (p[name][~m[name]] == 0.0).all(), (t, name)
            assert m[name].sum() == expected[name], (t, name)
            if algo_name == "magnitude":
                assert not (m[name] & ~previous[name]).any(), f"revived at step {t}"
            if algo_name == "static":
                np.testing.assert_array_equal(m[name], init_masks[name])
        previous = m
    assert all(_at(state_t, t).count == t + 1 for t in range(STEPS))

    # Training happened: some live weight moved.
    final = _kernels(_at(params_t, STEPS - 1))
    assert any((final[n] != _kernels(params0)[n])[previous[n]].any() for n in targets)
    if algo_name == "magnitude":  # reached the final count (checked above) by step 45 < 50
        assert {n: previous[n].sum() for n in targets} == targets
    if algo_name in ("set", "rigl"):  # checked here so the trajectory compiles once
        _assert_dst_update_steps(algo, state0, params_t, state_t)


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_masked_dense_is_bitwise_the_inner_optimizer(opt_name):
    _, _, alone, _ = _trajectory(opt_name, None)
    params0, state0, wrapped, state_t = _trajectory(opt_name, "dense")
    assert all(m is None for m in jax.tree.leaves(state0.masks, is_leaf=is_none))
    for a, w in zip(jax.tree.leaves(alone), jax.tree.leaves(wrapped)):
        np.testing.assert_array_equal(a, w)


# --------------------------------------------------------------------------------------
# jit == eager, and one compilation for many steps

_SHORT = {
    "magnitude": lambda: algorithms.get(
        "magnitude", sparsity=SPARSITY, begin_step=0, end_step=2, update_every_steps=1
    ),
    "snip": lambda: algorithms.get("snip", sparsity=SPARSITY),
    "static": lambda: algorithms.get("static", sparsity=SPARSITY),
    "set": lambda: algorithms.get("set", sparsity=SPARSITY, update_every_steps=1, end_step=3),
    "rigl": lambda: algorithms.get("rigl", sparsity=SPARSITY, update_every_steps=1, end_step=3),
}
_F32_RTOL = 8 * float(np.finfo(np.float32).eps)


def _small_loss(params):
    return jnp.mean(jnp.tanh(X @ params["w"] + params["b"]) ** 2)


@functools.cache
def _eager_steps(algo_name: str):
    """[(grads, state, params, updates, new state)] of 2 eager steps of masked adamw.

    Eager `lax.cond` compiles on every call, so this uses a one-kernel model and is cached.
    """
    tx = transforms.masked(optax.adamw(1e-2, weight_decay=0.1), _SHORT[algo_name]())
    rng = np.random.default_rng(2)
    params = {"w": jnp.asarray(rng.standard_normal((6, 8)), jnp.float32), "b": jnp.zeros(8)}
    state = tx.init(params)
    params = transforms.sparsify(params, state)
    steps = []
    for _ in range(2):
        grads = jax.grad(_small_loss)(params)
        updates, new_state = tx.update(grads, state, params)
        steps.append((grads, state, params, updates, new_state))
        params, state = optax.apply_updates(params, updates), new_state
    if algo_name != "static":  # the steps must include a real mask update
        assert any(not np.array_equal(step[4].masks["w"], step[1].masks["w"]) for step in steps)
    return tx, steps


def _assert_equal_up_to_float_rounding(actual, expected):
    """Masks, counts and keys bit for bit; float leaves to a few float32 ulps.

    The float slack is the inner optimizer's: XLA rewrites e.g. adam's division by the bias
    correction differently when it fuses the whole update than op by op.
    """
    chex.assert_trees_all_equal_structs(actual, expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        a, e = np.asarray(a), np.asarray(e)
        assert a.dtype == e.dtype
        if np.issubdtype(e.dtype, np.floating):
            np.testing.assert_allclose(a, e, rtol=_F32_RTOL, atol=1e-9)
            np.testing.assert_array_equal(a == 0.0, e == 0.0)
        else:
            np.testing.assert_array_equal(a, e)


class JitEqualsEagerTest(chex.TestCase):
    """The update of `masked` is the same with and without jit."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*[(name, name) for name in _SHORT])
    def test_update_jit_equals_eager(self, algo_name):
        tx, steps = _eager_steps(algo_name)
        update = self.variant(tx.update)
        for grads, state, params, expected_updates, expected_state in steps:
            updates, new_state = update(grads, state, params)
            _assert_equal_up_to_float_rounding(new_state, expected_state)
            _assert_equal_up_to_float_rounding(updates, expected_updates)


_SPREAD = {
    "magnitude": lambda: algorithms.get(
        "magnitude", sparsity=SPARSITY, begin_step=2, end_step=12, update_every_steps=2
    ),
    "rigl": lambda: algorithms.get("rigl", sparsity=SPARSITY, update_every_steps=3, end_step=20),
}


@pytest.mark.parametrize("algo_name", list(_SPREAD))
def test_jitted_step_traces_once_across_mask_update_steps(algo_name):
    tx = transforms.masked(optax.adam(1e-2), _SPREAD[algo_name]())
    chex.clear_trace_counter()  # the counter is per code location, shared by parametrizations

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, state):
        updates, state = tx.update(jax.grad(loss_fn)(params), state, params)
        return optax.apply_updates(params, updates), state

    params = _params()
    state = tx.init(params)
    changed = []
    for _ in range(15):
        before = state.masks
        params, state = step(params, state)
        changed.append(
            any(
                not np.array_equal(a, b)
                for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state.masks))
            )
        )
    assert sum(changed) >= 3, "too few mask updates happened in the steps run"


@pytest.mark.parametrize("algo_name", list(_SPREAD))
def test_the_mask_update_cond_carries_only_masks_not_optimizer_state(algo_name):
    # Ordinary steps must not pay for mask updates: a cond whose branches return the
    # optimizer moments costs XLA:CPU a pass over them every step (benchmarks/overhead.py).
    tx = transforms.masked(optax.adam(1e-2), _SPREAD[algo_name]())
    params = _params()
    state = tx.init(params)
    jaxpr = jax.make_jaxpr(lambda s: tx.update(jax.grad(loss_fn)(params), s, params))(state)
    conds = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "cond"]
    assert len(conds) == 1
    assert conds[0].outvars and all(v.aval.dtype == jnp.bool_ for v in conds[0].outvars)


def test_init_under_jit_equals_eager():
    for make in (_SHORT["static"], _SHORT["magnitude"]):  # random and dense initial masks
        tx = transforms.masked(optax.adam(1e-2), make())
        chex.assert_trees_all_equal(jax.jit(tx.init)(_params()), tx.init(_params()))


# --------------------------------------------------------------------------------------
# reset_moments


def _reset_cases():
    return {
        "adam": optax.adam(1e-2),
        "adamw": optax.adamw(1e-2, weight_decay=0.1),
        "momentum": optax.sgd(0.1, momentum=0.9),
        "nesterov": optax.sgd(0.1, momentum=0.9, nesterov=True),
        "lion": optax.lion(1e-3),
        "clipped_adam": optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2)),
    }


@pytest.mark.parametrize("opt_name", list(_reset_cases()))
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_reset_moments_zeroes_the_selected_slot_entries_only(opt_name, seed):
    inner = _reset_cases()[opt_name]
    rng = np.random.default_rng(seed)
    params = _params(seed % 7)
    state = inner.init(params)
    for _ in range(2):  # Populate the slots with nonzero values.
        grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
        _, state = inner.update(grads, state, params)
    where = {name: {"kernel": jnp.asarray(rng.random(shape) < 0.4)} for name, shape in KERNELS}
    where["dense1"]["bias"] = None
    where["dense2"]["bias"] = None

    reset = transforms.reset_moments(state, params, where)
    assert jax.tree.structure(reset) == jax.tree.structure(state)
    by_shape = {shape: np.asarray(where[name]["kernel"]) for name, shape in KERNELS}
    n_reset_slots = n_zeroed = 0
    for old, new in zip(jax.tree.leaves(state), jax.tree.leaves(reset)):
        old, new = np.asarray(old), np.asarray(new)
        w = by_shape.get(old.shape)
        if w is None:  # counts, biases' slots, empty states: untouched
            np.testing.assert_array_equal(new, old)
            continue
        n_reset_slots += 1
        n_zeroed += (old[w] != 0).sum()
        assert (new[w] == 0.0).all()
        np.testing.assert_array_equal(new[~w], old[~w])
    assert n_zeroed > 0, "nothing was reset"
    # adam/adamw: mu and nu of three kernels; momentum, nesterov and lion: one slot each.
    assert n_reset_slots == (6 if "adam" in opt_name else 3)
    chex.assert_trees_all_equal(jax.jit(transforms.reset_moments)(state, params, where), reset)


# --------------------------------------------------------------------------------------
# RigL and SET mask updates, directly


def _rigl_case(seed: int):
    """Random weights, dense gradients and a mask of exactly 20 live weights out of 48."""
    rng = np.random.default_rng(seed)
    live = np.zeros(48, bool)
    live[rng.permutation(48)[:20]] = True
    live = live.reshape(6, 8)
    w = np.where(live, rng.standard_normal((6, 8)), 0.0).astype(np.float32)
    g = rng.standard_normal((6, 8)).astype(np.float32)
    return {"w": w}, {"w": g}, {"w": live}


_DST_STEP = 7  # drop fraction 0.3 / 2 * (1 + cos(7 pi / 20)) at this step
_dst = {
    name: algorithms.get(name, sparsity=0.5, distribution="uniform", end_step=20)
    for name in ("set", "rigl")
}
_dst_update = {
    name: jax.jit(
        lambda m, p, g, algo=algo: algo.update_masks(m, p, g, _DST_STEP, jax.random.key(3))
    )
    for name, algo in _dst.items()
}


def _dst_reference_keep(w, live):
    """The live weights RigL and SET keep: all but the round(f * k) smallest |w|."""
    fraction = np.float32(schedules.cosine_drop_fraction(0.3, 20)(_DST_STEP))
    n_drop = int(np.round(fraction * np.float32(live.sum())))
    order = np.argsort(-np.where(live, np.abs(w), -np.inf).reshape(-1), kind="stable")
    keep = np.zeros(w.size, bool)
    keep[order[: live.sum() - n_drop]] = True
    return keep.reshape(w.shape), n_drop


def _check_drop_and_grow(name, seed):
    """One ``name`` mask update keeps the reference's weights and grows as many as it drops.

    Returns:
      ``(new mask, reference keep, number dropped, grads)``.
    """
    params, grads, live = _rigl_case(seed)
    new = np.asarray(_dst_update[name](live, params, grads)["w"])
    keep, n_drop = _dst_reference_keep(params["w"], live["w"])
    assert new.sum() == live["w"].sum()
    np.testing.assert_array_equal(new & keep, keep)
    assert (new & ~keep).sum() == n_drop
    return new, keep, n_drop, grads


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_rigl_drops_the_smallest_live_weights_and_grows_the_largest_gradients(seed):
    new, keep, n_drop, grads = _check_drop_and_grow("rigl", seed)
    assert n_drop > 0
    grown = new & ~keep
    # The grown entries have the largest |g| among those not kept (ties by position).
    candidates = np.where(keep, -np.inf, np.abs(grads["w"])).reshape(-1)
    order = np.argsort(-candidates, kind="stable")
    expected = np.zeros(candidates.size, bool)
    expected[order[:n_drop]] = True
    np.testing.assert_array_equal(grown, expected.reshape(grown.shape))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_set_drops_the_smallest_live_weights_and_grows_as_many_elsewhere(seed):
    _check_drop_and_grow("set", seed)


def test_rigl_grows_exactly_where_the_gradient_is_largest_through_the_transform():
    """A linear loss sum(c * w) has gradient c; two pruned entries get the largest |c|."""
    algo = algorithms.get(
        "rigl",
        sparsity=0.5,
        distribution="uniform",
        drop_fraction=0.25,
        update_every_steps=1,
        end_step=1000,
    )
    tx = transforms.masked(optax.sgd(0.1), algo, key=jax.random.key(5))
    state = tx.init({"w": jnp.zeros((4, 4))})
    live = np.asarray(state.masks["w"])
    assert live.sum() == 8
    # Live weights with distinct magnitudes 1..8 (the two smallest get dropped).
    w = np.zeros(16, np.float32)
    w[np.flatnonzero(live)] = np.arange(1, 9) * np.array([1, -1] * 4)
    w = w.reshape(4, 4)
    pruned = np.flatnonzero(~live)
    targets = pruned[[2, 5]]
    c = np.zeros(16, np.float32)
    c[pruned] = 1.0
    c[targets] = 5.0
    c = jnp.asarray(c.reshape(4, 4))
    loss = lambda p: jnp.sum(c * p["w"])

    params = {"w": jnp.asarray(w)}
    step = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p), s, p))
    updates, state = step(params, state)  # step 0: ordinary; live weights see c == 0
    params = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(params["w"], w)
    updates, state = step(params, state)  # step 1: drop 2 (|w| = 1, 2), grow 2
    params = optax.apply_updates(params, updates)

    expected = live.copy().reshape(-1)
    expected[np.flatnonzero(live)[:2]] = False
    expected[targets] = True
    np.testing.assert_array_equal(np.asarray(state.masks["w"]).reshape(-1), expected)
    out = np.asarray(params["w"]).reshape(-1)
    assert (out[~expected] == 0.0).all() and (out[targets] == 0.0).all()
    stay = expected & live.reshape(-1)
    np.testing.assert_array_equal(out[stay], w.reshape(-1)[stay])


# --------------------------------------------------------------------------------------
# SNIP

_snip_tx = transforms.masked(optax.sgd(0.1), algorithms.get("snip", sparsity=0.5))
_snip_step = jax.jit(lambda p, s: _snip_tx.update(jax.grad(loss_fn)(p), s, p))


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_snip_prunes_at_step_zero_by_abs_w_times_g_then_holds(seed):
    params = _params(seed)
    state = _snip_tx.init(params)
    grads = jax.grad(loss_fn)(params)
    updates, state = _snip_step(params, state)
    params_1 = optax.apply_updates(params, updates)
    sparsities = algorithms.get("snip", sparsity=0.5).layer_sparsities(params)
    for name, _ in KERNELS:
        saliency = np.abs(np.asarray(params[name]["kernel"] * grads[name]["kernel"]))
        expected = masks.topk_mask(saliency, sparsities[name]["kernel"])
        m = np.asarray(state.masks[name]["kernel"])
        np.testing.assert_array_equal(m, expected)
        assert (np.asarray(params_1[name]["kernel"])[~m] == 0.0).all()
    first = state.masks
    for _ in range(3):
        updates, state = _snip_step(params_1, state)
        params_1 = optax.apply_updates(params_1, updates)
    chex.assert_trees_all_equal(state.masks, first)


# --------------------------------------------------------------------------------------
# get_masks, sparsify and argument checks


def test_get_masks_finds_the_masked_state_inside_a_chain():
    algo = algorithms.get("static", sparsity=SPARSITY)
    tx = optax.chain(optax.clip_by_global_norm(1.0), transforms.masked(optax.adam(1e-2), algo))
    params = _params()
    state = tx.init(params)
    assert transforms.get_masks(state) is state[1].masks
    sparse = transforms.sparsify(params, state)
    for name, _ in KERNELS:
        m = np.asarray(state[1].masks[name]["kernel"])
        assert (np.asarray(sparse[name]["kernel"])[~m] == 0.0).all()
        np.testing.assert_array_equal(sparse[name]["kernel"][m], params[name]["kernel"][m])
    assert sparse["dense2"]["bias"] is params["dense2"]["bias"]


_AFTER_MASKED = {
    "chain": lambda m: optax.chain(m, optax.scale(0.5)),
    "nested": lambda m: optax.chain(optax.chain(optax.clip(1.0), m, optax.scale(0.5))),
    "identity after": lambda m: optax.chain(m, optax.identity()),
    "named_chain": lambda m: optax.named_chain(("sparse", m), ("half", optax.scale(0.5))),
}


@pytest.mark.parametrize("build", list(_AFTER_MASKED.values()), ids=list(_AFTER_MASKED))
def test_a_transform_after_masked_is_refused_as_it_would_unzero_pruned_weights(build):
    tx = build(transforms.masked(optax.adam(1e-2), algorithms.get("static", sparsity=SPARSITY)))
    params = _params()
    state = tx.init(params)
    with pytest.raises(ValueError, match=r"masked\(\.\.\.\) must be the last transform"):
        transforms.sparsify(params, state)
    with pytest.raises(ValueError, match=r"Put them inside: masked\(optax.chain"):
        transforms.get_masks(state)


def test_a_scale_after_masked_does_leave_pruned_weights_nonzero():
    # Why the composition is refused: masked emits -w for a pruned weight, the scale halves it.
    algo = algorithms.get("static", sparsity=SPARSITY)
    inner = transforms.masked(optax.adam(1e-2), algo)
    tx = optax.chain(inner, optax.scale(0.5))
    params = _params()
    state = tx.init(params)
    mask_tree = inner.init(params).masks
    updates, _ = tx.update(jax.grad(loss_fn)(params), state, params)
    after = optax.apply_updates(params, updates)
    pruned = ~np.asarray(mask_tree["dense1"]["kernel"])
    np.testing.assert_allclose(
        np.asarray(after["dense1"]["kernel"])[pruned],
        0.5 * np.asarray(params["dense1"]["kernel"])[pruned],
    )


_MASKED_LAST = {
    "alone": lambda m: m,
    "after a clip": lambda m: optax.chain(optax.clip_by_global_norm(1.0), m),
    "nested last": lambda m: optax.chain(optax.clip(1.0), optax.chain(optax.identity(), m)),
    "multi steps": lambda m: optax.MultiSteps(m, every_k_schedule=2),
}


@pytest.mark.parametrize("build", list(_MASKED_LAST.values()), ids=list(_MASKED_LAST))
def test_masked_last_keeps_pruned_weights_exactly_zero(build):
    algo = algorithms.get("rigl", sparsity=SPARSITY, update_every_steps=2, end_step=8)
    # A scale belongs inside masked, where it cannot touch the update that zeroes.
    tx = build(transforms.masked(optax.chain(optax.adam(1e-2), optax.scale(0.5)), algo))
    params = _params()
    state = tx.init(params)
    params = transforms.sparsify(params, state)
    step = jax.jit(
        lambda p, s: (lambda u_s: (optax.apply_updates(p, u_s[0]), u_s[1]))(
            tx.update(jax.grad(loss_fn)(p), s, p)
        )
    )
    for _ in range(10):
        params, state = step(params, state)
        kept = transforms.get_masks(state)
        for name, _ in KERNELS:
            m = np.asarray(kept[name]["kernel"])
            assert (np.asarray(params[name]["kernel"])[~m] == 0.0).all(), name


@pytest.mark.parametrize("inner", [optax.adam(1e-2), optax.chain(optax.sgd(0.1)), optax.identity()])
def test_get_masks_without_masked_state_raises(inner):
    with pytest.raises(ValueError, match="opt_state holds no MaskedState"):
        transforms.get_masks(inner.init(_params()))


def test_masked_argument_errors_name_the_argument():
    algo = algorithms.get("static")
    with pytest.raises(ValueError, match="inner must be an optax.GradientTransformation"):
        transforms.masked(lambda g: g, algo)
    with pytest.raises(ValueError, match="key must be a typed key from jax.random.key"):
        transforms.masked(optax.sgd(0.1), algo, key=jax.random.PRNGKey(0))
    tx = transforms.masked(optax.sgd(0.1), algo)
    params = _params()
    with pytest.raises(ValueError, match="needs params"):
        tx.update(params, tx.init(params))


@dataclasses.dataclass(frozen=True)
class _Rescale(algorithms.SparseAlgorithm):
    """Fixed random masks; every third step doubles the params and the momentum trace.

    Not a function-preserving basis change (the transform does not need one), but a
    reparametrization whose effect on the emitted update is easy to predict.
    """

    updates_masks = True
    reparametrizes = True

    def init_masks(self, params, key):
        return self.random_masks(params, key)

    def is_update_step(self, step):
        return step % 3 == 1

    def reparametrize(self, params, inner_state, masks):
        del masks
        double = functools.partial(jax.tree.map, lambda v: 2 * v)
        first, *rest = inner_state  # sgd with momentum: (TraceState, scale's state)
        return double(params), (first._replace(trace=double(first.trace)), *rest)


def test_masked_reparametrizes_on_update_steps_before_the_inner_update():
    algo = _Rescale(sparsity=SPARSITY, distribution="uniform")
    lr, beta = 0.1, 0.9
    tx = transforms.masked(optax.sgd(lr, momentum=beta), algo)
    params = _params()
    state = tx.init(params)
    params = transforms.sparsify(params, state)
    m = transforms.get_masks(state)
    trace = jax.tree.map(jnp.zeros_like, params)
    step = jax.jit(lambda p, s: tx.update(jax.grad(loss_fn)(p), s, p))
    for t in range(7):
        g = jax.grad(loss_fn)(params)
        updates, state = step(params, state)
        new = optax.apply_updates(params, updates)
        # The expected step: q = 2p (and its trace doubled) on update steps, then momentum
        # SGD on the masked gradient from q, dead entries back to exactly zero.
        q, trace = (
            (jax.tree.map(lambda v: 2 * v, params), jax.tree.map(lambda v: 2 * v, trace))
            if t % 3 == 1
            else (params, trace)
        )
        g = masks.apply_masks(g, m)
        trace = jax.tree.map(lambda tr, gg: gg + beta * tr, trace, g)
        want = jax.tree.map(lambda v, tr: v - lr * tr, q, trace)
        for path, got in jax.tree_util.tree_leaves_with_path(new):
            mask = m
            for k in path:
                mask = mask[k.key]
            expected = np.asarray(want[path[0].key][path[1].key])
            if mask is not None:
                assert np.all(np.asarray(got)[~np.asarray(mask)] == 0.0)
                expected = np.where(mask, expected, 0.0)
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
        params = new


def test_masked_refuses_packed_masks_with_a_reparametrizing_algorithm():
    with pytest.raises(ValueError, match="packed=True does not combine with _Rescale"):
        transforms.masked(optax.sgd(0.1), _Rescale(), packed=True)
