"""Traced-index block-sparse layouts: the matmuls equal the dense product in values and
gradients, one compiled program serves every index array, and selection and updates keep
exact counts.

Tolerances: float32 sums in another order, so ``atol = rtol = 1e-4`` on O(1) data.
"""

from __future__ import annotations

from unittest import mock

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import pallas_kernels as pk
from pallas_kernels import dynamic

_SETTINGS = settings(max_examples=8, deadline=None, derandomize=True)
_TOL = dict(atol=1e-4, rtol=1e-4)
# Tiny chunks force every loop path: several column (or block) chunks, a shorter last
# chunk, and row pieces of 8 with a remainder.
CHUNKS = ("default", "tiny")


def _chunk_patch(chunk):
    return mock.patch.object(
        dynamic, "_CHUNK_BYTES", 1 if chunk == "tiny" else dynamic._CHUNK_BYTES
    )


def _fan_in(rng, kb, nbc, f, bk, bn):
    rows = pk.fan_in_select(rng.random((kb, nbc)), f)
    values = jnp.asarray(rng.standard_normal((nbc, f, bk, bn)), jnp.float32)
    return values, rows


def _coo(rng, kb, nbc, nb, bk, bn):
    rows, cols = pk.coo_select(rng.random((kb, nbc)), nb)
    # A random order of the blocks: the ops must not rely on column-major order.
    perm = rng.permutation(nb)
    values = jnp.asarray(rng.standard_normal((nb, bk, bn)), jnp.float32)
    return values, rows[perm], cols[perm]


def _loss(matmul):
    # A nonlinear scalar of the output, so the cotangent dY is not constant.
    return lambda x, v: jnp.sum(jnp.sin(matmul(x, v)))


def _assert_matches(op, reference, x, values):
    chex.assert_trees_all_close(jax.jit(op)(x, values), jax.jit(reference)(x, values), **_TOL)
    got = jax.jit(jax.grad(_loss(op), argnums=(0, 1)))(x, values)
    want = jax.jit(jax.grad(_loss(reference), argnums=(0, 1)))(x, values)
    chex.assert_trees_all_close(got, want, **_TOL)


