"""Factorized Flax (Linen) layers: dense, convolution and embedding, and a wrapper.

Every layer stores the factors of its weight as flat parameters (``factor_0``,
``core``, ``core_0``, ``weights`` ... next to ``bias``) and computes its output
from them without materializing the weight (except when that is cheaper: dense
layers pick by FLOPs, see `tensornets.contract`).

Formats:
  ``"cp"``        CP of the kernel reshaped to in_shape + out_shape.
  ``"tucker"``    Tucker of the same tensor (conv: Tucker-2 over the channels).
  ``"tt"``        TT of the same tensor (conv: TT-matrix, see below).
  ``"tt_matrix"`` TT-matrix with factorized input and output dims (Novikov et al.
                  2015); ``in_shape`` / ``out_shape`` default to 3 balanced factors.
  ``"tubal"``     dense layers only: a t-product layer (Newman, Horesh, Avron &
                  Kilmer 2018, "Stable Tensor Neural Networks for Rapid Deep
                  Learning"). The input (n2 * n3,) is a lateral slice (n2, 1, n3) of
                  tubes, the output is W * x (n1, 1, n3) for a weight tensor W
                  (n1, n2, n3) kept as a truncated t-SVD U * diag(s) * V^T (Kilmer &
                  Martin 2011) of tubal rank k: (n1 + n2 + 1) k n3 parameters.
                  ``in_shape=(n2, n3)``, ``out_shape=(n1, n3)`` (same tube length
                  n3); by default n3 is the largest common divisor of the two
                  dimensions that is at most sqrt(min(in, features)). As a matrix the
                  layer's kernel is block-circulant, K[(j, s), (i, t)] =
                  W[i, j, (t - s) mod n3], so even at full tubal rank it is a
                  structured (n3 times smaller) dense layer, not an arbitrary one;
                  a float rank is a fraction of in * features, capped there.

Ranks: an int (a cap per mode / bond), a tuple (one per mode / bond), or a float
meaning a fraction of the dense parameter count (see the formats' ``resolve_*``).

Initialization preserves the dense layer's output variance. With independent
zero-mean factors, the entries of the reconstructed kernel are uncorrelated, so
Var(y_j) = ||x||^2 E[W_ij^2] as for a dense kernel; each format's factor scales
make E[W_ij^2] equal the dense initializer's (1/fan_in for Flax's lecun_normal):
  CP      W = sum_r prod_n A_n[i_n, r], A_n ~ N(0, s^2):  E W^2 = R s^(2N),
          so s^2 = (sigma^2 / R)^(1/N);
  Tucker  core ~ N(0, sigma^2), U_n ~ N(0, 1/R_n):  E W^2 = sigma^2;
  TT      core k ~ N(0, sigma^(2/d) / r_{k-1}):  E W^2 = prod_k (sigma^(2/d) / r_{k-1})
          * prod_k r_k = sigma^2 (r_0 = r_d = 1). TensorLy-Torch draws every core
          with the same std and ends up sqrt(prod r) too small; here each core
          normalizes its incoming bond.
  tubal   s = the identity tube (1, 0, ..., 0) per component, U, V ~ N(0, t^2): each
          W[i, j, d] sums k n3 products of two factors, so E W^2 = k n3 t^4 and
          t^4 = sigma^2 / (k n3).

Convolutions (kernel (k_1..k_s, C/g, F), g feature groups, each group factorized on
its own, parameters with a leading group axis):
  CP (Lebedev, Ganin, Rakhuba, Oseledets & Lempitsky 2015, "Speeding-up
    Convolutional Neural Networks Using Fine-tuned CP-Decomposition"):
    K[h, w, c, f] = sum_r A_h[h, r] A_w[w, r] A_c[c, r] A_f[f, r] runs as a 1x1 conv
    C -> gR, one depthwise conv per spatial axis (k_i along axis i only, carrying that
    axis's stride, dilation and padding), and a 1x1 conv gR -> F.
  Tucker-2 (Kim, Park, Yoo, Choi, Yang & Shin 2016, "Compression of Deep
    Convolutional Neural Networks for Fast and Low Power Mobile Applications"):
    K = G x_c U x_f V runs as 1x1 (C -> gR_in), the core conv (k, R_in -> R_out per
    group, with all the conv's spatial settings), 1x1 (gR_out -> F).
  TT (Garipov, Podoprikhin, Novikov & Vetrov 2016, "Ultimate tensorization"): the
    kernel reshaped to (K C/g, F/g), K = prod k_i, is a TT-matrix with
    in_shape (K, c_1..c_d) and out_shape (1, f_1..f_d): a depthwise spatial conv
    (one filter per bond index) then the channel cores.
  The 1x1 stages are pointwise and linear, so they commute with padding (zero,
  circular, reflect) and with input dilation: the factorized conv has the dense
  conv's output shape and, at full rank, its values.
"""

from __future__ import annotations

import math
import string
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import unfreeze
from flax.linen.dtypes import promote_dtype
from flax.linen.linear import canonicalize_padding, default_embed_init, default_kernel_init

from tensornets import contract as contract_lib
from tensornets import rank as rank_lib
from tensornets import regularizers
from tensornets.formats import validation
from tensornets.formats.cp import CP
from tensornets.formats.tt import TT, TTMatrix
from tensornets.formats.tubal import Tubal
from tensornets.formats.tucker import Tucker

__all__ = [
    "FORMATS",
    "Factorized",
    "FactorizedConv",
    "FactorizedDense",
    "FactorizedEmbedding",
    "balanced_factors",
    "densify_params",
    "factorized_dense_cost",
    "factorize_params",
]

FORMATS = ("cp", "tucker", "tt", "tt_matrix", "tubal")
_CONV_FORMATS = ("cp", "tucker", "tt", "tt_matrix")
_ALIASES = {"ttm": "tt_matrix", "tt-matrix": "tt_matrix", "parafac": "cp"}

Initializer = Callable[..., jax.Array]


# ------------------------------------------------------------------ helpers
def balanced_factors(n: int, d: int = 3) -> tuple[int, ...]:
    """Splits ``n`` into ``d`` factors as equal as its prime factors allow, ascending.

    ``balanced_factors(1024, 3) == (8, 8, 16)``; a prime n gives (1, ..., 1, n).
    """
    n = validation.check_int_rank(n, "n")
    d = validation.check_int_rank(d, "d")
    primes, m, p = [], n, 2
    while p * p <= m:
        while m % p == 0:
            primes.append(p)
            m //= p
        p += 1
    if m > 1:
        primes.append(m)
    bins = [1] * d
    for q in sorted(primes, reverse=True):
        bins[bins.index(min(bins))] *= q
    return tuple(sorted(bins))


