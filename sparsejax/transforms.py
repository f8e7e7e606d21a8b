"""The masked optax transform: sparse training as one `optax.GradientTransformation`.

``masked(inner, algorithm)`` wraps any optax optimizer. Its state holds the
masks, the step count and a key; the algorithm recomputes masks at its
scheduled steps inside the jitted update (with `jax.lax.cond`), and the
updates it emits zero the pruned weights exactly, whatever the inner
optimizer does (momentum, Adam moments, decoupled weight decay ...):

    pruned entries:  u = -w        so  w + u == 0 exactly
    live entries:    u = inner(g * mask)

There is no second call to forget. Use it as the outermost transform so it
sees raw gradients (dynamic sparse training grows by gradient magnitude).
The exact zeros need it outermost too: a transform applied after it (say
``optax.chain(masked(adam, algo), optax.scale(0.5))``) rescales the -w that
zeroes a pruned weight, which then keeps w / 2. optax gives a transform no
view of what follows it, so `get_masks` and `sparsify` (called once after
``init``) refuse an ``opt_state`` in which a chain has transforms after
`masked`; put them inside instead: ``masked(optax.chain(adam, scale), algo)``.
"""

from __future__ import annotations

import collections
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

# The packer lives in `sparsejax.masks`; re-exported here for `masked(..., packed=True)`.
from sparsejax.masks import (
    PackedMask,
    apply_masks,
    is_none,
    pack_masks,
    unpack_masks,
    validate_masks,
)

PyTree = Any

__all__ = [
    "MaskedState",
    "PackedMask",
    "get_masks",
    "masked",
    "pack_masks",
    "reset_moments",
    "sparsify",
    "unpack_masks",
]


class MaskedState(NamedTuple):
    """State of `masked`.

    Attributes:
      count: int32 scalar, number of updates applied so far (the step).
      masks: mask pytree (bool arrays, None where a leaf is not sparsified);
        `PackedMask` leaves instead of bool arrays when built with
        ``masked(..., packed=True)``. Read them with `get_masks`.
      rng: uint32 key data (``jax.random.key_data``) of the per-step base key;
        step t uses ``fold_in(key, t)``, so no key has to be carried forward and
        the state checkpoints as plain arrays.
      inner_state: state of the wrapped optimizer.
      algo_state: the algorithm's own state (e.g. SNFS's gradient momentum),
        ``()`` for algorithms without one.
    """

    count: jax.Array
    masks: PyTree
    rng: jax.Array
    inner_state: optax.OptState
    algo_state: PyTree = ()


def _param_like(params: PyTree):
    treedef = jax.tree.structure(params)
    shapes = [jnp.shape(p) for p in jax.tree.leaves(params)]

    def check(x: Any) -> bool:
        if x is None or jax.tree.structure(x) != treedef:
            return False
        return [jnp.shape(v) for v in jax.tree.leaves(x)] == shapes

    return check


def reset_moments(inner_state: optax.OptState, params: PyTree, where: PyTree) -> optax.OptState:
    """Zeroes the optimizer slots of the entries selected by ``where``.

    Every sub-tree of ``inner_state`` that has the structure and shapes of
    ``params`` (Adam's mu and nu, momentum traces, Lion's mu ...) is treated as
    a slot; other state (counts, schedules) is left alone. This works for any
    optax optimizer without knowing its state types.

    Args:
      inner_state: an optax optimizer state.
      params: the parameter pytree (structure and shapes only).
      where: mask-like pytree, True where slots are reset, None where untouched.

    Returns:
      The state with ``slot[where] = 0`` in every slot.
    """
    is_slot = _param_like(params)

    def reset(node):
        if not is_slot(node):
            return node
        return jax.tree.map(
            lambda w, v: v if w is None else jnp.where(w, jnp.zeros_like(v), v),
            where,
            node,
            is_leaf=is_none,
        )

    return jax.tree.map(reset, inner_state, is_leaf=is_slot)


def _check_params(params: PyTree, masks: PyTree | None) -> None:
    """Fails on masks that do not fit ``params`` and on NaN/inf or integer weights.

    Values are checked only when concrete (an eager ``init``); under jit only
    shapes and dtypes can be.
    """
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    for path, p in leaves:
        name = "params" + jax.tree_util.keystr(path)
        dtype = jnp.result_type(p)
        if not jnp.issubdtype(dtype, jnp.inexact):
            raise ValueError(f"{name} must be floating point, got dtype {dtype}")
        if not isinstance(p, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(p))):
            raise ValueError(f"{name} contains NaN or inf values (got {p!r:.80})")
    if masks is not None:
        validate_masks(params, masks)


