"""How many weights a sparsified layer keeps: never none, and exactly the distribution's count.

The one rule for degenerate layers (`sparsejax.masks.num_kept`): every count computed for
one layer keeps at least one weight (one unit with a structure), whatever the sparsity:
0.9999 of 64 weights keeps 1, a (1, 1) kernel at 0.5 keeps its weight, ERK at 0.9999999
gives every layer one weight, and a traced sparsity outside [0, 1) (which jit cannot
refuse) is clipped to keep between 1 and all. Static hyperparameters that would empty
layers (non-finite or out of range) are refused with a ValueError naming them. The pooled
`distribution='global'` ranking keeps at least one weight in total but may still empty a
layer: that layer collapse is what global pruning at initialization is studied for.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import algorithms, distributions, masks, schedules, scores

SHAPES = {"tiny": (8, 8), "unit": (1, 1), "wide": (32, 48)}


def _params(shapes=SHAPES) -> dict:
    keys = jax.random.split(jax.random.key(0), len(shapes))
    return {
        name: {"kernel": jax.random.normal(k, shape), "bias": jnp.zeros(shape[-1])}
        for k, (name, shape) in zip(keys, shapes.items())
    }


UNSTRUCTURED = ["static", "set", "rigl", "snfs", "srigl", "ste", "magnitude", "random", "snip"]


@pytest.mark.parametrize("distribution", ["uniform", "er", "erk"])
@pytest.mark.parametrize("name", UNSTRUCTURED)
def test_no_algorithm_empties_a_layer_at_an_extreme_sparsity(name, distribution):
    params = _params()
    algo = algorithms.get(name, sparsity=0.9999, distribution=distribution)
    initial = algo.init_masks(params, jax.random.key(1))
    # The masks at the full target (what pruning schedules end with).
    final = algo.score_masks(scores.magnitude(params), params)
    for layer in SHAPES:
        assert initial[layer]["kernel"].sum() >= 1, layer
        assert final[layer]["kernel"].sum() >= 1, layer


@pytest.mark.parametrize("distribution", ["uniform", "erk"])
def test_a_1x1_kernel_at_half_sparsity_keeps_its_weight(distribution):
    params = _params({"unit": (1, 1)})
    algo = algorithms.get("static", sparsity=0.5, distribution=distribution)
    assert bool(algo.init_masks(params, jax.random.key(0))["unit"]["kernel"][0, 0])
    assert bool(masks.topk_mask(jnp.ones((1, 1)), 0.5)[0, 0])


@pytest.mark.parametrize(
    "build",
    [
        lambda s: masks.topk_mask(jnp.arange(64.0), s),
        lambda s: masks.block_mask(jnp.arange(64.0).reshape(8, 8), s, (2, 2)),
        lambda s: masks.channel_mask(jnp.arange(64.0).reshape(8, 8), s),
    ],
    ids=["topk", "block", "channel"],
)
def test_masks_keep_one_entry_or_unit_at_any_sparsity(build):
    kept = np.asarray(build(0.9999))
    assert kept.any()
    assert kept.reshape(-1)[-1]  # the best one


@pytest.mark.parametrize(("sparsity", "kept"), [(1.5, 1), (1.0, 1), (0.9999, 1), (-0.5, 10)])
def test_a_traced_sparsity_is_clipped_to_keep_between_one_and_all(sparsity, kept):
    mask = jax.jit(masks.topk_mask)(jnp.arange(10.0), sparsity)
    assert int(mask.sum()) == kept
    assert int(masks.num_kept(10, jnp.float32(sparsity))) == kept


def test_erk_at_an_extreme_target_gives_every_layer_one_weight():
    params = _params()
    result = distributions.erk(params, 0.9999999)
    counts = {}
    for layer, shape in SHAPES.items():
        s = result[layer]["kernel"]
        assert s < 1.0, layer
        counts[layer] = int(round((1.0 - s) * np.prod(shape)))
    assert counts == {layer: 1 for layer in SHAPES}


def test_erk_tops_up_emptied_layers_and_keeps_the_exact_total_when_it_can():
    # 0.99 of 1601 weights leaves 16: ERK's share of the (1, 1) kernel is 0.33, rounded to 0.
    params = _params()
    result = distributions.erk(params, 0.99)
    sizes = {layer: int(np.prod(shape)) for layer, shape in SHAPES.items()}
    counts = {k: int(round((1.0 - result[k]["kernel"]) * n)) for k, n in sizes.items()}
    assert min(counts.values()) >= 1
    assert sum(counts.values()) == round(0.01 * sum(sizes.values())) == 16


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0, True])
def test_non_finite_or_negative_power_scale_is_refused_naming_it(value):
    with pytest.raises(ValueError, match=re.escape("power_scale")):
        distributions.erk(_params(), 0.9, power_scale=value)
    with pytest.raises(ValueError, match=re.escape(f"power_scale={value!r}")):
        algorithms.get("rigl", sparsity=0.9, power_scale=value)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_pruning_power_is_refused_naming_it(value):
    with pytest.raises(ValueError, match=re.escape(f"power must be a finite number, got {value}")):
        algorithms.get("magnitude", sparsity=0.9, power=value)
    with pytest.raises(ValueError, match=re.escape("power must be a finite number")):
        schedules.polynomial(0.9, 0, 100, 10, power=value)


# --------------------------------------------------------------------------------------
# Exact counts on layers past float32's integers (2**24)

# ERK at 0.8 gives this 24.6M-entry kernel s = 0.8000975..., whose count float32 misses by one.
_BIG = {
    "big": {"kernel": jax.ShapeDtypeStruct((4803, 5125), jnp.float32)},
    "small": {"kernel": jax.ShapeDtypeStruct((300, 10), jnp.float32)},
}


def test_target_counts_give_back_the_distributions_exact_count_on_a_huge_layer():
    algo = algorithms.get("static", sparsity=0.8, distribution="erk")
    s_big = algo.layer_sparsities(_BIG)["big"]["kernel"]
    n_big = 4803 * 5125
    exact = int(round((1.0 - s_big) * n_big))  # float64, as the distribution rounds
    assert masks.num_kept(n_big, s_big) != exact  # float32 does miss it here
    counts = algo.target_counts(_BIG)
    assert counts["big"]["kernel"] == exact
    total = n_big + 3000
    assert counts["big"]["kernel"] + counts["small"]["kernel"] == round(0.2 * total)


@pytest.mark.slow
def test_masks_of_a_huge_layer_keep_the_exact_count_at_init_and_after_gradual_pruning():
    params = {"big": {"kernel": jnp.ones((4803, 5125)) * jnp.arange(5125.0)}}
    params["small"] = {"kernel": jnp.ones((300, 10))}
    static = algorithms.get("static", sparsity=0.8, distribution="erk")
    want = static.target_counts(params)["big"]["kernel"]
    assert int(static.init_masks(params, jax.random.key(0))["big"]["kernel"].sum()) == want
    prune = algorithms.get(
        "magnitude", sparsity=0.8, distribution="erk", end_step=10, update_every_steps=5
    )
    dense = prune.init_masks(params, jax.random.key(0))
    final = jax.jit(prune.update_masks)(dense, params, params, jnp.asarray(10), jax.random.key(0))
    assert int(final["big"]["kernel"].sum()) == want
