"""Block and channel structure for every algorithm built on `SparseAlgorithm`.

Through the masked optax transform (Adam, jitted scan): at every step each mask is
constant on every unit (a (4, 4) block, or all weights into one output unit), each
layer keeps exactly round((1 - s) * units) units, and the weights the model uses are
exactly zero wherever the mask is False. Dynamic algorithms change units, not weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparsejax import algorithms, transforms
from tests.sparsejax.algorithms.conftest import apply, init, scan_step, xent

STEPS = 30
SPARSITY = 0.5
STRUCTURES = {
    "block": dict(structure="block", block_shape=(4, 4)),
    "channel": {"structure": "channel"},
}
ALGORITHMS = {
    "static": dict(distribution="erk"),
    "set": dict(update_every_steps=5, end_step=25, drop_fraction=0.5, distribution="uniform"),
    "rigl": dict(update_every_steps=5, end_step=25, drop_fraction=0.5, distribution="erk"),
    "magnitude": dict(begin_step=0, end_step=20, update_every_steps=5, distribution="uniform"),
    "random": dict(begin_step=0, end_step=20, update_every_steps=5, distribution="uniform"),
    "ste": dict(update_every_steps=5, distribution="uniform"),
    "snip": dict(distribution="uniform"),
    "synflow": dict(rounds=3, distribution="uniform"),
}


def _unit(structure, shape):
    return (4, 4) if structure == "block" else (shape[0], 1)


def _unit_grid(mask, unit):
    """Per-unit counts of kept weights: every entry must be 0 or the unit's size."""
    k, n = mask.shape
    return mask.reshape(k // unit[0], unit[0], n // unit[1], unit[1]).sum(axis=(1, 3))


@pytest.mark.parametrize("structure", list(STRUCTURES))
@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_masks_are_unit_constant_with_exact_unit_counts_every_step(name, structure):
    algo = algorithms.get(name, sparsity=SPARSITY, **ALGORITHMS[name], **STRUCTURES[structure])
    params = init(jax.random.key(1))
    kx, ky = jax.random.split(jax.random.key(7))
    x, y = jax.random.normal(kx, (32, 12)), jax.random.randint(ky, (32,), 0, 4)
    start = algo.masks_from_model(
        params, key=jax.random.key(2), apply_fn=apply, batch=(x, y), loss_fn=xent
    )
    tx = transforms.masked(optax.adam(1e-2), algo, key=jax.random.key(3), masks=start)
    state = tx.init(params)
    if not algo.straight_through:
        params = transforms.sparsify(params, state)

    step = scan_step(algo, tx, x, y)
    _, (used, history) = jax.jit(lambda c: jax.lax.scan(step, c, None, length=STEPS))(
        (params, state)
    )
    layer_s = algo.layer_sparsities(params)
    changed = False
    for layer in ("l1", "l2"):
        shape = params[layer]["kernel"].shape
        unit = _unit(structure, shape)
        units = (shape[0] // unit[0]) * (shape[1] // unit[1])
        target = layer_s[layer]["kernel"]
        final_units = round((1 - target) * units)
        ms = np.asarray(history[layer]["kernel"])
        ws = np.asarray(used[layer]["kernel"])
        for t in range(STEPS):
            grid = _unit_grid(ms[t], unit)
            assert set(np.unique(grid)) <= {0, unit[0] * unit[1]}, (t, layer)
            assert (ws[t][~ms[t]] == 0.0).all(), (t, layer)
            if name not in ("magnitude", "random") or t >= 20:
                assert int((grid > 0).sum()) == final_units, (t, layer)
        changed |= bool((ms[0] != ms[-1]).any())
    # A dead output unit (ReLU at 0) gets no gradient, so RigL's channel regrowth can
    # rightly pick the units it just dropped; random regrowth (SET) and blocks must move.
    if name == "set" or (name == "rigl" and structure == "block"):
        assert changed, "dynamic sparse training moved no unit"


def test_rigl_grows_the_block_with_the_largest_gradient():
    algo = algorithms.get(
        "rigl", sparsity=0.5, structure="block", block_shape=(2, 2), distribution="uniform",
        drop_fraction=0.5, update_every_steps=1, end_step=10,
    )  # fmt: skip
    params = {
        "w": {"kernel": jnp.array([[5.0, 5, 1, 1], [5, 5, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]])}
    }
    mask = jnp.array([[1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]], bool)
    grads = {"w": {"kernel": jnp.array([[0.0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 3, 3], [0, 1, 3, 3]])}}
    new = algo.update_masks(
        {"w": {"kernel": mask}}, params, grads, jnp.asarray(0), jax.random.key(0)
    )["w"]["kernel"]
    # Drop: of the two live blocks, the one with the smaller sum |w| (top right).
    # Grow: of the free blocks, the one with the larger sum |g| (bottom right).
    want = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], bool)
    np.testing.assert_array_equal(np.asarray(new), want)


def test_structure_errors_name_the_argument():
    with pytest.raises(ValueError, match="structure must be one of .*got 'rows'"):
        algorithms.get("rigl", structure="rows")
    with pytest.raises(ValueError, match=r"block_shape must be positive ints, got \(0, 4\)"):
        algorithms.get("static", structure="block", block_shape=(0, 4))
    with pytest.raises(ValueError, match="SNFS supports structure='unstructured' only"):
        algorithms.get("snfs", structure="channel")
    with pytest.raises(ValueError, match="SRigL supports structure='unstructured' only"):
        algorithms.get("srigl", structure="block")
    with pytest.raises(ValueError, match="needs a per-layer distribution.*'global'"):
        algorithms.get("snip", structure="block", distribution="global")
    algo = algorithms.get("static", structure="block", block_shape=(5, 4), distribution="uniform")
    with pytest.raises(ValueError, match=r"block_shape=\(5, 4\) must divide .* shape \(12, 16\)"):
        algo.init_masks(init(jax.random.key(0)), jax.random.key(1))


def test_from_config_passes_the_structure():
    algo = algorithms.from_config(
        {"algorithm": "rigl", "target": 0.8, "structure": "block", "block_shape": (4, 4)}, 100
    )
    assert (algo.structure, algo.block_shape) == ("block", (4, 4))