def _canon_format(fmt: Any, allowed: Sequence[str] = FORMATS) -> str:
    name = _ALIASES.get(str(fmt).lower(), str(fmt).lower()) if isinstance(fmt, str) else fmt
    if name not in allowed:
        raise ValueError(f"format must be one of {tuple(allowed)}, got {fmt!r}")
    return name


class _Layout(NamedTuple):
    """Static description of a factorized weight: resolved shapes, ranks, params."""

    format: str
    shape: tuple[int, ...]  # tensor factorized per group (tt_matrix: (M, N))
    n_in: int  # leading input modes of ``shape`` (cp / tucker / tt)
    ranks: tuple[int, ...]
    modes: tuple[int, ...] | None  # tucker's factorized modes
    in_shape: tuple[int, ...]  # tt_matrix row factors
    out_shape: tuple[int, ...]  # tt_matrix column factors
    param_shapes: dict[str, tuple[int, ...]]


def _tensor_layout(fmt: str, shape, rank, n_in: int, modes=None) -> _Layout:
    if fmt == "cp":
        r = CP.resolve_rank(shape, rank)
        params = {"weights": (r,)}
        params.update({f"factor_{n}": (s, r) for n, s in enumerate(shape)})
        return _Layout(fmt, shape, n_in, (r,), None, (), (), params)
    if fmt == "tucker":
        modes = tuple(range(len(shape))) if modes is None else tuple(modes)
        ranks = Tucker.resolve_ranks(shape, rank, modes)
        core = list(shape)
        for m, r in zip(modes, ranks):
            core[m] = r
        params = {"core": tuple(core)}
        params.update({f"factor_{k}": (shape[m], r) for k, (m, r) in enumerate(zip(modes, ranks))})
        return _Layout(fmt, shape, n_in, ranks, modes, (), (), params)
    if fmt == "tt":
        bonds = TT.resolve_ranks(shape, rank)
        full = (1, *bonds, 1)
        params = {f"core_{k}": (full[k], s, full[k + 1]) for k, s in enumerate(shape)}
        return _Layout(fmt, shape, n_in, bonds, None, (), (), params)
    raise AssertionError(fmt)


def _tt_matrix_layout(in_shape, out_shape, rank) -> _Layout:
    bonds = TTMatrix.resolve_ranks(in_shape, out_shape, rank)
    full = (1, *bonds, 1)
    params = {
        f"core_{k}": (full[k], m, n, full[k + 1])
        for k, (m, n) in enumerate(zip(in_shape, out_shape))
    }
    shape = (math.prod(in_shape), math.prod(out_shape))
    return _Layout("tt_matrix", shape, 1, bonds, None, in_shape, out_shape, params)


def _default_tube(n_in: int, n_out: int) -> int:
    """Largest common divisor of n_in and n_out that is at most sqrt(min(n_in, n_out))."""
    g, bound = math.gcd(n_in, n_out), math.isqrt(min(n_in, n_out))
    return max(d for d in range(1, min(g, bound) + 1) if g % d == 0)


def _tubal_layout(n_in, n_out, rank, in_shape, out_shape) -> _Layout:
    """(n_in, n_out) kernel as a t-product operator W (n1, n2, n3): in (n2, n3), out (n1, n3)."""
    if in_shape is None and out_shape is None:
        n3 = _default_tube(n_in, n_out)
        in_shape, out_shape = (n_in // n3, n3), (n_out // n3, n3)
    elif in_shape is None or out_shape is None:
        raise ValueError(
            f"format 'tubal' needs both in_shape=(n2, n3) and out_shape=(n1, n3) or neither, "
            f"got in_shape={in_shape!r}, out_shape={out_shape!r}"
        )
    in_shape = validation.check_factorization(in_shape, n_in, "in_shape")
    out_shape = validation.check_factorization(out_shape, n_out, "out_shape")
    if len(in_shape) != 2 or len(out_shape) != 2 or in_shape[1] != out_shape[1]:
        raise ValueError(
            f"format 'tubal' needs in_shape=(n2, n3) and out_shape=(n1, n3) with the same tube "
            f"length n3, got in_shape={in_shape}, out_shape={out_shape}"
        )
    (n2, n3), (n1, _) = in_shape, out_shape
    if validation.is_fraction(rank):
        # A fraction of the dense kernel (n_in * n_out = n1 n2 n3^2 entries), as for the
        # other formats, not of the tensor W (n1 n2 n3): capped at full tubal rank.
        budget = validation.check_fraction(rank) * n_in * n_out
        k = validation.uniform_rank_for_budget(
            budget, lambda r: Tubal.num_params_for((n1, n2, n3), r), min(n1, n2)
        )
    else:
        k = Tubal.resolve_rank((n1, n2, n3), rank)
    params = {"u": (n1, k, n3), "s": (k, n3), "v": (n2, k, n3)}
    return _Layout("tubal", (n1, n2, n3), 1, (k,), None, in_shape, out_shape, params)


def _matrix_layout(fmt, n_in, n_out, rank, in_shape, out_shape, what=("in_shape", "out_shape")):
    """Layout of a (n_in, n_out) kernel; tt_matrix needs factorized dims."""
    if fmt == "tubal":
        return _tubal_layout(n_in, n_out, rank, in_shape, out_shape)
    if fmt == "tt_matrix":
        if in_shape is None and out_shape is None:
            d = 3
        else:
            d = len(validation.check_shape(in_shape if in_shape is not None else out_shape))
        in_shape = balanced_factors(n_in, d) if in_shape is None else in_shape
        out_shape = balanced_factors(n_out, d) if out_shape is None else out_shape
        in_shape = validation.check_factorization(in_shape, n_in, what[0])
        out_shape = validation.check_factorization(out_shape, n_out, what[1])
        if len(in_shape) != len(out_shape):
            raise ValueError(
                f"{what[0]}={in_shape} and {what[1]}={out_shape} must have the same length "
                "for a TT-matrix (one core per pair)"
            )
        return _tt_matrix_layout(in_shape, out_shape, rank)
    in_shape = (
        (n_in,) if in_shape is None else validation.check_factorization(in_shape, n_in, what[0])
    )
    out_shape = (
        (n_out,) if out_shape is None else validation.check_factorization(out_shape, n_out, what[1])
    )
    return _tensor_layout(fmt, in_shape + out_shape, rank, len(in_shape))


def _param_std(layout: _Layout, name: str, variance):
    """Std of a factor so the reconstructed entries have second moment ``variance``."""
    if layout.format == "cp":
        if name == "weights":
            return None  # ones
        r, n = layout.ranks[0], len(layout.shape)
        return (variance / r) ** (0.5 / n)
    if layout.format == "tucker":
        if name == "core":
            return jnp.sqrt(variance)
        return 1.0 / math.sqrt(layout.ranks[int(name.split("_")[1])])
    if layout.format == "tubal":
        if name == "s":
            return None  # the identity tube
        k, n3 = layout.ranks[0], layout.shape[2]
        return (variance / (k * n3)) ** 0.25
    # tt, tt_matrix
    d = len(layout.param_shapes)
    r_prev = layout.param_shapes[name][0]
    return variance ** (0.5 / d) / math.sqrt(r_prev)


def _make_params(mod: nn.Module, layout: _Layout, variance, param_dtype, groups: int | None):
    params = {}
    for name, shape in layout.param_shapes.items():
        full = shape if groups is None else (groups, *shape)

        def init(key, shape, dtype, name=name):
            std = _param_std(layout, name, variance)
            if std is None and layout.format == "tubal":
                return jnp.zeros(shape, dtype).at[..., 0].set(1)
            if std is None:
                return jnp.ones(shape, dtype)
            return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)

        params[name] = mod.param(name, init, full, param_dtype)
    return params


