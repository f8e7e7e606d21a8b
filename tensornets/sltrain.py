"""SLTrain: a dense layer whose kernel is low rank plus sparse on a fixed random support.

Reference: Han, Li, Huang, Hong, Takeda, Jawanpuria & Mishra 2024, "SLTrain: a
sparse plus low-rank approach for parameter and memory efficient pretraining"
(NeurIPS 2024).

The kernel K (in, out) of ``y = x K + b`` is parameterized as

    K = (alpha / r) A B + S,      A (in, r),  B (r, out),
    S = scatter(values) on a support I of exactly round(delta * in * out) entries,

where I is drawn uniformly at random once and never changes: only the values on
it are trained, jointly with A and B (the paper trains all three with Adam). The
paper's initialization: the factor that meets the input first is Kaiming
(LoRA's U[-1/sqrt(in), 1/sqrt(in)]), the other is zero, and the sparse values
are U[-1/sqrt(in), 1/sqrt(in)]; so at step 0 the layer is its sparse part alone.
``alpha / r`` balances the two parts (the paper tunes alpha; 32 with r = 128 for
its LLaMA runs). Storage is r (in + out) + nnz values plus the nnz indices,
which are not parameters: the support is a static function of the layer's
shape, ``support_seed`` and its module path (layers of a model get different
supports, every call and every ``init`` the same one).

Why this module lives in ``tensornets``: the trainable structure is a matrix
factorization (the low-rank part is a 2-factor decomposition like the
``low_rank`` format of `tensornets.layers`), while the sparse part only needs a
fixed support, for which it uses `sparsejax.masks` (the exact-count rule and
the boolean-mask convention), the direction of dependency the design allows
(tensornets may use the mask helpers; sparsejax never imports tensornets).
`support_mask` returns the support as a sparsejax mask, so FLOP and memory
accounting (`sparsejax.flops`) treat S like any masked kernel.

Two contractions give the same output:
  ``"dense"``: form K (``2 in r out`` FLOPs, plus the scatter) and run ``x K``;
  ``"factorized"``: ``(alpha / r) (x A) B`` plus a gather / scatter-add over the
  support, ``2 m (r (in + out) + nnz)`` FLOPs for m examples.
``"auto"`` picks the cheaper one for the batch (`tensornets.contract.choose_method`).
"""

from __future__ import annotations

import math
import numbers
import zlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.dtypes import promote_dtype

from sparsejax import masks as masks_lib
from tensornets import contract as contract_lib

__all__ = [
    "SLTrainDense",
    "random_support",
    "sltrain_apply",
    "sltrain_cost",
    "sltrain_kernel",
    "sltrain_reference",
    "support_mask",
]


def _check_density(density: Any) -> float:
    if isinstance(density, bool) or not isinstance(density, numbers.Real):
        raise ValueError(f"density must be a number in [0, 1], got {density!r}")
    if not 0.0 <= float(density) <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density!r}")
    return float(density)


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def random_support(shape: tuple[int, int], density: float, seed: Any) -> np.ndarray:
    """Flat indices (sorted, int32) of a uniformly random support of ``shape``.

    The count is exactly ``round(density * size)``, the rule of
    `sparsejax.masks.num_kept`; the draw is a NumPy permutation, so the result is
    a static constant under ``jit`` (it never depends on traced values).

    Args:
      shape: (in, out).
      density: fraction of entries in the support, in [0, 1].
      seed: anything ``numpy.random.default_rng`` accepts (an int or a list of ints).

    Returns:
      int32[nnz], strictly increasing, in [0, in * out).

    Raises:
      ValueError: for a density outside [0, 1] or a non-positive dimension.
    """
    density = _check_density(density)
    rows, cols = (_check_positive_int(d, "shape") for d in shape)
    size = rows * cols
    # Density 0 has no sparse entry (num_kept would keep one: it never empties a layer).
    nnz = masks_lib.num_kept(size, 1.0 - density) if 0.0 < density < 1.0 else round(density * size)
    chosen = np.random.default_rng(seed).choice(size, size=nnz, replace=False)
    return np.sort(chosen).astype(np.int32)