def _check_updates(updates: PyTree, params: PyTree) -> None:
    """Fails, naming ``updates``, on gradients that do not mirror ``params``.

    Structure and shapes are static, so this runs at trace time at no cost; without
    it a missing or misshapen gradient leaf would be reported against the masks.
    """
    update_leaves, update_def = jax.tree_util.tree_flatten_with_path(updates)
    param_leaves, param_def = jax.tree_util.tree_flatten_with_path(params)
    if update_def != param_def:
        have = {jax.tree_util.keystr(path) for path, _ in update_leaves}
        want = {jax.tree_util.keystr(path) for path, _ in param_leaves}
        detail = "; ".join(
            [f"no entry for params{p}" for p in sorted(want - have)[:3]]
            + [f"updates{p} is not a parameter" for p in sorted(have - want)[:3]]
        )
        raise ValueError(
            "updates (the gradients) must have the structure of params: "
            f"{detail or f'{update_def} vs {param_def}'}"
        )
    for (path, u), (_, p) in zip(update_leaves, param_leaves):
        if jnp.shape(u) != jnp.shape(p):
            raise ValueError(
                f"updates{jax.tree_util.keystr(path)} (a gradient) has shape {jnp.shape(u)}, "
                f"its parameter {jnp.shape(p)}"
            )


# The methods and flags of `sparsejax.algorithms.Algorithm` that `masked` uses.
_ALGORITHM_API = (
    "init_masks",
    "init_state",
    "update_state",
    "update_masks",
    "is_update_step",
    "updates_masks",
    "straight_through",
    "skip_update_on_mask_step",
    "reset_grown_moments",
)


