"""Properties of `tensornets.contract`: optimal paths, FLOP counts, method choice."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from tensornets import contract


def test_plan_counts_matmul_flops():
    p = contract.plan("ab,bc->ac", (3, 4), (4, 5))
    assert p.flops == contract.matmul_flops(3, 4, 5) == 2 * 3 * 4 * 5
    assert p.path == ((0, 1),)


def test_plan_finds_the_cheap_order_of_a_chain():
    # (x @ A) @ B costs 2*1*100*100 + 2*1*100*2; x @ (A @ B) costs 2*100*100*2 + 2*1*100*2.
    p = contract.plan("za,ab,bc->zc", (1, 100), (100, 100), (100, 2))
    assert p.flops == 2 * 100 * 100 + 2 * 100 * 2
    q = contract.plan("za,ab,bc->zc", (1000, 100), (100, 100), (100, 2))
    assert q.flops == 2 * 100 * 100 * 2 + 2 * 1000 * 100 * 2


def test_contract_equals_einsum_and_large_networks_use_dp():
    rng = np.random.default_rng(0)
    shapes = [(2, 3)] + [(3, 3)] * 8 + [(3, 2)]
    ops = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    letters = "abcdefghijk"
    expr = ",".join(letters[i] + letters[i + 1] for i in range(10)) + "->ak"
    np.testing.assert_allclose(
        contract.contract(expr, *ops), np.einsum(expr, *ops), rtol=1e-4, atol=1e-4
    )
    assert contract.plan(expr, *shapes).flops > 0


def test_choose_method():
    assert contract.choose_method(10, 20) == "factorized"
    assert contract.choose_method(30, 20) == "dense"
    assert contract.choose_method(20, 20) == "factorized"
    assert contract.choose_method(30, 20, "factorized") == "factorized"
    assert contract.choose_method(10, 20, "dense") == "dense"
    with pytest.raises(ValueError, match="method must be one of"):
        contract.choose_method(1, 2, "fast")


def test_factorized_apply_both_ways_and_auto_follows_flops():
    rng = np.random.default_rng(1)
    u = rng.standard_normal((64, 4)).astype(np.float32)
    v = rng.standard_normal((4, 64)).astype(np.float32)
    args = ("zi", ["ir", "ro"], None, "io", "zo")
    for batch in (1, 512):
        x = rng.standard_normal((batch, 64)).astype(np.float32)
        costs = contract.factorized_apply_costs(
            x.shape, "zi", ["ir", "ro"], [u.shape, v.shape], "io", "zo"
        )
        assert costs["dense"] == costs["reconstruct"] + costs["matmul"]
        expected = x @ (u @ v)
        for method in ("factorized", "dense", "auto"):
            y = contract.factorized_apply(
                x, args[0], args[1], [jnp.asarray(u), jnp.asarray(v)], args[3], args[4], method
            )
            np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-3)
    # rank 4 out of 64: factorizing is cheaper at every batch size here
    costs = contract.factorized_apply_costs(
        (1, 64), "zi", ["ir", "ro"], [u.shape, v.shape], "io", "zo"
    )
    assert costs["factorized"] < costs["dense"]


def test_optimal_path_is_never_worse_than_reconstruction():
    # Reconstruct-then-matmul is one of the orders the exhaustive planner searches, so the
    # planned factorized cost never exceeds it; here (rank 64 of a 16x16 matrix) the planner
    # itself multiplies the factors first.
    for batch in (1, 64, 4096):
        costs = contract.factorized_apply_costs(
            (batch, 16), "zi", ["ir", "ro"], [(16, 64), (64, 16)], "io", "zo"
        )
        assert costs["factorized"] <= costs["dense"]
    assert costs["factorized"] == costs["dense"]
    assert contract.plan("zi,ir,ro->zo", (4096, 16), (16, 64), (64, 16)).path[0] == (1, 2)


def test_plan_requires_explicit_output():
    with pytest.raises(ValueError, match="explicit output"):
        contract.plan("ab,bc", (2, 3), (3, 4))
