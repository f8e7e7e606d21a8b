"""The straight-through methods' forward pass follows the current weights, under jit.

Zhou et al. 2021 ("Learning N:M Fine-grained Structured Sparse Neural Networks
From Scratch") recompute the N:M mask from the weights at every forward pass:
at step t the model runs on E(W_t) ⊙ W_t, not on a mask built from W_{t-1}.
These tests train a Flax Dense layer with Adam at a learning rate that flips a few
percent of the mask per step and read the mask the forward pass really applies by
running the layer on the identity (its output is the effective kernel).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pallas_kernels import NM
from sparsejax import algorithms, export, masks, transforms
from sparsejax.algorithms import nm_ste

D_IN, D_OUT, STEPS = 16, 8, 24


class _Layer(nn.Module):
    """One bias-free Dense layer: on the identity its output is its effective kernel."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(D_OUT, use_bias=False, name="dense")(x)


def _expected_mask(algo, w, step):
    """The paper's mask of the current weights ``w`` at ``step``, from `sparsejax.masks`."""
    score = jnp.abs(w)
    if isinstance(algo, algorithms.STE):
        return masks.topk_mask(score, algo.sparsity)
    n = int(algo.n_at(step)) if getattr(algo, "decay_schedule", "") == "structure" else algo.n
    return masks.nm_mask(score, n, algo.m, -2)


def _applied_mask(algo, effective, w, step):
    """The entries the forward pass keeps, or None at a step where it cannot be read.

    Hard masks zero the pruned weights and keep the others unchanged; S-STE's
    soft-thresholded forward is nonzero exactly on its support; mask decay keeps
    the mask's entries unchanged and scales the others by alpha < 1.
    """
    if isinstance(algo, algorithms.SSTE):
        return effective != 0
    if isinstance(algo, algorithms.NMDecay) and algo.decay_schedule != "structure":
        if float(algo.alpha(step)) == 1.0:
            return None  # dense forward: every entry is kept, whatever the mask
    return effective == w


def _train(algo, steps=STEPS, lr=3e-2):
    """Trains ``_Layer`` as the trainer does; per step, the applied and current-weight masks."""
    model = _Layer()
    kx, ky, kp = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (64, D_IN))
    y = jax.random.randint(ky, (64,), 0, D_OUT)
    params = model.init(kp, x[:1])["params"]
    tx = transforms.masked(optax.adam(lr), algo)
    opt_state = tx.init(params)
    probe = jnp.eye(D_IN)

    def forward(p, m, algo_state, inputs):
        # The model call of `experiments.state.step_functions`.
        weights = algo.forward_params_with_state(p, m, algo_state)
        with algo.model_context(p, m, algo_state):
            return model.apply({"params": weights}, inputs)

    @jax.jit
    def step(p, s):
        m = transforms.get_masks(s)
        effective = forward(p, m, s.algo_state, probe)  # the forward pass of this step

        def loss(q):
            logits = forward(q, m, s.algo_state, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        u, s = tx.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, u), s, effective

    records = []
    for t in range(steps):
        w = params["dense"]["kernel"]
        params, opt_state, effective = step(params, opt_state)
        applied = _applied_mask(algo, effective, w, t)
        stored = transforms.get_masks(opt_state)["dense"]["kernel"]
        records.append((t, w, applied, _expected_mask(algo, w, t), stored))
    return params, opt_state, records


# Every straight-through method (S-STE's soft threshold always read the current
# weights; it is pinned here with the others).
_METHODS = {
    "ste": ("ste", {"sparsity": 0.5, "distribution": "uniform"}),
    "nm_ste": ("nm_ste", {"n": 2, "m": 4}),
    "sr_ste": ("sr_ste", {"n": 2, "m": 4}),
    "s_ste": ("s_ste", {"n": 2, "m": 4}),
    "bimask": ("bimask", {"n": 2, "m": 4}),
    "nm_decay_mask": ("nm_decay", {"n": 1, "m": 4, "decay_schedule": "mask_linear", "end_step": 8}),
    "nm_decay_structure": (
        "nm_decay",
        {"n": 1, "m": 4, "decay_schedule": "structure", "end_step": 9},
    ),
}


@pytest.mark.parametrize("method", sorted(_METHODS))
def test_forward_mask_is_the_mask_of_the_current_weights_at_every_step(method):
    name, kwargs = _METHODS[method]
    algo = algorithms.get(name, **kwargs)
    _, opt_state, records = _train(algo)
    checked = 0
    for t, _, applied, expected, stored in records:
        if applied is None:
            continue
        differing = int(np.sum(np.asarray(applied) != np.asarray(expected)))
        assert differing == 0, f"{method}: step {t}'s forward pass used another mask"
        # What the state keeps (masks, flip rate) is the mask this forward pass used.
        np.testing.assert_array_equal(stored, applied, err_msg=f"{method} step {t}")
        checked += 1
    assert checked >= STEPS - 8
    # The learning rate is high enough for the mask to move (else the test shows nothing).
    first, last = records[0][3], records[-1][3]
    assert bool(np.any(np.asarray(first) != np.asarray(last)))


@pytest.mark.parametrize("method", ["nm_ste", "sr_ste", "bimask", "nm_decay_structure"])
def test_flip_rate_counts_the_flips_between_consecutive_forward_masks(method):
    name, kwargs = _METHODS[method]
    algo = algorithms.get(name, **kwargs)
    _, opt_state, records = _train(algo)
    forward_masks = [algo.init_masks({"dense": {"kernel": records[0][1]}}, None)["dense"]["kernel"]]
    forward_masks += [expected for _, _, _, expected, _ in records]
    flips = [
        float(nm_ste.nm_flip_rate(a, b)) for a, b in zip(forward_masks[:-1], forward_masks[1:])
    ]
    assert sum(flips) > 0  # real flips happened
    metrics = algo.metrics(opt_state.algo_state)
    np.testing.assert_allclose(metrics["mask_flip_rate_mean"], np.mean(flips), rtol=1e-5)


def test_ste_with_update_every_steps_recomputes_on_its_steps_and_holds_between():
    algo = algorithms.get("ste", sparsity=0.5, distribution="uniform", update_every_steps=3)
    _, _, records = _train(algo, steps=12)
    held = None
    for t, _, applied, expected, stored in records:
        if t % 3 == 0:
            # An update step: the forward pass takes the top-k of the weights it starts from.
            held = expected
        np.testing.assert_array_equal(applied, held, err_msg=f"step {t}")
        np.testing.assert_array_equal(stored, applied, err_msg=f"step {t}")
    # Between update steps the mask really is held (it differs from the current top-k).
    assert any(
        bool(np.any(np.asarray(applied) != np.asarray(expected)))
        for t, _, applied, expected, _ in records
        if t % 3
    )


@pytest.mark.parametrize("method", ["nm_ste", "sr_ste", "bimask"])
def test_trained_model_exports_what_its_forward_pass_computes(method):
    name, kwargs = _METHODS[method]
    algo = algorithms.get(name, **kwargs)
    params, opt_state, _ = _train(algo, steps=7)
    w = params["dense"]["kernel"]
    exported = export.export_trained(params, opt_state, algo)["dense"]["kernel"]
    assert isinstance(exported, NM)
    current = masks.nm_mask(jnp.abs(w), 2, 4, -2)
    np.testing.assert_array_equal(exported.to_dense(), jnp.where(current, w, 0.0))
    forward = algo.forward_params_with_state(
        params, transforms.get_masks(opt_state), opt_state.algo_state
    )
    np.testing.assert_array_equal(exported.to_dense(), forward["dense"]["kernel"])