def masked(
    inner: optax.GradientTransformation,
    algorithm: Any,
    *,
    key: jax.Array | None = None,
    masks: PyTree | None = None,
    packed: bool = False,
) -> optax.GradientTransformation:
    """Wraps ``inner`` so training follows ``algorithm``'s masks.

    Args:
      inner: any optax transformation (e.g. ``optax.adamw(1e-3)``).
      algorithm: a sparse-training algorithm from `sparsejax.algorithms`
        (``algorithms.get('rigl', sparsity=0.9, ...)``).
      key: ``jax.random.key`` for the algorithm's randomness (random masks,
        SET growth); defaults to ``jax.random.key(0)``.
      masks: initial masks to start from instead of ``algorithm.init_masks``
        (e.g. computed with a model by `sparsejax.algorithms.PruneAtInit`).
      packed: keep the masks bit-packed in the state (`PackedMask`, 1 bit a
        weight instead of 1 byte): 8x less mask memory and checkpoint space for
        an unpack/pack per step. Updates are identical either way.

    Returns:
      An `optax.GradientTransformation` whose ``update(grads, state, params)``
      requires ``params``. Its state is a `MaskedState`.

    On a mask-update step (``algorithm.is_update_step(count)``) the new masks
    are computed from the current params, the incoming gradients and a step
    key; the optimizer slots of newly grown weights are reset to zero when the
    algorithm asks for it; and the inner update is skipped when the algorithm
    says so (RigL and SET do). Otherwise the inner optimizer runs on the masked
    gradient ``g * mask``. Straight-through algorithms (``algorithm.straight_through``)
    keep dense weights instead: the gradient and the update are not masked,
    and the model must run on ``algorithm.forward_params_with_state(params, masks,
    state.algo_state)``, which takes the mask from the current weights.

    Algorithms that change the basis of the params (``algorithm.reparametrizes``,
    e.g. `tensornets.adaptive.SpectralTruncation`) first get
    ``algorithm.reparametrize(params, inner_state, masks)`` on their update steps:
    the same weights in a new basis, the optimizer moments mapped alike. The masks
    are then updated on the new params, and the emitted update takes the params to
    the new basis (and dead entries to exactly zero), so ``optax.apply_updates`` is
    still all a train step needs.

    Raises:
      ValueError: for an ``inner`` that is not an optax transformation, a key that
        is not a typed ``jax.random.key``, a non-bool ``packed``, or
        ``packed=True`` with an algorithm that reparametrizes.
    """
    if not isinstance(inner, optax.GradientTransformation):
        raise ValueError(f"inner must be an optax.GradientTransformation, got {type(inner)!r}")
    missing = [a for a in _ALGORITHM_API if not hasattr(algorithm, a)]
    if missing:
        raise ValueError(
            "algorithm must be a sparsejax.algorithms.Algorithm (a name goes through "
            f"sparsejax.algorithms.get), got {algorithm!r}"
        )
    base_key = jax.random.key(0) if key is None else key
    if not isinstance(base_key, jax.Array) or not jnp.issubdtype(
        base_key.dtype, jax.dtypes.prng_key
    ):
        raise ValueError(
            "key must be a typed key from jax.random.key, got "
            f"{getattr(base_key, 'dtype', type(base_key).__name__)!r}"
        )
    init_key, step_base_key = jax.random.split(base_key)
    key_data = jax.random.key_data(step_base_key)
    has_schedule = algorithm.updates_masks

    straight_through = algorithm.straight_through
    if not isinstance(packed, bool):
        raise ValueError(f"packed must be a bool, got {packed!r}")
    if packed and algorithm.reparametrizes:
        raise ValueError(
            f"packed=True does not combine with {type(algorithm).__name__}, which rotates "
            "params and moments on its update steps (algorithm.reparametrizes)"
        )
    store = pack_masks if packed else (lambda m: m)

    def init_fn(params):
        _check_params(params, masks)
        if masks is None:
            init_masks = algorithm.init_masks(params, init_key)
        else:
            init_masks = jax.tree.map(
                lambda m, p: None if m is None else jnp.asarray(m, bool),
                masks,
                params,
                is_leaf=is_none,
            )
        return MaskedState(
            count=jnp.zeros((), jnp.int32),
            masks=store(init_masks),
            rng=key_data,
            inner_state=inner.init(params),
            algo_state=algorithm.init_state(params),
        )

    def masked_update(updates, state, params):
        step = state.count
        old_masks = unpack_masks(state.masks)
        algo_state = algorithm.update_state(state.algo_state, params, updates, step)

        def ordinary(masks_, inner_state):
            grads = updates if straight_through else apply_masks(updates, masks_)
            inner_updates, inner_state = inner.update(grads, inner_state, params)
            return masks_, inner_updates, inner_state

        if not has_schedule:
            new_masks, inner_updates, inner_state = ordinary(old_masks, state.inner_state)
        else:
            step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), step)
            is_update = algorithm.is_update_step(step)
            # Only the masks go through the cond: a cond whose branches carry the
            # optimizer state made XLA:CPU pay on every ordinary step (RigL's amortized
            # step in benchmarks/overhead.py: 1.06-1.11x dense before, 0.98-1.01x after),
            # while the choices below are elementwise selects that fuse into the
            # optimizer's own arithmetic.
            new_masks = jax.lax.cond(
                is_update,
                lambda: algorithm.update_masks(
                    old_masks, params, updates, step, step_key, algo_state=algo_state
                ),
                lambda: old_masks,
            )
            inner_state = state.inner_state
            if algorithm.reset_grown_moments:
                # Empty on ordinary steps (the masks did not change).
                grown = jax.tree.map(
                    lambda n, o: None if n is None else n & ~o,
                    new_masks,
                    old_masks,
                    is_leaf=is_none,
                )
                inner_state = reset_moments(inner_state, params, grown)
            new_masks, inner_updates, stepped_state = ordinary(new_masks, inner_state)
            if algorithm.skip_update_on_mask_step:
                # On update steps the inner optimizer's step is discarded: no move, and
                # its state stays as reset (its computation is wasted once per ΔT steps).
                inner_updates = jax.tree.map(
                    lambda u: jnp.where(is_update, jnp.zeros_like(u), u), inner_updates
                )
                inner_state = jax.tree.map(
                    lambda kept, stepped: jax.lax.select(is_update, kept, stepped),
                    inner_state,
                    stepped_state,
                )
            else:
                inner_state = stepped_state

        if straight_through:
            out = inner_updates
        else:
            out = jax.tree.map(
                lambda m, u, p: u if m is None else jnp.where(m, u, -p).astype(u.dtype),
                new_masks,
                inner_updates,
                params,
                is_leaf=is_none,
            )
        new_state = MaskedState(
            count=optax.safe_int32_increment(step),
            masks=store(new_masks),
            rng=state.rng,
            inner_state=inner_state,
            algo_state=algo_state,
        )
        return out, new_state

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(
                "masked(...).update needs params (the pruned weights are zeroed from them)"
            )
        _check_updates(updates, params)
        if not algorithm.reparametrizes:
            return masked_update(updates, state, params)
        # The basis change comes first, so the masks are chosen in the new basis.
        new_params, inner_state = jax.lax.cond(
            algorithm.is_update_step(state.count),
            lambda: algorithm.reparametrize(params, state.inner_state, state.masks),
            lambda: (params, state.inner_state),
        )
        out, new_state = masked_update(updates, state._replace(inner_state=inner_state), new_params)

        def from_old_params(m, u, p, q):
            # u moves q (the new basis) and zeroes its dead entries; (q - p) + u moves p.
            moved = (q - p) + u
            if m is None:
                return moved
            return jnp.where(m, moved, -p).astype(u.dtype)

        out = jax.tree.map(
            from_old_params, new_state.masks, out, params, new_params, is_leaf=is_none
        )
        return out, new_state

    return optax.GradientTransformation(init_fn, update_fn)


