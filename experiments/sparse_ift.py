"""Sparse Iso-FLOP Transformations of an MLP: Sparse Wide, Parallel, Factorized and Doped.

Reference: Thangarasa, Saxena, Gupta, Lie, Leung & Saxena 2023, "SPDF"/"Sparse-IFT:
Sparse Iso-FLOP Transformations for Maximizing Training Efficiency". Each
transformation replaces a dense layer y = x W (W: d_in x d_out, 2 d_in d_out
FLOPs per example) by a sparse block of the same FLOPs at sparsity s, so that
sparsity buys capacity instead of savings:

  Sparse Wide        widen the layers by k: a (k d_in x k d_out) kernel at sparsity s
                     costs 2 k^2 (1 - s) d_in d_out, iso-FLOP at k = 1/sqrt(1 - s);
  Sparse Parallel    K = 1/(1 - s) sparse copies of the layer, outputs summed;
  Sparse Factorized  W = U V, U (d_in x d), V (d x d_out), both at sparsity s and no
                     nonlinearity between: 2 (1 - s) d (d_in + d_out) FLOPs, so
                     d = d_in d_out / ((1 - s)(d_in + d_out));
  Sparse Doped       W = L + S, a dense rank-r factorization L plus S at sparsity s:
                     2 r (d_in + d_out) + 2 (1 - s) d_in d_out FLOPs, so
                     r = s d_in d_out / (d_in + d_out).

The paper trains the sparse parts with dynamic sparse training (RigL keeps each
layer's nonzero count, so the FLOPs stay iso all along) and applies the
transformations to every layer but the first and the last, which stay dense.
Here the model is the MNIST-1D MLP ``in -> w_0 -> ... -> w_{L-1} -> classes``:
the stem (``in -> w_0``) and the head stay dense and the L - 1 hidden-to-hidden
layers are transformed. Sparse Wide widens every hidden layer, so the dense stem
and head grow by k as well; k is therefore the largest width multiplier whose
whole-model FLOPs stay within the dense model's (k < 1/sqrt(1 - s)), and every
other family takes the largest K, d or r within each replaced layer's FLOPs. So
each family costs at most the dense model's FLOPs, within rounding (the tests
hold the ratio in [0.98, 1]).

An extra family, ``"sltrain"``, is Sparse Doped with S on a fixed random support
(`tensornets.sltrain.SLTrainDense`, Han et al. 2024) instead of a trained mask.

FLOPs follow `sparsejax.flops` (a multiply-add is 2, plus bias adds; a masked
kernel costs its density times the dense count); the low-rank part of Sparse
Doped is a `tensornets.FactorizedDense` (a 2-factor CP, the ``low_rank`` format)
counted by `tensornets.factorized_dense_cost`, and the SLTrain layer by
`tensornets.sltrain.sltrain_cost`.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import tensornets
from sparsejax import flops as flops_lib
from sparsejax import masks as masks_lib
from tensornets import sltrain

__all__ = [
    "FAMILIES",
    "KEEP_DENSE",
    "SparseIFTMLP",
    "block_shapes",
    "example_input",
    "model_flops",
    "num_nonzero_params",
]

FAMILIES = ("dense", "wide", "parallel", "factorized", "doped", "sltrain")
# Leaf-name substrings the sparse-training algorithm must leave dense.
KEEP_DENSE = ("stem", "head", "lowrank", "sltrain")


def _check(features: Sequence[int], family: str, sparsity: float) -> None:
    if family not in FAMILIES:
        raise ValueError(f"family={family!r} is unknown; known: {list(FAMILIES)}")
    if not isinstance(features, Sequence) or len(features) < 2:
        raise ValueError(
            f"features must list at least two hidden widths (one layer to transform), "
            f"got {features!r}"
        )
    if any(not isinstance(w, int) or isinstance(w, bool) or w < 1 for w in features):
        raise ValueError(f"features must be positive ints, got {features!r}")
    if family == "dense":
        if sparsity != 0.0:
            raise ValueError(f"family 'dense' takes sparsity 0, got {sparsity!r}")
        return
    masks_lib.validate_sparsity(sparsity)
    if not sparsity > 0:
        raise ValueError(f"sparsity must be in (0, 1) for family {family!r}, got {sparsity!r}")


def _nnz(rows: int, cols: int, sparsity: float) -> int:
    return masks_lib.num_kept(rows * cols, sparsity)


def _dense_flops(d_in: int, d_out: int, bias: bool = True) -> int:
    return 2 * d_in * d_out + (d_out if bias else 0)


def _doped_lowrank(d_out: int, rank: int, **kwargs: Any) -> tensornets.FactorizedDense:
    """The low-rank part of Sparse Doped: x A diag(w) B^T, a 2-factor CP (``low_rank``)."""
    return tensornets.FactorizedDense(
        d_out, "cp", rank, use_bias=False, contraction="factorized", **kwargs
    )


def _largest(fits, start: int = 1) -> int:
    """Largest integer n >= start with fits(n) (fits is monotone decreasing in n)."""
    if not fits(start):
        return start - 1
    lo, hi = start, start * 2
    while fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def _wide_width_multiplier(features, sparsity, n_in, n_out) -> float:
    """Largest k (widths round(k w)) whose whole-model FLOPs stay within the dense model's."""

    def total(widths):
        cost = _dense_flops(n_in, widths[0]) + _dense_flops(widths[-1], n_out)
        for a, b in zip(widths, widths[1:], strict=False):
            cost += 2 * _nnz(a, b, sparsity) + b
        return cost

    dense = _dense_flops(n_in, features[0]) + _dense_flops(features[-1], n_out)
    dense += sum(_dense_flops(a, b) for a, b in zip(features, features[1:], strict=False))
    # Search k on a fine grid (widths are integers, so k matters only to 1/min(w)).
    step = 1.0 / (8 * max(features))
    hi = 1.0 / math.sqrt(1.0 - sparsity)
    best = 1.0
    for i in range(int((hi - 1.0) / step) + 2):
        k = 1.0 + i * step
        widths = [max(1, round(k * w)) for w in features]
        if total(widths) <= dense:
            best = k
    return best


