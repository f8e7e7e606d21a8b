"""Flax Linen layers that run real sparse weights through `pallas_kernels`.

`SparseDense` is a drop-in for ``nn.Dense`` whose ``kernel`` parameter is a
`pallas_kernels.BSR` or `pallas_kernels.NM` pytree instead of a dense array; its call is
``block_sparse_matmul`` / ``nm_matmul`` plus the bias, so only the stored nonzeros are
read and multiplied. The parameter names (``kernel``, ``bias``) are those of ``nn.Dense``,
so the params written by `sparsejax.export.export` fit either a model built with
`SparseDense` or an unchanged model run under `sparse_dense_calls`, which routes every
``nn.Dense`` whose kernel is a BSR / NM pytree to the sparse kernels.

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

from pallas_kernels import BSR, NM, BSRLayout, block_sparse_matmul, nm_matmul

__all__ = [
    "SparseDense",
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


@contextlib.contextmanager
def sparse_dense_calls(impl: str = "auto") -> Iterator[None]:
    """Within this context, an ``nn.Dense`` whose ``kernel`` param is a BSR / NM runs sparse.

    Lets an unchanged model (e.g. ``experiments.models.CNN1D``) apply params written by
    `sparsejax.export.export`: the interceptor computes ``x @ kernel + bias`` with the
    sparse kernels; every other module call runs as usual.

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
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        yield
