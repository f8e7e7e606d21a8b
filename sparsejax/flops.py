"""FLOPs and memory of sparse models, per layer and in total.

Conventions (those of Evci et al. 2020, "Rigging the Lottery", Appendix H,
and the MicroNet counter it used): a multiply-add is 2 FLOPs; a bias add is 1
FLOP per output; activations, normalizations and the loss are not counted. A
layer whose kernel has density d costs d times its dense multiply-add FLOPs
(plus its bias). One training step costs a forward pass f and a backward pass
2f (gradients with respect to the activations and to the weights), so 3f; the
algorithms that need dense gradients pay for them where they take them (see
`training_flops` for every registered algorithm).

Layers are found by intercepting every `flax.linen.Dense` and `flax.linen.Conv`
call while the model is traced with `jax.eval_shape` (nothing is computed).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import numpy as np

from sparsejax import masks as masks_lib

PyTree = Any

__all__ = [
    "LayerFlops",
    "inference_flops",
    "layer_flops",
    "memory",
    "training_flops",
]


class LayerFlops(NamedTuple):
    """Dense cost of one layer call.

    Attributes:
      name: the kernel's parameter path, e.g. 'conv1/kernel'.
      macs: multiply-adds of the dense layer (per forward pass of the batch).
      bias_adds: additions of the bias (0 without bias).
      kernel_size: number of kernel entries (for densities).
    """

    name: str
    macs: int
    bias_adds: int
    kernel_size: int


def _layer_of(module: nn.Module, x: Any, y: Any) -> LayerFlops | None:
    name = "/".join(module.path) + "/kernel"
    bias = int(np.prod(y.shape)) if module.use_bias else 0
    if isinstance(module, nn.Dense):
        in_features = x.shape[-1]
        batch = int(np.prod(y.shape[:-1]))
        return LayerFlops(
            name, batch * in_features * module.features, bias, in_features * module.features
        )
    if isinstance(module, nn.Conv):
        kernel_size = tuple(module.kernel_size)
        groups = module.feature_group_count
        in_features = x.shape[-1]
        # Every output element is a dot over a kernel window of in/groups channels.
        window = int(np.prod(kernel_size)) * (in_features // groups)
        return LayerFlops(name, int(np.prod(y.shape)) * window, bias, window * module.features)
    return None


def layer_flops(apply_fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[LayerFlops]:
    """Dense FLOP counts of every Dense and Conv call made by ``apply_fn(*args, **kwargs)``.

    Args:
      apply_fn: e.g. ``model.apply``; traced abstractly, never run.
      *args, **kwargs: its arguments, e.g. ``{"params": params}, x``; arrays may be
        `jax.ShapeDtypeStruct`.

    Returns:
      One `LayerFlops` per layer call, in call order (a layer called twice appears twice).
    """
    layers: list[LayerFlops] = []

    def interceptor(next_fun, call_args, call_kwargs, context):
        out = next_fun(*call_args, **call_kwargs)
        if context.method_name == "__call__" and isinstance(context.module, (nn.Dense, nn.Conv)):
            layer = _layer_of(context.module, call_args[0], out)
            if layer is not None:
                layers.append(layer)
        return out

    with nn.intercept_methods(interceptor):
        # Arguments go through eval_shape (not a closure) so ShapeDtypeStructs work.
        jax.eval_shape(functools.partial(apply_fn, **kwargs), *args)
    return layers


def _densities(layers: list[LayerFlops], masks: PyTree | None) -> dict[str, float]:
    """Density of each layer's kernel from the mask tree (1.0 where unmasked)."""
    if masks is None:
        return {layer.name: 1.0 for layer in layers}
    found = {}
    for path, m in jax.tree_util.tree_leaves_with_path(masks, is_leaf=masks_lib.is_none):
        if m is not None:
            found[masks_lib.path_name(path)] = float(np.mean(np.asarray(m)))
    return {layer.name: found.get(layer.name, 1.0) for layer in layers}


