"""Selection rules: each rule's sparsity exactly as defined, and JumpReLU's gradients."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsejax.sae import selection

# A few (tokens, n_latents, budget) cases, so the jitted rules compile a bounded number of
# times: a single token, budgets of 1, of all latents and in between, a budget above the
# number of tokens.
CASES = [(1, 9, 3), (4, 7, 1), (4, 7, 7), (9, 24, 8)]


@functools.cache
def _jitted(rule, budget):
    return jax.jit(
        functools.partial(rule, **{"m" if rule is selection.feature_choice else "k": budget})
    )


def run(rule, pre, budget):
    """``rule(pre, budget)`` through a cached jit (one compile per shape and budget)."""
    return _jitted(rule, budget)(pre)


@st.composite
def batches(draw):
    """Random pre-activations ``[tokens, n]`` (positive or mixed sign) and a budget k <= n."""
    tokens, n, k = draw(st.sampled_from(CASES))
    seed = draw(st.integers(0, 2**16))
    positive = draw(st.booleans())
    pre = np.random.default_rng(seed).standard_normal((tokens, n)).astype(np.float32)
    if positive:  # every pre-activation > 0: the number kept equals the number selected
        pre = np.abs(pre) + 0.1
    return jnp.asarray(pre), k, positive


def _nonzero(z):
    return np.asarray(z) != 0


@settings(max_examples=10, deadline=None)
@given(batches())
def test_topk_keeps_exactly_the_k_largest_per_token(case):
    pre, k, positive = case
    z = run(selection.topk, pre, k)
    nz = _nonzero(z)
    assert np.all(nz.sum(axis=1) <= k)
    if positive:
        np.testing.assert_array_equal(nz.sum(axis=1), k)
    # What is kept equals relu(pre), and nothing kept is smaller than anything dropped.
    np.testing.assert_array_equal(np.asarray(z)[nz], np.asarray(pre)[nz])
    kth = np.sort(np.asarray(pre), axis=1)[:, -k]
    assert np.all(np.where(nz, np.asarray(pre) >= kth[:, None], True))
    dropped_positive = ~nz & (np.asarray(pre) > np.maximum(kth, 0)[:, None])
    assert not dropped_positive.any()


@settings(max_examples=10, deadline=None)
@given(batches())
def test_abs_topk_keeps_k_largest_magnitudes_with_their_sign(case):
    pre, k, _ = case
    z = np.asarray(run(selection.abs_topk, pre, k))
    p = np.asarray(pre)
    nz = z != 0
    np.testing.assert_array_equal(nz.sum(axis=1), k)  # normal draws are never exactly 0
    np.testing.assert_array_equal(z[nz], p[nz])  # sign and value unchanged
    kth = np.sort(np.abs(p), axis=1)[:, -k]
    assert np.all(np.abs(p)[nz] >= np.repeat(kth, nz.sum(axis=1)))


def test_abs_topk_keeps_negative_codes():
    pre = jnp.array([[-3.0, 1.0, 0.5, -0.2], [0.1, -0.1, 2.0, -5.0]])
    np.testing.assert_array_equal(
        selection.abs_topk(pre, 2), [[-3.0, 1.0, 0.0, 0.0], [0.0, 0.0, 2.0, -5.0]]
    )
    assert float(jnp.min(selection.topk(pre, 2))) >= 0  # TopK's ReLU drops them instead


@settings(max_examples=10, deadline=None)
@given(batches())
def test_batch_topk_keeps_exactly_k_times_tokens(case):
    pre, k, positive = case
    tokens = pre.shape[0]
    z = np.asarray(run(selection.batch_topk, pre, k))
    nz = z != 0
    assert nz.sum() <= k * tokens
    if positive:
        assert nz.sum() == k * tokens
    # The kept set is the top of the whole batch: no dropped entry beats a kept one.
    p = np.asarray(pre)
    if nz.any() and (~nz).any():
        assert p[nz].min() >= p[~nz].max()


def test_mutual_choice_is_the_top_k_times_tokens_pairs_of_the_batch():
    pre = jnp.asarray(np.abs(np.random.default_rng(5).standard_normal((9, 24))) + 0.1)
    z = run(selection.mutual_choice, pre, 8)
    assert int(jnp.sum(z != 0)) == 8 * 9
    np.testing.assert_array_equal(z, run(selection.batch_topk, pre, 8))
    # Unlike TopK, tokens get different numbers of latents.
    assert len(set(np.asarray(jnp.sum(z != 0, axis=1)).tolist())) > 1


@settings(max_examples=10, deadline=None)
@given(batches())
def test_feature_choice_gives_each_latent_at_most_m_tokens(case):
    pre, k, positive = case
    tokens = pre.shape[0]
    m = min(k, tokens)
    z = np.asarray(run(selection.feature_choice, pre, m))
    nz = z != 0
    assert np.all(nz.sum(axis=0) <= m)
    if positive:
        np.testing.assert_array_equal(nz.sum(axis=0), m)
    p = np.asarray(pre)
    mth = np.sort(p, axis=0)[-m, :]
    assert np.all(np.where(nz, p >= mth[None, :], True))


def test_ties_still_select_exactly_the_budget():
    pre = jnp.ones((4, 7))
    per_token = np.asarray(run(selection.topk, pre, 2) != 0).sum(axis=1)
    np.testing.assert_array_equal(per_token, 2)
    assert int(jnp.sum(run(selection.batch_topk, pre, 2) != 0)) == 8
    assert int(jnp.sum(run(selection.abs_topk, -pre, 2) != 0)) == 8
    per_latent = np.asarray(run(selection.feature_choice, pre, 2) != 0).sum(axis=0)
    np.testing.assert_array_equal(per_latent, 2)


def test_per_token_rules_take_leading_batch_axes():
    pre = jnp.asarray(np.random.default_rng(0).standard_normal((2, 2, 7)), jnp.float32)
    flat = pre.reshape(4, 7)
    for rule in (selection.topk, selection.abs_topk):
        np.testing.assert_array_equal(run(rule, pre, 2).reshape(4, 7), run(rule, flat, 2))


@pytest.mark.parametrize(
    "rule, budget",
    [
        (selection.topk, 2),
        (selection.batch_topk, 2),
        (selection.feature_choice, 2),
        (selection.abs_topk, 2),
    ],
)
def test_gradient_reaches_only_selected_entries(rule, budget):
    pre = jnp.asarray(np.random.default_rng(1).standard_normal((4, 7)) + 0.5, jnp.float32)
    z = run(rule, pre, budget)
    g = jax.grad(lambda p: jnp.sum(_jitted(rule, budget)(p) * 1.7))(pre)
    np.testing.assert_allclose(np.asarray(g), np.where(np.asarray(z) != 0, 1.7, 0.0))


def test_threshold_select_keeps_what_exceeds_the_threshold():
    pre = jnp.array([[0.5, -1.0, 2.0], [1.5, 0.2, 0.0]])
    np.testing.assert_array_equal(
        selection.threshold_select(pre, jnp.array([1.0, -2.0, 0.1])),
        np.float32([[0.0, 0.0, 2.0], [1.5, 0.2, 0.0]]),
    )
    np.testing.assert_array_equal(
        selection.threshold_select(pre, 0.4), [[0.5, 0.0, 2.0], [1.5, 0.0, 0.0]]
    )


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda p: selection.topk(p, 0), "k"),
        (lambda p: selection.topk(p, 9), "k"),
        (lambda p: selection.batch_topk(p, 9), "k"),
        (lambda p: selection.batch_topk(p[0], 2), "pre"),
        (lambda p: selection.feature_choice(p, 4), "m"),
        (lambda p: selection.abs_topk(p, 2.5), "k"),
    ],
)
def test_bad_budgets_name_the_argument(call, name):
    with pytest.raises(ValueError, match=rf"^{name} must"):
        call(jnp.ones((3, 8)))


# JumpReLU: the straight-through pseudo-derivatives are the exact derivatives of the
# rectangle-kernel-smoothed functions in the threshold.


def _jumprelu_case(seed, tokens=64, n=6, bandwidth=0.2):
    rng = np.random.default_rng(seed)
    threshold = rng.uniform(0.3, 0.7, n)
    # Many pre-activations fall inside the kernel window around each threshold.
    pre = threshold + rng.uniform(-0.3, 0.3, (tokens, n))
    c = rng.standard_normal((tokens, n))
    return tuple(jnp.asarray(a, jnp.float64) for a in (pre, threshold, c)) + (bandwidth,)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_jumprelu_threshold_gradient_matches_finite_differences_of_smoothed_objective(seed):
    lam = 0.7
    with jax.enable_x64(True):
        pre, threshold, c, eps = _jumprelu_case(seed)
        assert np.mean(np.abs(np.asarray(pre - threshold)) < eps / 2) > 0.1

        def objective(t):
            return jnp.sum(c * selection.jumprelu(pre, t, eps)) + lam * jnp.sum(
                selection.step(pre, t, eps)
            )

        def smoothed(t):
            return jnp.sum(c * selection.jumprelu_smoothed_reference(pre, t, eps)) + lam * jnp.sum(
                selection.step_smoothed_reference(pre, t, eps)
            )

        smoothed = jax.jit(smoothed)
        grad = np.asarray(jax.jit(jax.grad(objective))(threshold))
        h = 1e-6
        fd = np.array(
            [
                (smoothed(threshold.at[i].add(h)) - smoothed(threshold.at[i].add(-h))) / (2 * h)
                for i in range(threshold.shape[0])
            ]
        )
        np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-6)
        # Away from the window both functions equal the unsmoothed ones.
        far = jnp.abs(pre - threshold) > eps / 2
        np.testing.assert_array_equal(
            jnp.where(far, selection.jumprelu_smoothed_reference(pre, threshold, eps), 0),
            jnp.where(far, selection.jumprelu(pre, threshold, eps), 0),
        )


def test_jumprelu_input_gradient_is_the_gate_and_step_passes_none():
    rng = np.random.default_rng(3)
    pre = jnp.asarray(rng.standard_normal((8, 5)), jnp.float32)
    threshold = jnp.full(5, 0.2)
    c = jnp.asarray(rng.standard_normal((8, 5)), jnp.float32)
    g = jax.grad(lambda p: jnp.sum(c * selection.jumprelu(p, threshold, 0.01)))(pre)
    np.testing.assert_allclose(g, jnp.where(pre > threshold, c, 0))
    g0 = jax.grad(lambda p: jnp.sum(selection.step(p, threshold, 0.01)))(pre)
    np.testing.assert_array_equal(g0, jnp.zeros_like(pre))


def test_pseudo_gradient_estimates_the_expected_loss_gradient():
    """Averaged over tokens, the kernel pseudo-derivative is a density estimate of the exact
    derivative of the expected objective (the paper's justification): for z ~ N(0, 1),
    E[z H(z - t)] = phi(t) and E[H(z - t)] = 1 - Phi(t), so their t-derivatives are -t phi(t)
    and -phi(t). Quantiles of N(0, 1) stand in for the tokens; a window of width eps holds
    a few hundred of them, hence the 1% tolerance (the tested gradients differ from the
    rule without the factor t by 20% or more)."""
    with jax.enable_x64(True):
        tokens, eps = 50_000, 0.02
        z = jax.scipy.stats.norm.ppf((jnp.arange(tokens, dtype=jnp.float64) + 0.5) / tokens)
        t = jnp.array([0.3, 0.8, 1.5])
        pre = jnp.broadcast_to(z[:, None], (tokens, 3))

        def expected(t):
            out = jnp.mean(selection.jumprelu(pre, t, eps), axis=0)
            return jnp.sum(out) + jnp.sum(jnp.mean(selection.step(pre, t, eps), axis=0))

        def exact(t):
            return jnp.sum(jax.scipy.stats.norm.pdf(t)) + jnp.sum(1 - jax.scipy.stats.norm.cdf(t))

        h = 1e-5
        exact = jax.jit(exact)
        fd = np.array(
            [(exact(t.at[i].add(h)) - exact(t.at[i].add(-h))) / (2 * h) for i in range(3)]
        )
        np.testing.assert_allclose(np.asarray(jax.jit(jax.grad(expected))(t)), fd, rtol=1e-2)