def _variance(mod: nn.Module, init_variance, kernel_init, default_init, default_var, shape, dtype):
    """Target E[W_ij^2] of the reconstructed kernel."""
    if init_variance is not None:
        if not init_variance > 0:
            raise ValueError(f"init_variance must be > 0, got {init_variance!r}")
        return float(init_variance)
    if kernel_init is None or kernel_init is default_init:
        return default_var
    if mod.is_initializing():
        # A custom dense initializer: match its empirical second moment (sampled once,
        # at init only).
        w = kernel_init(mod.make_rng("params"), shape, dtype)
        return jnp.mean(jnp.square(w.astype(jnp.float32)))
    return 1.0  # unused: factor initializers only run at init


def _format_of(layout: _Layout, params: Mapping[str, jax.Array]):
    if layout.format == "cp":
        return CP.from_params(params)
    if layout.format == "tucker":
        return Tucker.from_params(params, layout.modes)
    if layout.format == "tt":
        return TT.from_params(params)
    if layout.format == "tubal":
        return Tubal.from_params(params)
    return TTMatrix.from_params(params)


def _tubal_apply(fmt: Tubal, x: jax.Array, method: str) -> jax.Array:
    """x (..., n2 n3) -> W * x (..., n1 n3): each row of x is a lateral slice of tubes."""
    n1, n2, n3 = fmt.shape
    xb = x.reshape(-1, n2, n3)
    if method == "auto":
        costs = fmt.apply_costs(xb.shape[0])
        method = contract_lib.choose_method(costs["factorized"], costs["dense"])
    elif method not in contract_lib.METHODS:
        raise ValueError(f"contraction must be one of {contract_lib.METHODS}, got {method!r}")
    y = fmt.apply(jnp.swapaxes(xb, 0, 1), method=method)  # (n1, batch, n3)
    return jnp.swapaxes(y, 0, 1).reshape(x.shape[:-1] + (n1 * n3,))


def _tubal_to_kernel(w: jax.Array) -> jax.Array:
    """W (n1, n2, n3) -> the block-circulant kernel K (n2 n3, n1 n3) of x -> W * x.

    K[(j, s), (i, t)] = W[i, j, (t - s) mod n3].
    """
    n1, n2, n3 = w.shape
    shift = (jnp.arange(n3)[None, :] - jnp.arange(n3)[:, None]) % n3  # [s, t]
    k = jnp.take(jnp.swapaxes(w, 0, 1), shift, axis=2)  # (n2, n1, s, t)
    return jnp.transpose(k, (0, 2, 1, 3)).reshape(n2 * n3, n1 * n3)


def _kernel_to_tubal(kernel: jax.Array, n1: int, n2: int, n3: int) -> jax.Array:
    """Orthogonal projection of a kernel (n2 n3, n1 n3) onto t-product operators.

    The nearest block-circulant kernel in the Frobenius norm averages each
    circulant diagonal: W[i, j, d] = mean_s K[(j, s), (i, (s + d) mod n3)]. Since
    ||bcirc(A)||_F^2 = n3 ||A||_F^2 and the projection is orthogonal, truncating
    the t-SVD of this W gives the best tubal-rank-k kernel for K itself.
    """
    k4 = kernel.reshape(n2, n3, n1, n3)  # [j, s, i, t]
    shift = (jnp.arange(n3)[:, None] + jnp.arange(n3)[None, :]) % n3  # [s, d] -> t
    diag = jnp.take_along_axis(k4, shift[None, :, None, :], axis=3)  # [j, s, i, d]
    return jnp.swapaxes(diag.mean(axis=1), 0, 1)  # (n1, n2, n3)


def _apply_matrix(layout: _Layout, params, x, method, precision):
    """x (..., N_in) @ W (N_in, N_out) through the factors."""
    fmt = _format_of(layout, params)
    if layout.format == "tubal":
        return _tubal_apply(fmt, x, method)
    if layout.format == "tt_matrix":
        return fmt.apply(x, method=method, precision=precision)
    in_shape, out_shape = layout.shape[: layout.n_in], layout.shape[layout.n_in :]
    y = fmt.apply(x.reshape(x.shape[:-1] + in_shape), layout.n_in, method, precision)
    return y.reshape(x.shape[:-1] + (math.prod(out_shape),))


def _rank_masked(mod: nn.Module, params: dict, rank_dropout: float) -> dict:
    """Applies the layer's rank mask and, when training, tensor dropout to its factors.

    The rank mask comes from the ``"rank_masks"`` variable collection when the caller
    passes one (``model.apply({"params": p, "rank_masks": rm}, x)``, see
    `tensornets.rank`): dead components are exactly zero, so one compiled shape serves
    every rank. Tensor dropout (`tensornets.regularizers`) runs when ``rank_dropout`` > 0
    and a ``"dropout"`` rng is given, never at init.
    """
    axes = rank_lib.layer_rank_axes(params)
    present = [a for a in axes if mod.has_variable(rank_lib.RANK_COLLECTION, a)]
    if present and len(present) != len(axes):
        raise ValueError(
            f"rank_masks of {mod.name!r} has axes {present}; the layer needs all of {list(axes)}"
        )
    if present:
        mask = {a: mod.get_variable(rank_lib.RANK_COLLECTION, a) for a in axes}
        params = rank_lib.mask_layer(params, mask)
    if rank_dropout:
        fmt = rank_lib.layer_format(params)
        if fmt not in regularizers.DROPOUT_FORMATS:
            raise ValueError(
                f"rank_dropout={rank_dropout!r} needs format in {regularizers.DROPOUT_FORMATS}, "
                f"got {fmt!r}"
            )
        if not mod.is_initializing() and mod.has_rng("dropout"):
            params = regularizers.tensor_dropout(params, rank_dropout, mod.make_rng("dropout"))
    return params