def block_shapes(
    features: Sequence[int], family: str, sparsity: float, n_in: int, n_out: int
) -> dict[str, Any]:
    """The hidden widths and each transformed layer's hyperparameter, as static ints.

    Args:
      features: the dense model's hidden widths (w_0, ..., w_{L-1}), L >= 2.
      family: one of `FAMILIES`.
      sparsity: s of the sparse parts (0 for 'dense').
      n_in, n_out: input and output dimensions of the model.

    Returns:
      ``{"widths": (hidden widths), "blocks": [per transformed layer: {"d_in", "d_out",
      "branches" | "inner" | "rank"}]}``.
    """
    features = tuple(features)
    _check(features, family, sparsity)
    # Called at every trace of the model: cache the (pure, static) search.
    return copy.deepcopy(_block_shapes(features, family, float(sparsity), n_in, n_out))


@functools.lru_cache(maxsize=256)
def _block_shapes(features, family, sparsity, n_in, n_out) -> dict[str, Any]:
    widths = features
    if family == "wide":
        k = _wide_width_multiplier(features, sparsity, n_in, n_out)
        widths = tuple(max(1, round(k * w)) for w in features)
    blocks = []
    for d_in, d_out in zip(widths, widths[1:], strict=False):
        budget = _dense_flops(d_in, d_out)
        block: dict[str, int] = {"d_in": d_in, "d_out": d_out}
        if family == "parallel":
            # One bias (on the first branch), K sparse branches.
            block["branches"] = _largest(
                lambda k, a=d_in, b=d_out, budget=budget: 2 * k * _nnz(a, b, sparsity) + b <= budget
            )
        elif family == "factorized":
            block["inner"] = _largest(
                lambda d, a=d_in, b=d_out, budget=budget: (
                    2 * _nnz(a, d, sparsity) + 2 * _nnz(d, b, sparsity) + b <= budget
                )
            )
        elif family == "doped":
            sparse = 2 * _nnz(d_in, d_out, sparsity) + d_out

            def fits(r, a=d_in, b=d_out, sparse=sparse, budget=budget):
                if r > min(a, b):
                    return False
                layer = _doped_lowrank(b, r, parent=None)
                return tensornets.factorized_dense_cost(layer, a)["flops"] + sparse <= budget

            block["rank"] = max(1, _largest(fits))
        elif family == "sltrain":

            def fits(r, a=d_in, b=d_out, budget=budget):
                if r > min(a, b):
                    return False
                layer = sltrain.SLTrainDense(b, r, 1.0 - sparsity, parent=None)
                return sltrain.sltrain_cost(layer, a)["flops"] <= budget

            block["rank"] = max(1, _largest(fits))
        blocks.append(block)
    return {"widths": widths, "blocks": blocks}