def support_mask(shape: tuple[int, int], indices: np.ndarray) -> np.ndarray:
    """The support as a boolean mask of ``shape`` (a `sparsejax.masks`-style mask)."""
    mask = np.zeros(math.prod(shape), bool)
    mask[np.asarray(indices)] = True
    return mask.reshape(shape)


def sltrain_kernel(
    a: jax.Array, b: jax.Array, values: jax.Array, indices: np.ndarray, scale: float
) -> jax.Array:
    """K = scale * A B + S, with S's ``values`` at the flat ``indices`` of (in, out).

    Args:
      a: (in, r).
      b: (r, out).
      values: (nnz,).
      indices: int[nnz] flat positions in the (in, out) kernel (distinct).
      scale: alpha / r.

    Returns:
      (in, out).
    """
    n_in, n_out = a.shape[0], b.shape[1]
    low_rank = scale * (a @ b)
    sparse = jnp.zeros(n_in * n_out, values.dtype).at[jnp.asarray(indices)].set(values)
    return low_rank + sparse.reshape(n_in, n_out).astype(low_rank.dtype)


def sltrain_apply(
    x: jax.Array,
    a: jax.Array,
    b: jax.Array,
    values: jax.Array,
    indices: np.ndarray,
    scale: float,
    method: str = "auto",
    precision: Any = None,
) -> jax.Array:
    """``x K`` for the SLTrain kernel K = scale * A B + S, without a bias.

    Args:
      x: (..., in).
      a, b, values, indices, scale: as in `sltrain_kernel`.
      method: "auto" (fewer FLOPs for this batch), "factorized" (x A B plus a
        gather / scatter-add over the support) or "dense" (form K, then x K).
      precision: matmul precision.

    Returns:
      (..., out).
    """
    n_in, r = a.shape
    n_out = b.shape[1]
    if x.shape[-1] != n_in:
        raise ValueError(f"x must have last dimension {n_in}, got shape {x.shape}")
    m = math.prod(x.shape[:-1])
    nnz = int(np.asarray(indices).size)
    factorized = 2 * m * (r * (n_in + n_out) + nnz)
    dense = 2 * n_in * r * n_out + nnz + 2 * m * n_in * n_out
    method = contract_lib.choose_method(factorized, dense, method)
    if method == "dense":
        kernel = sltrain_kernel(a, b, values, indices, scale)
        return jnp.matmul(x, kernel, precision=precision)
    rows, cols = np.divmod(np.asarray(indices, np.int64), n_out)
    xa = jnp.matmul(x, a, precision=precision)
    low_rank = scale * jnp.matmul(xa, b, precision=precision)
    # S's contribution: y[..., c] += sum over support entries (i, c) of x[..., i] * S[i, c].
    contributions = x[..., rows] * values  # (..., nnz)
    sparse = jnp.zeros(x.shape[:-1] + (n_out,), contributions.dtype)
    sparse = sparse.at[..., cols].add(contributions)
    return low_rank + sparse.astype(low_rank.dtype)