def _dense_layout(fmt, in_features, features, rank, in_shape, out_shape) -> _Layout:
    return _matrix_layout(_canon_format(fmt), in_features, features, rank, in_shape, out_shape)


# -------------------------------------------------------------------- dense
class FactorizedDense(nn.Module):
    """A dense layer ``y = x W + b`` whose kernel W (in, features) is factorized.

    Attributes:
      features: output dimension.
      format: "cp" | "tucker" | "tt" | "tt_matrix" | "tubal".
      rank: int, tuple or float fraction of in * features (see module docstring;
        tubal: the tubal rank k, or a float fraction).
      in_shape: factorization of the input dimension (prod must equal it); default
        (in,) for cp/tucker/tt, 3 balanced factors for tt_matrix, (in / n3, n3)
        for tubal (see the module docstring).
      out_shape: same for ``features``.
      use_bias: add a bias.
      dtype: computation dtype (default: inferred from inputs and params).
      param_dtype: parameter dtype.
      precision: einsum precision.
      kernel_init: the dense initializer whose second moment the reconstructed
        kernel matches (default Flax's lecun_normal: 1/in).
      bias_init: bias initializer.
      init_variance: explicit target E[W_ij^2], overriding ``kernel_init``.
      contraction: "auto" (fewer FLOPs) | "factorized" | "dense".
      rank_dropout: tensor dropout rate (cp and tucker; Kolbeinsson et al. 2021),
        active when a "dropout" rng is passed.

    A "rank_masks" variable collection, when given, masks the components (see
    `tensornets.rank`). Input (..., in) -> output (..., features).
    """

    features: int
    format: str
    rank: Any
    in_shape: tuple[int, ...] | None = None
    out_shape: tuple[int, ...] | None = None
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Initializer | None = default_kernel_init
    bias_init: Initializer = nn.initializers.zeros_init()
    init_variance: float | None = None
    contraction: str = "auto"
    rank_dropout: float = 0.0

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        features = validation.check_int_rank(self.features, "features")
        in_features = inputs.shape[-1]
        layout = _dense_layout(
            self.format, in_features, features, self.rank, self.in_shape, self.out_shape
        )
        variance = _variance(
            self,
            self.init_variance,
            self.kernel_init,
            default_kernel_init,
            1.0 / in_features,
            (in_features, features),
            self.param_dtype,
        )
        params = _make_params(self, layout, variance, self.param_dtype, None)
        params = _rank_masked(self, params, self.rank_dropout)
        bias = (
            self.param("bias", self.bias_init, (features,), self.param_dtype)
            if self.use_bias
            else None
        )
        names = list(params)
        inputs, bias, *leaves = promote_dtype(inputs, bias, *params.values(), dtype=self.dtype)
        y = _apply_matrix(
            layout, dict(zip(names, leaves)), inputs, self.contraction, self.precision
        )
        return y if bias is None else y + bias


def factorized_dense_cost(layer: FactorizedDense, in_features: int) -> dict[str, int]:
    """Parameters and forward FLOPs per example of a `FactorizedDense` (no init needed).

    FLOPs follow `tensornets.contract` (a multiply-add is 2; the tubal layer's
    FFTs count as in `tensornets.formats.Tubal.apply_costs`) for the contraction
    the layer runs on one example, plus one add per output for the bias. The
    dense layer it replaces costs ``2 * in_features * features + features``.

    Args:
      layer: the (unbound) layer.
      in_features: the input dimension.

    Returns:
      ``{"params": factor entries plus bias, "flops": FLOPs of one example}``.
    """
    features = validation.check_int_rank(layer.features, "features")
    in_features = validation.check_int_rank(in_features, "in_features")
    layout = _dense_layout(
        layer.format, in_features, features, layer.rank, layer.in_shape, layer.out_shape
    )
    shapes = {k: jax.ShapeDtypeStruct(v, jnp.float32) for k, v in layout.param_shapes.items()}
    fmt = _format_of(layout, shapes)
    method = layer.contraction
    if layout.format in ("tt_matrix", "tubal"):
        costs = fmt.apply_costs(1)
    else:
        costs = fmt.apply_costs(1, layout.n_in)
    flops = costs[contract_lib.choose_method(costs["factorized"], costs["dense"], method)]
    bias = features if layer.use_bias else 0
    params = sum(math.prod(v) for v in layout.param_shapes.values())
    return {"params": params + bias, "flops": int(flops) + bias}


# --------------------------------------------------------------------- conv
def _conv_layout(fmt, kernel_size, c_group, f_group, rank, in_shape, out_shape) -> _Layout:
    s = len(kernel_size)
    if fmt == "cp":
        return _tensor_layout("cp", (*kernel_size, c_group, f_group), rank, s + 1)
    if fmt == "tucker":
        return _tensor_layout("tucker", (*kernel_size, c_group, f_group), rank, s + 1, (s, s + 1))
    # tt / tt_matrix: TT-matrix over (spatial, c_1..c_d) x (1, f_1..f_d)
    in_shape = (c_group,) if in_shape is None else in_shape
    out_shape = (f_group,) if out_shape is None else out_shape
    in_shape = validation.check_factorization(in_shape, c_group, "in_shape")
    out_shape = validation.check_factorization(out_shape, f_group, "out_shape")
    if len(in_shape) != len(out_shape):
        raise ValueError(f"in_shape={in_shape} and out_shape={out_shape} must have the same length")
    return _tt_matrix_layout((math.prod(kernel_size), *in_shape), (1, *out_shape), rank)


def _broadcast(x, n: int, name: str) -> tuple[int, ...]:
    if x is None:
        return (1,) * n
    if isinstance(x, int):
        return (x,) * n
    x = tuple(x)
    if len(x) != n:
        raise ValueError(f"{name} must have {n} entries (one per spatial axis), got {x!r}")
    return x


