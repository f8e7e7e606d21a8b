"""Block-sparse execution of a run: ``config.sparsity.execution = "bsr"``.

With ``execution = "masked"`` (the default) a run trains dense weights times masks
(`sparsejax.transforms.masked`), so a step costs a dense step. With ``"bsr"`` the
sparsified ``nn.Dense`` kernels are held as their stored blocks
(`sparsejax.block_sparse`): the train state's params are the block values, the
optimizer is ``sparse_blocks(inner, algorithm, layouts)`` whose state holds the block
positions (``config.sparsity.block_layout``: ``"coo"`` or ``"fan_in"``), and every step
and evaluation runs the unchanged Linen model inside ``block_sparse_calls(layouts)``.
The dense gradient RigL grows by is computed only on mask-update steps.

With the COO layout and the same seed, a bsr run picks the same blocks as the masked
run of the same config and reaches the same weights up to float rounding (the block
products sum in another order; see `sparsejax.block_sparse`).

This module holds what differs from the masked path and needs no train state: the
config checks, the initial values and layouts, the optimizer and the exact sparsity
of the layouts. `experiments.state` builds the state and the steps from them.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from experiments import optim
from sparsejax import algorithms, block_sparse

PyTree = Any

__all__ = [
    "EXECUTIONS",
    "check_config",
    "execution_of",
    "init_values",
    "layout_sparsity",
    "make_optimizer",
]

# The values of config.sparsity.execution.
EXECUTIONS = ("masked", "bsr")

_PREFIX = "config.sparsity.execution='bsr'"


def execution_of(config: ml_collections.ConfigDict) -> str:
    """``config.sparsity.execution`` (default ``"masked"``), with ``block_layout`` checked.

    Raises:
      ValueError: naming ``config.sparsity.execution`` or ``config.sparsity.block_layout``
        for a value not in `EXECUTIONS` / ``block_sparse.LAYOUTS``.
    """
    execution = config.sparsity.get("execution", "masked")
    if execution not in EXECUTIONS:
        raise ValueError(
            f"config.sparsity.execution={execution!r} is unknown; known: {list(EXECUTIONS)}"
        )
    layout = config.sparsity.get("block_layout", "coo")
    if layout not in block_sparse.LAYOUTS:
        raise ValueError(
            f"config.sparsity.block_layout={layout!r} is unknown; known: "
            f"{list(block_sparse.LAYOUTS)}"
        )
    return execution


def check_config(config: ml_collections.ConfigDict, algorithm: algorithms.Algorithm) -> None:
    """Refuses a bsr config `sparsejax.block_sparse` cannot run, before anything is written.

    Nothing to check for ``execution = "masked"``. For ``"bsr"``: a Linen model
    (``config.model.api = "linen"``; the execution intercepts ``nn.Dense`` calls) without
    ``config.model.factorize``, ``config.pack_masks = False`` (no masks are held), and an
    algorithm `sparsejax.block_sparse.sparse_blocks` accepts (block structure with a 2-D
    block, a fixed block count: Static, SET or RigL; no straight-through or gradual pruning).

    Raises:
      ValueError: naming ``config.sparsity.execution`` (and the key at fault), with the
        library's own message for a refused algorithm.
    """
    if execution_of(config) != "bsr":
        return
    api = config.model.get("api", "linen")
    if api != "linen":
        raise ValueError(
            f"{_PREFIX} runs Linen models only (it intercepts nn.Dense calls), got "
            f"config.model.api={api!r}; use 'linen' or execution='masked'"
        )
    if config.model.get("factorize"):
        raise ValueError(
            f"{_PREFIX} cannot run a factorized model (config.model.factorize is set); "
            "use execution='masked'"
        )
    if optim.packs_masks(config):
        raise ValueError(f"{_PREFIX} holds block positions, not masks: set config.pack_masks=False")
    try:
        # Only its checks run here: the layouts are given to init, not to update.
        block_sparse.sparse_blocks(optax.identity(), algorithm, None)
    except ValueError as error:
        raise ValueError(
            f"{_PREFIX} cannot run config.sparsity.algorithm="
            f"{config.sparsity.get('algorithm', 'dense')!r}: {error}"
        ) from None


def make_optimizer(
    config: ml_collections.ConfigDict,
    algorithm: algorithms.Algorithm,
    layouts: PyTree,
    *,
    key: jax.Array | None = None,
) -> optax.GradientTransformationExtraArgs:
    """``sparse_blocks(optim.make_optimizer(config, total_steps), algorithm, layouts)``.

    As `optim.make_masked_optimizer`, the update reads only the state (layouts, counter,
    key), so a transform built from any layouts of the same tree updates any state.
    """
    inner = optim.make_optimizer(config, config.total_steps)
    return block_sparse.sparse_blocks(inner, algorithm, layouts, key=key)


def init_values(
    config: ml_collections.ConfigDict,
    algorithm: algorithms.Algorithm,
    params: PyTree,
    masks_tree: PyTree,
    *,
    key: jax.Array,
) -> tuple[PyTree, optax.OptState]:
    """The initial values params and optimizer state of a bsr run (eager).

    Takes the masked run's initial draw (`experiments.state` draws params and masks once for
    both executions), so the COO layout holds exactly the masked run's initial blocks. Not
    jit-able (the layouts' sizes come from the concrete masks).

    Args:
      config: the run config (``optimizer``, ``total_steps``, ``sparsity.block_layout``).
      algorithm: from `sparsejax.algorithms`.
      params: the initial dense params. masks_tree: their initial masks.
      key: the masks' key (the transform's key in the masked run).

    Returns:
      ``(values, opt_state)``: values params (`block_sparse.to_block_sparse`) and the
      `block_sparse.SparseBlocksState` holding the layouts.

    Raises:
      ValueError: naming ``config.sparsity.execution`` for a model whose sparsified
        leaves are not block-divisible 2-D Dense kernels.
    """
    try:
        values, layouts = block_sparse.to_block_sparse(
            params,
            algorithm,
            key=key,
            masks=masks_tree,
            layout=config.sparsity.get("block_layout", "coo"),
        )
    except ValueError as error:
        raise ValueError(f"{_PREFIX} cannot hold config.model's kernels: {error}") from None
    tx = make_optimizer(config, algorithm, layouts, key=key)
    return values, tx.init(values)


def layout_sparsity(layouts: PyTree) -> jax.Array:
    """Exact fraction of weights not stored, over the block-sparse kernels (jit-able).

    Args:
      layouts: a layouts tree (`block_sparse.get_layouts`).

    Returns:
      float32 scalar: ``1 - stored / total`` over every `CooBlocks` / `FanInBlocks`;
      0.0 without any.
    """
    is_layout = lambda x: isinstance(x, (block_sparse.CooBlocks, block_sparse.FanInBlocks))  # noqa: E731
    found = [x for x in jax.tree.leaves(layouts, is_leaf=is_layout) if is_layout(x)]
    total = sum(lay.shape[0] * lay.shape[1] for lay in found)
    if not total:
        return jnp.zeros((), jnp.float32)
    # Block counts are fixed by the layouts' shapes: a Python number, exact.
    stored = sum(lay.rows.size * lay.block_shape[0] * lay.block_shape[1] for lay in found)
    return jnp.asarray(1.0 - stored / total, jnp.float32)
