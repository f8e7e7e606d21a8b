"""Synthetic activations with a known sparse dictionary, for testing SAE recovery.

    x = codes @ dictionary + noise,    codes [tokens, n_features] sparse and nonnegative

Features fire with Zipf-like probabilities, optionally correlated through a Gaussian copula
(so each feature's own firing rate is unchanged) and optionally arranged in a hierarchy of
parents whose children are mutually exclusive and fire only with their parent. Everything is
jnp under one jit with static shapes.

Reference: Sharkey et al. 2022, "Taking features out of superposition with sparse
autoencoders" (random unit dictionary, sparse nonnegative codes); the hierarchy follows the
synthetic benchmarks of Bussmann et al. 2025, "Learning Multi-Level Features with Matryoshka
Sparse Autoencoders".
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["SyntheticData", "generate", "random_dictionary", "zipf_firing_probs"]


class SyntheticData(NamedTuple):
    """Activations and their ground truth.

    Attributes:
      x: ``float32[tokens, d]`` activations.
      codes: ``float32[tokens, n_features]`` true codes (0 where a feature does not fire).
      dictionary: ``float32[n_features, d]`` unit-norm true feature directions.
      firing_probs: ``float32[n_features]`` each feature's probability of firing on a token.
      parents: ``int32[n_features]`` a child's parent feature, -1 for features without one.
    """

    x: jax.Array
    codes: jax.Array
    dictionary: jax.Array
    firing_probs: jax.Array
    parents: jax.Array


def zipf_firing_probs(n_features: int, mean_active: float, exponent: float = 1.0) -> jax.Array:
    """Firing probabilities ``p_i = min(1, c * (i + 1) ** -exponent)`` summing to ``mean_active``.

    ``mean_active`` is the expected number of active features per token (at most
    ``n_features``); the scale c is found by bisection, so when the most frequent features
    saturate at probability 1 the rest make up the difference. Returns
    ``float32[n_features]``, nonincreasing; jit-able in ``mean_active`` and ``exponent``.
    """
    ranks = jnp.arange(1, n_features + 1, dtype=jnp.float32)
    weights = ranks ** -jnp.asarray(exponent, jnp.float32)

    def total(log_c):
        return jnp.sum(jnp.minimum(1.0, jnp.exp(log_c) * weights))

    def bisect(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        below = total(mid) < mean_active
        return jnp.where(below, mid, lo), jnp.where(below, hi, mid)

    # c = 0 gives 0 and c = 1 / min(w) gives n_features >= mean_active; bisect log c between.
    lo = jnp.log(mean_active / jnp.sum(weights))
    hi = -jnp.log(weights[-1]) + 1.0
    _, hi = jax.lax.fori_loop(0, 64, bisect, (lo, hi))
    return jnp.minimum(1.0, jnp.exp(hi) * weights)


def random_dictionary(key: jax.Array, n_features: int, d: int) -> jax.Array:
    """``float32[n_features, d]`` rows drawn uniformly on the unit sphere."""
    w = jax.random.normal(key, (n_features, d), jnp.float32)
    return w / jnp.linalg.norm(w, axis=-1, keepdims=True)


def _check(name, value, ok, what):
    if not ok:
        raise ValueError(f"{name} must be {what}, got {value!r}")


def generate(
    key: jax.Array,
    *,
    n_tokens: int,
    d: int,
    n_features: int,
    mean_active: float = 5.0,
    zipf_exponent: float = 1.0,
    magnitude_range: tuple[float, float] = (0.0, 1.0),
    correlation: float = 0.0,
    n_correlation_factors: int = 4,
    hierarchy: tuple[int, int] | None = None,
    child_prob: float = 1.0,
    noise_std: float = 0.0,
) -> SyntheticData:
    """Draws activations from a random sparse dictionary model.

    Args:
      key: ``jax.random.key``.
      n_tokens: number of tokens.
      d: activation width.
      n_features: number of true features (parents and children included).
      mean_active: expected number of active features per token among those without a
        parent (children add to it).
      zipf_exponent: firing probability of the i-th such feature is proportional to
        ``(i + 1) ** -zipf_exponent`` (0 gives equal rates).
      magnitude_range: an active feature's code is uniform in this range.
      correlation: in [0, 1): strength of the Gaussian copula that correlates firing;
        features i, j get latent correlation ``correlation * a_i . a_j`` for random unit
        ``a_i`` in ``n_correlation_factors`` dimensions. Each feature's firing rate is
        unchanged.
      n_correlation_factors: dimension of the shared factors of the copula.
      hierarchy: ``(n_parents, children_per_parent)``: features ``0 .. n_parents - 1`` are
        parents and the next ``n_parents * children_per_parent`` are their children, in
        parent order. When a parent fires, with probability ``child_prob`` exactly one of its
        children (uniformly chosen) fires too; children never fire without their parent and
        never two of one parent at once.
      child_prob: probability that a firing parent has a child firing.
      noise_std: standard deviation of isotropic Gaussian noise added to ``x``.

    Returns:
      `SyntheticData`: ``firing_probs`` holds each feature's probability of firing (for a
      child, its parent's times ``child_prob / children_per_parent``).

    Raises:
      ValueError: naming the argument, for nonpositive sizes, ``mean_active`` outside
        (0, number of features without a parent], an empty or negative magnitude range,
        ``correlation`` outside [0, 1), a hierarchy that needs more than n_features
        features, or a negative ``noise_std``.
    """
    for name, value in (("n_tokens", n_tokens), ("d", d), ("n_features", n_features)):
        _check(name, value, isinstance(value, int) and value >= 1, "a positive int")
    n_children = 0
    if hierarchy is not None:
        _check(
            "hierarchy",
            hierarchy,
            len(tuple(hierarchy)) == 2 and all(isinstance(h, int) and h >= 1 for h in hierarchy),
            "a pair of positive ints (n_parents, children_per_parent)",
        )
        n_children = hierarchy[0] * hierarchy[1]
        _check(
            "hierarchy",
            hierarchy,
            hierarchy[0] + n_children <= n_features,
            f"at most n_features={n_features} parents plus children",
        )
    n_roots = n_features - n_children
    _check(
        "mean_active",
        mean_active,
        0 < mean_active <= n_roots,
        f"in (0, {n_roots}] (features without a parent)",
    )
    lo, hi = magnitude_range
    _check(
        "magnitude_range",
        magnitude_range,
        0 <= lo <= hi and hi > 0,
        "(lo, hi), 0 <= lo <= hi, hi > 0",
    )
    _check("correlation", correlation, 0 <= correlation < 1, "in [0, 1)")
    _check(
        "n_correlation_factors",
        n_correlation_factors,
        isinstance(n_correlation_factors, int) and n_correlation_factors >= 1,
        "a positive int",
    )
    _check("child_prob", child_prob, 0 <= child_prob <= 1, "in [0, 1]")
    _check(
        "noise_std", noise_std, noise_std >= 0 and math.isfinite(noise_std), "a finite float >= 0"
    )
    return _generate(
        key,
        n_tokens=n_tokens,
        d=d,
        n_features=n_features,
        mean_active=float(mean_active),
        zipf_exponent=float(zipf_exponent),
        magnitude_range=(float(lo), float(hi)),
        correlation=float(correlation),
        n_correlation_factors=n_correlation_factors,
        hierarchy=None if hierarchy is None else tuple(hierarchy),
        child_prob=float(child_prob),
        noise_std=float(noise_std),
    )


@functools.partial(
    jax.jit,
    # Only sizes are static: the rates, magnitudes and noise are traced, so changing them
    # does not recompile.
    static_argnames=("n_tokens", "d", "n_features", "n_correlation_factors", "hierarchy"),
)
def _generate(
    key,
    *,
    n_tokens,
    d,
    n_features,
    mean_active,
    zipf_exponent,
    magnitude_range,
    correlation,
    n_correlation_factors,
    hierarchy,
    child_prob,
    noise_std,
):
    n_parents, per_parent = hierarchy if hierarchy is not None else (0, 0)
    n_children = n_parents * per_parent
    n_roots = n_features - n_children
    r = n_correlation_factors
    # Every random number comes from one uniform draw (normals through the inverse normal
    # CDF): one random-bits kernel to compile instead of eight.
    sizes = {
        "dictionary": (n_features, d),
        "mix": (n_roots, r),
        "factor": (n_tokens, r),
        "fire": (n_tokens, n_roots),
        "child_on": (n_tokens, n_parents),
        "child": (n_tokens, n_parents),
        "magnitude": (n_tokens, n_features),
        "noise": (n_tokens, d),
    }
    total = sum(math.prod(shape) for shape in sizes.values())
    flat = jax.random.uniform(key, (total,), minval=jnp.finfo(jnp.float32).tiny, maxval=1.0)
    uniform, start = {}, 0
    for name, shape in sizes.items():
        uniform[name] = flat[start : start + math.prod(shape)].reshape(shape)
        start += math.prod(shape)

    def normal(name):
        return jax.scipy.special.ndtri(uniform[name])

    dictionary = normal("dictionary")
    dictionary = dictionary / jnp.linalg.norm(dictionary, axis=-1, keepdims=True)

    root_probs = zipf_firing_probs(n_roots, mean_active, zipf_exponent)
    # Gaussian copula: u_i ~ N(0, 1) exactly (a_i unit-norm), correlated through shared s.
    a = normal("mix")
    a = a / jnp.linalg.norm(a, axis=-1, keepdims=True)
    u = jnp.sqrt(1.0 - correlation) * normal("fire") + jnp.sqrt(correlation) * (
        normal("factor") @ a.T
    )
    roots_fire = u < jax.scipy.special.ndtri(root_probs)  # P(u < Phi^-1(p)) = p

    # Roots are laid out parents first: feature order is [parents, other roots, children].
    parents_fire = roots_fire[:, :n_parents]
    fire = [roots_fire[:, :n_parents], roots_fire[:, n_parents:]]
    probs = [root_probs[:n_parents], root_probs[n_parents:]]
    parent_of = [jnp.full(n_roots, -1, jnp.int32)]
    if n_children:
        has_child = uniform["child_on"] < child_prob
        which = jnp.minimum(jnp.floor(uniform["child"] * per_parent), per_parent - 1)
        chosen = jax.nn.one_hot(which.astype(jnp.int32), per_parent, dtype=jnp.bool_)
        child_fire = (parents_fire & has_child)[..., None] & chosen  # [tokens, parents, per]
        fire.append(child_fire.reshape(n_tokens, n_children))
        probs.append(jnp.repeat(root_probs[:n_parents] * child_prob / per_parent, per_parent))
        parent_of.append(jnp.repeat(jnp.arange(n_parents, dtype=jnp.int32), per_parent))
    fire = jnp.concatenate(fire, axis=1)
    lo, hi = magnitude_range
    codes = jnp.where(fire, lo + (hi - lo) * uniform["magnitude"], 0.0)
    x = codes @ dictionary + noise_std * normal("noise")
    return SyntheticData(
        x=x,
        codes=codes,
        dictionary=dictionary,
        firing_probs=jnp.concatenate(probs),
        parents=jnp.concatenate(parent_of),
    )