def _axis_padding(padding, axis: int, n: int):
    """Padding for a conv that only has extent along spatial ``axis``."""
    padding = canonicalize_padding(padding, n)
    if isinstance(padding, str):
        # SAME / VALID / CIRCULAR / REFLECT / CAUSAL are all computed axis by axis
        # from the kernel extent, which is 1 (no padding) on the other axes.
        return padding
    return [padding[i] if i == axis else (0, 0) for i in range(n)]


def _conv_apply(
    mod: nn.Module,
    inputs: jax.Array,
    *,
    features: int,
    kernel_size,
    fmt: str,
    rank,
    in_shape,
    out_shape,
    strides,
    padding,
    input_dilation,
    kernel_dilation,
    feature_group_count: int,
    use_bias: bool,
    dtype,
    param_dtype,
    precision,
    kernel_init,
    bias_init,
    init_variance,
    rank_dropout=0.0,
) -> jax.Array:
    fmt = _canon_format(fmt, _CONV_FORMATS)
    kernel_size = (kernel_size,) if isinstance(kernel_size, int) else tuple(kernel_size)
    kernel_size = validation.check_shape(kernel_size, "kernel_size")
    s = len(kernel_size)
    strides = _broadcast(strides, s, "strides")
    input_dilation = _broadcast(input_dilation, s, "input_dilation")
    kernel_dilation = _broadcast(kernel_dilation, s, "kernel_dilation")
    features = validation.check_int_rank(features, "features")
    g = validation.check_int_rank(feature_group_count, "feature_group_count")
    c = inputs.shape[-1]
    if c % g or features % g:
        raise ValueError(
            f"feature_group_count={g} must divide the input channels ({c}) and "
            f"features ({features})"
        )
    cg, fg = c // g, features // g
    layout = _conv_layout(fmt, kernel_size, cg, fg, rank, in_shape, out_shape)
    fan_in = math.prod(kernel_size) * cg
    variance = _variance(
        mod,
        init_variance,
        kernel_init,
        default_kernel_init,
        1.0 / fan_in,
        (*kernel_size, cg, features),
        param_dtype,
    )
    params = _make_params(mod, layout, variance, param_dtype, g)
    params = _rank_masked(mod, params, rank_dropout)
    bias = mod.param("bias", bias_init, (features,), param_dtype) if use_bias else None
    names = list(params)
    inputs, bias, *leaves = promote_dtype(inputs, bias, *params.values(), dtype=dtype)
    p = dict(zip(names, leaves))

    def conv(x, kernel, *, axis=None, groups):
        """One Flax conv stage with the dense conv's settings (one axis, or all)."""
        if axis is None:
            ks, st, pad, idil, kdil = kernel_size, strides, padding, input_dilation, kernel_dilation
        else:
            pick = lambda v: tuple(v[i] if i == axis else 1 for i in range(s))
            ks, st, idil, kdil = (
                pick(kernel_size),
                pick(strides),
                pick(input_dilation),
                pick(kernel_dilation),
            )
            pad = _axis_padding(padding, axis, s)
        layer = nn.Conv(
            features=kernel.shape[-1],
            kernel_size=ks,
            strides=st,
            padding=pad,
            input_dilation=idil,
            kernel_dilation=kdil,
            feature_group_count=groups,
            use_bias=False,
            dtype=dtype,
            precision=precision,
            parent=None,
        )
        return layer.apply({"params": {"kernel": kernel.reshape(*ks, -1, kernel.shape[-1])}}, x)

    lead = inputs.shape[:-1]
    xg = inputs.reshape(*lead, g, cg)
    if layout.format == "cp":
        r = layout.ranks[0]
        first = p[f"factor_{s}"] * p["weights"][:, None, :]  # (g, C/g, R)
        h = jnp.einsum("...gc,gcr->...gr", xg, first, precision=precision)
        h = h.reshape(*lead, g * r)
        for i in range(s):
            k_i = jnp.transpose(p[f"factor_{i}"], (1, 0, 2)).reshape(kernel_size[i], 1, g * r)
            h = conv(h, k_i, axis=i, groups=g * r)
        h = h.reshape(*h.shape[:-1], g, r)
        y = jnp.einsum("...gr,gfr->...gf", h, p[f"factor_{s + 1}"], precision=precision)
    elif layout.format == "tucker":
        r_in, r_out = layout.ranks
        h = jnp.einsum("...gc,gca->...ga", xg, p["factor_0"], precision=precision)
        h = h.reshape(*lead, g * r_in)
        core = jnp.moveaxis(p["core"], 0, -2)  # (k..., R_in, g, R_out)
        h = conv(h, core.reshape(*kernel_size, r_in, g * r_out), groups=g)
        h = h.reshape(*h.shape[:-1], g, r_out)
        y = jnp.einsum("...gb,gfb->...gf", h, p["factor_1"], precision=precision)
    else:
        cores = [p[f"core_{k}"] for k in range(len(layout.param_shapes))]
        r0 = cores[0].shape[-1]
        spatial = cores[0].reshape(g, *kernel_size, r0)  # (g, k..., r0)
        spatial = jnp.broadcast_to(spatial[:, None], (g, cg, *kernel_size, r0))
        spatial = jnp.moveaxis(spatial, (0, 1), (-3, -2)).reshape(*kernel_size, 1, c * r0)
        h = conv(inputs, spatial, groups=c)  # (..., C * r0), channel-major
        out_lead = h.shape[:-1]
        in_sh = layout.in_shape[1:]
        h = h.reshape(-1, g, *in_sh, r0)
        d = len(in_sh)
        ins, outs = string.ascii_lowercase[:d], string.ascii_lowercase[12 : 12 + d]
        bonds = string.ascii_uppercase[: d + 1]  # r_0 .. r_d; "Y" groups, "Z" batch
        subs = [f"Y{bonds[k]}{ins[k]}{outs[k]}{bonds[k + 1]}" for k in range(d)]
        expr = ",".join([f"ZY{ins}{bonds[0]}", *subs]) + f"->ZY{outs}"
        y = contract_lib.contract(expr, h, *cores[1:], precision=precision)
        y = y.reshape(*out_lead, g, fg)
    y = y.reshape(*y.shape[:-2], features)
    return y if bias is None else y + bias


