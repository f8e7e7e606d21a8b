"""FLOPs and memory accounting against hand counts."""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from sparsejax import algorithms, flops, masks


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(100, name="hidden")(x))
        return nn.Dense(10, name="out", use_bias=False)(x)


class _Conv(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(8, (3,), strides=2, padding=((1, 1),), name="c1")(x)
        x = nn.Conv(8, (3,), feature_group_count=4, padding="SAME", name="c2")(x)
        return x


def _setup(model, shape):
    x = jnp.ones(shape)
    params = model.init(jax.random.key(0), x)["params"]
    return params, flops.layer_flops(model.apply, {"params": params}, x)


def test_dense_mlp_matches_hand_count():
    params, layers = _setup(_MLP(), (32, 40))
    # hidden: 32 examples x 40 x 100 multiply-adds, 32 x 100 bias adds;
    # out: 32 x 100 x 10 multiply-adds, no bias.
    hand = 2 * 32 * 40 * 100 + 32 * 100 + 2 * 32 * 100 * 10
    result = flops.inference_flops(layers)
    assert result["total"] == hand == result["dense_total"]
    assert [layer.name for layer in layers] == ["hidden/kernel", "out/kernel"]


def test_sparse_mlp_scales_multiply_adds_by_density():
    params, layers = _setup(_MLP(), (32, 40))
    mask_tree = {
        "hidden": {
            "kernel": masks.topk_mask(jnp.abs(params["hidden"]["kernel"]), 0.75),
            "bias": None,
        },
        "out": {"kernel": masks.topk_mask(jnp.abs(params["out"]["kernel"]), 0.5)},
    }
    result = flops.inference_flops(layers, mask_tree)
    assert result["per_layer"]["hidden/kernel"] == 2 * 32 * 40 * 100 * 0.25 + 32 * 100
    assert result["per_layer"]["out/kernel"] == 2 * 32 * 100 * 10 * 0.5


def test_conv_counts_output_positions_window_and_groups():
    _, layers = _setup(_Conv(), (2, 16, 4))
    c1, c2 = layers
    # c1: output (2, 8, 8), window 3 x 4 input channels.
    assert c1.macs == 2 * 8 * 8 * 3 * 4 and c1.bias_adds == 2 * 8 * 8
    # c2: output (2, 8, 8), 4 groups of 2 input channels each.
    assert c2.macs == 2 * 8 * 8 * 3 * 2
    assert c2.kernel_size == 3 * 2 * 8


def test_training_flops_follow_evci_et_al():
    f_s, f_d = 10.0, 100.0
    assert flops.training_flops(f_s, f_d, "dense") == 300.0
    assert flops.training_flops(f_s, f_d, "static") == 30.0
    assert flops.training_flops(f_s, f_d, "rigl", update_every_steps=100) == pytest.approx(
        (3 * 10 * 100 + 2 * 10 + 100) / 101
    )
    assert flops.training_flops(f_s, f_d, "snfs") == 120.0
    gradual = flops.training_flops(
        f_s, f_d, "magnitude", sparsity_fraction_by_step=lambda t: t / 9, total_steps=10
    )
    assert gradual == pytest.approx(3 * (100 - 90 * 0.5))


@pytest.mark.parametrize("name", ["ste", "nm_ste", "sr_ste", "s_ste", "bimask"])
def test_straight_through_training_pays_the_dense_weight_gradient(name):
    # Forward and activation gradient through the sparse weights, weight gradient dense.
    assert flops.training_flops(10.0, 100.0, name) == 2 * 10 + 100


def test_srigl_training_costs_rigls_formula():
    # The dense gradient once every ΔT steps: 3.089 f_S at f_D / f_S = 10, ΔT = 100.
    got = flops.training_flops(10.0, 100.0, "srigl", update_every_steps=100)
    assert got == flops.training_flops(10.0, 100.0, "rigl", update_every_steps=100)
    assert got / 10.0 == pytest.approx(312 / 101)


@pytest.mark.parametrize("name", ["static", "set", "snip", "grasp", "synflow"])
def test_sparse_from_the_start_costs_three_sparse_passes(name):
    assert flops.training_flops(10.0, 100.0, name) == 30.0


def test_nm_decay_pays_the_dense_weight_gradient_on_top_of_its_forward_trajectory():
    # Dense forward while the pruned weights still count (phi = 0), N:M after (phi = 1).
    got = flops.training_flops(
        10.0, 100.0, "nm_decay", sparsity_fraction_by_step=lambda t: float(t >= 5), total_steps=10
    )
    assert got == pytest.approx(0.5 * (3 * 100) + 0.5 * (2 * 10 + 100))


def test_nm_oneshot_is_dense_until_it_prunes():
    got = flops.training_flops(
        10.0, 100.0, "nm_oneshot", sparsity_fraction_by_step=lambda t: float(t >= 2), total_steps=4
    )
    assert got == pytest.approx(0.5 * 300 + 0.5 * 30)


@pytest.mark.parametrize("name", ["magnitude", "random", "nm_oneshot", "nm_decay"])
def test_algorithms_that_start_dense_need_their_schedule(name):
    # They start dense: 3 f_S would understate their cost.
    with pytest.raises(ValueError, match="sparsity_fraction_by_step"):
        flops.training_flops(10.0, 100.0, name)


def test_every_registered_sparsejax_algorithm_has_a_formula():
    for name in algorithms.names():
        if not type(algorithms.get(name)).__module__.startswith("sparsejax."):
            continue  # rank-adaptive algorithms of tensornets: their cost follows the ranks
        schedule = {"sparsity_fraction_by_step": lambda t: 1.0, "total_steps": 3}
        got = flops.training_flops(10.0, 100.0, name, **schedule)
        assert 30.0 <= got <= 300.0, name


@pytest.mark.parametrize("name", ["RigL", "rigl ", "unknown", "", None])
def test_unknown_algorithm_names_are_refused_listing_the_known_ones(name):
    with pytest.raises(ValueError, match=r"algorithm=.* known algorithms: \[.*'srigl'"):
        flops.training_flops(10.0, 100.0, name)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"update_every_steps": 0}, "update_every_steps must be a positive integer, got 0"),
        ({"update_every_steps": 2.5}, "update_every_steps must be a positive integer, got 2.5"),
    ],
)
def test_bad_update_interval_raises_naming_it(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        flops.training_flops(10.0, 100.0, "rigl", **kwargs)


def test_memory_counts_params_and_the_packed_masks_of_the_one_packer():
    mask = jax.random.bernoulli(jax.random.key(1), 0.3, (7, 13))
    params = {"w": jnp.ones((7, 13)), "b": jnp.ones(13)}
    mem = flops.memory(params, {"w": mask, "b": None})
    nnz = int(mask.sum())
    assert mem["dense_params"] == 4 * (7 * 13 + 13)
    assert mem["sparse_params"] == nnz * 8 + 4 * 13
    # masks.pack_mask packs each row of 13 into 2 bytes: what masked(packed=True) stores.
    assert mem["masks_bool"] == 91 and mem["masks_packed"] == 7 * 2
    assert mem["masks_packed"] == masks.pack_masks({"w": mask})["w"].bits.nbytes