@pytest.mark.parametrize("chunk", CHUNKS)
@_SETTINGS
@given(
    kb=st.integers(1, 4),
    nbc=st.integers(1, 3),
    bk=st.sampled_from([8, 16, 32]),  # 32 takes the per-block branch of the forward
    bn=st.sampled_from([8, 16]),
    fan_frac=st.floats(0.0, 1.0),
    rows=st.integers(1, 20),
    lead=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fan_in_matches_reference(chunk, kb, nbc, bk, bn, fan_frac, rows, lead, seed):
    rng = np.random.default_rng(seed)
    f = 1 + round(fan_frac * (kb - 1))
    values, idx = _fan_in(rng, kb, nbc, f, bk, bn)
    shape = (2, rows, kb * bk) if lead else (rows, kb * bk)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    with _chunk_patch(chunk):
        _assert_matches(
            lambda x, v: pk.fan_in_matmul(x, v, idx),
            lambda x, v: pk.fan_in_matmul_reference(x, v, idx),
            x,
            values,
        )


@pytest.mark.parametrize("chunk", CHUNKS)
@_SETTINGS
@given(
    kb=st.integers(1, 4),
    nbc=st.integers(1, 3),
    bk=st.sampled_from([8, 16]),
    bn=st.sampled_from([8, 16]),
    frac=st.floats(0.0, 1.0),
    rows=st.integers(1, 20),
    seed=st.integers(0, 2**16),
)
def test_coo_matches_reference(chunk, kb, nbc, bk, bn, frac, rows, seed):
    rng = np.random.default_rng(seed)
    nb = 1 + round(frac * (kb * nbc - 1))
    values, r, c = _coo(rng, kb, nbc, nb, bk, bn)
    n = nbc * bn
    x = jnp.asarray(rng.standard_normal((rows, kb * bk)), jnp.float32)
    with _chunk_patch(chunk):
        _assert_matches(
            lambda x, v: pk.coo_matmul(x, v, r, c, n=n),
            lambda x, v: pk.coo_matmul_reference(x, v, r, c, n=n),
            x,
            values,
        )


def test_gradients_equal_the_masked_dense_gradient():
    """dvalues are the blocks of the dense gradient dW = X^T dY at the stored positions."""
    rng = np.random.default_rng(0)
    values, rows = _fan_in(rng, 4, 3, 2, 8, 8)
    x = jnp.asarray(rng.standard_normal((5, 32)), jnp.float32)
    w = pk.fan_in_to_dense(values, rows, 32)
    dw = jax.grad(_loss(lambda x, w: x @ w), argnums=1)(x, w)
    _, dv = jax.grad(_loss(lambda x, v: pk.fan_in_matmul(x, v, rows)), argnums=(0, 1))(x, values)
    blocks = dw.reshape(4, 8, 3, 8).transpose(0, 2, 1, 3)
    want = blocks[rows, jnp.arange(3)[:, None]]
    chex.assert_trees_all_close(dv, want, **_TOL)


def test_check_grads():
    rng = np.random.default_rng(1)
    values, rows = _fan_in(rng, 3, 2, 2, 4, 4)
    x = jnp.asarray(rng.standard_normal((3, 12)), jnp.float32)
    check_grads(lambda x, v: pk.fan_in_matmul(x, v, rows), (x, values), order=1, modes=["rev"])
    c_values, r, c = _coo(rng, 3, 2, 4, 4, 4)
    check_grads(lambda x, v: pk.coo_matmul(x, v, r, c, n=8), (x, c_values), order=1, modes=["rev"])


class JitEqualsEager(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_fan_in_and_coo(self):
        rng = np.random.default_rng(2)
        values, rows = _fan_in(rng, 4, 3, 2, 8, 8)
        c_values, r, c = _coo(rng, 4, 3, 5, 8, 8)
        x = jnp.asarray(rng.standard_normal((6, 32)), jnp.float32)
        fan = self.variant(lambda x, v, i: pk.fan_in_matmul(x, v, i))
        coo = self.variant(lambda x, v, i, j: pk.coo_matmul(x, v, i, j, n=24))
        chex.assert_trees_all_close(fan(x, values, rows), x @ pk.fan_in_to_dense(values, rows, 32))
        want = x @ pk.coo_to_dense(c_values, r, c, (32, 24))
        chex.assert_trees_all_close(coo(x, c_values, r, c), want, **_TOL)

    @chex.variants(with_jit=True, without_jit=True)
    def test_selection_and_update(self):
        rng = np.random.default_rng(3)
        scores = jnp.asarray(rng.random((6, 4)))
        select = self.variant(lambda s: pk.fan_in_select(s, 3))
        np.testing.assert_array_equal(select(scores), pk.fan_in_select(np.asarray(scores), 3))
        values, rows = _fan_in(rng, 6, 4, 3, 4, 4)
        drop, grow = jnp.asarray(rng.random((4, 3))), jnp.asarray(rng.random((6, 4)))
        update = self.variant(pk.fan_in_update)
        got = update(values, rows, drop, grow, 2)
        chex.assert_trees_all_equal(got, jax.jit(pk.fan_in_update)(values, rows, drop, grow, 2))


def test_one_trace_for_every_index_array():
    """A new mask (new indices, same shapes) reuses the compiled train step."""
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((4, 32)), jnp.float32)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(x, values, rows, c_values, c_rows, c_cols):
        fan = jax.grad(_loss(lambda x, v: pk.fan_in_matmul(x, v, rows)), argnums=(0, 1))
        coo = jax.grad(
            _loss(lambda x, v: pk.coo_matmul(x, v, c_rows, c_cols, n=24)), argnums=(0, 1)
        )
        return fan(x, values), coo(x, c_values)

    for seed in range(3):
        r = np.random.default_rng(seed)
        step(x, *_fan_in(r, 4, 3, 2, 8, 8), *_coo(r, 4, 3, 5, 8, 8))


# ----------------------------------------------------------------------------- selection


@_SETTINGS
@given(kb=st.integers(1, 8), nbc=st.integers(1, 5), frac=st.floats(0, 1), seed=st.integers(0, 99))
def test_fan_in_select_keeps_the_top_f_of_every_column(kb, nbc, frac, seed):
    f = 1 + round(frac * (kb - 1))
    scores = np.random.default_rng(seed).integers(0, 3, (kb, nbc)).astype(np.float32)  # ties
    rows = np.asarray(jax.jit(pk.fan_in_select, static_argnums=1)(scores, f))
    assert rows.shape == (nbc, f) and rows.dtype == np.int32
    for j in range(nbc):
        assert np.all(np.diff(rows[j]) > 0)  # distinct and ascending
        # The exact top f by (score high to low, row low to high): ties are deterministic.
        want = sorted(sorted(range(kb), key=lambda i: (-scores[i, j], i))[:f])
        np.testing.assert_array_equal(rows[j], want)


@_SETTINGS
@given(kb=st.integers(1, 6), nbc=st.integers(1, 5), frac=st.floats(0, 1), seed=st.integers(0, 99))
def test_coo_select_keeps_the_global_top_nb(kb, nbc, frac, seed):
    nb = 1 + round(frac * (kb * nbc - 1))
    scores = np.random.default_rng(seed).integers(0, 3, (kb, nbc)).astype(np.float32)
    rows, cols = jax.jit(pk.coo_select, static_argnums=1)(scores, nb)
    flat = np.asarray(cols) * kb + np.asarray(rows)
    assert flat.shape == (nb,) and np.all(np.diff(flat) > 0)  # distinct, column-major
    order = sorted(range(kb * nbc), key=lambda p: (-scores[p % kb, p // kb], p))
    np.testing.assert_array_equal(flat, sorted(order[:nb]))


def test_from_dense_round_trips():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((24, 32)).astype(np.float32)
    mask = np.zeros((3, 4), bool)
    mask[[0, 2, 1, 2, 0, 1, 1, 2], [0, 0, 1, 1, 2, 2, 3, 3]] = True  # 2 a column
    expanded = np.kron(mask, np.ones((8, 8), bool))
    values, rows = pk.fan_in_from_dense(w, mask)
    assert values.shape == (4, 2, 8, 8)
    np.testing.assert_array_equal(pk.fan_in_to_dense(values, rows, 24), w * expanded)
    values, r, c = pk.coo_from_dense(w, mask)
    np.testing.assert_array_equal(pk.coo_to_dense(values, r, c, (24, 32)), w * expanded)


# ----------------------------------------------------------------------------- updates


def _expected_swap(old, drop, grow, n):
    """Reference on sets: the kept positions plus the n best not kept (ties: lower)."""
    order = sorted(range(len(old)), key=lambda s: (drop[s], s))
    kept = {old[s] for s in order[n:]}
    cands = sorted((p for p in range(len(grow)) if p not in kept), key=lambda p: (-grow[p], p))
    return kept | set(cands[:n])


@_SETTINGS
@given(kb=st.integers(2, 7), nbc=st.integers(1, 4), seed=st.integers(0, 999), data=st.data())
def test_fan_in_update_swaps_exactly(kb, nbc, seed, data):
    rng = np.random.default_rng(seed)
    f = data.draw(st.integers(1, kb - 1))
    n = data.draw(st.integers(0, f))
    values, rows = _fan_in(rng, kb, nbc, f, 2, 2)
    drop = rng.integers(0, 3, (nbc, f)).astype(np.float32)  # ties on purpose
    grow = rng.integers(0, 3, (kb, nbc)).astype(np.float32)
    # n_swap traced: a schedule may compute it inside the step.
    new_v, new_r, grown = jax.jit(pk.fan_in_update)(values, rows, drop, grow, jnp.int32(n))
    rows, new_r, values, new_v = map(np.asarray, (rows, new_r, values, new_v))
    for j in range(nbc):
        assert len(set(new_r[j])) == f  # exact fan-in, distinct
        assert set(new_r[j]) == _expected_swap(list(rows[j]), drop[j], grow[:, j], n)
        for s in range(f):
            if new_r[j, s] in set(rows[j]):  # an old block keeps its value and is not new
                old_slot = list(rows[j]).index(new_r[j, s])
                np.testing.assert_array_equal(new_v[j, s], values[j, old_slot])
                assert not grown[j, s]
            else:
                assert grown[j, s] and not new_v[j, s].any()


@_SETTINGS
@given(kb=st.integers(1, 5), nbc=st.integers(1, 4), seed=st.integers(0, 999), data=st.data())
def test_coo_update_swaps_exactly(kb, nbc, seed, data):
    rng = np.random.default_rng(seed)
    nb = data.draw(st.integers(1, kb * nbc))
    n = data.draw(st.integers(0, nb))
    values, rows, cols = _coo(rng, kb, nbc, nb, 2, 2)
    drop = rng.integers(0, 3, nb).astype(np.float32)
    grow = rng.integers(0, 3, (kb, nbc)).astype(np.float32)
    new_v, new_r, new_c, grown = jax.jit(pk.coo_update, static_argnums=5)(
        values, rows, cols, drop, grow, n
    )
    old = list(np.asarray(cols) * kb + np.asarray(rows))
    new = list(np.asarray(new_c) * kb + np.asarray(new_r))
    assert len(set(new)) == nb
    assert set(new) == _expected_swap(old, drop, grow.T.reshape(-1), n)
    for s, p in enumerate(new):
        if p in old:
            np.testing.assert_array_equal(new_v[s], values[old.index(p)])
            assert not grown[s]
        else:
            assert grown[s] and not np.asarray(new_v[s]).any()


def test_update_with_no_swap_is_the_identity():
    rng = np.random.default_rng(6)
    values, rows = _fan_in(rng, 5, 3, 2, 4, 4)
    out = pk.fan_in_update(values, rows, rng.random((3, 2)), rng.random((5, 3)), 0)
    chex.assert_trees_all_equal(out, (values, rows, jnp.zeros((3, 2), bool)))


# ----------------------------------------------------------------------------- errors


def test_bad_inputs_raise_naming_the_argument():
    rng = np.random.default_rng(7)
    values, rows = _fan_in(rng, 4, 3, 2, 8, 8)
    x = jnp.ones((2, 32))
    uneven = np.array([[True, True], [False, True]])  # 1 block in column 0, 2 in column 1
    cases = [
        (lambda: pk.fan_in_matmul(jnp.ones((2, 30)), values, rows), "bk=8"),
        (lambda: pk.fan_in_matmul(jnp.ones((2, 8)), values, rows), "fan-in f=2"),
        (lambda: pk.fan_in_matmul(x, values, rows[:, :1]), "rows must be an int array of shape"),
        (
            lambda: pk.fan_in_matmul(x, values, rows.astype(jnp.float32)),
            r"shape \(3, 2\), got float32",
        ),
        (lambda: pk.fan_in_matmul(x, values, rows.at[0, 0].set(4)), "rows must lie in"),
        (lambda: pk.fan_in_matmul(x, values, rows.at[1].set(0)), "column 1 repeats"),
        (lambda: pk.fan_in_matmul(x, values[0], rows), "values must be"),
        (lambda: pk.fan_in_to_dense(values, rows, 0), "k must be a positive int"),
        (lambda: pk.fan_in_select(np.ones((3, 2)), 4), "fan_in=4"),
        (lambda: pk.fan_in_select(np.ones(3), 1), "scores must be"),
        (lambda: pk.fan_in_from_dense(np.ones((8, 8)), uneven), "same number"),
        (lambda: pk.fan_in_from_dense(np.ones((8, 9)), np.ones((2, 2))), "block_mask shape"),
        (lambda: pk.fan_in_update(values, rows, np.ones((3, 2)), np.ones((4, 3)), 3), "n_swap"),
        (
            lambda: pk.fan_in_update(values, rows, np.ones((3, 1)), np.ones((4, 3)), 1),
            "drop_scores",
        ),
        (
            lambda: pk.fan_in_update(values, rows, np.ones((3, 2)), np.ones((4, 2)), 1),
            "grow_scores",
        ),
        (lambda: pk.coo_matmul(x, values[0], rows[0], rows[0], n=25), "must divide shape"),
        (
            lambda: pk.coo_matmul(x, values[0], jnp.array([1, 1]), jnp.array([2, 2]), n=24),
            "distinct",
        ),
        (lambda: pk.coo_matmul(x, values[0], rows[0], jnp.array([0, 3]), n=24), "cols must lie"),
        (lambda: pk.coo_select(np.ones((2, 2)), 5), "num_blocks=5"),
        (lambda: pk.coo_to_dense(values[0, :0], rows[0, :0], rows[0, :0], (32, 24)), "1 to 12"),
        (lambda: pk.coo_from_dense(np.ones((4, 4)), np.zeros((2, 2))), "keeps no block"),
    ]
    for fn, message in cases:
        with pytest.raises(ValueError, match=message):
            fn()


def test_under_jit_only_static_shapes_are_checked():
    """Traced indices cannot be inspected, so only shapes are checked under jit."""
    rng = np.random.default_rng(8)
    values, rows = _fan_in(rng, 4, 3, 2, 8, 8)
    y = jax.jit(lambda r: pk.fan_in_matmul(jnp.ones((2, 32)), values, r))(rows)
    assert y.shape == (2, 24)
    with pytest.raises(ValueError, match="rows must be an int array of shape"):
        jax.jit(lambda r: pk.fan_in_matmul(jnp.ones((2, 32)), values, r))(rows[:, :1])