class FactorizedConv(nn.Module):
    """A convolution (Flax ``nn.Conv`` semantics) with a factorized kernel.

    Attributes:
      features: output channels F.
      kernel_size: spatial kernel shape (k_1, ..., k_s) (an int means 1-d).
      format: "cp" (Lebedev et al. 2015), "tucker" (Tucker-2, Kim et al. 2016) or
        "tt" / "tt_matrix" (Garipov et al. 2016).
      rank: cp: int R or float; tucker: int cap or (R_in, R_out) or float; tt: bond
        ranks of the TT-matrix (K, c_1..) x (1, f_1..) or float.
      in_shape, out_shape: tt only: factorization of C/g and F/g (default whole).
      strides, padding, input_dilation, kernel_dilation, feature_group_count,
      use_bias, dtype, param_dtype, precision, bias_init: as in ``nn.Conv``.
      kernel_init: the dense initializer whose second moment the kernel matches.
      init_variance: explicit target E[K^2], overriding ``kernel_init``.
      rank_dropout: tensor dropout rate (cp and tucker), with a "dropout" rng.

    A "rank_masks" collection masks components (see `tensornets.rank`).
    Input (..., *spatial, C) -> output (..., *spatial_out, F), same as ``nn.Conv``.
    """

    features: int
    kernel_size: int | Sequence[int]
    format: str
    rank: Any
    in_shape: tuple[int, ...] | None = None
    out_shape: tuple[int, ...] | None = None
    strides: int | Sequence[int] | None = 1
    padding: Any = "SAME"
    input_dilation: int | Sequence[int] | None = 1
    kernel_dilation: int | Sequence[int] | None = 1
    feature_group_count: int = 1
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Initializer | None = default_kernel_init
    bias_init: Initializer = nn.initializers.zeros_init()
    init_variance: float | None = None
    rank_dropout: float = 0.0

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        return _conv_apply(
            self,
            inputs,
            features=self.features,
            kernel_size=self.kernel_size,
            fmt=self.format,
            rank=self.rank,
            in_shape=self.in_shape,
            out_shape=self.out_shape,
            strides=self.strides,
            padding=self.padding,
            input_dilation=self.input_dilation,
            kernel_dilation=self.kernel_dilation,
            feature_group_count=self.feature_group_count,
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
            kernel_init=self.kernel_init,
            bias_init=self.bias_init,
            init_variance=self.init_variance,
            rank_dropout=self.rank_dropout,
        )


# ---------------------------------------------------------------- embedding
def _embed_layout(num_embeddings, features, rank, in_shape, out_shape) -> _Layout:
    return _matrix_layout(
        "tt_matrix", num_embeddings, features, rank, in_shape, out_shape, ("in_shape", "out_shape")
    )


class FactorizedEmbedding(nn.Module):
    """An embedding table (num_embeddings, features) in TT-matrix format.

    Reference: Hrinchuk et al. 2020, "Tensorized Embedding Layers"; the TT-matrix
    of Novikov et al. 2015. A lookup multiplies the core slices picked by the
    index's digits; the table is never built.

    Attributes:
      num_embeddings: vocabulary size V (= prod(in_shape)).
      features: embedding size D (= prod(out_shape)).
      rank: TT bond ranks (int cap, tuple, or float fraction of V * D).
      in_shape, out_shape: factorizations of V and D (default 3 balanced factors).
      dtype, param_dtype: as in ``nn.Embed``.
      embedding_init: the dense initializer whose second moment the table matches
        (default Flax's, variance 1/D).
      init_variance: explicit target E[E_ij^2].

    ``__call__``: int (...) -> (..., D). ``attend``: (..., D) -> (..., V) logits.
    """

    num_embeddings: int
    features: int
    rank: Any
    in_shape: tuple[int, ...] | None = None
    out_shape: tuple[int, ...] | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    embedding_init: Initializer | None = default_embed_init
    init_variance: float | None = None

    def setup(self):
        v = validation.check_int_rank(self.num_embeddings, "num_embeddings")
        d = validation.check_int_rank(self.features, "features")
        self._layout = _embed_layout(v, d, self.rank, self.in_shape, self.out_shape)
        variance = _variance(
            self,
            self.init_variance,
            self.embedding_init,
            default_embed_init,
            1.0 / d,
            (v, d),
            self.param_dtype,
        )
        self._cores = _make_params(self, self._layout, variance, self.param_dtype, None)

    def _table(self) -> TTMatrix:
        cores = _rank_masked(self, dict(self._cores), 0.0)
        names = list(cores)
        leaves = promote_dtype(*cores.values(), dtype=self.dtype)
        return TTMatrix.from_params(dict(zip(names, leaves)))

    def __call__(self, inputs: jax.Array) -> jax.Array:
        if not jnp.issubdtype(inputs.dtype, jnp.integer):
            raise ValueError(f"inputs must be integers, got dtype {inputs.dtype}")
        return self._table().take(inputs)

    def attend(self, query: jax.Array) -> jax.Array:
        """Logits ``query @ E^T`` (weight tying), shape (..., num_embeddings)."""
        table = self._table()
        (query,) = promote_dtype(query, dtype=self.dtype)
        return table.apply(query, transpose=True)


# ------------------------------------------------------------------ wrapper
def _factorized_like(
    module: nn.Module, fmt, rank, in_shape, out_shape, contraction, variance, rank_dropout=0.0
):
    if isinstance(module, nn.Embed):
        if rank_dropout:
            raise ValueError(f"rank_dropout={rank_dropout!r} is for cp / tucker, not embeddings")
        return FactorizedEmbedding(
            num_embeddings=module.num_embeddings,
            features=module.features,
            rank=rank,
            in_shape=in_shape,
            out_shape=out_shape,
            dtype=module.dtype,
            param_dtype=module.param_dtype,
            embedding_init=module.embedding_init,
            init_variance=variance,
            parent=None,
        )
    if isinstance(module, nn.Dense):
        return FactorizedDense(
            features=module.features,
            format=fmt,
            rank=rank,
            in_shape=in_shape,
            out_shape=out_shape,
            use_bias=module.use_bias,
            dtype=module.dtype,
            param_dtype=module.param_dtype,
            precision=module.precision,
            kernel_init=module.kernel_init,
            bias_init=module.bias_init,
            init_variance=variance,
            contraction=contraction,
            rank_dropout=rank_dropout,
            parent=None,
        )
    if isinstance(module, nn.Conv):
        if getattr(module, "mask", None) is not None:
            raise ValueError("module.mask is not supported: a masked conv has no factorization")
        return FactorizedConv(
            features=module.features,
            kernel_size=module.kernel_size,
            format=fmt,
            rank=rank,
            in_shape=in_shape,
            out_shape=out_shape,
            strides=module.strides,
            padding=module.padding,
            input_dilation=module.input_dilation,
            kernel_dilation=module.kernel_dilation,
            feature_group_count=module.feature_group_count,
            use_bias=module.use_bias,
            dtype=module.dtype,
            param_dtype=module.param_dtype,
            precision=module.precision,
            kernel_init=module.kernel_init,
            bias_init=module.bias_init,
            init_variance=variance,
            rank_dropout=rank_dropout,
            parent=None,
        )
    raise ValueError(
        f"module must be an nn.Dense, nn.Conv or nn.Embed, got {type(module).__name__}"
    )


