"""Properties of `sparsejax.schedules`: the papers' formulas at every step, and update steps."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsejax import schedules

_SETTINGS = settings(max_examples=30, deadline=None)
# One fixed step range for every example, so eager ops compile once.
STEPS = np.arange(400)
_ATOL = 4 * float(np.finfo(np.float32).eps)  # a few float32 ulps of values in [0, 1]

sparsities = st.floats(0.0, 1.0, exclude_max=True, allow_nan=False)


@st.composite
def polynomial_args(draw):
    begin = draw(st.integers(0, 60), label="begin_step")
    end = draw(st.integers(begin + 1, begin + 250), label="end_step")
    return {
        "final_sparsity": draw(sparsities, label="final_sparsity"),
        "initial_sparsity": draw(sparsities, label="initial_sparsity"),
        "begin_step": begin,
        "end_step": end,
        "update_every_steps": draw(st.integers(1, 40), label="update_every_steps"),
        "power": draw(st.sampled_from([0.5, 1.0, 2.0, 3.0, 4.5]), label="power"),
    }


def _zhu_gupta_reference(t, final_sparsity, initial_sparsity, begin_step, end_step, power, **_):
    """Zhu & Gupta 2017, eq. (1), in float64, held at s_i before t_0 and s_f after t_end."""
    t = np.asarray(t, np.float64)
    progress = np.clip((t - begin_step) / (end_step - begin_step), 0.0, 1.0)
    return final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - progress) ** power


@_SETTINGS
@given(args=polynomial_args())
def test_polynomial_matches_zhu_gupta_and_is_held_outside_the_ramp(args):
    schedule = schedules.polynomial(**args)
    values = np.asarray(schedule.sparsity(STEPS))
    assert values.dtype == np.float32
    np.testing.assert_allclose(values, _zhu_gupta_reference(STEPS, **args), rtol=0, atol=_ATOL)
    # Exactly s_i up to t_0 and exactly s_f from t_end on (the end points of the ramp too).
    before = STEPS <= args["begin_step"]
    after = STEPS >= args["end_step"]
    assert (values[before] == np.float32(args["initial_sparsity"])).all()
    assert (values[after] == np.float32(args["final_sparsity"])).all()


@_SETTINGS
@given(args=polynomial_args())
def test_polynomial_is_monotone_from_initial_to_final(args):
    values = np.asarray(schedules.polynomial(**args).sparsity(STEPS))
    steps = np.diff(values)
    if args["initial_sparsity"] <= args["final_sparsity"]:
        assert (steps >= 0).all()
    else:
        assert (steps <= 0).all()


@_SETTINGS
@given(args=polynomial_args())
def test_polynomial_updates_at_begin_plus_multiples_of_every_and_at_end(args):
    update = np.asarray(schedules.polynomial(**args).is_update_step(STEPS))
    begin, end, every = args["begin_step"], args["end_step"], args["update_every_steps"]
    # Both ends are update steps, also when end_step is off the grid: the last update
    # is the one that sets s_f.
    expected = set(range(begin, end + 1, every)) | {end}
    assert set(STEPS[update].tolist()) == expected


def test_polynomial_end_step_off_the_update_grid_is_an_update_step():
    schedule = schedules.polynomial(0.9, begin_step=0, end_step=1000, update_every_steps=300)
    steps = np.arange(1200)
    updates = steps[np.asarray(schedule.is_update_step(steps))].tolist()
    assert updates == [0, 300, 600, 900, 1000]
    assert float(schedule.sparsity(updates[-1])) == np.float32(0.9)


@_SETTINGS
# Tiny fractions are left out: XLA flushes the subnormal 0.5 * alpha to zero on CPU.
@given(
    fraction=st.one_of(st.just(0.0), st.floats(1e-6, 1.0)),
    end=st.integers(1, 350),
)
def test_cosine_drop_fraction_matches_rigl_and_is_zero_from_end_step(fraction, end):
    values = np.asarray(schedules.cosine_drop_fraction(fraction, end)(STEPS))
    expected = np.where(STEPS < end, fraction / 2 * (1 + np.cos(np.pi * STEPS / end)), 0.0)
    assert values.dtype == np.float32
    np.testing.assert_allclose(values, expected, rtol=0, atol=_ATOL)
    assert (values[STEPS >= end] == 0.0).all()
    assert values[0] == np.float32(fraction)


@_SETTINGS
@given(
    every=st.integers(1, 50),
    begin=st.integers(0, 60),
    length=st.integers(0, 300),
)
def test_periodic_updates_strictly_inside_begin_end_every_delta_t(every, begin, length):
    end = begin + length
    update = np.asarray(schedules.periodic(every, end, begin)(STEPS))
    assert set(STEPS[update].tolist()) == set(range(begin + every, end, every))


@_SETTINGS
@given(sparsity=sparsities, step=st.integers(0, 399))
def test_one_shot_is_dense_until_its_step_then_final_and_updates_once(sparsity, step):
    schedule = schedules.one_shot(sparsity, step)
    values = np.asarray(schedule.sparsity(STEPS))
    np.testing.assert_array_equal(
        values, np.where(STEPS >= step, np.float32(sparsity), np.float32(0.0))
    )
    assert STEPS[np.asarray(schedule.is_update_step(STEPS))].tolist() == [step]


@_SETTINGS
@given(sparsity=sparsities)
def test_constant_is_constant_and_updates_at_step_zero_only(sparsity):
    schedule = schedules.constant(sparsity)
    assert (np.asarray(jax.vmap(schedule.sparsity)(STEPS)) == np.float32(sparsity)).all()
    assert STEPS[np.asarray(schedule.is_update_step(STEPS))].tolist() == [0]


def test_schedules_under_jit_equal_eager():
    """Predicates exactly; values in [0, 1] to a few float32 ulps of 1: XLA compiles a division
    by a constant into a multiplication by its reciprocal for arrays but not for eager scalars,
    and the power (or 1 + cos near -1) carries that one-ulp difference into the value."""
    poly = schedules.polynomial(0.9, 10, 110, 20, initial_sparsity=0.1)
    shot = schedules.one_shot(0.7, 33)
    fns = {
        "poly": poly.sparsity,
        "poly_update": poly.is_update_step,
        "shot": shot.sparsity,
        "shot_update": shot.is_update_step,
        "cosine": schedules.cosine_drop_fraction(0.3, 150),
        "periodic": schedules.periodic(25, 300, 5),
    }
    for name, fn in fns.items():
        eager = np.stack([np.asarray(fn(int(t))) for t in STEPS[:200:7]])
        jitted = np.asarray(jax.jit(jax.vmap(fn))(jnp.asarray(STEPS[:200:7], jnp.int32)))
        assert jitted.dtype == eager.dtype, name
        if eager.dtype == bool:
            np.testing.assert_array_equal(jitted, eager, err_msg=name)
        else:
            np.testing.assert_allclose(jitted, eager, rtol=0, atol=_ATOL, err_msg=name)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"end_step": 10, "begin_step": 10}, "end_step must be > begin_step, got end_step=10"),
        ({"end_step": 5, "begin_step": 10}, "end_step must be > begin_step, got end_step=5"),
        ({"begin_step": -1}, "begin_step must be a non-negative integer, got -1"),
        ({"begin_step": 1.5}, "begin_step must be a non-negative integer, got 1.5"),
        ({"end_step": True}, "end_step must be a non-negative integer, got True"),
        ({"update_every_steps": 0}, "update_every_steps must be positive, got 0"),
        ({"update_every_steps": -3}, "update_every_steps must be a non-negative integer, got -3"),
        ({"power": 0.0}, "power must be positive, got 0.0"),
        ({"power": -1}, "power must be positive, got -1"),
        ({"final_sparsity": 1.0}, "final_sparsity must be in [0, 1), got 1.0"),
        ({"final_sparsity": -0.1}, "final_sparsity must be in [0, 1), got -0.1"),
        ({"initial_sparsity": 1.5}, "initial_sparsity must be in [0, 1), got 1.5"),
    ],
)
def test_polynomial_bad_arguments_raise_naming_them(kwargs, message):
    args = {"final_sparsity": 0.9, "begin_step": 0, "end_step": 100, "update_every_steps": 10}
    with pytest.raises(ValueError, match=re.escape(message)):
        schedules.polynomial(**{**args, **kwargs})


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: schedules.cosine_drop_fraction(1.5, 10), "initial_fraction must be in [0, 1]"),
        (lambda: schedules.cosine_drop_fraction(-0.1, 10), "initial_fraction must be in [0, 1]"),
        (lambda: schedules.cosine_drop_fraction(0.3, 0), "end_step must be positive, got 0"),
        (lambda: schedules.cosine_drop_fraction(0.3, -5), "end_step must be a non-negative"),
        (lambda: schedules.periodic(0, 100), "update_every_steps must be positive, got 0"),
        (lambda: schedules.periodic(10, -1), "end_step must be a non-negative integer, got -1"),
        (lambda: schedules.periodic(10, 100, 2.0), "begin_step must be a non-negative integer"),
        (lambda: schedules.one_shot(0.5, -1), "step must be a non-negative integer, got -1"),
        (lambda: schedules.one_shot(1.0), "sparsity must be in [0, 1), got 1.0"),
        (lambda: schedules.constant(-0.1), "sparsity must be in [0, 1), got -0.1"),
    ],
)
def test_other_schedules_bad_arguments_raise_naming_them(build, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build()
