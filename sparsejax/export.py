"""Turn a trained masked dense model into real sparse storage for inference.

``export(params, masks, format='bsr' | 'nm', ...)`` replaces every 2-D Dense kernel
``(K, N)`` that has a mask by a `pallas_kernels.BSR` (blocks of ``w * mask`` holding a kept
entry) or `pallas_kernels.NM` (``w * mask`` compressed along K) pytree, in place in the
params tree. With ``convs=True`` (BSR only), masked convolution kernels ``(*window, in, out)``
become the BSR of their im2col matrix `sparsejax.nn.conv_kernel_matrix`, which
`sparsejax.nn.sparse_dense_calls` runs as patches times the sparse matrix. Other masked
leaves (convolution kernels without ``convs``, embeddings, anything else) are exported **as
dense arrays with the mask applied**: the output of the exported model is unchanged, but
they are not stored sparse. Unmasked leaves pass through.

The exported params drop into a model built with `sparsejax.nn.SparseDense` layers of the
same names, or into the original model run under `sparsejax.nn.sparse_dense_calls()`. The
exported model computes ``x @ (w * mask) + b`` with only the stored values, so its outputs
equal the masked dense model's up to float32 summation order (tests: ``atol = 1e-5`` on
logits of size O(1)).

Runs eagerly, outside jit: the number of stored blocks depends on the mask.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import BSR, NM
from sparsejax import masks as masks_lib
from sparsejax import transforms
from sparsejax.masks import path_name
from sparsejax.nn import conv_kernel_matrix

__all__ = [
    "export",
    "export_trained",
    "storage_summary",
]

PyTree = Any
_FORMATS = ("bsr", "nm")


def _is_dense_kernel(path, leaf) -> bool:
    last = path[-1] if path else None
    name = getattr(last, "key", None)
    return name == "kernel" and np.ndim(leaf) == 2


def _is_conv_kernel(path, leaf) -> bool:
    last = path[-1] if path else None
    return getattr(last, "key", None) == "kernel" and np.ndim(leaf) >= 3


def export(
    params: PyTree,
    masks: PyTree,
    *,
    format: str = "bsr",
    block_shape: Sequence[int] | Mapping[str, Sequence[int]] = (32, 32),
    n: int = 2,
    m: int = 4,
    packed: bool = False,
    convs: bool = False,
) -> PyTree:
    """Sparse inference params from dense params and their masks.

    Args:
      params: the trained params (nested dicts, e.g. ``state.params``).
      masks: same structure, boolean leaves or None (e.g.
        ``sparsejax.transforms.get_masks(opt_state)``).
      format: ``'bsr'`` or ``'nm'``.
      block_shape: BSR block ``(bk, bn)``, or a mapping from a kernel's path
        (``'dense/kernel'``) to its block shape, for layers whose widths differ.
      n, m: N:M pattern for ``format='nm'``; each mask must keep at most ``n`` of every
        ``m`` consecutive inputs per output (``sparsejax.masks.nm_mask(..., axis=0)``).
      packed: bit-pack NM indices.
      convs: also store masked conv kernels (name ``kernel``, rank >= 3) as the BSR of
        their ``(in * prod(window), out)`` im2col matrix (``format='bsr'`` only); give their
        block shapes through the ``block_shape`` mapping when the default does not divide.

    Returns:
      A params tree of the same structure in which masked Dense kernels are BSR / NM
      pytrees and other masked leaves are ``w * mask`` dense arrays.

    Raises:
      ValueError: unknown ``format``; masks that are not a mask tree of params
        (`sparsejax.masks.validate_masks`: other keys, non-boolean or misshapen masks); a
        Dense kernel whose shape the block shape does not divide, or whose mask is not N:M
        (the message names the parameter path).
    """
    if format not in _FORMATS:
        raise ValueError(f"format must be one of {_FORMATS}, got {format!r}")
    if convs and format != "bsr":
        raise ValueError(f"convs=True needs format='bsr', got format={format!r}")
    # Matched by key path, never by position: params {a, b} with masks {b, c} must fail.
    masks_lib.validate_masks(params, masks)
    flat_params, treedef = jax.tree_util.tree_flatten_with_path(params)
    flat_masks = jax.tree.leaves(masks, is_leaf=lambda x: x is None)
    out = []
    for (path, leaf), mask in zip(flat_params, flat_masks):
        name = path_name(path)
        if mask is None:
            out.append(leaf)
            continue
        mask = np.asarray(mask).astype(bool)
        if mask.shape != np.shape(leaf):
            raise ValueError(f"mask of {name} has shape {mask.shape}, parameter {np.shape(leaf)}")
        if convs and _is_conv_kernel(path, leaf):
            shape = block_shape.get(name) if isinstance(block_shape, Mapping) else block_shape
            if shape is None:
                raise ValueError(f"block_shape has no entry for {name!r}")
            matrix = conv_kernel_matrix(np.asarray(leaf))
            try:
                out.append(
                    BSR.from_dense(matrix, conv_kernel_matrix(mask), block_shape=tuple(shape))
                )
            except ValueError as err:
                raise ValueError(
                    f"cannot export {name} of shape {np.shape(leaf)} (im2col matrix "
                    f"{matrix.shape}): {err}"
                ) from None
            continue
        if not _is_dense_kernel(path, leaf):
            out.append(
                jnp.asarray(np.where(mask, np.asarray(leaf), 0).astype(np.asarray(leaf).dtype))
            )
            continue
        try:
            if format == "bsr":
                shape = block_shape.get(name) if isinstance(block_shape, Mapping) else block_shape
                if shape is None:
                    raise ValueError(f"block_shape has no entry for {name!r}")
                out.append(BSR.from_dense(np.asarray(leaf), mask, block_shape=tuple(shape)))
            else:
                out.append(NM.from_dense(np.asarray(leaf), mask, n=n, m=m, packed=packed))
        except ValueError as err:
            raise ValueError(f"cannot export {name} of shape {np.shape(leaf)}: {err}") from None
    return jax.tree_util.tree_unflatten(treedef, out)


def export_trained(
    params: PyTree, opt_state: Any, algorithm: Any, *, format: str = "nm", **kwargs: Any
) -> PyTree:
    """`export` of what a trained model computes with: the algorithm's forward weights.

    Straight-through algorithms keep dense weights in ``params``; the model runs on
    ``algorithm.forward_params_with_state(params, masks, algo_state)`` (``w * mask``,
    or S-STE's rescaled soft-thresholded weights), and that is what is exported, under
    the masks that forward pass applies (``algorithm.forward_masks``: straight-through
    methods take them from the current weights, not the stored ones). For
    N:M algorithms (``algorithm.nm_pattern()`` is not None) ``format='nm'`` takes
    the pattern from the algorithm, so a trained N:M model converts in one call:

        exported = export_trained(state.params, state.opt_state, algorithm)

    Args:
      params: the trained params.
      opt_state: the optimizer state holding a `sparsejax.transforms.MaskedState`.
      algorithm: the `sparsejax.algorithms.Algorithm` that trained them.
      format: ``'nm'`` or ``'bsr'``.
      **kwargs: further arguments of `export` (``n``, ``m``, ``packed``, ``block_shape``).

    Returns:
      The exported params tree (see `export`).

    Raises:
      ValueError: as `export`, e.g. when a Dense kernel's mask is not N:M along its
        input axis (a transposable or decaying mask still in its dense phase).
    """
    masks = transforms.get_masks(opt_state)
    state = [
        node
        for node in jax.tree.leaves(
            opt_state, is_leaf=lambda x: isinstance(x, transforms.MaskedState)
        )
        if isinstance(node, transforms.MaskedState)
    ][0]
    # The masks the forward pass applies to these params (straight-through methods
    # recompute them from the current weights), so values and mask agree.
    masks = algorithm.forward_masks(params, masks, state.algo_state)
    forward = algorithm.forward_params_with_state(params, masks, state.algo_state)
    pattern = algorithm.nm_pattern()
    if format == "nm" and pattern is not None:
        kwargs = {"n": pattern[0], "m": pattern[1], **kwargs}
    return export(forward, masks, format=format, **kwargs)


def storage_summary(exported: PyTree) -> dict[str, dict[str, float]]:
    """Bytes stored per exported parameter vs its dense float32 size.

    Returns:
      ``{path: {'bytes': stored, 'dense_bytes': K*N*itemsize, 'ratio': stored/dense}}`` for
      every BSR / NM leaf.
    """
    summary = {}
    leaves = jax.tree_util.tree_flatten_with_path(
        exported, is_leaf=lambda x: isinstance(x, (BSR, NM))
    )[0]
    for path, leaf in leaves:
        if isinstance(leaf, (BSR, NM)):
            dense = int(np.prod(leaf.shape)) * leaf.values.dtype.itemsize
            summary[path_name(path)] = {
                "bytes": leaf.nbytes,
                "dense_bytes": dense,
                "ratio": leaf.nbytes / dense,
            }
    return summary