def inference_flops(layers: list[LayerFlops], masks: PyTree | None = None) -> dict[str, Any]:
    """Forward FLOPs of a model under its masks.

    Args:
      layers: from `layer_flops`.
      masks: the mask tree (None or missing leaves mean dense).

    Returns:
      ``{"per_layer": {name: flops}, "total": flops, "dense_total": flops}``
      where flops = 2 * density * macs + bias_adds.
    """
    density = _densities(layers, masks)
    per_layer: dict[str, float] = {}
    dense_total = 0
    for layer in layers:
        cost = 2 * density[layer.name] * layer.macs + layer.bias_adds
        per_layer[layer.name] = per_layer.get(layer.name, 0.0) + cost
        dense_total += 2 * layer.macs + layer.bias_adds
    return {"per_layer": per_layer, "total": sum(per_layer.values()), "dense_total": dense_total}


# Registered algorithm name -> how its training step is paid for (see `training_flops`).
_TRAINING_COST = {
    "dense": "dense",
    # Sparse from the first step; a pruning pass at initialization is a one-off, not counted.
    "static": "sparse",
    "set": "sparse",
    "snip": "sparse",
    "grasp": "sparse",
    "synflow": "sparse",
    # The dense gradient on mask-update steps only.
    "rigl": "periodic_dense_gradient",
    "srigl": "periodic_dense_gradient",
    # The dense gradient every step: SNFS's momentum, and the straight-through family whose
    # optimizer updates the dense weights (their weight gradient is a dense product).
    "snfs": "dense_gradient",
    "ste": "dense_gradient",
    "nm_ste": "dense_gradient",
    "sr_ste": "dense_gradient",
    "s_ste": "dense_gradient",
    "bimask": "dense_gradient",
    # Dense at first, sparse later: the forward cost follows the schedule.
    "magnitude": "scheduled",
    "random": "scheduled",
    "nm_oneshot": "scheduled",
    "nm_decay": "scheduled_dense_gradient",
}
# Registered too, but trained through factor ranks whose cost is not a mask density.
_RANK_ADAPTIVE = ("greedy_growth", "spectral_truncation")


