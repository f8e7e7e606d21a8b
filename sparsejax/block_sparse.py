"""Block-sparse execution: sparse ``nn.Dense`` kernels held and run as stored blocks.

``sparsejax.transforms.masked`` trains dense weights times a mask, so a step costs a dense
step. Here each sparsified kernel ``W (K, N)`` of a Flax Linen model is replaced in the
params by the ``values`` of its stored ``(bk, bn)`` blocks (`pallas_kernels.dynamic`), the
only float leaf the optimizer sees, while the block indices live in the optimizer state
(as masks live in ``masked``'s). Mask updates move indices, never shapes, so one compiled
train step serves the whole run. Two layouts:

* COO (`CooBlocks`): a fixed number of blocks anywhere in each layer. Mask updates follow
  the algorithm's own ``update_masks`` (`sparsejax.algorithms.SET`, ``RigL``), run on the
  densified weights, so the blocks chosen are exactly those of the masked mode: per layer,
  drop the ``round(f(t) * k)`` live blocks of lowest pooled |w|, grow as many of highest
  pooled grow score among the others, ties to the lower row-major grid position, f(t) the
  cosine drop fraction, the optimizer step skipped on update steps, grown blocks at zero
  with zero moments. From the same key, training in both modes picks the same blocks and
  reaches the same weights up to float rounding (the block products sum in another order;
  near-ties of scores or ReLU kinks can amplify that, as between any two summation orders).
* fan-in (`FanInBlocks`): every block column keeps the same number f of blocks, the
  constant fan-in of SRigL. Its update swaps ``round(f(t) * f)`` blocks within every
  column (`pallas_kernels.fan_in_update`): a per-column rule, not RigL's per-layer one, so
  it does not reproduce the masked mode (SRigL's neuron ablation is not implemented).
  Initial rows: per column, the blocks of the algorithm's initial mask first, then random
  ones, f = round(blocks / columns) (the layer's count rounded to whole columns).

Usage::

    params = model.init(key, x)["params"]
    algo = algorithms.get("rigl", sparsity=0.9, structure="block", block_shape=(32, 32))
    values, layouts = block_sparse.to_block_sparse(params, algo, key=key)
    tx = block_sparse.sparse_blocks(optax.adam(1e-3), algo, layouts, key=key)
    opt_state = tx.init(values)
    step = jax.jit(block_sparse.make_train_step(loss_fn, tx))  # loss_fn(params, batch)
    values, opt_state, loss = step(values, opt_state, batch)
    dense = block_sparse.to_dense(values, block_sparse.get_layouts(opt_state))

Supported algorithms keep every layer's block count: `Static`, `SET`, `RigL` (and masks
given with ``masks=``) with ``structure='block'`` and a 2-D ``block_shape``. Algorithms
whose counts change (gradual pruning `Prune`, SNFS's redistribution) or that keep dense
weights (straight-through, reparametrizing) are refused with a ValueError.

FLOPs per step, per layer with batch B, nnz stored weights: an ordinary step is the
sparse forward, activation gradient and values gradient, 3 * 2 B nnz (the dense step:
3 * 2 B K N). RigL's grow score needs the dense gradient X^T dY; it is computed only on
update steps, inside the update branch, by a second pass in which a zero "probe" is added
to each layer's output whose gradient is X^T dY (`dense_gradients`): 3 * 2 B nnz + 2 B K N.
So an update step costs 2 * 3 * 2 B nnz + 2 B K N (the first pass's gradient is discarded:
the step is skipped), amortized over ``update_every_steps`` (Evci et al. 2020, Appendix H,
count 2 f_S + f_D for it). On update steps the weights, masks and gradients are densified
for ``update_masks`` (transient memory of a dense layer; none on ordinary steps).

References:
  Evci et al., "Rigging the Lottery: Making All Tickets Winners", ICML 2020 (RigL).
  Lasby et al., "Dynamic Sparse Training with Structured Sparsity", ICLR 2024 (SRigL).
  Mocanu et al., "Scalable training of artificial neural networks with adaptive sparse
  connectivity inspired by network science", 2018 (SET).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

import pallas_kernels as pk
from sparsejax import schedules
from sparsejax.algorithms.base import SparseAlgorithm
from sparsejax.algorithms.dst import SET
from sparsejax.masks import is_none, path_name
from sparsejax.transforms import reset_moments

PyTree = Any

__all__ = [
    "LAYOUTS",
    "CooBlocks",
    "FanInBlocks",
    "SparseBlocksState",
    "block_sparse_calls",
    "dense_gradients",
    "get_layouts",
    "make_train_step",
    "masks_from_layouts",
    "sparse_blocks",
    "to_block_sparse",
    "to_dense",
]

LAYOUTS = ("coo", "fan_in")


@struct.dataclass
class CooBlocks:
    """Positions of the stored blocks of one kernel in the COO layout.

    Attributes:
      rows: int32[nb], block rows in ``[0, K/bk)``; slot ``b`` holds ``values[b]``.
      cols: int32[nb], block columns in ``[0, N/bn)``; the pairs are distinct.
      shape: ``(K, N)``, the dense kernel's shape (static).
      block_shape: ``(bk, bn)`` (static).
    """

    rows: jax.Array
    cols: jax.Array
    shape: tuple[int, int] = struct.field(pytree_node=False)
    block_shape: tuple[int, int] = struct.field(pytree_node=False)


@struct.dataclass
class FanInBlocks:
    """Positions of the stored blocks of one kernel in the fan-in layout.

    Attributes:
      rows: int32[N/bn, f], the block rows of every block column (distinct per column);
        ``values[j, p]`` sits at block ``(rows[j, p], j)``.
      shape: ``(K, N)`` (static). block_shape: ``(bk, bn)`` (static).
    """

    rows: jax.Array
    shape: tuple[int, int] = struct.field(pytree_node=False)
    block_shape: tuple[int, int] = struct.field(pytree_node=False)


def _is_layout(x: Any) -> bool:
    return isinstance(x, (CooBlocks, FanInBlocks))


def _layout_or_none(x: Any) -> bool:
    return x is None or _is_layout(x)


def _block_grid(layout: CooBlocks | FanInBlocks) -> jax.Array:
    """bool[K/bk, N/bn]: True at the stored blocks."""
    (k, n), (bk, bn) = layout.shape, layout.block_shape
    if isinstance(layout, CooBlocks):
        rows, cols = layout.rows, layout.cols
    else:
        rows = layout.rows
        cols = jnp.broadcast_to(jnp.arange(rows.shape[0])[:, None], rows.shape)
    return jnp.zeros((k // bk, n // bn), bool).at[rows, cols].set(True)


def _layout_to_dense(values: jax.Array, layout: CooBlocks | FanInBlocks) -> jax.Array:
    if isinstance(layout, CooBlocks):
        return pk.coo_to_dense(values, layout.rows, layout.cols, layout.shape)
    return pk.fan_in_to_dense(values, layout.rows, layout.shape[0])


def _matmul(x: jax.Array, values: jax.Array, layout: CooBlocks | FanInBlocks) -> jax.Array:
    if isinstance(layout, CooBlocks):
        return pk.coo_matmul(x, values, layout.rows, layout.cols, n=layout.shape[1])
    return pk.fan_in_matmul(x, values, layout.rows)


def _expected_values_shape(layout: CooBlocks | FanInBlocks) -> tuple[int, ...]:
    if isinstance(layout, CooBlocks):
        return (layout.rows.shape[0], *layout.block_shape)
    return (*layout.rows.shape, *layout.block_shape)


# ----------------------------------------------------------------------------- conversion


def _check_algorithm(algorithm: Any) -> None:
    """Refuses algorithms whose kernels cannot be held as a fixed number of blocks."""
    if not isinstance(algorithm, SparseAlgorithm) or algorithm.structure != "block":
        raise ValueError(
            "algorithm must be a sparse algorithm with structure='block' (e.g. "
            "algorithms.get('rigl', structure='block', block_shape=(32, 32))), got "
            f"{algorithm!r}"
        )
    if len(tuple(algorithm.block_shape)) != 2:
        raise ValueError(
            f"block_shape must be 2-D (bk, bn) for Dense kernels, got {algorithm.block_shape!r}"
        )
    if algorithm.straight_through or algorithm.reparametrizes:
        raise ValueError(
            f"{type(algorithm).__name__} keeps dense weights (straight-through or "
            "reparametrizing); block-sparse execution holds only the stored blocks"
        )
    if algorithm.updates_masks and not isinstance(algorithm, SET):
        raise ValueError(
            f"{type(algorithm).__name__} changes the number of blocks of a layer during "
            "training (gradual pruning, redistribution), but a block-sparse layout holds "
            "a fixed count; use Static, SET or RigL, or the masked mode "
            "(sparsejax.transforms.masked)"
        )
    if algorithm.updates_masks and not (
        algorithm.skip_update_on_mask_step and algorithm.reset_grown_moments
    ):
        raise ValueError(
            f"{type(algorithm).__name__} must skip the optimizer step on mask updates and "
            "reset grown moments (skip_update_on_mask_step, reset_grown_moments)"
        )


def _init_key(key: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """``(init_key, step_base_key)`` split as `sparsejax.transforms.masked` splits its key."""
    key = jax.random.key(0) if key is None else key
    if not isinstance(key, jax.Array) or not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        raise ValueError(
            f"key must be a typed key from jax.random.key, got {getattr(key, 'dtype', key)!r}"
        )
    init_key, step_key = jax.random.split(key)
    return init_key, step_key


def to_block_sparse(
    params: PyTree,
    algorithm: SparseAlgorithm,
    *,
    key: jax.Array | None = None,
    masks: PyTree | None = None,
    layout: str = "coo",
) -> tuple[PyTree, PyTree]:
    """Dense params -> block values (in the params) and block positions (outside them).

    Call eagerly (the initial masks must be concrete). With the same ``key``,
    ``algorithm.init_masks`` draws the masks that ``masked(inner, algorithm, key=key)``
    draws, so the COO layout keeps exactly the masked mode's initial blocks.

    Args:
      params: the ``'params'`` collection of a Linen model (``variables['params']``);
        every sparsified leaf is a 2-D ``nn.Dense`` kernel ``(K, N)``.
      algorithm: a `SparseAlgorithm` with ``structure='block'`` (see the module doc).
      key: ``jax.random.key`` (default ``key(0)``, as ``masked``); pass the same one to
        `sparse_blocks`.
      masks: initial masks (bool, constant on blocks; None where dense) instead of
        ``algorithm.init_masks``, as ``masked(..., masks=...)``.
      layout: ``'coo'`` (free placement) or ``'fan_in'`` (constant fan-in per column).

    Returns:
      ``(values_params, layouts)``: ``params`` with every sparsified kernel replaced by
      its values (COO float[nb, bk, bn], fan-in float[N/bn, f, bk, bn]), and a tree of
      the structure of ``params`` holding `CooBlocks` / `FanInBlocks` there and None
      elsewhere.

    Raises:
      ValueError: an unsupported algorithm or layout, a sparsified leaf that is not 2-D
        or not divided by the block, a mask not constant on blocks or keeping none.
    """
    _check_algorithm(algorithm)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    init_key, _ = _init_key(key)
    if masks is None:
        masks = algorithm.init_masks(params, init_key)
    flat, treedef = jax.tree_util.tree_flatten_with_path(masks, is_leaf=is_none)
    param_leaves = treedef.flatten_up_to(params)
    out_values, out_layouts = [], []
    for i, ((path, mask), p) in enumerate(zip(flat, param_leaves)):
        if mask is None:
            out_values.append(p)
            out_layouts.append(None)
            continue
        name = path_name(path)
        if np.ndim(p) != 2:
            raise ValueError(
                f"parameter {name} of shape {np.shape(p)} is sparsified, but block-sparse "
                "execution runs 2-D nn.Dense kernels only; list it in keep_dense"
            )
        block = tuple(int(b) for b in algorithm.unit_shape(np.shape(p)))
        mask = np.asarray(mask, bool)
        grid = mask[:: block[0], :: block[1]]
        if mask.shape != np.shape(p) or not np.array_equal(
            mask, np.kron(grid, np.ones(block, bool))
        ):
            raise ValueError(f"the mask of {name} is not constant on {block} blocks")
        if not grid.any():
            raise ValueError(f"the mask of {name} keeps no block; a layout needs at least one")
        shape = tuple(int(d) for d in np.shape(p))
        if layout == "coo":
            values, rows, cols = pk.coo_from_dense(p, grid)
            out_layouts.append(CooBlocks(rows, cols, shape=shape, block_shape=block))
        else:
            kb, nbc = grid.shape
            fan_in = min(max(int(np.round(grid.sum() / nbc)), 1), kb)
            noise = jax.random.uniform(jax.random.fold_in(init_key, i), grid.shape)
            rows = pk.fan_in_select(grid + 0.5 * noise, fan_in)  # the mask's blocks first
            fan_grid = np.zeros_like(grid)
            fan_grid[np.asarray(rows), np.arange(nbc)[:, None]] = True
            values, rows = pk.fan_in_from_dense(p, fan_grid)
            out_layouts.append(FanInBlocks(rows, shape=shape, block_shape=block))
        out_values.append(values)
    return treedef.unflatten(out_values), treedef.unflatten(out_layouts)


def to_dense(params: PyTree, layouts: PyTree) -> PyTree:
    """Block values -> dense kernels (zeros where no block is stored); jit-able.

    Args:
      params: values params from `to_block_sparse` (or a training step).
      layouts: the matching layouts (`get_layouts` of the optimizer state).

    Returns:
      The params with every block-sparse kernel as its dense float[K, N].
    """
    return jax.tree.map(
        lambda lay, v: v if lay is None else _layout_to_dense(v, lay),
        layouts,
        params,
        is_leaf=_layout_or_none,
    )


def masks_from_layouts(layouts: PyTree) -> PyTree:
    """The bool masks (float kernel shapes, None where dense) of a layouts tree; jit-able."""

    def one(lay):
        if lay is None:
            return None
        return SparseAlgorithm.expand(_block_grid(lay), lay.block_shape)

    return jax.tree.map(one, layouts, is_leaf=_layout_or_none)


# ----------------------------------------------------------------------------- execution


@jax.custom_vjp
def _probe(y: jax.Array, x: jax.Array, probe: jax.Array) -> jax.Array:
    """``y``; its gradient reaches ``probe`` as ``X^T dY`` (as if ``y + x @ probe``)."""
    del x, probe
    return y


def _probe_fwd(y, x, probe):
    return y, (x, probe)


def _probe_bwd(res, dy):
    x, probe = res
    k, n = probe.shape
    # The gradient of x @ probe at probe = 0: X^T dY for probe, dY @ 0^T = 0 for x.
    dprobe = jnp.dot(x.reshape(-1, k).T, dy.reshape(-1, n).astype(x.dtype))
    return dy, jnp.zeros_like(x), dprobe.astype(probe.dtype)


_probe.defvjp(_probe_fwd, _probe_bwd)


def _lookup(tree: Any, path: tuple[str, ...]) -> Any:
    node = tree
    for name in (*path, "kernel"):
        if not isinstance(node, Mapping) or name not in node:
            return None
        node = node[name]
    return node


@contextlib.contextmanager
def block_sparse_calls(layouts: PyTree, *, probes: PyTree | None = None) -> Iterator[None]:
    """Within this context, every ``nn.Dense`` with a layout runs its block-sparse kernel.

    An unchanged Linen model applied to values params (`to_block_sparse`) computes
    ``x @ W + b`` of its sparsified Dense layers with `pallas_kernels.coo_matmul` or
    `pallas_kernels.fan_in_matmul` at the current (possibly traced) block positions;
    other module calls run as usual. Layers are found by their module path in
    ``layouts`` (which mirrors the ``'params'`` collection). Dtypes are promoted as
    ``nn.Dense`` does; its ``precision`` and ``dot_general`` are not used.

    Args:
      layouts: the layouts tree (`to_block_sparse`, `get_layouts`).
      probes: optional tree of zero float[K, N] arrays at the layouts' places: each
        layer's output then passes a probe whose gradient is the dense weight
        gradient ``X^T dY`` (used by `dense_gradients`).

    Raises:
      ValueError (when a layer runs): an input width or ``features`` that does not
        match the layout's shape.
    """

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if type(module) is not nn.Dense or context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        layout = _lookup(layouts, module.path)
        if not _is_layout(layout):
            return next_fun(*args, **kwargs)
        x = args[0] if args else kwargs["inputs"]
        if (x.shape[-1], module.features) != layout.shape:
            raise ValueError(
                f"layer {'/'.join(module.path)}: input width {x.shape[-1]} and features "
                f"{module.features} do not match its block layout of shape {layout.shape}"
            )
        values = module.get_variable("params", "kernel")
        bias = module.get_variable("params", "bias") if module.use_bias else None
        x, values, bias = nn.dtypes.promote_dtype(x, values, bias, dtype=module.dtype)
        y = _matmul(x, values, layout)
        probe = None if probes is None else _lookup(probes, module.path)
        if probe is not None:
            y = _probe(y, x, probe)
        return y if bias is None else y + bias

    with nn.intercept_methods(interceptor):
        yield


def dense_gradients(
    loss_fn: Callable[..., Any], params: PyTree, layouts: PyTree, *args: Any, has_aux=False
) -> PyTree:
    """The gradient of ``loss_fn`` with respect to the dense weights, at every position.

    Runs the model block-sparse with a zero probe on each sparsified layer: the cost is
    one sparse forward and backward plus one dense product ``X^T dY`` per layer (not a
    dense forward). This is what RigL grows by (the gradient of absent weights).

    Args:
      loss_fn: ``loss_fn(params, *args) -> scalar`` (or ``(scalar, aux)`` with has_aux)
        running a Linen model on ``params``.
      params: values params. layouts: the matching layouts.
      *args: further arguments of ``loss_fn`` (the batch).
      has_aux: ``loss_fn`` returns ``(loss, aux)``.

    Returns:
      A tree of the structure of ``to_dense(params, layouts)``: float[K, N] gradients at
      the sparsified kernels, the ordinary gradients elsewhere.
    """
    probes = jax.tree.map(
        lambda lay, v: None if lay is None else jnp.zeros(lay.shape, v.dtype),
        layouts,
        params,
        is_leaf=_layout_or_none,
    )

    def probed(p, q):
        with block_sparse_calls(layouts, probes=q):
            return loss_fn(p, *args)

    grads, probe_grads = jax.grad(probed, argnums=(0, 1), has_aux=has_aux)(params, probes)
    if has_aux:
        grads, probe_grads = grads
    return jax.tree.map(
        lambda lay, q, g: g if lay is None else q,
        layouts,
        probe_grads,
        grads,
        is_leaf=_layout_or_none,
    )


# ----------------------------------------------------------------------------- training


class SparseBlocksState(NamedTuple):
    """State of `sparse_blocks`.

    Attributes:
      count: int32 scalar, updates applied so far (the step).
      layouts: the block positions (`CooBlocks` / `FanInBlocks`, None where dense).
      rng: uint32 key data of the per-step base key (step t uses ``fold_in(key, t)``,
        as `sparsejax.transforms.MaskedState`).
      inner_state: the wrapped optimizer's state, over the values params only.
    """

    count: jax.Array
    layouts: PyTree
    rng: jax.Array
    inner_state: optax.OptState


def _relayout_coo(lay: CooBlocks, new_mask: jax.Array) -> tuple[CooBlocks, jax.Array]:
    """Slots for ``new_mask``'s blocks: kept blocks keep their slot, new ones fill the freed."""
    bk, bn = lay.block_shape
    kb = lay.shape[0] // bk
    nb = lay.rows.shape[0]
    new_grid = new_mask[::bk, ::bn]
    stays = new_grid[lay.rows, lay.cols]
    fresh = (new_grid & ~_block_grid(lay)).T.reshape(-1)  # column-major positions
    fresh_pos = jnp.nonzero(fresh, size=nb, fill_value=0)[0].astype(jnp.int32)
    # The i-th freed slot takes the i-th new block; both counts are equal because the
    # supported algorithms keep each layer's count (unused fills, index nb, are dropped).
    freed = jnp.nonzero(~stays, size=nb, fill_value=nb)[0]
    rows = lay.rows.at[freed].set(fresh_pos % kb, mode="drop")
    cols = lay.cols.at[freed].set(fresh_pos // kb, mode="drop")
    return lay.replace(rows=rows, cols=cols), ~stays


def sparse_blocks(
    inner: optax.GradientTransformation,
    algorithm: SparseAlgorithm,
    layouts: PyTree,
    *,
    key: jax.Array | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Wraps ``inner`` to train values params while ``algorithm`` moves their blocks.

    The optax analog of ``masked(inner, algorithm)`` for block-sparse execution: the
    state holds the layouts; on the algorithm's update steps (`jax.lax.cond` inside the
    jitted update) the blocks are moved, grown blocks start at zero with zeroed inner
    moments, and the inner step is skipped; otherwise the inner optimizer runs on the
    values' gradients. ``update(grads, state, params, dense_grads=fn)`` needs
    ``dense_grads``: a function of no arguments returning the dense gradients
    (`dense_gradients`), called only in the update branch; `make_train_step` passes it.

    Args:
      inner: any optax transformation; it sees only the values (and dense leaves).
      algorithm: the algorithm given to `to_block_sparse`.
      layouts: the layouts `to_block_sparse` returned.
      key: the key given to `to_block_sparse` (step keys as in ``masked``).

    Returns:
      An `optax.GradientTransformationExtraArgs` with a `SparseBlocksState`.

    Raises:
      ValueError: an unsupported algorithm (module doc), ``inner`` not an optax
        transformation; at init, params that do not fit ``layouts``; at update, missing
        ``params`` or ``dense_grads`` (when the algorithm updates masks).
    """
    _check_algorithm(algorithm)
    if not isinstance(inner, optax.GradientTransformation):
        raise ValueError(f"inner must be an optax.GradientTransformation, got {type(inner)!r}")
    _, step_base_key = _init_key(key)
    key_data = jax.random.key_data(step_base_key)

    def init_fn(params):
        for (path, lay), v in zip(
            jax.tree_util.tree_flatten_with_path(layouts, is_leaf=_layout_or_none)[0],
            jax.tree.structure(layouts, is_leaf=_layout_or_none).flatten_up_to(params),
        ):
            if lay is not None and jnp.shape(v) != _expected_values_shape(lay):
                raise ValueError(
                    f"params {path_name(path)} has shape {jnp.shape(v)}, its layout "
                    f"needs values of shape {_expected_values_shape(lay)}"
                )
        return SparseBlocksState(
            count=jnp.zeros((), jnp.int32),
            layouts=layouts,
            rng=key_data,
            inner_state=inner.init(params),
        )

    def relayout(state, params, dense_grads, step):
        lays = state.layouts
        step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), step)
        dense_params = to_dense(params, lays)
        grads = dense_grads()
        has = lambda cls: any(isinstance(x, cls) for x in jax.tree.leaves(lays, _is_layout))  # noqa: E731
        # COO: the algorithm's own rule on the densified weights (exactly the masked mode).
        current = masks_from_layouts(lays)
        new_masks = current
        if has(CooBlocks):
            new_masks = algorithm.update_masks(current, dense_params, grads, step, step_key)
        # Fan-in: the same drop fraction and grow scores, per block column.
        fraction = schedules.cosine_drop_fraction(algorithm.drop_fraction, algorithm.end_step)
        grow = current  # a placeholder where no fan-in layer needs scores
        if has(FanInBlocks):
            grow = algorithm.grow_scores(dense_params, grads, step_key)

        def one(lay, v, m, g):
            if lay is None:
                return None, None
            if isinstance(lay, CooBlocks):
                return _relayout_coo(lay, m)
            n_swap = jnp.round(fraction(step) * lay.rows.shape[1]).astype(jnp.int32)
            drop = jnp.sum(jnp.abs(v), axis=(2, 3))
            pooled = algorithm.pool(g, lay.block_shape)
            _, rows, grown = pk.fan_in_update(v, lay.rows, drop, pooled, n_swap)
            return lay.replace(rows=rows), grown

        pairs = jax.tree.map(one, lays, params, new_masks, grow, is_leaf=_layout_or_none)
        is_pair = lambda x: isinstance(x, tuple) and len(x) == 2 and not _is_layout(x)  # noqa: E731
        new_lays = jax.tree.map(lambda t: t[0], pairs, is_leaf=is_pair)
        grown = jax.tree.map(lambda t: t[1], pairs, is_leaf=is_pair)
        return new_lays, grown  # grown: bool per slot, (nb,) or (N/bn, f)

    def update_fn(updates, state, params=None, *, dense_grads=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError("sparse_blocks(...).update needs params (the stored values)")
        if jax.tree.structure(updates) != jax.tree.structure(params):
            raise ValueError(
                "updates (the gradients) must have the structure of params: "
                f"{jax.tree.structure(updates)} vs {jax.tree.structure(params)}"
            )
        step = state.count

        out, inner_state = inner.update(updates, state.inner_state, params)
        lays = state.layouts
        if algorithm.updates_masks:
            if dense_grads is None:
                raise ValueError(
                    "sparse_blocks(...).update needs dense_grads=<function returning the "
                    "dense gradients> (block_sparse.make_train_step passes it)"
                )
            is_update = algorithm.is_update_step(step)
            # As in `transforms.masked`: only the layouts and the grown slots go through the
            # cond (the dense gradient is computed inside it, on update steps only); the
            # optimizer's skip and the moment reset are selects fused into its arithmetic,
            # where a cond carrying values and moments would pass them through every step.
            lays, grown_slots = jax.lax.cond(
                is_update,
                lambda: relayout(state, params, dense_grads, step),
                lambda: (
                    lays,
                    jax.tree.map(
                        lambda lay: None if lay is None else jnp.zeros(lay.rows.shape, bool),
                        lays,
                        is_leaf=_layout_or_none,
                    ),
                ),
            )
            grown = jax.tree.map(
                lambda g, v: None if g is None else jnp.broadcast_to(g[..., None, None], v.shape),
                grown_slots,
                params,
                is_leaf=is_none,
            )
            reset = reset_moments(state.inner_state, params, grown)
            # Update steps: no inner step; grown slots held a dropped block, -v zeroes them.
            out = jax.tree.map(
                lambda g, v, u: jnp.where(
                    is_update, jnp.zeros_like(v) if g is None else jnp.where(g, -v, 0.0), u
                ),
                grown,
                params,
                out,
                is_leaf=is_none,
            )
            inner_state = jax.tree.map(
                lambda kept, stepped: jax.lax.select(is_update, kept, stepped), reset, inner_state
            )
        new_state = SparseBlocksState(
            count=optax.safe_int32_increment(step),
            layouts=lays,
            rng=state.rng,
            inner_state=inner_state,
        )
        return out, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def get_layouts(opt_state: optax.OptState) -> PyTree:
    """The layouts of the (first) `SparseBlocksState` in ``opt_state``.

    Raises:
      ValueError: if ``opt_state`` holds no `SparseBlocksState`.
    """
    is_state = lambda x: isinstance(x, SparseBlocksState)  # noqa: E731
    for node in jax.tree.leaves(opt_state, is_leaf=is_state):
        if is_state(node):
            return node.layouts
    raise ValueError("opt_state holds no SparseBlocksState: was tx built with sparse_blocks?")


def make_train_step(
    loss_fn: Callable[[PyTree, Any], Any],
    tx: optax.GradientTransformationExtraArgs,
    *,
    has_aux: bool = False,
) -> Callable[[PyTree, optax.OptState, Any], tuple]:
    """A pure train step for values params: block-sparse forward, backward and update.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar`` (``(scalar, aux)`` with has_aux),
        running an unchanged Linen model, e.g. ``xent(model.apply({'params': p}, x), y)``.
      tx: a `sparse_blocks` transform (or a chain containing it).
      has_aux: ``loss_fn`` returns ``(loss, aux)``.

    Returns:
      ``step(params, opt_state, batch) -> (params, opt_state, loss)`` (``loss`` is
      ``(loss, aux)`` with has_aux); wrap it in `jax.jit`. The dense gradient is computed
      only on mask-update steps (`dense_gradients`, inside the update branch).
    """

    def step(params, opt_state, batch):
        layouts = get_layouts(opt_state)

        def sparse_loss(p):
            with block_sparse_calls(layouts):
                return loss_fn(p, batch)

        loss, grads = jax.value_and_grad(sparse_loss, has_aux=has_aux)(params)
        updates, opt_state = tx.update(
            grads,
            opt_state,
            params,
            dense_grads=lambda: dense_gradients(loss_fn, params, layouts, batch, has_aux=has_aux),
        )
        return optax.apply_updates(params, updates), opt_state, loss

    return step