def sltrain_reference(x, a, b, values, indices, scale, bias=None) -> np.ndarray:
    """Plain NumPy float64 ``x (scale A B + S) + bias``, the reference for both contractions."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    kernel = scale * (a @ b)
    flat = kernel.reshape(-1)
    flat[np.asarray(indices)] += np.asarray(values, np.float64)
    y = np.asarray(x, np.float64) @ flat.reshape(kernel.shape)
    return y if bias is None else y + np.asarray(bias, np.float64)


def _lecun_like_uniform(fan_in: int):
    """U[-1/sqrt(fan_in), 1/sqrt(fan_in)]: PyTorch's default Linear init, which LoRA's A uses."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class SLTrainDense(nn.Module):
    """``y = x ((alpha / r) A B + S) + b`` with S on a fixed random support (SLTrain).

    Attributes:
      features: output dimension.
      rank: r, the rank of the low-rank part (1 <= r <= min(in, features)).
      density: delta, the fraction of kernel entries in S's support, in [0, 1].
      alpha: the balancing factor; the low-rank part is scaled by alpha / r
        (default None: alpha = r, scale 1).
      support_seed: seeds the support together with the module path.
      use_bias: add a bias.
      dtype: computation dtype (default: from inputs and params).
      param_dtype: parameter dtype.
      precision: matmul precision.
      contraction: "auto" | "factorized" | "dense" (see the module docstring).

    Params: ``a`` (in, r) ~ U[-1/sqrt(in), 1/sqrt(in)], ``b`` (r, features) = 0,
    ``values`` (nnz,) ~ U[-1/sqrt(in), 1/sqrt(in)], ``bias`` (features,) = 0.
    Input (..., in) -> output (..., features).

    Reference: Han et al. 2024, "SLTrain: a sparse plus low-rank approach for
    parameter and memory efficient pretraining".
    """

    features: int
    rank: int
    density: float
    alpha: float | None = None
    support_seed: int = 0
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    contraction: str = "auto"

    def support(self, in_features: int) -> np.ndarray:
        """This layer's flat support indices in its (in_features, features) kernel."""
        features = _check_positive_int(self.features, "features")
        path = "/".join(str(p) for p in self.scope.path) if self.scope is not None else ""
        seed = [int(self.support_seed), zlib.crc32(path.encode())]
        return random_support((in_features, features), self.density, seed)

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        features = _check_positive_int(self.features, "features")
        rank = _check_positive_int(self.rank, "rank")
        in_features = inputs.shape[-1]
        if rank > min(in_features, features):
            raise ValueError(
                f"rank={rank} must be at most min(in, features) = {min(in_features, features)}"
            )
        if self.alpha is not None and not float(self.alpha) > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha!r}")
        indices = self.support(in_features)
        scale = (rank if self.alpha is None else float(self.alpha)) / rank
        init = _lecun_like_uniform(in_features)
        a = self.param("a", init, (in_features, rank), self.param_dtype)
        b = self.param("b", nn.initializers.zeros_init(), (rank, features), self.param_dtype)
        values = self.param("values", init, (indices.size,), self.param_dtype)
        bias = (
            self.param("bias", nn.initializers.zeros_init(), (features,), self.param_dtype)
            if self.use_bias
            else None
        )
        inputs, a, b, values, bias = promote_dtype(inputs, a, b, values, bias, dtype=self.dtype)
        y = sltrain_apply(inputs, a, b, values, indices, scale, self.contraction, self.precision)
        return y if bias is None else y + bias


def sltrain_cost(layer: SLTrainDense, in_features: int) -> dict[str, int]:
    """Parameters and forward FLOPs per example of an `SLTrainDense` (no init needed).

    FLOPs are those of the factorized contraction on one example (a multiply-add
    is 2): ``2 (r (in + out) + nnz)`` plus one add per output for the bias; the
    dense layer it replaces costs ``2 in out + out``. Params count A, B, the
    sparse values and the bias (the support's indices are stored but not trained).

    Returns:
      ``{"params", "flops", "nnz"}``.
    """
    in_features = _check_positive_int(in_features, "in_features")
    features = _check_positive_int(layer.features, "features")
    rank = _check_positive_int(layer.rank, "rank")
    density = _check_density(layer.density)
    size = in_features * features
    # Density 0 has no sparse entry (num_kept would keep one: it never empties a layer).
    nnz = masks_lib.num_kept(size, 1.0 - density) if 0.0 < density < 1.0 else round(density * size)
    bias = features if layer.use_bias else 0
    params = rank * (in_features + features) + nnz + bias
    flops = 2 * (rank * (in_features + features) + nnz) + bias
    return {"params": params, "flops": flops, "nnz": nnz}
