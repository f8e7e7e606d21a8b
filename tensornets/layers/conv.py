"""The factorized convolution: Flax ``nn.Conv`` semantics, a factorized kernel.

The kernel (k_1..k_s, C/g, F/g) of each of the g feature groups is factorized on its
own (parameters carry a leading group axis) and the conv runs as a chain of cheap
convs, never building the kernel:
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
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.linear import canonicalize_padding, default_kernel_init

from tensornets import contract as contract_lib
from tensornets.formats import validation
from tensornets.layers.layouts import Layout, conv_layout
from tensornets.layers.params import Initializer, layer_params
from tensornets.layers.spec import canonical_format

__all__ = ["FactorizedConv"]


class _ConvSettings(NamedTuple):
    """The dense conv's settings, which every spatial stage keeps."""

    kernel_size: tuple[int, ...]
    strides: tuple[int, ...]
    padding: Any
    input_dilation: tuple[int, ...]
    kernel_dilation: tuple[int, ...]
    dtype: Any
    precision: Any


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


def _conv_stage(x, kernel, settings: _ConvSettings, *, groups: int, axis: int | None = None):
    """One Flax conv with the dense conv's settings, on all spatial axes or only ``axis``."""
    s = len(settings.kernel_size)
    if axis is None:
        ks, st, idil, kdil = (
            settings.kernel_size,
            settings.strides,
            settings.input_dilation,
            settings.kernel_dilation,
        )
        pad = settings.padding
    else:
        pick = lambda v: tuple(v[i] if i == axis else 1 for i in range(s))  # noqa: E731
        ks, st, idil, kdil = (
            pick(settings.kernel_size),
            pick(settings.strides),
            pick(settings.input_dilation),
            pick(settings.kernel_dilation),
        )
        pad = _axis_padding(settings.padding, axis, s)
    layer = nn.Conv(
        features=kernel.shape[-1],
        kernel_size=ks,
        strides=st,
        padding=pad,
        input_dilation=idil,
        kernel_dilation=kdil,
        feature_group_count=groups,
        use_bias=False,
        dtype=settings.dtype,
        precision=settings.precision,
        parent=None,
    )
    return layer.apply({"params": {"kernel": kernel.reshape(*ks, -1, kernel.shape[-1])}}, x)


def _cp_conv(inputs, p, layout: Layout, settings: _ConvSettings, g: int) -> jax.Array:
    """1x1 (C -> gR), a depthwise conv per spatial axis, 1x1 (gR -> F): (..., g, F/g)."""
    s, precision = len(settings.kernel_size), settings.precision
    lead = inputs.shape[:-1]
    xg = inputs.reshape(*lead, g, -1)
    r = layout.ranks[0]
    first = p[f"factor_{s}"] * p["weights"][:, None, :]  # (g, C/g, R)
    h = jnp.einsum("...gc,gcr->...gr", xg, first, precision=precision)
    h = h.reshape(*lead, g * r)
    for i in range(s):
        k_i = jnp.transpose(p[f"factor_{i}"], (1, 0, 2)).reshape(settings.kernel_size[i], 1, g * r)
        h = _conv_stage(h, k_i, settings, groups=g * r, axis=i)
    h = h.reshape(*h.shape[:-1], g, r)
    return jnp.einsum("...gr,gfr->...gf", h, p[f"factor_{s + 1}"], precision=precision)


def _tucker_conv(inputs, p, layout: Layout, settings: _ConvSettings, g: int) -> jax.Array:
    """1x1 (C -> gR_in), the core conv, 1x1 (gR_out -> F): (..., g, F/g)."""
    precision = settings.precision
    lead = inputs.shape[:-1]
    xg = inputs.reshape(*lead, g, -1)
    r_in, r_out = layout.ranks
    h = jnp.einsum("...gc,gca->...ga", xg, p["factor_0"], precision=precision)
    h = h.reshape(*lead, g * r_in)
    core = jnp.moveaxis(p["core"], 0, -2)  # (k..., R_in, g, R_out)
    h = _conv_stage(h, core.reshape(*settings.kernel_size, r_in, g * r_out), settings, groups=g)
    h = h.reshape(*h.shape[:-1], g, r_out)
    return jnp.einsum("...gb,gfb->...gf", h, p["factor_1"], precision=precision)


def _tt_conv(inputs, p, layout: Layout, settings: _ConvSettings, g: int) -> jax.Array:
    """A depthwise spatial conv (one filter per bond index), then the channel cores."""
    kernel_size = settings.kernel_size
    c = inputs.shape[-1]
    cores = [p[f"core_{k}"] for k in range(len(layout.param_shapes))]
    r0 = cores[0].shape[-1]
    spatial = cores[0].reshape(g, *kernel_size, r0)  # (g, k..., r0)
    spatial = jnp.broadcast_to(spatial[:, None], (g, c // g, *kernel_size, r0))
    spatial = jnp.moveaxis(spatial, (0, 1), (-3, -2)).reshape(*kernel_size, 1, c * r0)
    h = _conv_stage(inputs, spatial, settings, groups=c)  # (..., C * r0), channel-major
    out_lead = h.shape[:-1]
    in_sh = layout.in_shape[1:]
    h = h.reshape(-1, g, *in_sh, r0)
    d = len(in_sh)
    ins, outs = string.ascii_lowercase[:d], string.ascii_lowercase[12 : 12 + d]
    bonds = string.ascii_uppercase[: d + 1]  # r_0 .. r_d; "Y" groups, "Z" batch
    subs = [f"Y{bonds[k]}{ins[k]}{outs[k]}{bonds[k + 1]}" for k in range(d)]
    expr = ",".join([f"ZY{ins}{bonds[0]}", *subs]) + f"->ZY{outs}"
    y = contract_lib.contract(expr, h, *cores[1:], precision=settings.precision)
    return y.reshape(*out_lead, g, -1)


_CONVS = {"cp": _cp_conv, "tucker": _tucker_conv, "tt_matrix": _tt_conv}


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
        fmt = canonical_format(self.format, "conv")
        kernel_size = (
            (self.kernel_size,) if isinstance(self.kernel_size, int) else tuple(self.kernel_size)
        )
        kernel_size = validation.check_shape(kernel_size, "kernel_size")
        s = len(kernel_size)
        settings = _ConvSettings(
            kernel_size,
            _broadcast(self.strides, s, "strides"),
            self.padding,
            _broadcast(self.input_dilation, s, "input_dilation"),
            _broadcast(self.kernel_dilation, s, "kernel_dilation"),
            self.dtype,
            self.precision,
        )
        features = validation.check_int_rank(self.features, "features")
        g = validation.check_int_rank(self.feature_group_count, "feature_group_count")
        c = inputs.shape[-1]
        if c % g or features % g:
            raise ValueError(
                f"feature_group_count={g} must divide the input channels ({c}) and "
                f"features ({features})"
            )
        cg = c // g
        layout = conv_layout(
            fmt, kernel_size, cg, features // g, self.rank, self.in_shape, self.out_shape
        )
        fan_in = math.prod(kernel_size) * cg
        inputs, bias, params = layer_params(
            self, inputs, layout, fan_in, (*kernel_size, cg, features), g
        )
        y = _CONVS[layout.format](inputs, params, layout, settings, g)
        y = y.reshape(*y.shape[:-2], features)
        return y if bias is None else y + bias