class SparseIFTMLP(nn.Module):
    """The MNIST-1D MLP with its hidden-to-hidden layers replaced by a Sparse-IFT family.

    ``x -> relu(stem) -> relu(block_1) -> ... -> relu(block_{L-1}) -> head``. The
    stem and head are dense ``nn.Dense`` layers; block i is, by ``family``:
      dense:      ``block_i`` (nn.Dense, w_{i-1} -> w_i);
      wide:       ``block_i`` on the widened widths (sparsified by the optimizer);
      parallel:   ``block_i/branch_j``, j < K, summed (only branch 0 has a bias);
      factorized: ``block_i/u`` (no bias) then ``block_i/v``, no nonlinearity between;
      doped:      ``block_i/lowrank`` (a rank-r `tensornets.FactorizedDense`, dense)
                  plus ``block_i/sparse`` (nn.Dense, sparsified);
      sltrain:    ``block_i/sltrain`` (`tensornets.sltrain.SLTrainDense`, density 1 - s).
    The sparse kernels are ordinary ``nn.Dense`` kernels: the masks come from the
    optimizer (`sparsejax.transforms.masked` with ``keep_dense=KEEP_DENSE`` and a
    uniform distribution at ``sparsity``); this module only sets the shapes.

    Attributes:
      features: the dense model's hidden widths (at least two).
      family: one of `FAMILIES`.
      sparsity: s (0 for 'dense').
      num_classes: output width.

    Input ``float[batch, ...]`` (flattened), output ``float32[batch, num_classes]``.

    Reference: Thangarasa et al. 2023, "Sparse-IFT: Sparse Iso-FLOP Transformations
    for Maximizing Training Efficiency".
    """

    features: Sequence[int] = (128, 128, 128)
    family: str = "dense"
    sparsity: float = 0.0
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        shapes = block_shapes(
            tuple(self.features), self.family, self.sparsity, x.shape[-1], self.num_classes
        )
        widths = shapes["widths"]
        x = nn.relu(nn.Dense(widths[0], name="stem")(x))
        for i, block in enumerate(shapes["blocks"], start=1):
            x = nn.relu(_Block(self.family, self.sparsity, block, name=f"block_{i}")(x))
        return nn.Dense(self.num_classes, name="head")(x)


class _Block(nn.Module):
    family: str
    sparsity: float
    shape: dict

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d_out = self.shape["d_out"]
        if self.family in ("dense", "wide"):
            return nn.Dense(d_out, name="dense")(x)
        if self.family == "parallel":
            return sum(
                nn.Dense(d_out, use_bias=j == 0, name=f"branch_{j}")(x)
                for j in range(self.shape["branches"])
            )
        if self.family == "factorized":
            h = nn.Dense(self.shape["inner"], use_bias=False, name="u")(x)
            return nn.Dense(d_out, name="v")(h)
        if self.family == "doped":
            low = _doped_lowrank(d_out, self.shape["rank"], name="lowrank")
            return low(x) + nn.Dense(d_out, name="sparse")(x)
        return sltrain.SLTrainDense(
            d_out, self.shape["rank"], 1.0 - self.sparsity, contraction="dense", name="sltrain"
        )(x)


def model_flops(model: nn.Module, params: Any, x: Any, masks: Any = None) -> dict[str, float]:
    """Forward FLOPs per example of ``model`` (dense layers under ``masks``, factorized, SLTrain).

    Args:
      model: a Flax module (e.g. `SparseIFTMLP`).
      params: its params (arrays or ShapeDtypeStructs), without the 'params' wrapper.
      x: one example batch ``[1, ...]`` (shapes only).
      masks: the mask tree (None: everything dense).

    Returns:
      ``{"total": FLOPs, "dense_layers": ..., "factorized_layers": ..., "sltrain_layers": ...}``
      for one example; masked ``nn.Dense`` kernels cost their density times the dense count.
    """
    if x.shape[0] != 1:
        raise ValueError(f"x must hold one example (batch 1), got shape {x.shape}")
    layers = flops_lib.layer_flops(model.apply, {"params": params}, x)
    dense = flops_lib.inference_flops(layers, masks)["total"]
    costs = {"factorized_layers": 0.0, "sltrain_layers": 0.0}

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name == "__call__":
            module = context.module
            if isinstance(module, tensornets.FactorizedDense):
                costs["factorized_layers"] += tensornets.factorized_dense_cost(
                    module, args[0].shape[-1]
                )["flops"]
            elif isinstance(module, sltrain.SLTrainDense):
                costs["sltrain_layers"] += sltrain.sltrain_cost(module, args[0].shape[-1])["flops"]
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        jax.eval_shape(lambda p, v: model.apply({"params": p}, v), params, x)
    total = dense + costs["factorized_layers"] + costs["sltrain_layers"]
    return {"total": float(total), "dense_layers": float(dense), **costs}


def num_nonzero_params(params: Any, masks: Any = None) -> int:
    """Parameters the model uses: masked leaves count their live entries."""
    if masks is None:
        return int(sum(np.size(p) for p in jax.tree.leaves(params)))
    total = 0
    for m, p in zip(
        jax.tree.leaves(masks, is_leaf=masks_lib.is_none), jax.tree.leaves(params), strict=True
    ):
        total += int(np.size(p)) if m is None else int(np.sum(np.asarray(m)))
    return total


def example_input(n_in: int = 40) -> jnp.ndarray:
    """A zero MNIST-1D example ``[1, n_in, 1]`` for shape inference."""
    return jnp.zeros((1, n_in, 1), jnp.float32)
