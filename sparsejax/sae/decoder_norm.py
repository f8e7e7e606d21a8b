"""Unit-norm decoder rows as optax transforms: project the gradient, renormalise after the step.

An SAE's decoder ``[n_latents, d_in]`` is kept with unit-norm rows so a latent's code is its
feature's magnitude and a sparsity penalty cannot be dodged by shrinking codes and growing
rows. `unit_norm_decoder` wraps any optimizer:

    g  <- g - (g . w) w           for each row w (remove_parallel_gradient)
    u  <- inner(g)                  (any optax optimizer)
    u  <- (w + u) / ||w + u|| - w   (renormalize_rows: the emitted update lands on the sphere)

so ``optax.apply_updates`` alone leaves every decoder row with norm 1, whatever the inner
optimizer does (momentum, Adam, decoupled weight decay).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

PyTree = Any

__all__ = [
    "decoder_leaves",
    "remove_parallel_gradient",
    "renormalize_rows",
    "unit_norm_decoder",
]


def decoder_leaves(params: PyTree, name: str = "W_dec") -> PyTree:
    """A bool pytree like ``params``: True at leaves whose last path key is ``name``."""

    def is_decoder(path, leaf):
        last = path[-1] if path else None
        key = getattr(last, "key", getattr(last, "name", None))
        return key == name and jnp.ndim(leaf) == 2

    return jax.tree_util.tree_map_with_path(is_decoder, params)


def _unit_rows(w: jax.Array, eps: float) -> jax.Array:
    return w / jnp.maximum(jnp.linalg.norm(w, axis=-1, keepdims=True), eps)


def _check_params(params, name):
    if params is None:
        raise ValueError(f"the {name} transform needs params: call update(grads, state, params)")
    if not any(jax.tree.leaves(decoder_leaves(params, name))):
        raise ValueError(f"params have no 2-D leaf named {name!r} to treat as the decoder")


class _Empty(NamedTuple):
    pass


def remove_parallel_gradient(name: str = "W_dec", eps: float = 1e-12):
    """Removes from each decoder row's gradient its component along the row.

    Args:
      name: key of the decoder leaf ``[n_latents, d_in]`` in the params tree.
      eps: smallest row norm used when normalising a row.

    Returns:
      An `optax.GradientTransformation`; ``update`` requires ``params``. Other leaves pass
      through unchanged.

    Reference: Gao et al. 2024, "Scaling and evaluating sparse autoencoders" (following
    Bricken et al. 2023). On the unit sphere only the tangent part of the gradient moves a
    row; the radial part would be undone by the renormalisation and, left in, feeds the
    optimizer's moments with a direction it can never follow.
    """

    def init_fn(params):
        del params
        return _Empty()

    def update_fn(updates, state, params=None):
        _check_params(params, name)
        where = decoder_leaves(params, name)

        def project(g, w, is_dec):
            if not is_dec:
                return g
            u = _unit_rows(w, eps)
            return g - jnp.sum(g * u, axis=-1, keepdims=True) * u

        return jax.tree.map(project, updates, params, where), state

    return optax.GradientTransformation(init_fn, update_fn)


def renormalize_rows(name: str = "W_dec", eps: float = 1e-12):
    """Emits, for the decoder leaf, the update that lands each row on the unit sphere.

    Args:
      name: key of the decoder leaf in the params tree.
      eps: smallest row norm divided by.

    Returns:
      An `optax.GradientTransformation` meant as the last transform of a chain: it changes
      the decoder's incoming update ``u`` to ``(w + u) / ||w + u|| - w`` so that
      ``optax.apply_updates`` yields unit-norm rows. ``update`` requires ``params``.
    """

    def init_fn(params):
        del params
        return _Empty()

    def update_fn(updates, state, params=None):
        _check_params(params, name)
        where = decoder_leaves(params, name)

        def project(u, w, is_dec):
            if not is_dec:
                return u
            return _unit_rows(w + u, eps) - w

        return jax.tree.map(project, updates, params, where), state

    return optax.GradientTransformation(init_fn, update_fn)


def unit_norm_decoder(
    inner: optax.GradientTransformation, name: str = "W_dec"
) -> optax.GradientTransformation:
    """Wraps ``inner`` so the decoder rows stay unit-norm through every update.

    Args:
      inner: any optax transformation (e.g. ``optax.adam(2e-4)``).
      name: key of the decoder leaf ``[n_latents, d_in]`` in the params tree.

    Returns:
      ``optax.chain(remove_parallel_gradient(name), inner, renormalize_rows(name))``; its
      ``update`` requires ``params``. Starting from any params, one step of
      ``optax.apply_updates`` leaves the decoder rows with norm 1 (up to float rounding).

    Raises:
      ValueError: for an ``inner`` that is not an optax transformation.

    Reference: Gao et al. 2024, "Scaling and evaluating sparse autoencoders".
    """
    if not isinstance(inner, optax.GradientTransformation):
        raise ValueError(f"inner must be an optax.GradientTransformation, got {type(inner)!r}")
    return optax.chain(remove_parallel_gradient(name), inner, renormalize_rows(name))
