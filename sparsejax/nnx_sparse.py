"""Real sparse weights in Flax NNX models: `SparseLinear` and `export_model`.

The NNX counterpart of `sparsejax.nn.SparseDense` and `sparsejax.export.export`: a trained
(pruned) ``nnx.Linear`` becomes a `SparseLinear` that stores only the kept entries of its
kernel, as the values of a `pallas_kernels.BSR` (blocks holding a kept entry) or
`pallas_kernels.NM` (N:M along the input axis) matrix, and computes ``y = x @ W + b``
with `sparsejax.nn.sparse_matmul` (the `pallas_kernels` ops and their custom VJPs; there
is no second implementation here).

How the storage is split between NNX's kinds of attributes, and why:

- ``values`` is an `nnx.Param` holding the one float array of the BSR / NM pytree
  (``float[nnz_blocks, bk, bn]`` or ``float[K * n / m, N]``), so ``nnx.grad``,
  ``nnx.Optimizer`` and ``sparsejax.nnx.optimizer`` train exactly the stored entries:
  structural zeros are not stored, get no gradient and stay absent. (A whole BSR / NM
  pytree inside one Param does not survive ``nnx.Optimizer``'s write-back.)
- a BSR's ``layout`` (a hashable `pallas_kernels.BSRLayout`) is a plain, static attribute:
  it sits in the graph definition, so ``nnx.jit`` compiles the block structure in as
  constants (what the kernels need) and retraces once per pattern.
- an N:M matrix's positions are data the size of the values (int8, or bit-packed uint8),
  so they are a `SparseIndices` Variable, not a Param: ``nnx.jit`` passes them as an
  input, and optimizers and gradients, which filter on ``nnx.Param``, never see them.

`export_model` converts a whole model: a copy in which every ``nnx.Linear`` whose kernel
has a mask is a `SparseLinear`; other masked leaves keep their dense layer with the mask
applied (as `sparsejax.export.export` does for Linen params), so the exported model
computes what the masked dense model computes, up to float summation order.

References:
  Gray, Radford, Kingma, "GPU Kernels for Block-Sparse Weights", OpenAI 2017 (BSR).
  Mishra et al., "Accelerating Sparse Deep Neural Networks", 2021 (N:M, 2:4 storage).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels import BSR, IMPLS, NM, BSRLayout
from sparsejax import masks as masks_lib
from sparsejax import nn as sparse_nn

PyTree = Any

__all__ = ["SparseIndices", "SparseLinear", "export_model"]

_FORMATS = ("bsr", "nm")
# nnx.Linear's defaults.
_KERNEL_INIT = nnx.initializers.lecun_normal()
_BIAS_INIT = nnx.initializers.zeros_init()


class SparseIndices(nnx.Variable):
    """Integer index data of a sparse layer (an N:M matrix's positions): state, not a Param.

    Filtering on ``nnx.Param`` (``nnx.grad``, ``nnx.Optimizer(..., wrt=nnx.Param)``)
    leaves it out, so it is never differentiated or updated; ``nnx.state(model)`` and
    checkpoints include it.
    """


def _check_features(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {name}={value!r}")
    return int(value)


def _check_format(format: Any) -> str:
    if format not in _FORMATS:
        raise ValueError(f"format must be one of {_FORMATS}, got format={format!r}")
    return format


def _check_impl(impl: Any) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got impl={impl!r}")
    return impl


class SparseLinear(nnx.Module):
    """``y = x @ W + b`` with ``W`` stored as a BSR or N:M matrix; an ``nnx.Linear`` drop-in.

    Built three ways: ``SparseLinear(in_features, out_features, ..., rngs=rngs)`` initializes
    a layer at a fixed structure (every block, or the blocks of ``layout``; N:M at positions
    ``0..n-1`` of every group), as `sparsejax.nn.SparseDense` does; `from_linear` converts a
    trained (pruned) ``nnx.Linear``; `from_sparse` holds a given `pallas_kernels.BSR` /
    `pallas_kernels.NM` (e.g. an exported Linen kernel).

    Args:
      in_features, out_features: the kernel shape ``(K, N)``.
      format: ``'bsr'`` or ``'nm'``.
      block_shape: BSR block ``(bk, bn)`` dividing ``(K, N)`` when ``layout`` is None.
      layout: a `pallas_kernels.BSRLayout` of shape ``(K, N)`` fixing which blocks exist;
        None stores every block (density 1).
      n, m: the N:M pattern (``m`` divides ``K``).
      use_bias: add a bias ``float[N]``.
      dtype: computation dtype (``x`` and the values are cast to it); None promotes, as
        ``nnx.Linear`` does.
      param_dtype: dtype of the stored values and the bias.
      impl: kernel choice of the ops (``'auto'``, ``'xla'``, ``'pallas'``,
        ``'pallas_interpret'``; see `pallas_kernels.ops`).
      kernel_init: initializer of the dense equivalent ``(K, N)``, restricted to the stored
        entries; bias_init: of the bias.
      rngs: ``nnx.Rngs`` with a ``params`` (or default) stream.

    Attributes:
      values: ``nnx.Param``, ``float[nnz_blocks, bk, bn]`` (BSR) or ``float[K * n / m, N]``
        (N:M): the stored entries, the only trained kernel array.
      layout: the static `BSRLayout` (BSR), else None.
      indices: `SparseIndices`, ``int8[K * n / m, N]`` or bit-packed uint8 (N:M), else None.
      bias: ``nnx.Param`` ``float[N]``, or None.

    Input ``x: float[..., K]``, output ``float[..., N]``.

    Raises:
      ValueError: naming the argument: features that are not positive ints, an unknown
        ``format`` or ``impl``, a ``layout`` of another shape, a ``block_shape`` or ``m``
        that does not divide the kernel.

    References: Gray et al., "GPU Kernels for Block-Sparse Weights", 2017; Mishra et al.,
    "Accelerating Sparse Deep Neural Networks", 2021.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        format: str = "bsr",
        block_shape: Sequence[int] = (32, 32),
        layout: BSRLayout | None = None,
        n: int = 2,
        m: int = 4,
        use_bias: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        impl: str = "auto",
        kernel_init: Any = _KERNEL_INIT,
        bias_init: Any = _BIAS_INIT,
        rngs: nnx.Rngs,
    ):
        in_features = _check_features(in_features, "in_features")
        out_features = _check_features(out_features, "out_features")
        format = _check_format(format)
        impl = _check_impl(impl)
        if layout is not None and not isinstance(layout, BSRLayout):
            raise ValueError(f"layout must be a BSRLayout or None, got {type(layout).__name__}")
        if layout is not None and layout.shape != (in_features, out_features):
            raise ValueError(
                f"layout shape {layout.shape} must equal (in_features, out_features) = "
                f"{(in_features, out_features)}"
            )
        kernel = _initial_kernel(
            in_features,
            out_features,
            format=format,
            block_shape=block_shape,
            layout=layout,
            n=n,
            m=m,
            kernel_init=kernel_init,
            key=rngs.params(),
        )
        bias = None
        if use_bias:
            bias = bias_init(rngs.params(), (out_features,), param_dtype)
        self.in_features = in_features
        self.out_features = out_features
        self.dtype = dtype
        self.impl = impl
        self._hold(dataclasses.replace(kernel, values=kernel.values.astype(param_dtype)), bias)

    def _hold(self, kernel: BSR | NM, bias: jax.Array | None) -> None:
        """Holds ``kernel``: values in the Param, the rest as the module docstring says."""
        self.format = "bsr" if isinstance(kernel, BSR) else "nm"
        self.values = nnx.Param(jnp.asarray(kernel.values))
        self.layout = kernel.layout if isinstance(kernel, BSR) else None
        nm = isinstance(kernel, NM)
        # nnx.data(None): the attribute is data whether or not it is set (as nnx.Linear's
        # bias), so layers of either kind share one attribute status.
        self.indices = SparseIndices(jnp.asarray(kernel.indices)) if nm else nnx.data(None)
        self.n, self.m = (kernel.n, kernel.m) if nm else (None, None)
        self.packed = kernel.packed if nm else False
        self.use_bias = bias is not None
        self.bias = nnx.data(None) if bias is None else nnx.Param(jnp.asarray(bias))

    @classmethod
    def from_sparse(
        cls,
        kernel: BSR | NM,
        bias: jax.Array | None = None,
        *,
        dtype: Any = None,
        impl: str = "auto",
    ) -> SparseLinear:
        """The layer holding ``kernel`` (and ``bias``) as they are.

        Args:
          kernel: a `pallas_kernels.BSR` or `pallas_kernels.NM` of shape ``(K, N)``, e.g. a
            kernel of `sparsejax.export.export`'s output.
          bias: ``float[N]`` or None (no bias).
          dtype, impl: as for `SparseLinear`.

        Returns:
          A `SparseLinear` computing ``x @ kernel.to_dense() + bias``.

        Raises:
          ValueError: naming the argument, for a ``kernel`` of another type, a ``bias`` of
            another shape, an unknown ``impl``.
        """
        if not isinstance(kernel, (BSR, NM)):
            raise ValueError(
                f"kernel must be a pallas_kernels.BSR or NM, got kernel={type(kernel).__name__}"
            )
        k, out = kernel.shape
        if bias is not None and np.shape(bias) != (out,):
            raise ValueError(f"bias must have shape ({out},), got bias.shape={np.shape(bias)}")
        # A small zero-initialized layer of the same structure, then the real storage: the
        # constructor is the one place that builds NNX state.
        fmt = "bsr" if isinstance(kernel, BSR) else "nm"
        layer = cls(
            k,
            out,
            format=fmt,
            layout=kernel.layout if fmt == "bsr" else None,
            n=kernel.n if fmt == "nm" else 1,
            m=kernel.m if fmt == "nm" else 1,
            use_bias=False,
            dtype=dtype,
            param_dtype=kernel.values.dtype,
            impl=impl,
            kernel_init=nnx.initializers.zeros_init(),
            rngs=nnx.Rngs(0),
        )
        layer._hold(kernel, bias)
        return layer

    @classmethod
    def from_linear(
        cls,
        linear: nnx.Linear,
        mask: Any = None,
        *,
        format: str = "bsr",
        block_shape: Sequence[int] = (32, 32),
        n: int = 2,
        m: int = 4,
        packed: bool = False,
        impl: str = "auto",
    ) -> SparseLinear:
        """Converts a trained (pruned) ``nnx.Linear``: the layer computes ``x @ (W * mask) + b``.

        Runs eagerly (outside jit): the number of stored blocks depends on the mask.
        ``linear`` is not changed. The computation dtype is ``linear.dtype``; its
        ``precision`` and ``dot_general`` are not carried (the sparse ops have their own).

        Args:
          linear: the ``nnx.Linear`` with kernel ``float[K, N]``.
          mask: ``bool[K, N]`` of the kept entries, or None for the nonzeros of the kernel.
          format: ``'bsr'`` (blocks holding a kept entry) or ``'nm'`` (the mask must keep at
            most ``n`` of every ``m`` consecutive inputs per output, e.g.
            ``sparsejax.masks.nm_mask(..., axis=0)``).
          block_shape: BSR block ``(bk, bn)`` dividing ``(K, N)``.
          n, m: the N:M pattern; packed: bit-pack the N:M positions.
          impl: as for `SparseLinear`.

        Returns:
          A new `SparseLinear`, values in the kernel's dtype, the bias copied.

        Raises:
          ValueError: naming the argument: ``linear`` not an ``nnx.Linear``, a ``mask`` that
            is not boolean or not of the kernel's shape, an unknown ``format``, and as
            `pallas_kernels.BSR.from_dense` / `pallas_kernels.NM.from_dense` (a block shape
            that does not divide, a mask that is not N:M, a non-finite kept weight).
        """
        if not isinstance(linear, nnx.Linear):
            raise ValueError(f"linear must be an nnx.Linear, got linear={type(linear).__name__}")
        format = _check_format(format)
        _check_impl(impl)
        w = np.asarray(linear.kernel[...])
        if mask is not None:
            mask = np.asarray(mask)
            if mask.dtype != np.bool_:
                raise ValueError(f"mask must be boolean, got mask.dtype={mask.dtype}")
            if mask.shape != w.shape:
                raise ValueError(
                    f"mask shape {mask.shape} must equal linear.kernel shape {w.shape}"
                )
        try:
            if format == "bsr":
                kernel = BSR.from_dense(w, mask, block_shape=tuple(block_shape))
            else:
                kernel = NM.from_dense(w, mask, n=n, m=m, packed=packed)
        except ValueError as err:
            raise ValueError(f"cannot convert linear with kernel shape {w.shape}: {err}") from None
        bias = None if linear.bias is None else linear.bias[...]
        return cls.from_sparse(kernel, bias, dtype=linear.dtype, impl=impl)

    @property
    def kernel(self) -> BSR | NM:
        """The stored kernel as a `pallas_kernels.BSR` / `pallas_kernels.NM` (current values)."""
        if self.layout is not None:
            return BSR(values=self.values[...], layout=self.layout)
        return NM(
            values=self.values[...],
            indices=self.indices[...],
            shape=(self.in_features, self.out_features),
            n=self.n,
            m=self.m,
            packed=self.packed,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x @ W + b``: float[..., K] -> float[..., N] (`sparsejax.nn.sparse_matmul`).

        Raises:
          ValueError: if ``x.shape[-1]`` is not ``in_features``.
        """
        if jnp.shape(x)[-1:] != (self.in_features,):
            raise ValueError(
                f"x must have {self.in_features} features in its last axis, got x.shape="
                f"{jnp.shape(x)}"
            )
        kernel = self.kernel
        if self.dtype is not None:
            x = jnp.asarray(x, self.dtype)
            kernel = dataclasses.replace(kernel, values=kernel.values.astype(self.dtype))
        y = sparse_nn.sparse_matmul(x, kernel, impl=self.impl)
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y


def _initial_kernel(
    in_features, out_features, *, format, block_shape, layout, n, m, kernel_init, key
) -> BSR | NM:
    """The initial kernel of `sparsejax.nn.SparseDense` with these hyperparameters."""
    module = sparse_nn.SparseDense(
        out_features,
        format=format,
        block_shape=tuple(block_shape),
        layout=layout,
        n=n,
        m=m,
        use_bias=False,
        kernel_init=kernel_init,
    )
    # Linen's initializer is the one definition of the initial structure; it runs the
    # forward pass once on a single zero row, which costs K * N at most.
    return module.init(key, jnp.zeros((1, in_features)))["params"]["kernel"]


# ------------------------------------------------------------------ whole models
def _flat(tree: PyTree) -> dict[tuple[Any, ...], Any]:
    """``{key path: leaf}`` of nested dicts, None leaves included."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=masks_lib.is_none)[0]
    return {tuple(k.key for k in path): leaf for path, leaf in leaves}


def _set_child(model: nnx.Module, path: tuple[Any, ...], child: nnx.Module) -> None:
    """Puts ``child`` at ``path`` (attribute names, ``nnx.List`` / ``nnx.Dict`` keys)."""
    parent = model
    for key in path[:-1]:
        parent = parent[key] if isinstance(key, int) else getattr(parent, key)
    key = path[-1]
    if isinstance(key, int) or isinstance(parent, (nnx.Dict, dict, list)):
        parent[key] = child
    else:
        setattr(parent, key, child)


def export_model(
    model: nnx.Module,
    masks: PyTree,
    *,
    format: str = "bsr",
    block_shape: Sequence[int] | Mapping[str, Sequence[int]] = (32, 32),
    n: int = 2,
    m: int = 4,
    packed: bool = False,
    impl: str = "auto",
) -> nnx.Module:
    """A copy of ``model`` whose masked ``nnx.Linear`` layers are `SparseLinear` layers.

    The NNX form of `sparsejax.export.export`. Every ``nnx.Linear`` whose ``kernel`` has a
    mask becomes ``SparseLinear.from_linear(layer, mask, ...)`` at the same attribute
    path; every other masked leaf (a conv kernel, an embedding, a bias) keeps its dense
    layer with ``w * mask`` applied; unmasked leaves and other state are copied. So the
    result computes what ``model`` computes with its masks applied, up to float
    summation order, storing only the kept entries of the Linear kernels.

    ``model`` is not changed: like ``sparsejax.nnx.prune_model`` and
    ``tensornets.nnx.compact`` this returns a new model (an ``nnx.clone`` with the layers
    replaced). Runs eagerly, outside jit. A Linear shared by several paths is replaced at
    the first path ``nnx.iter_graph`` visits; the others keep the masked dense layer.

    Args:
      model: the trained NNX model.
      masks: a mask tree of its params in the layout of ``sparsejax.nnx.functional``
        (nested dicts of ``bool`` arrays or None), e.g. ``sparsejax.nnx.get_masks(opt)``
        or ``sparsejax.nnx.prune_model(...).masks``.
      format: ``'bsr'`` or ``'nm'``.
      block_shape: BSR block ``(bk, bn)``, or a mapping from a kernel's path
        (``'dense_0/kernel'``) to its block shape, for layers whose widths differ.
      n, m, packed: the N:M pattern and index packing for ``format='nm'``.
      impl: kernel choice of the `SparseLinear` layers.

    Returns:
      The exported model.

    Raises:
      ValueError: naming the argument and the parameter path: ``model`` not an
        ``nnx.Module``, ``masks`` not a mask tree of its params
        (`sparsejax.masks.validate_masks`), an unknown ``format`` or ``impl``, a missing
        ``block_shape`` entry, and as `SparseLinear.from_linear`.
    """
    if not isinstance(model, nnx.Module):
        raise ValueError(f"model must be an nnx.Module, got model={type(model).__name__}")
    format = _check_format(format)
    _check_impl(impl)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    masks_lib.validate_masks(params, masks)
    flat_masks = _flat(masks)

    out = nnx.clone(model)
    # Every mask applied densely first (the leaves that stay dense need nothing more),
    # then the Linear layers are converted from their masked weights.
    nnx.update(out, masks_lib.apply_masks(params, masks))
    todo = []
    for path, node in nnx.iter_graph(out):
        if isinstance(node, nnx.Linear):
            mask = flat_masks.get((*path, "kernel"))
            if mask is not None:
                todo.append((tuple(path), node, mask))
    for path, layer, mask in todo:
        name = masks_lib.path_name((*path, "kernel"))
        shape = block_shape.get(name) if isinstance(block_shape, Mapping) else block_shape
        if format == "bsr" and shape is None:
            raise ValueError(f"block_shape has no entry for {name!r}")
        try:
            sparse = SparseLinear.from_linear(
                layer,
                np.asarray(mask),
                format=format,
                block_shape=shape if shape is not None else (1, 1),
                n=n,
                m=m,
                packed=packed,
                impl=impl,
            )
        except ValueError as err:
            raise ValueError(f"cannot export {name}: {err}") from None
        _set_child(out, path, sparse)
    return out
