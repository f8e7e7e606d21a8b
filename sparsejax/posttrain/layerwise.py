"""The layer-by-layer driver: prune a trained Flax model from a small calibration batch.

Layers are pruned in call order. Each layer is calibrated on the inputs it receives from the
model whose earlier layers are already pruned, so later layers see (and compensate for) the
errors of earlier ones, as in SparseGPT and Wanda's sequential setting.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.errors
import jax
import jax.numpy as jnp

from sparsejax import masks as masks_lib
from sparsejax.posttrain import calibration
from sparsejax.posttrain import pattern as pattern_lib
from sparsejax.posttrain.dsnot import dsnot as dsnot_refine
from sparsejax.posttrain.magnitude import magnitude
from sparsejax.posttrain.sparsegpt import sparsegpt
from sparsejax.posttrain.wanda import wanda, wanda_scores

PyTree = Any

__all__ = ["METHODS", "PruneResult", "prune_calls", "prune_layer", "prune_model"]

METHODS: dict[str, Callable[..., tuple[jax.Array, jax.Array]]] = {
    "magnitude": magnitude,
    "sparsegpt": sparsegpt,
    "wanda": wanda,
}


_BLOCK_METHODS = ("magnitude", "wanda")


class PruneResult(NamedTuple):
    """What `prune_model` returns.

    Attributes:
      params: the pruned parameters (same structure as the input).
      masks: a mask tree like ``params``: boolean kernels of the pruned layers, None elsewhere.
      errors: ``{layer name: ||XW - XŴ||_F / ||XW||_F}`` on the layer's calibration inputs X.
    """

    params: PyTree
    masks: PyTree
    errors: dict[str, float]


def _get_method(method: str):
    if method not in METHODS:
        raise ValueError(f"method={method!r} is unknown; known methods: {sorted(METHODS)}")
    return METHODS[method]


def prune_layer(
    method: str,
    kernel: jax.Array,
    x: jax.Array,
    *,
    sparsity: Any = 0.0,
    n: int | None = None,
    m: int | None = None,
    dsnot: bool | Mapping[str, Any] = False,
    block_shape: tuple[int, int] | None = None,
    **options: Any,
) -> tuple[jax.Array, jax.Array]:
    """Prunes one 2D kernel ``[in, out]`` with ``method``, optionally refined by DSnoT.

    Args:
      method: 'magnitude', 'wanda' or 'sparsegpt'.
      kernel: ``float[in, out]``.
      x: calibration inputs ``float[tokens, in]``.
      sparsity, n, m: the pattern (see `magnitude`).
      dsnot: True (default options) or a mapping of `dsnot` options to refine the mask;
        the refined layer is the dense kernel under the new mask.
      block_shape: ``(rows, cols)``: drop whole blocks instead, ``sparsity`` being the
        fraction of blocks dropped; each block is scored by the sum of the method's weight
        scores inside it (``|W|`` for magnitude, ``|W_ij| * ||X_i||`` for Wanda), the
        structure BSR kernels store without padding. Magnitude and Wanda only: SparseGPT's
        weight update and DSnoT's swaps are per weight.
      **options: passed to the method (e.g. ``block_size``, ``dampening`` for SparseGPT).

    Returns:
      ``(pruned kernel, mask)``.

    Block scores: Gray, Radford & Kingma, "GPU Kernels for Block-Sparse Weights" (2017) for
    the format; Sun et al., "A Simple and Effective Pruning Approach for Large Language
    Models" (Wanda, 2024) for the score summed over a block.
    """
    fn = _get_method(method)
    if block_shape is not None:
        return _prune_blocks(method, kernel, x, sparsity, n, dsnot, block_shape)
    pruned, mask = fn(kernel, x, sparsity=sparsity, n=n, m=m, **options)
    if dsnot is not False and dsnot is not None:
        dsnot_options = {} if dsnot is True else dict(dsnot)
        pruned, mask = dsnot_refine(kernel, x, mask, n=n, m=m, **dsnot_options)
    return pruned, mask


def _prune_blocks(method, kernel, x, sparsity, n, dsnot, block_shape):
    if method not in _BLOCK_METHODS:
        raise ValueError(
            f"block_shape={tuple(block_shape)} works with methods {list(_BLOCK_METHODS)}, "
            f"got method={method!r}"
        )
    if n is not None or (dsnot is not False and dsnot is not None):
        raise ValueError(f"block_shape={tuple(block_shape)} takes a sparsity, not N:M or DSnoT")
    scores = jnp.abs(kernel) if method == "magnitude" else wanda_scores(kernel, x)
    mask = masks_lib.block_mask(scores, sparsity, block_shape)
    return jnp.where(mask, kernel, jnp.zeros_like(kernel)), mask


def _get(tree: Mapping, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: Mapping, path: tuple[str, ...], key: str, value: Any) -> dict:
    """A copy of nested dict ``tree`` with ``tree[path...][key] = value``."""
    tree = dict(tree)
    if not path:
        tree[key] = value
        return tree
    tree[path[0]] = _set(tree[path[0]], path[1:], key, value)
    return tree


def _blocks(calls: list, depth: int | None) -> list[list]:
    """Consecutive runs of calls whose paths share their first ``depth`` names."""
    if depth is None:
        return [[c] for c in calls]
    blocks: list[list] = []
    for call in calls:
        if blocks and blocks[-1][-1].path[:depth] == call.path[:depth]:
            blocks[-1].append(call)
        else:
            blocks.append([call])
    return blocks


def _check_options(method: str, sparsity: Any, n: Any, m: Any, block_depth: Any):
    """The pattern of ``sparsity`` / ``n``, ``m``, after checking every option of `prune_calls`."""
    _get_method(method)
    pattern = pattern_lib.make_pattern(sparsity, n, m)
    if block_depth is not None and (
        isinstance(block_depth, bool) or not isinstance(block_depth, int) or block_depth < 1
    ):
        raise ValueError(f"block_depth must be None or a positive int, got {block_depth!r}")
    return pattern


def prune_model(
    apply_fn: Callable[..., Any],
    params: PyTree,
    x: jax.Array,
    *,
    method: str,
    sparsity: Any = 0.0,
    n: int | None = None,
    m: int | None = None,
    dsnot: bool | Mapping[str, Any] = False,
    skip: Sequence[str] = (),
    block_depth: int | None = None,
    block_shape: tuple[int, int] | None = None,
    **options: Any,
) -> PruneResult:
    """Prunes every Dense and Conv kernel of a model, one layer (or block) at a time, in order.

    Args:
      apply_fn: ``model.apply``; called as ``apply_fn({"params": params}, x)``.
      params: trained parameters (nested dicts, kernels at ``[...]['kernel']``).
      x: a calibration batch of model inputs (e.g. 128 examples).
      method: 'magnitude', 'wanda' or 'sparsegpt'.
      sparsity: per-layer sparsity in [0, 1) (unstructured).
      n, m: N:M instead, along each kernel's input axis (a conv's input channels, so m
        must divide them).
      dsnot: refine each layer's mask with DSnoT (True, or a mapping of its options).
      skip: layer names (``'block_0/attention/query'``) left dense, e.g. embeddings and the
        classifier, as the papers leave the embeddings and the LM head dense.
      block_depth: None calibrates layer by layer: each layer sees the outputs of every
        pruned layer before it. An int groups consecutive layers whose paths share their
        first ``block_depth`` names (``block_depth=2`` on a BERT: ``encoder/layer_0``, all six
        projections of one encoder layer) into a block whose layers are all calibrated in one
        forward pass on the model with the earlier blocks pruned and this block still
        dense: the procedure of the SparseGPT and Wanda reference implementations (one
        transformer block at a time), and one forward pass per block instead of per layer.
      block_shape: drop whole ``(rows, cols)`` blocks of each kernel (see `prune_layer`);
        ``sparsity`` is then the fraction of blocks dropped.
      **options: passed to the method.

    Returns:
      A `PruneResult`. Biases and other parameters are unchanged.

    Raises:
      ValueError: for an unknown method or skipped name, a bad pattern, empty ``params``, an
        ``x`` that is empty or does not fit the model, or a layer (named in the message)
        whose input size ``m`` does not divide or whose calibration inputs are NaN/inf or
        zero on every token.

    The calibration input of layer l is captured (`calibration.capture_input`) from the model
    whose layers before l are already pruned; a Conv's input becomes im2col patches
    (`calibration.input_matrix`) and its kernel ``[window..., in, out]`` the matrix
    ``[window * in, out]``. The loop itself is `prune_calls`, shared with the Flax NNX
    front end (`sparsejax.nnx.prune_model`).
    """
    _check_options(method, sparsity, n, m, block_depth)
    if not jax.tree.leaves(params):
        raise ValueError(f"params must hold the model's parameters, got an empty tree {params!r}")
    x = jnp.asarray(x)
    if x.ndim == 0 or x.shape[0] == 0:
        raise ValueError(f"x must be a batch of at least one example, got shape {x.shape}")
    try:
        calls = calibration.layer_calls(apply_fn, {"params": params}, x)
    except flax.errors.ScopeParamShapeError as error:
        raise ValueError(f"x of shape {x.shape} does not fit the model's params: {error}") from None
    except flax.errors.FlaxError as error:
        raise ValueError(f"params do not fit the model: {error}") from None
    return prune_calls(
        calls,
        lambda current, paths: calibration.capture_inputs(apply_fn, {"params": current}, x, paths),
        params,
        method=method,
        sparsity=sparsity,
        n=n,
        m=m,
        dsnot=dsnot,
        skip=skip,
        block_depth=block_depth,
        block_shape=block_shape,
        **options,
    )


def prune_calls(
    calls: Sequence[calibration.LayerCall],
    capture: Callable[[PyTree, list[tuple[str, ...]]], Mapping[tuple[str, ...], jax.Array]],
    params: PyTree,
    *,
    method: str,
    sparsity: Any = 0.0,
    n: int | None = None,
    m: int | None = None,
    dsnot: bool | Mapping[str, Any] = False,
    skip: Sequence[str] = (),
    block_depth: int | None = None,
    block_shape: tuple[int, int] | None = None,
    **options: Any,
) -> PruneResult:
    """The layer-by-layer loop of `prune_model`, for any way of running the model.

    `prune_model` calls it for a Linen model, `sparsejax.nnx.prune_model` for an NNX one;
    only how layers are found and their inputs captured differs between the two.

    Args:
      calls: the layers in call order (`calibration.LayerCall`: a path of strings and a
        Linen ``Dense`` / ``Conv`` carrying the layer's hyperparameters for
        `calibration.input_matrix`).
      capture: ``(params, paths) -> {path: input}``, the inputs the layers at ``paths``
        receive when the model runs on ``params`` (with the earlier layers pruned).
      params: nested dicts with each layer's kernel at ``params[path...]['kernel']``.
      method, sparsity, n, m, dsnot, skip, block_depth, block_shape, **options: as for
        `prune_model`.

    Returns:
      A `PruneResult`, ``params`` and ``masks`` in the layout of ``params``.

    Raises:
      ValueError: as `prune_model`.
    """
    pattern = _check_options(method, sparsity, n, m, block_depth)
    names = [c.name for c in calls]
    unknown = sorted(set(skip) - set(names))
    if unknown:
        raise ValueError(
            f"skip names layers {unknown} that the model does not call; its layers: {names}"
        )
    masks = jax.tree.map(lambda _: None, params)
    errors: dict[str, float] = {}
    pruned_calls = [c for c in calls if c.name not in skip]
    for block in _blocks(pruned_calls, block_depth):
        block_inputs = capture(params, [c.path for c in block])
        for call in block:
            matrix = calibration.input_matrix(call.module, block_inputs[call.path])
            matrix = matrix.astype(jnp.float32)
            kernel = _get(params, call.path)["kernel"]
            flat = kernel.reshape(-1, kernel.shape[-1])
            try:
                # Every method, magnitude too: the reported error is measured on these inputs.
                pattern_lib.check_layer(flat, matrix, pattern)
                pruned, mask = prune_layer(
                    method,
                    flat,
                    matrix,
                    sparsity=sparsity,
                    n=n,
                    m=m,
                    dsnot=dsnot,
                    block_shape=block_shape,
                    **options,
                )
            except ValueError as error:
                raise ValueError(f"layer {call.name!r}: {error}") from None
            dense_out = matrix @ flat.astype(jnp.float32)
            diff = dense_out - matrix @ pruned.astype(jnp.float32)
            errors[call.name] = float(
                jnp.linalg.norm(diff) / jnp.maximum(jnp.linalg.norm(dense_out), 1e-30)
            )
            params = _set(
                params, call.path, "kernel", pruned.reshape(kernel.shape).astype(kernel.dtype)
            )
            masks = _set(masks, call.path, "kernel", mask.reshape(kernel.shape))
    return PruneResult(params, masks, errors)