def _child(node: Any, key: Any) -> Any:
    """The child of a pytree node at one key-path entry (None for custom nodes)."""
    if isinstance(key, jax.tree_util.SequenceKey):
        return node[key.idx]
    if isinstance(key, jax.tree_util.DictKey):
        return node[key.key]
    if isinstance(key, jax.tree_util.GetAttrKey):
        return getattr(node, key.name)
    return None


def _masked_state(opt_state: optax.OptState) -> MaskedState:
    """The first `MaskedState` in ``opt_state``, checking that no transform follows `masked`.

    An ``optax.chain`` state is a plain tuple (``optax.named_chain``'s an
    OrderedDict) with one entry per transform in order; every such container
    on the way to the `MaskedState` must hold it in its last entry.
    """
    is_state = lambda x: isinstance(x, MaskedState)  # noqa: E731
    found = [
        (path, node)
        for path, node in jax.tree_util.tree_flatten_with_path(opt_state, is_leaf=is_state)[0]
        if is_state(node)
    ]
    if not found:
        raise ValueError(
            "opt_state holds no MaskedState: was the optimizer built with masked(...)?"
        )
    path, state = found[0]
    node = opt_state
    for depth, key in enumerate(path):
        if type(node) is tuple or type(node) is collections.OrderedDict:
            entries = list(range(len(node))) if type(node) is tuple else list(node)
            here = key.idx if isinstance(key, jax.tree_util.SequenceKey) else key.key
            if here != entries[-1]:
                raise ValueError(
                    f"masked(...) must be the last transform of its chain, but its state at "
                    f"opt_state{jax.tree_util.keystr(path[: depth + 1])} is followed by "
                    f"{len(entries) - 1 - entries.index(here)} more transform(s), which would "
                    "rescale the update -w that zeroes each pruned weight (optax.scale(0.5) "
                    "leaves w / 2). "
                    "Put them inside: masked(optax.chain(inner, ...), algorithm)"
                )
        node = _child(node, key)
        if node is None:
            break
    return state


def get_masks(opt_state: optax.OptState) -> PyTree:
    """The masks held by the (first) `MaskedState` inside ``opt_state``.

    Args:
      opt_state: the state of `masked` or of a chain containing it.

    Returns:
      The mask pytree of bool arrays (bit-packed masks are unpacked).

    Raises:
      ValueError: if there is no `MaskedState` in ``opt_state``, or a chain in it
        has transforms after `masked` (they would break the exact zeros of the
        pruned weights; see the module docstring).
    """
    return unpack_masks(_masked_state(opt_state).masks)


def sparsify(params: PyTree, opt_state: optax.OptState) -> PyTree:
    """Applies the masks of ``opt_state`` to ``params``.

    Call it once after ``opt_state = tx.init(params)`` so the very first
    forward pass already sees the initial sparse network (every later step
    keeps pruned weights at zero by itself, which needs `masked` to be the last
    transform: this call refuses a chain with transforms after it).

    Raises:
      ValueError: as `get_masks`.
    """
    return apply_masks(params, get_masks(opt_state))