class Factorized(nn.Module):
    """Wraps an ``nn.Dense``, ``nn.Conv`` or ``nn.Embed``; same call, factorized params.

    The wrapped module only supplies its hyperparameters (features, kernel size,
    strides, padding, dilations, groups, bias, dtypes, initializers); it is never
    called and owns no parameters. The factors live directly under this module
    (no extra nesting), named as in `FactorizedDense` / `FactorizedConv` /
    `FactorizedEmbedding`.

    Example::

        layer = Factorized(nn.Dense(1024), format="tt_matrix", rank=16)
        y = layer.apply(layer.init(key, x), x)       # same as nn.Dense(1024)(x)

    Attributes:
      module: the dense layer to imitate.
      format: see `FORMATS` (embeddings: TT-matrix only).
      rank: int, tuple or float fraction of the dense parameter count.
      in_shape, out_shape: factorizations (see the factorized layers).
      contraction: dense layers only: "auto" | "factorized" | "dense".
      init_variance: explicit target second moment of the reconstructed weight.
      rank_dropout: tensor dropout rate for cp / tucker (a "dropout" rng turns it on).
    """

    module: nn.Module
    format: str
    rank: Any
    in_shape: tuple[int, ...] | None = None
    out_shape: tuple[int, ...] | None = None
    contraction: str = "auto"
    init_variance: float | None = None
    rank_dropout: float = 0.0

    def setup(self):
        fmt = _canon_format(self.format)
        if isinstance(self.module, nn.Embed) and fmt not in ("tt", "tt_matrix"):
            raise ValueError(f"format for an nn.Embed must be 'tt_matrix', got {self.format!r}")
        self.impl = _factorized_like(
            self.module,
            fmt,
            self.rank,
            self.in_shape,
            self.out_shape,
            self.contraction,
            self.init_variance,
            self.rank_dropout,
        )
        nn.share_scope(self, self.impl)

    def __call__(self, inputs: jax.Array) -> jax.Array:
        return self.impl(inputs)

    def attend(self, query: jax.Array) -> jax.Array:
        """``nn.Embed.attend`` for a wrapped embedding."""
        if not isinstance(self.impl, FactorizedEmbedding):
            raise ValueError("attend is only defined for a wrapped nn.Embed")
        return self.impl.attend(query)


# ------------------------------------------------------ trained-model conversion
_SPEC_KEYS = frozenset(
    {
        "format",
        "rank",
        "in_shape",
        "out_shape",
        "feature_group_count",
        "kernel_size",
        "kind",
        "to",
        "n_iter_max",
    }
)


def _check_spec(path: str, entry: Any) -> dict:
    if not isinstance(entry, Mapping):
        raise ValueError(
            f"spec[{path!r}] must be a mapping with 'format' and 'rank', got {entry!r}"
        )
    unknown = set(entry) - _SPEC_KEYS
    if unknown:
        raise ValueError(
            f"spec[{path!r}] has unknown keys {sorted(unknown)}; known: {sorted(_SPEC_KEYS)}"
        )
    for key in ("format", "rank"):
        if key not in entry:
            raise ValueError(f"spec[{path!r}] needs {key!r}")
    return dict(entry)


def _split(path: str) -> list[str]:
    parts = [p for p in path.split("/") if p]
    if not parts:
        raise ValueError(f"empty parameter path {path!r}")
    return parts


def _paths(tree, prefix=()) -> list[str]:
    out = []
    if isinstance(tree, Mapping):
        if any(not isinstance(v, Mapping) for v in tree.values()):
            out.append("/".join(prefix))
        for k, v in tree.items():
            if isinstance(v, Mapping):
                out.extend(_paths(v, (*prefix, str(k))))
    return out


def _locate(params, path: str):
    """(root tree, list of keys) with 'params' looked through when present."""
    tree = unfreeze(params) if hasattr(params, "unfreeze") else params
    keys = _split(path)
    for root_keys in ([], ["params"]):
        node, ok = tree, True
        for k in root_keys + keys:
            if isinstance(node, Mapping) and k in node:
                node = node[k]
            else:
                ok = False
                break
        if ok and isinstance(node, Mapping):
            return root_keys + keys, node
    raise ValueError(f"no module at parameter path {path!r}; known paths: {_paths(tree)}")


def _replace(tree, keys: list[str], new_keys: list[str], value):
    def without(node, ks):
        node = dict(node)
        if len(ks) == 1:
            node.pop(ks[0])
        else:
            node[ks[0]] = without(node[ks[0]], ks[1:])
        return node

    def with_(node, ks):
        node = dict(node)
        if len(ks) == 1:
            node[ks[0]] = value
        else:
            node[ks[0]] = with_(node.get(ks[0], {}), ks[1:])
        return node

    return with_(without(tree, keys), new_keys)


def _kind_of(node: Mapping, entry: dict) -> str:
    if "kind" in entry:
        if entry["kind"] not in ("dense", "conv", "embed"):
            raise ValueError(f"kind must be 'dense', 'conv' or 'embed', got {entry['kind']!r}")
        return entry["kind"]
    if "embedding" in node:
        return "embed"
    if "kernel" in node:
        return "dense" if node["kernel"].ndim == 2 else "conv"
    raise ValueError(f"cannot tell the layer kind of params with keys {sorted(node)}; set 'kind'")


