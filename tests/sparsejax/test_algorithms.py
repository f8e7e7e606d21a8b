"""Properties of `sparsejax.algorithms`: the registry, `from_config`, and exact initial masks."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsejax import algorithms, distributions
from sparsejax.masks import is_none

_SETTINGS = settings(max_examples=25, deadline=None)
KNOWN = ["dense", "magnitude", "random", "rigl", "set", "snip", "static"]
SPARSE = [name for name in KNOWN if name != "dense"]


def test_names_are_sorted_and_include_the_core_algorithms():
    assert algorithms.names() == sorted(algorithms.names())
    assert set(KNOWN) <= set(algorithms.names())


@pytest.mark.parametrize("name", algorithms.names())
def test_get_builds_every_registered_name_as_an_immutable_algorithm(name):
    algo = algorithms.get(name)
    assert isinstance(algo, algorithms.Algorithm)
    fields = {f.name: getattr(algo, f.name) for f in dataclasses.fields(algo)}
    assert algorithms.get(name, **fields) == algo
    for field in fields:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(algo, field, fields[field])


@pytest.mark.parametrize(
    ("name", "cls", "expected"),
    [
        ("dense", algorithms.Dense, {}),
        ("magnitude", algorithms.Prune, {"score": "magnitude", "schedule": "polynomial"}),
        ("random", algorithms.Prune, {"score": "random", "schedule": "polynomial"}),
        ("snip", algorithms.Prune, {"score": "saliency", "schedule": "one_shot", "begin_step": 0}),
        ("static", algorithms.Static, {}),
        ("set", algorithms.SET, {}),
        ("rigl", algorithms.RigL, {}),
    ],
)
def test_registered_variants(name, cls, expected):
    algo = algorithms.get(name)
    assert type(algo) is cls
    for field, value in expected.items():
        assert getattr(algo, field) == value


def test_get_unknown_name_raises_listing_every_known_name():
    with pytest.raises(ValueError, match=re.escape("algorithm='gmp' is unknown")) as info:
        algorithms.get("gmp")
    for name in algorithms.names():
        assert repr(name) in str(info.value)


def test_building_a_sparsejax_algorithm_imports_neither_tensornets_nor_experiments():
    code = (
        "import sparsejax, sys; "
        'sparsejax.algorithms.from_config({"algorithm": "rigl", "target": 0.9}, 1000); '
        'assert not any(m.startswith(("tensornets", "experiments")) for m in sys.modules)'
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_register_adds_a_name_that_get_and_from_config_build():
    code = (
        "from sparsejax import algorithms\n"
        "algorithms.register('rigl_half', algorithms.RigL, drop_fraction=0.5)\n"
        "assert 'rigl_half' in algorithms.names()\n"
        "a = algorithms.from_config({'algorithm': 'rigl_half', 'target': 0.8}, 100)\n"
        "assert a == algorithms.RigL(sparsity=0.8, drop_fraction=0.5), a\n"
        "assert algorithms.get('rigl_half', drop_fraction=0.1).drop_fraction == 0.1\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (("rigl", algorithms.RigL), {}, "name='rigl' is already registered"),
        (("", algorithms.RigL), {}, "name must be a non-empty string"),
        (("x", lambda **kw: algorithms.RigL(**kw)), {}, "factory must be an Algorithm dataclass"),
        (("x", algorithms.RigL), {"lr": 0.1}, "defaults ['lr'] of algorithm 'x' are not fields"),
    ],
)
def test_register_refuses_duplicates_and_bad_entries(args, kwargs, message):
    before = algorithms.names()
    with pytest.raises(ValueError, match=re.escape(message)):
        algorithms.register(*args, **kwargs)
    assert algorithms.names() == before


def test_an_unknown_name_says_where_the_rank_algorithms_come_from():
    # Whether or not tensornets was imported in this process, the message says how.
    with pytest.raises(ValueError, match="import tensornets"):
        algorithms.get("spectral_truncations")


@pytest.mark.parametrize("name", KNOWN)
def test_get_unknown_argument_raises_naming_it(name):
    with pytest.raises(ValueError, match=re.escape("takes no argument(s) ['bogus', 'lr']")):
        algorithms.get(name, bogus=1, lr=0.1)


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        *[
            (n, {"sparsity": s}, f"sparsity must be in [0, 1), got {s!r}")
            for n in SPARSE
            for s in (-0.1, 1.0, 1.5)
        ],
        ("static", {"distribution": "erk2"}, "distribution='erk2' is unknown"),
        ("magnitude", {"score": "taylor"}, "score='taylor' is unknown"),
        ("magnitude", {"schedule": "cubic"}, "schedule='cubic' is unknown"),
        ("magnitude", {"begin_step": 100, "end_step": 100}, "end_step must be > begin_step"),
        ("magnitude", {"update_every_steps": 0}, "update_every_steps must be positive, got 0"),
        ("snip", {"begin_step": -1}, "step must be a non-negative integer, got -1"),
        ("set", {"drop_fraction": 1.5}, "drop_fraction must be in [0, 1], got 1.5"),
        ("rigl", {"end_step": 0}, "end_step must be positive, got 0"),
        ("rigl", {"update_every_steps": 0}, "update_every_steps must be positive, got 0"),
    ],
)
def test_invalid_hyperparameters_raise_at_construction_naming_them(name, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        algorithms.get(name, **kwargs)


# --------------------------------------------------------------------------------------
# Initial masks

# A fixed pool of kernel shapes (tiny ones included, where a layer can be left with no
# weight at all), so that eager mask building compiles once per shape.
SHAPE_POOL = [(1, 1), (1, 2), (2, 1), (3, 5), (8, 8), (12, 4), (3, 3, 1, 1), (3, 3, 2, 4)]
layer_shapes = st.lists(st.sampled_from(SHAPE_POOL), min_size=1, max_size=4)


def _params(shapes):
    return {
        f"layer{i}": {"kernel": jnp.ones(s), "bias": jnp.ones(s[-1])} for i, s in enumerate(shapes)
    }


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(SPARSE),
    distribution=st.sampled_from(["uniform", "er", "erk"]),
    shapes=layer_shapes,
    sparsity=st.floats(0.0, 1.0, exclude_max=True),
    seed=st.integers(0, 2**31 - 1),
)
def test_initial_masks_have_the_distributions_exact_counts(
    name, distribution, shapes, sparsity, seed
):
    params = _params(shapes)
    algo = algorithms.get(name, sparsity=sparsity, distribution=distribution)
    init = algo.init_masks(params, jax.random.key(seed))
    layer_sparsities = distributions.get(distribution)(params, sparsity)
    assert algo.layer_sparsities(params) == layer_sparsities
    for layer, m in init.items():
        assert m["bias"] is None
        kernel = np.asarray(m["kernel"])
        assert kernel.dtype == bool and kernel.shape == params[layer]["kernel"].shape
        if isinstance(algo, algorithms.Prune):  # pruning starts dense
            assert kernel.all()
        else:
            s_l = layer_sparsities[layer]["kernel"]
            assert kernel.sum() == round((1.0 - s_l) * kernel.size)


def test_dense_masks_are_all_none():
    params = _params([(4, 4), (3, 3, 2, 2)])
    init = algorithms.get("dense").init_masks(params, jax.random.key(0))
    assert all(m is None for m in jax.tree.leaves(init, is_leaf=is_none))
    assert jax.tree.structure(init, is_leaf=is_none) == jax.tree.structure(
        jax.tree.map(lambda _: None, params), is_leaf=is_none
    )


def test_keep_dense_leaves_have_no_mask():
    params = _params([(4, 4), (8, 8)])
    for name in SPARSE:
        init = algorithms.get(name, keep_dense="layer0").init_masks(params, jax.random.key(0))
        assert init["layer0"]["kernel"] is None
        assert init["layer1"]["kernel"] is not None


# --------------------------------------------------------------------------------------
# Pruning by random score at the end of its schedule

_random_prune = algorithms.get(
    "random", sparsity=0.75, distribution="uniform", begin_step=0, end_step=10, update_every_steps=5
)
_random_update = jax.jit(
    lambda m, p, k: _random_prune.update_masks(m, p, p, 10, k)  # grads unused by random scores
)


@_SETTINGS
@given(seed=st.integers(0, 2**31 - 1))
def test_random_pruning_reaches_the_exact_count_and_never_revives(seed):
    rng = np.random.default_rng(seed)
    params = {"w": jnp.ones((8, 8))}
    live = np.zeros(64, bool)
    live[rng.permutation(64)[:40]] = True
    new = np.asarray(
        _random_update({"w": jnp.asarray(live.reshape(8, 8))}, params, jax.random.key(seed))["w"]
    )
    assert new.sum() == 16
    assert not (new & ~live.reshape(8, 8)).any()


# --------------------------------------------------------------------------------------
# from_config


@_SETTINGS
@given(
    target=st.floats(0.0, 1.0, exclude_max=True),
    total_steps=st.integers(10, 100_000),
    end_fraction=st.floats(0.1, 1.0),
)
def test_from_config_maps_target_and_end_fraction(target, total_steps, end_fraction):
    config = {"algorithm": "rigl", "target": target, "end_fraction": end_fraction}
    algo = algorithms.from_config(config, total_steps=total_steps)
    assert algo == algorithms.get(
        "rigl", sparsity=target, end_step=int(round(end_fraction * total_steps))
    )


@_SETTINGS
@given(
    total_steps=st.integers(100, 100_000),
    begin_fraction=st.floats(0.0, 0.45),
    end_fraction=st.floats(0.55, 1.0),
)
def test_from_config_maps_begin_fraction_for_pruning(total_steps, begin_fraction, end_fraction):
    config = ml_collections.ConfigDict(
        {
            "algorithm": "magnitude",
            "target": 0.8,
            "begin_fraction": begin_fraction,
            "end_fraction": end_fraction,
            "update_every_steps": 5,
        }
    )
    algo = algorithms.from_config(config, total_steps=total_steps)
    assert algo.sparsity == 0.8 and algo.update_every_steps == 5
    assert algo.begin_step == int(round(begin_fraction * total_steps))
    assert algo.end_step == int(round(end_fraction * total_steps))


def test_from_config_ignores_keys_of_other_algorithms():
    config = {
        "algorithm": "static",
        "target": 0.7,
        "distribution": "er",
        "drop_fraction": 0.5,  # SET / RigL
        "score": "random",  # pruning
        "power": 2.0,  # pruning
        "update_every_steps": 7,  # pruning, SET, RigL
        "begin_fraction": 0.1,
        "end_fraction": 0.75,
    }
    algo = algorithms.from_config(config, total_steps=1000)
    assert algo == algorithms.get("static", sparsity=0.7, distribution="er")
    config["algorithm"] = "set"
    assert algorithms.from_config(config, total_steps=1000) == algorithms.get(
        "set",
        sparsity=0.7,
        distribution="er",
        drop_fraction=0.5,
        update_every_steps=7,
        end_step=750,
    )


def test_from_config_without_algorithm_is_dense():
    assert algorithms.from_config({}, total_steps=10) == algorithms.get("dense")


def test_from_config_refuses_unknown_keys_listing_them():
    config = {"algorithm": "rigl", "target": 0.9, "tagret": 0.9, "lr": 0.1}
    with pytest.raises(ValueError, match=re.escape("unknown key(s) ['lr', 'tagret']")) as info:
        algorithms.from_config(config, total_steps=100)
    assert "'target'" in str(info.value) and "'end_fraction'" in str(info.value)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"algorithm": "rigl", "end_fraction": 1.5}, "end_fraction must be in [0, 1], got 1.5"),
        ({"algorithm": "magnitude", "begin_fraction": -0.1}, "begin_fraction must be in [0, 1]"),
        ({"algorithm": "rigl2"}, "algorithm='rigl2' is unknown"),
        ({"algorithm": "rigl", "target": 1.0}, "sparsity must be in [0, 1), got 1.0"),
    ],
)
def test_from_config_bad_values_raise_naming_them(config, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        algorithms.from_config(config, total_steps=100)
