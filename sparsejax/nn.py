"""Flax Linen layers that run real sparse weights through `pallas_kernels`.

`SparseDense` is a drop-in for ``nn.Dense`` whose ``kernel`` parameter is a
`pallas_kernels.BSR` or `pallas_kernels.NM` pytree instead of a dense array; its call is
``block_sparse_matmul`` / ``nm_matmul`` plus the bias, so only the stored nonzeros are
read and multiplied. The parameter names (``kernel``, ``bias``) are those of ``nn.Dense``,
so the params written by `sparsejax.export.export` fit either a model built with
`SparseDense` or an unchanged model run under `sparse_dense_calls`, which routes every
``nn.Dense`` whose kernel is a BSR / NM pytree to the sparse kernels, and every ``nn.Conv``
whose kernel is a BSR to an im2col product: the input's patches (``window`` positions of
every input channel, `jax.lax.conv_general_dilated_patches`) times the kernel stored as the
``(in_channels * prod(window), out)`` matrix of `conv_kernel_matrix`.

A BSR kernel's block layout is static pytree metadata, so a jitted apply retraces once per
pattern; its only leaf is ``values``, so gradients and optimizers see just the nonzeros and
sparse training runs on the real format. An NM kernel also holds int8 ``indices`` as a leaf:
take gradients with ``allow_int=True`` and keep optimizers off it (e.g. ``optax.masked``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels import BSR, NM, BSRLayout, block_sparse_matmul, nm_matmul

__all__ = [
    "SparseDense",
    "conv_kernel_matrix",
    "sparse_dense_calls",
    "sparse_matmul",
]

_FORMATS = ("bsr", "nm")


def sparse_matmul(x: jax.Array, kernel: BSR | NM, *, impl: str = "auto") -> jax.Array:
    """``x @ kernel`` for a BSR or NM kernel: float[..., K] -> float[..., N].

    Raises:
      ValueError: if ``kernel`` is neither, or ``x.shape[-1] != K``.
    """
    if isinstance(kernel, BSR):
        return block_sparse_matmul(x, kernel, impl=impl)
    if isinstance(kernel, NM):
        return nm_matmul(x, kernel, impl=impl)
    raise ValueError(f"kernel must be a pallas_kernels.BSR or NM, got {type(kernel).__name__}")


class SparseDense(nn.Module):
    """``y = x @ W + b`` with ``W`` stored as a BSR or N:M pytree.

    Attributes:
      features: output width N.
      format: ``'bsr'`` or ``'nm'``; used only to build the initial kernel.
      block_shape: BSR block ``(bk, bn)`` for initialization.
      layout: optional `BSRLayout` fixing which blocks exist at initialization; None
        initializes every block (density 1). Exported params carry their own layout.
      n, m: N:M pattern for initialization (positions ``0..n-1`` of each group).
      use_bias: add a bias of shape ``(N,)``.
      impl: kernel choice passed to the ops (``'auto'``, ``'xla'``, ``'pallas'``,
        ``'pallas_interpret'``).
      kernel_init, bias_init: initializers of the dense equivalent / the bias.

    Input ``x: float[..., K]``, output ``float[..., N]``. Params: ``kernel`` (BSR or NM of
    shape ``(K, N)``) and ``bias`` (``float32[N]``).

    Reference: Gray et al., "GPU Kernels for Block-Sparse Weights", 2017; Mishra et al.,
    "Accelerating Sparse Deep Neural Networks", 2021.
    """

    features: int
    format: str = "bsr"
    block_shape: Sequence[int] = (32, 32)
    layout: BSRLayout | None = None
    n: int = 2
    m: int = 4
    use_bias: bool = True
    impl: str = "auto"
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros_init()

    def __post_init__(self) -> None:
        if (
            isinstance(self.features, bool)
            or not isinstance(self.features, int)
            or self.features < 1
        ):
            raise ValueError(f"features must be a positive int, got {self.features!r}")
        if self.format not in _FORMATS:
            raise ValueError(f"format must be one of {_FORMATS}, got {self.format!r}")
        super().__post_init__()

    def _init_kernel(self, key: jax.Array, in_features: int) -> BSR | NM:
        shape = (in_features, self.features)
        if self.layout is not None and self.layout.shape != shape:
            raise ValueError(
                f"layout shape {self.layout.shape} must equal the kernel shape {shape}"
            )
        dense = self.kernel_init(key, shape, jnp.float32)
        if self.format == "nm":
            if in_features % self.m:
                raise ValueError(f"m={self.m} must divide the input width {in_features}")
            # First n positions of every group: a valid N:M pattern without looking at data,
            # so init works under jit. Real patterns come from export.
            values = dense.reshape(in_features // self.m, self.m, -1)[:, : self.n]
            indices = np.broadcast_to(
                np.arange(self.n, dtype=np.int8)[None, :, None],
                (in_features // self.m, self.n, self.features),
            )
            return NM(
                values=values.reshape(-1, self.features),
                indices=jnp.asarray(indices.reshape(-1, self.features)),
                shape=shape,
                n=self.n,
                m=self.m,
            )
        layout = self.layout
        if layout is None:
            layout = BSR.from_dense(
                np.ones(shape, np.float32), block_shape=tuple(self.block_shape)
            ).layout
        bk, bn = layout.block_shape
        blocks = dense.reshape(shape[0] // bk, bk, shape[1] // bn, bn).transpose(0, 2, 1, 3)
        return BSR(values=blocks[layout.row_indices, layout.col_indices], layout=layout)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.has_variable("params", "kernel"):
            # Read, not self.param: Flax would re-run the initializer under eval_shape to
            # compare shapes, and the init layout (all blocks) differs from an exported one.
            kernel = self.get_variable("params", "kernel")
        else:
            kernel = self.param("kernel", self._init_kernel, x.shape[-1])
        if kernel.shape != (x.shape[-1], self.features):
            raise ValueError(
                f"kernel shape {kernel.shape} does not match (input width, features) = "
                f"{(x.shape[-1], self.features)}"
            )
        y = sparse_matmul(x, kernel, impl=self.impl)
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
            y = y + bias.astype(y.dtype)
        return y


def conv_kernel_matrix(kernel: Any) -> Any:
    """A conv kernel ``(*window, in, out)`` as the ``(in * prod(window), out)`` im2col matrix.

    Rows are ordered channel-major (``row = c * prod(window) + window position``), the order
    of the patches of `jax.lax.conv_general_dilated_patches`, so
    ``patches(x) @ conv_kernel_matrix(kernel) == conv(x, kernel)``. Works on arrays and on
    boolean masks (numpy or jax).

    Raises:
      ValueError: if ``kernel`` has fewer than 3 dimensions.
    """
    if np.ndim(kernel) < 3:
        raise ValueError(f"kernel must be (*window, in, out), got shape {np.shape(kernel)}")
    xp = np if isinstance(kernel, np.ndarray) else jnp
    return xp.moveaxis(kernel, -2, 0).reshape(-1, np.shape(kernel)[-1])


_CONV_SPECS = {
    1: ("NWC", "WIO", "NWC"),
    2: ("NHWC", "HWIO", "NHWC"),
    3: ("NDHWC", "DHWIO", "NDHWC"),
}


def _per_dim(value: Any, nd: int, name: str) -> tuple[int, ...]:
    if value is None:
        return (1,) * nd
    if isinstance(value, int):
        return (value,) * nd
    value = tuple(value)
    if len(value) != nd:
        raise ValueError(f"nn.Conv {name}={value!r} must have {nd} entries")
    return value


def _conv_padding(padding: Any, nd: int) -> Any:
    if padding in ("SAME", "VALID"):
        return padding
    if isinstance(padding, int):
        return ((padding, padding),) * nd
    if not isinstance(padding, str):
        pads = tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)
        if len(pads) == nd and all(len(p) == 2 for p in pads):
            return pads
    raise ValueError(
        f"sparse conv supports padding 'SAME', 'VALID', an int or (low, high) pairs, got "
        f"padding={padding!r}"
    )


def _sparse_conv(module: nn.Conv, x: jax.Array, kernel: BSR, impl: str) -> jax.Array:
    """``module(x)`` for an ``nn.Conv`` whose kernel is the BSR of its im2col matrix."""
    # As in nn.Conv: an int kernel_size is a 1-D window (nn.Conv(features, 3)).
    size = module.kernel_size
    kernel_size = (int(size),) if isinstance(size, (int, np.integer)) else tuple(size)
    nd = len(kernel_size)
    if nd not in _CONV_SPECS:
        raise ValueError(
            f"sparse conv supports 1 to 3 spatial dims, got kernel_size={module.kernel_size!r}"
        )
    if module.feature_group_count != 1:
        raise ValueError(
            f"sparse conv needs feature_group_count=1, got {module.feature_group_count}"
        )
    if x.ndim != nd + 2:
        raise ValueError(f"sparse conv needs a batched input of rank {nd + 2}, got {x.shape}")
    window = int(np.prod(kernel_size))
    if kernel.shape != (x.shape[-1] * window, module.features):
        raise ValueError(
            f"BSR kernel shape {kernel.shape} does not match (in_channels * window, features)"
            f" = {(x.shape[-1] * window, module.features)}"
        )
    patches = lax.conv_general_dilated_patches(
        x,
        filter_shape=kernel_size,
        window_strides=_per_dim(module.strides, nd, "strides"),
        padding=_conv_padding(module.padding, nd),
        lhs_dilation=_per_dim(module.input_dilation, nd, "input_dilation"),
        rhs_dilation=_per_dim(module.kernel_dilation, nd, "kernel_dilation"),
        dimension_numbers=_CONV_SPECS[nd],
    )
    y = block_sparse_matmul(patches, kernel, impl=impl)
    if module.use_bias:
        y = y + module.get_variable("params", "bias").astype(y.dtype)
    return y


@contextlib.contextmanager
def sparse_dense_calls(impl: str = "auto") -> Iterator[None]:
    """Within this context, ``nn.Dense`` / ``nn.Conv`` layers with sparse kernels run sparse.

    Lets an unchanged model (e.g. ``experiments.models.CNN1D``) apply params written by
    `sparsejax.export.export`: a Dense whose kernel is a BSR / NM computes
    ``x @ kernel + bias`` with the sparse kernels; a Conv whose kernel is a BSR (of its
    `conv_kernel_matrix`) computes ``patches(x) @ kernel + bias``; every other module call
    runs as usual.

    Args:
      impl: kernel choice passed to the ops.
    """

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if type(module) is nn.Dense and context.method_name == "__call__":
            if module.has_variable("params", "kernel"):
                kernel = module.get_variable("params", "kernel")
                if isinstance(kernel, (BSR, NM)):
                    (x,) = args
                    y = sparse_matmul(x, kernel, impl=impl)
                    if module.use_bias:
                        y = y + module.get_variable("params", "bias").astype(y.dtype)
                    return y
        if type(module) is nn.Conv and context.method_name == "__call__":
            if module.has_variable("params", "kernel"):
                kernel = module.get_variable("params", "kernel")
                if isinstance(kernel, BSR):
                    return _sparse_conv(module, args[0], kernel, impl)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        yield
