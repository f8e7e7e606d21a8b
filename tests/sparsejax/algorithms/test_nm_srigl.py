"""SRigL: constant fan-in dynamic sparse training with neuron ablation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparsejax import algorithms, transforms
from sparsejax.algorithms.srigl import fan_in_counts
from tests.sparsejax.algorithms.conftest import loss


def _constant_fan_in(mask) -> int:
    """The common fan-in of the active neurons (asserting there is one)."""
    counts = np.asarray(fan_in_counts(jnp.asarray(mask)))
    active = counts[counts > 0]
    assert active.size and np.all(active == active[0]), counts
    return int(active[0])


def test_init_masks_have_constant_fan_in(problem):
    params, _, _ = problem
    algo = algorithms.get("srigl", sparsity=0.75, distribution="uniform", end_step=100)
    m = algo.init_masks(params, jax.random.key(0))
    assert _constant_fan_in(m["l1"]["kernel"]) == 3  # 12 inputs at density 0.25
    assert _constant_fan_in(m["l2"]["kernel"]) == 4  # 16 inputs
    assert m["l1"]["bias"] is None


def test_training_keeps_constant_fan_in_and_the_layer_budget(problem):
    params, x, y = problem
    algo = algorithms.get(
        "srigl", sparsity=0.75, distribution="uniform", update_every_steps=2, end_step=20
    )
    tx = transforms.masked(optax.adam(1e-2), algo)
    state = tx.init(params)
    p = transforms.sparsify(params, state)
    budget = {k: int(transforms.get_masks(state)[k]["kernel"].sum()) for k in ("l1", "l2")}

    @jax.jit
    def step(p, s):
        u, s = tx.update(jax.grad(loss)(p, x, y), s, p)
        return optax.apply_updates(p, u), s

    changed = False
    first = transforms.get_masks(state)
    for _ in range(12):
        p, state = step(p, state)
        current = transforms.get_masks(state)
        for k in ("l1", "l2"):
            mask = np.asarray(current[k]["kernel"])
            k_fan = _constant_fan_in(mask)
            active = int((fan_in_counts(jnp.asarray(mask)) > 0).sum())
            # floor(L / A) per neuron: never over budget, at most A - 1 weights under it.
            assert budget[k] - active < k_fan * active <= budget[k]
            assert np.all(np.asarray(p[k]["kernel"])[~mask] == 0)
        changed |= bool(np.any(np.asarray(current["l1"]["kernel"]) != first["l1"]["kernel"]))
    assert changed  # connections did move


def test_grows_by_gradient_inside_each_neuron_and_ablates_dead_neurons():
    fan_in, out = 8, 4
    w = jnp.ones((fan_in, out)).at[:, 3].set(0.0)  # neuron 3 has no weight...
    g = jnp.zeros((fan_in, out)).at[:, :3].set(jnp.arange(fan_in, dtype=jnp.float32)[:, None])
    mask = jnp.zeros((fan_in, out), bool).at[:4].set(True)  # fan-in 4 everywhere
    params, grads, masks_tree = {"k": w}, {"k": g}, {"k": mask}
    # "k" is the only sparsified layer, hence the output layer: allow ablating it here.
    algo = algorithms.get(
        "srigl",
        sparsity=0.5,
        distribution="uniform",
        drop_fraction=0.5,
        end_step=1000,
        no_ablation=(),
    )
    new = algo.update_masks(masks_tree, params, grads, jnp.asarray(0), jax.random.key(0))["k"]
    counts = np.asarray(fan_in_counts(new))
    assert counts[3] == 0  # ...and no gradient: not salient, ablated
    # Its budget (16 weights over 3 neurons) gives the others floor(16 / 3) = 5 each.
    np.testing.assert_array_equal(counts[:3], 5)
    # Each neuron grows the inputs with the largest gradient (rows 7, 6, ...).
    assert bool(new[7, 0]) and bool(new[6, 0])
    # gamma_sal = 0 never ablates: every neuron keeps exactly 4.
    algo0 = algorithms.get(
        "srigl", sparsity=0.5, distribution="uniform", gamma_sal=0.0, end_step=1000
    )
    kept = algo0.update_masks(masks_tree, params, grads, jnp.asarray(0), jax.random.key(0))["k"]
    np.testing.assert_array_equal(np.asarray(fan_in_counts(kept)), 4)


def _update(algo, mask, w, g, step=0):
    """One mask update of a single-layer tree ``{"k": ...}``."""
    params, grads, masks_tree = {"k": w}, {"k": g}, {"k": mask}
    return algo.update_masks(masks_tree, params, grads, jnp.asarray(step), jax.random.key(0))["k"]


def test_the_output_layer_is_never_ablated_by_default():
    # l2 is the output layer (last sparsified leaf); its neuron 3 has no salient weight.
    w1 = jnp.ones((6, 4))
    w2 = jnp.ones((4, 4)).at[:, 3].set(0.0)
    g2 = jnp.ones((4, 4)).at[:, 3].set(0.0)
    mask2 = jnp.zeros((4, 4), bool).at[:2].set(True)  # fan-in 2 (T = 8)
    params = {"l1": {"kernel": w1}, "l2": {"kernel": w2}}
    grads = {"l1": {"kernel": jnp.ones((6, 4))}, "l2": {"kernel": g2}}
    masks_tree = {
        "l1": {"kernel": jnp.ones((6, 4), bool).at[3:].set(False)},
        "l2": {"kernel": mask2},
    }
    for exempt, no_ablation in ((True, None), (True, ("l2",)), (False, ())):
        algo = algorithms.get(
            "srigl", sparsity=0.5, distribution="uniform", gamma_sal=1.0, no_ablation=no_ablation
        )
        assert algo.ablation_exempt(params) == {"l1": {"kernel": False}, "l2": {"kernel": exempt}}
        new = algo.update_masks(masks_tree, params, grads, jnp.asarray(0), jax.random.key(0))
        counts = np.asarray(fan_in_counts(new["l2"]["kernel"]))
        if exempt:
            np.testing.assert_array_equal(counts, 2)  # every logit keeps its fan-in
        else:
            assert counts[3] == 0 and _constant_fan_in(new["l2"]["kernel"]) == 8 // 3


def test_the_last_layer_is_found_in_natural_order_of_names():
    params = {f"Dense_{i}": {"kernel": jnp.ones((4, 4))} for i in (0, 1, 2, 9, 10)}
    algo = algorithms.get("srigl", sparsity=0.5, distribution="uniform")
    exempt = algo.ablation_exempt(params)
    assert [k for k, v in exempt.items() if v["kernel"]] == ["Dense_10"]


def test_an_ablated_neuron_comes_back_when_its_gradients_turn_salient():
    mask = jnp.zeros((8, 4), bool).at[:5, :3].set(True)  # neuron 3 ablated, k = 16 // 3
    w = jnp.where(mask, 1.0, 0.0)
    g = jnp.full((8, 4), 0.01).at[:, 3].set(100.0)
    algo = algorithms.get(
        "srigl", sparsity=0.5, distribution="uniform", drop_fraction=0.5, no_ablation=()
    )
    new = _update(algo, mask, w, g)
    np.testing.assert_array_equal(np.asarray(fan_in_counts(new)), 4)  # 16 // 4 each, 3 back


def test_a_layer_returns_to_its_budget_and_never_drifts_below_it():
    # 12 live weights against a target of 16 (fan-in 3 of 4 neurons): the update restores
    # k = floor(T / A) = 4 from the target, not floor(live / A) = 3.
    mask = jnp.zeros((8, 4), bool).at[:3].set(True)
    w = jnp.where(mask, 1.0, 0.0)
    g = jnp.arange(32.0).reshape(8, 4)
    for gamma_sal in (0.0, 0.3):
        algo = algorithms.get("srigl", sparsity=0.5, distribution="uniform", gamma_sal=gamma_sal)
        new = _update(algo, mask, w, g)
        np.testing.assert_array_equal(np.asarray(fan_in_counts(new)), 4)


def test_a_budget_below_one_weight_a_neuron_ablates_down_to_the_budget():
    # T = 3 weights for 4 neurons: at most 3 neurons stay, one weight each.
    mask = jnp.zeros((8, 4), bool).at[0].set(True)
    algo = algorithms.get("srigl", sparsity=0.9, distribution="uniform", no_ablation=())
    new = _update(algo, mask, jnp.where(mask, 1.0, 0.0), jnp.ones((8, 4)))
    counts = np.asarray(fan_in_counts(new))
    assert counts.sum() == 3 and counts.max() == 1


def test_ablation_keeps_enough_neurons_to_hold_the_budget_at_dense_fan_in():
    # Salient weights only in neuron 0: with gamma_sal = 1 every other neuron fails the
    # threshold, yet ceil(T / fan_in) = ceil(32 / 8) = 4 neurons stay, at fan-in 8.
    mask = jnp.zeros((8, 8), bool).at[:4].set(True)
    w = jnp.where(mask, 1.0, 0.0).at[:, 1:].multiply(1e-3)
    g = jnp.zeros((8, 8)).at[:, 0].set(1.0)
    algo = algorithms.get(
        "srigl",
        sparsity=0.5,
        distribution="uniform",
        gamma_sal=1.0,
        no_ablation=(),
        ablation_fan_in="dense",
    )
    new = _update(algo, mask, w, g)
    counts = np.asarray(fan_in_counts(new))
    assert int(counts.sum()) == 32
    assert (counts > 0).sum() == 4 and _constant_fan_in(new) == 8
    assert counts[0] == 8


def test_drops_by_magnitude_across_the_layer_not_per_neuron():
    # Fan-in 2, drop fraction 0.5: keep the 2 largest |w| of the layer (10 and 9, both in
    # neuron 0); neuron 1 regrows both of its weights by gradient. Dropping per neuron
    # kept w = 1 in neuron 1 and dropped w = 9.
    mask = jnp.zeros((4, 2), bool).at[:2].set(True)
    w = jnp.array([[10.0, 1.0], [9.0, 0.5], [0.0, 0.0], [0.0, 0.0]])
    g = jnp.array([[0.0, 0.0], [0.0, 0.0], [0.0, 5.0], [0.0, 6.0]])
    algo = algorithms.get(
        "srigl", sparsity=0.5, distribution="uniform", drop_fraction=0.5, gamma_sal=0.0
    )
    new = np.asarray(_update(algo, mask, w, g))
    np.testing.assert_array_equal(new, [[True, False], [True, False], [False, True], [False, True]])


def test_the_ablation_threshold_can_be_relative_to_the_dense_fan_in():
    # Every neuron has 4 salient weights: enough for 0.75 of the sparse fan-in 4 (3), not
    # for 0.75 of the dense fan-in 8 (6); then the 4 most salient neurons hold T = 32.
    mask = jnp.zeros((8, 8), bool).at[:4].set(True)
    w = jnp.where(mask, 1.0, 0.0)
    g = jnp.zeros((8, 8))
    counts = {}
    for fan_in in ("sparse", "dense"):
        algo = algorithms.get(
            "srigl",
            sparsity=0.5,
            distribution="uniform",
            gamma_sal=0.75,
            no_ablation=(),
            ablation_fan_in=fan_in,
        )
        counts[fan_in] = np.asarray(fan_in_counts(_update(algo, mask, w, g))).tolist()
    assert counts == {"sparse": [4] * 8, "dense": [8] * 4 + [0] * 4}


def test_erk_training_holds_every_layers_target_and_every_logit(problem):
    params, x, y = problem
    algo = algorithms.get(
        "srigl", sparsity=0.8, distribution="erk", update_every_steps=2, end_step=40, gamma_sal=0.5
    )
    targets = algo.target_counts(params)
    tx = transforms.masked(optax.adam(1e-2), algo)
    state = tx.init(params)
    p = transforms.sparsify(params, state)

    @jax.jit
    def step(p, s):
        u, s = tx.update(jax.grad(loss)(p, x, y), s, p)
        return optax.apply_updates(p, u), s

    for _ in range(30):
        p, state = step(p, state)
        current = transforms.get_masks(state)
        for name in ("l1", "l2"):
            mask = np.asarray(current[name]["kernel"])
            target = targets[name]["kernel"]
            active = int((np.asarray(fan_in_counts(jnp.asarray(mask))) > 0).sum())
            assert mask.sum() == active * (target // active), name  # A floor(T / A)
            assert target - active < mask.sum() <= target, name
        # l2 is the output layer: every logit keeps its weights.
        assert (np.asarray(fan_in_counts(jnp.asarray(current["l2"]["kernel"]))) > 0).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"gamma_sal": 1.5}, "gamma_sal must be in"),
        ({"gamma_sal": float("nan")}, "gamma_sal must be in"),
        ({"distribution": "global"}, "fan-in constant"),
        ({"ablation_fan_in": "neuron"}, "ablation_fan_in must be one of"),
        ({"no_ablation": 5}, "no_ablation must be None or substrings"),
        ({"no_ablation": ["head", 3]}, "no_ablation must be None or substrings"),
    ],
)
def test_bad_hyperparameters_raise_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        algorithms.get("srigl", **kwargs)