def _factorize_node(node: Mapping, entry: dict) -> dict:
    fmt = _canon_format(entry["format"])
    rank, n_iter = entry["rank"], entry.get("n_iter_max", 100)
    in_shape, out_shape = entry.get("in_shape"), entry.get("out_shape")
    kind = _kind_of(node, entry)
    extra = {"bias": node["bias"]} if "bias" in node else {}

    if fmt == "tubal" and kind != "dense":
        raise ValueError(f"format 'tubal' is for dense kernels only, got a {kind} layer")

    def decompose(layout: _Layout, w):
        if layout.format == "tubal":
            n1, n2, n3 = layout.shape
            return Tubal.from_dense(_kernel_to_tubal(w, n1, n2, n3), layout.ranks[0]).to_params()
        if layout.format == "cp":
            return CP.from_dense(w, layout.ranks, n_iter_max=n_iter).to_params()
        if layout.format == "tucker":
            t = Tucker.from_dense(w, layout.ranks, modes=layout.modes, n_iter_max=n_iter)
            return t.to_params()
        if layout.format == "tt":
            return TT.from_dense(w, layout.ranks).to_params()
        w = w.reshape(layout.shape)
        return TTMatrix.from_dense(w, layout.in_shape, layout.out_shape, layout.ranks).to_params()

    if kind == "embed":
        table = jnp.asarray(node["embedding"])
        layout = _embed_layout(*table.shape, rank, in_shape, out_shape)
        return {**decompose(layout, table), **extra}
    kernel = jnp.asarray(node["kernel"])
    if kind == "dense":
        layout = _dense_layout(fmt, *kernel.shape, rank, in_shape, out_shape)
        if fmt == "tubal":  # decompose() projects the (in, out) kernel itself
            return {**decompose(layout, kernel), **extra}
        return {**decompose(layout, kernel.reshape(layout.shape)), **extra}
    g = validation.check_int_rank(entry.get("feature_group_count", 1), "feature_group_count")
    *ks, cg, f = kernel.shape
    if f % g:
        raise ValueError(f"feature_group_count={g} must divide the kernel's features ({f})")
    layout = _conv_layout(fmt, tuple(ks), cg, f // g, rank, in_shape, out_shape)
    per_group = jnp.moveaxis(kernel.reshape(*ks, cg, g, f // g), -2, 0)  # (g, k..., C/g, F/g)
    return {**jax.vmap(lambda w: decompose(layout, w))(per_group), **extra}


def factorize_params(params: Any, spec: Mapping[str, Mapping[str, Any]]) -> Any:
    """Decomposes chosen kernels of a trained dense model into factorized-layer params.

    Each kernel is fitted with the formats' ``from_dense`` (CP: ALS, Tucker: HOOI,
    TT: TT-SVD) at the ranks the matching factorized layer resolves, so the result
    loads into a model that uses `Factorized` / `FactorizedDense` /
    `FactorizedConv` / `FactorizedEmbedding` at the same place, ready for
    fine-tuning. Biases are copied. Pure: the input tree is not modified.

    Args:
      params: a parameter tree (or a variables dict with a "params" collection).
      spec: ``{"path/to/module": {"format": ..., "rank": ..., optional "in_shape",
        "out_shape", "feature_group_count" (conv; the kernel shape does not show
        it), "kind" ("dense" | "conv" | "embed", inferred by default), "to" (a new
        path, e.g. the factorized module's name), "n_iter_max"}}``.

    Returns:
      A new tree with those modules' ``kernel`` / ``embedding`` replaced by factors.

    Raises:
      ValueError: for unknown paths (listing the known ones), unknown spec keys,
        bad ranks or shapes.
    """
    out = unfreeze(params) if hasattr(params, "unfreeze") else params
    for path, entry in spec.items():
        entry = _check_spec(path, entry)
        keys, node = _locate(out, path)
        new_keys = keys[: len(keys) - len(_split(path))] + _split(entry.get("to", path))
        out = _replace(out, keys, new_keys, _factorize_node(node, entry))
    return out


def _densify_node(node: Mapping, entry: dict) -> dict:
    fmt = _canon_format(entry["format"])
    kind = entry.get("kind")
    extra = {"bias": node["bias"]} if "bias" in node else {}
    factors = {k: v for k, v in node.items() if k != "bias"}
    if fmt == "tubal":
        return {"kernel": _tubal_to_kernel(Tubal.from_params(factors).to_dense()), **extra}
    grouped = {"cp": "factor_0", "tucker": "factor_0", "tt": "core_0", "tt_matrix": "core_0"}
    lead = factors[grouped[fmt]].ndim
    if kind is None:
        base = {"cp": 2, "tucker": 2, "tt": 3, "tt_matrix": 4}[fmt]
        kind = "conv" if lead == base + 1 or (fmt == "tt" and lead == 5) else "dense"
    if kind == "embed":
        return {"embedding": TTMatrix.from_params(factors).to_dense()}
    if kind == "dense":
        in_shape = entry.get("in_shape")
        n_in = 1 if in_shape is None else len(validation.check_shape(in_shape, "in_shape"))
        if fmt == "cp":
            w = CP.from_params(factors).to_dense()
        elif fmt == "tucker":
            w = Tucker.from_params(factors).to_dense()
        elif fmt == "tt":
            w = TT.from_params(factors).to_dense()
        else:
            return {"kernel": TTMatrix.from_params(factors).to_dense(), **extra}
        return {"kernel": w.reshape(math.prod(w.shape[:n_in]), -1), **extra}

    def one(group):
        if fmt == "cp":
            return CP.from_params(group).to_dense()
        if fmt == "tucker":
            core = group["core"]
            return Tucker.from_params(group, (core.ndim - 2, core.ndim - 1)).to_dense()
        return TTMatrix.from_params(group).to_dense()

    w = jax.vmap(one)(factors)  # (g, k..., C/g, F/g) or (g, K C/g, F/g)
    g = w.shape[0]
    if fmt in ("tt", "tt_matrix"):
        k = factors["core_0"].shape[2]
        ks = entry.get("kernel_size", (k,))
        w = w.reshape(g, *ks, -1, w.shape[-1])
    kernel = jnp.moveaxis(w, 0, -2)
    return {"kernel": kernel.reshape(*kernel.shape[:-2], -1), **extra}


def densify_params(params: Any, spec: Mapping[str, Mapping[str, Any]]) -> Any:
    """Inverse of `factorize_params`: rebuild dense kernels from factors.

    Args:
      params: a tree with factorized modules at the paths of ``spec``.
      spec: as for `factorize_params` ("format" required; "in_shape" for cp /
        tucker / tt dense kernels tensorized over several input modes; "kind"
        "embed" for embeddings; "kernel_size" for TT convs, whose factors only
        know the flattened spatial size; "to" renames back).

    Returns:
      A new tree with ``kernel`` (or ``embedding``) and ``bias`` at those paths.
    """
    out = unfreeze(params) if hasattr(params, "unfreeze") else params
    for path, entry in spec.items():
        entry = dict(entry)
        if "format" not in entry:
            raise ValueError(f"spec[{path!r}] needs 'format'")
        keys, node = _locate(out, path)
        new_keys = keys[: len(keys) - len(_split(path))] + _split(entry.get("to", path))
        out = _replace(out, keys, new_keys, _densify_node(node, entry))
    return out