def training_flops(
    forward_sparse: float,
    forward_dense: float,
    algorithm: str,
    *,
    update_every_steps: int = 100,
    sparsity_fraction_by_step: Callable[[int], float] | None = None,
    total_steps: int | None = None,
) -> float:
    """Average training FLOPs per step of a registered algorithm, after Evci et al. 2020.

    With f_S the forward FLOPs of the sparse model (its final masks), f_D those
    of the dense model, ΔT = ``update_every_steps`` and, for the algorithms that
    start dense, f(t) = f_D - (f_D - f_S) * phi(t) with phi =
    ``sparsity_fraction_by_step`` averaged over ``total_steps``:

        dense                                    3 f_D
        static, set, snip, grasp, synflow        3 f_S
        rigl, srigl                              (3 f_S ΔT + 2 f_S + f_D) / (ΔT + 1)
        snfs                                     2 f_S + f_D
        ste, nm_ste, sr_ste, s_ste, bimask       2 f_S + f_D
        magnitude, random, nm_oneshot            mean_t 3 f(t)
        nm_decay                                 mean_t 2 f(t) + f_D

    A step is a forward pass, the gradient with respect to the activations
    (another pass through the same weights) and the gradient with respect to
    the weights; the last is a dense product, f_D, whenever the algorithm reads
    the gradient of pruned weights: RigL and SRigL on their mask updates only
    (Evci et al. 2020, Appendix H), SNFS every step (its momentum of the dense
    gradient), and the straight-through family every step, since its optimizer
    updates the dense weights (Zhou et al. 2021; Bi-Mask's backward mask makes
    the activation gradient sparse, not the weight gradient). Gradual magnitude
    or random pruning and one-shot N:M pruning train with the current mask;
    N:M decay (Bambhaniya et al. 2024) takes straight-through dense weight
    gradients and runs a dense forward while its pruned weights still count
    (phi(t) = 0 while alpha_t > 0, 1 after ``end_step``; the N:M fraction of
    its stepwise structure decay). One-off pruning passes at initialization
    (SNIP, GraSP, SynFlow's rounds) are not counted.

    Args:
      forward_sparse: f_S, forward FLOPs of the sparse model (its final masks).
      forward_dense: f_D, forward FLOPs of the dense model.
      algorithm: a registered name (see the table; `sparsejax.algorithms.names`).
      update_every_steps: ΔT of RigL and SRigL, a positive integer.
      sparsity_fraction_by_step: phi(t) in [0, 1], how far step t's forward pass
        has gone from dense to the final masks (s(t) / s_final for gradual
        pruning); required by magnitude, random, nm_oneshot and nm_decay.
      total_steps: steps to average phi over, with ``sparsity_fraction_by_step``.

    Returns:
      FLOPs per training step, averaged over training.

    Raises:
      ValueError: for a name that is not a registered algorithm (listing the
        known ones), a rank-adaptive algorithm (its cost follows the ranks, not a
        mask density), a missing schedule, or a non-positive interval.
    """
    if algorithm in _RANK_ADAPTIVE:
        raise ValueError(
            f"algorithm={algorithm!r} adapts factor ranks: its training cost follows the "
            "rank trajectory, which training_flops does not model"
        )
    if not isinstance(algorithm, str) or algorithm not in _TRAINING_COST:
        raise ValueError(
            f"algorithm={algorithm!r} is unknown; known algorithms: {sorted(_TRAINING_COST)}"
        )
    f_s, f_d = float(forward_sparse), float(forward_dense)
    cost = _TRAINING_COST[algorithm]
    if cost == "dense":
        return 3.0 * f_d
    if cost == "sparse":
        return 3.0 * f_s
    if cost == "dense_gradient":
        return 2.0 * f_s + f_d
    if cost == "periodic_dense_gradient":
        dt = update_every_steps
        if isinstance(dt, bool) or not isinstance(dt, (int, np.integer)) or dt < 1:
            raise ValueError(f"update_every_steps must be a positive integer, got {dt!r}")
        return (3.0 * f_s * dt + 2.0 * f_s + f_d) / (dt + 1)
    # Starts dense: without the schedule, 3 f_S would understate the cost.
    if sparsity_fraction_by_step is None:
        raise ValueError(
            f"algorithm={algorithm!r} trains dense before its masks reach f_S: pass "
            "sparsity_fraction_by_step (t -> phi(t) in [0, 1]) and total_steps"
        )
    if isinstance(total_steps, bool) or not isinstance(total_steps, (int, np.integer)):
        raise ValueError(f"total_steps must be a positive integer, got {total_steps!r}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be positive for gradual pruning, got {total_steps!r}")
    fractions = np.array([sparsity_fraction_by_step(t) for t in range(total_steps)], np.float64)
    forward = f_d - (f_d - f_s) * fractions
    if cost == "scheduled_dense_gradient":
        return float(np.mean(2.0 * forward + f_d))
    return float(np.mean(3.0 * forward))


def memory(params: PyTree, masks: PyTree | None = None) -> Mapping[str, int]:
    """Bytes of parameters and masks.

    Returns:
      ``dense_params``: all parameters stored densely;
      ``sparse_params``: nonzero values of masked leaves plus an int32 index
      each (COO-like), unmasked leaves dense;
      ``masks_bool``: masks stored as one byte an entry;
      ``masks_packed``: masks bit-packed by `sparsejax.packing.pack_mask` (one bit an
      entry along the last axis, each row padded to whole bytes), what
      ``masked(..., packed=True)`` keeps in the optimizer state.
    """
    dense = sum(int(np.asarray(p).nbytes) for p in jax.tree.leaves(params))
    if masks is None:
        return {"dense_params": dense, "sparse_params": dense, "masks_bool": 0, "masks_packed": 0}
    sparse = bool_bytes = packed = 0
    for m, p in zip(
        jax.tree.leaves(masks, is_leaf=masks_lib.is_none),
        jax.tree.leaves(params),
        strict=True,
    ):
        p = np.asarray(p)
        if m is None:
            sparse += p.nbytes
            continue
        nnz = int(np.count_nonzero(np.asarray(m)))
        sparse += nnz * (p.itemsize + 4)
        bool_bytes += p.size
        packed += int(masks_lib.pack_mask(m).bits.nbytes)
    return {
        "dense_params": dense,
        "sparse_params": sparse,
        "masks_bool": bool_bytes,
        "masks_packed": packed,
    }
