"""Real sparse storage for a weight ``W`` of shape ``(K, N)`` used as ``Y = X @ W``.

Two formats, both registered pytrees whose only differentiable leaves are the stored nonzeros:

* `BSR`: block-sparse rows/columns. ``W`` is cut into a ``(K / bk, N / bn)`` grid of
  ``(bk, bn)`` blocks and only the nonzero blocks are stored, in block-column-major (CSC)
  order. The index metadata (block rows and columns, per-block-column pointers, and the
  transpose metadata: per-block-row pointers and the permutation from row-major to
  column-major block order) is static: it lives in a hashable, read-only `BSRLayout` in the
  pytree's treedef, so kernels read it as compile-time constants and the backward pass
  (which walks ``W`` by block rows) needs no data movement of the values. What the ops
  compute from a layout (the XLA path's groups, the kernels' step lists) is in
  `pallas_kernels.plans`.
* `NM`: N:M sparsity along the contracting axis ``K``: in every group of ``m`` consecutive
  rows of a column at most ``n`` entries are nonzero. Values are stored compressed as
  ``(K * n / m, N)`` plus the position of each value inside its group, as int8 or bit-packed
  into uint8.

Both are built eagerly (outside ``jax.jit``) by ``from_dense(w, mask, ...)``: the number of
nonzero blocks of a BSR matrix depends on the data, and fixes the shapes of everything
downstream, so it must be a concrete number. Build once (e.g. at export), then jit the
model that uses the format. A new sparsity pattern is a new treedef, hence one retrace.

References:
  Gray, Radford, Kingma, "GPU Kernels for Block-Sparse Weights", OpenAI 2017 (BSR matmul).
  Gale, Zaharia, Young, Elsen, "Sparse GPU Kernels for Deep Learning", SC 2020.
  Mishra et al., "Accelerating Sparse Deep Neural Networks", 2021 (2:4 storage, NVIDIA).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import numbers
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "BSR",
    "BSRLayout",
    "NM",
    "check_tpu_block_shape",
    "nm_decompress",
    "pack_indices",
    "unpack_indices",
]


def _is_tracer(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def _check_weights(w: np.ndarray, mask: np.ndarray) -> None:
    """A stored weight must be a float and finite where kept (a NaN would spread to Y)."""
    if not np.issubdtype(w.dtype, np.floating) and w.dtype.name != "bfloat16":
        raise ValueError(f"w must be a floating-point array, got dtype {w.dtype}")
    bad = mask.astype(bool) & ~np.isfinite(w.astype(np.float32))
    if bad.any():
        i, j = (int(v) for v in np.argwhere(bad)[0])
        raise ValueError(
            f"w has {int(bad.sum())} non-finite kept entries (first at w[{i}, {j}] = {w[i, j]})"
        )


def _positive_int_pair(value: Any, name: str) -> tuple[int, int]:
    """``value`` as two positive Python ints, or a ValueError naming ``name`` and the value."""
    if (
        not isinstance(value, Sequence)
        or len(value) != 2
        or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in value)
        or any(v < 1 for v in value)
    ):
        raise ValueError(f"{name} must be two positive ints, got {value!r}")
    return int(value[0]), int(value[1])


def _check_block_shape(block_shape: Any, shape: tuple[int, int]) -> tuple[int, int]:
    bk, bn = _positive_int_pair(block_shape, "block_shape")
    if shape[0] % bk or shape[1] % bn:
        raise ValueError(
            f"block_shape={(bk, bn)} must divide the weight shape {shape} "
            f"(K % bk = {shape[0] % bk}, N % bn = {shape[1] % bn})"
        )
    return bk, bn


def check_tpu_block_shape(block_shape: Sequence[int], shape: Sequence[int]) -> None:
    """Raises unless ``block_shape`` satisfies the TPU tiling rule for a ``shape`` matrix.

    Mosaic TPU moves arrays in (8, 128) tiles of 32-bit words: the last two dims of every
    block must be divisible by 8 and 128 respectively, or equal the full array dims. A BSR
    block ``(bk, bn)`` is the last dim of an ``X`` block ``(tm, bk)``, of an output block
    ``(tm, bn)`` and the last two dims of a values block ``(bk, bn)``, so both must be
    multiples of 128 (or the full ``K`` / ``N``).

    Args:
      block_shape: ``(bk, bn)``.
      shape: the dense weight shape ``(K, N)``.

    Raises:
      ValueError: naming the block shape and the rule.
    """
    bk, bn = block_shape
    k, n = shape
    ok_k = bk % 128 == 0 or bk == k
    ok_n = bn % 128 == 0 or bn == n
    if not (ok_k and ok_n):
        raise ValueError(
            f"block_shape={tuple(block_shape)} breaks the TPU tiling rule for a {tuple(shape)} "
            "weight: bk and bn must be multiples of 128 (or equal K and N), because blocks of "
            "X (tm, bk), Y (tm, bn) and W (bk, bn) must tile into (8, 128); use impl='xla' "
            "or a block shape such as (128, 128)"
        )


def _digest(*arrays: np.ndarray) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.digest()


_LAYOUT_ARRAYS = ("row_indices", "col_indices", "col_ptr", "row_ptr", "transpose_perm")


def _read_only_index_array(name: str, value: Any, length: int, bound: int) -> np.ndarray:
    """An int32 copy of ``value`` that nobody can write to; validates length and range."""
    a = np.asarray(value)
    if a.ndim != 1 or (a.size and not np.issubdtype(a.dtype, np.integer)):
        raise ValueError(f"{name} must be a 1D integer array, got {a.dtype}{list(a.shape)}")
    if a.shape[0] != length:
        raise ValueError(f"{name} must have {length} entries, got {a.shape[0]}")
    if a.size and (a.min() < 0 or a.max() > bound):
        raise ValueError(f"{name} entries must lie in [0, {bound}], got [{a.min()}, {a.max()}]")
    # A copy over immutable bytes: read-only, and `setflags(write=True)` cannot undo that
    # (it could on an array owning its memory). The caller's array stays the caller's.
    out = np.frombuffer(np.ascontiguousarray(a, dtype=np.int32).tobytes(), dtype=np.int32)
    out.setflags(write=False)
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class BSRLayout:
    """Static (hashable) index metadata of a `BSR` matrix; every array is read-only int32.

    Block ``t`` of ``BSR.values`` (CSC order: sorted by block column, then block row) sits
    at block row ``row_indices[t]`` and block column ``col_indices[t]``; the blocks of
    column ``j`` are ``col_ptr[j]:col_ptr[j+1]``. Transpose metadata: ``row_ptr`` and
    ``transpose_perm`` list the same blocks in CSR order (by row, then column):
    ``values[transpose_perm[row_ptr[i]:row_ptr[i+1]]]`` are the blocks of row ``i``.

    A layout is a static jit argument (it sits in `BSR`'s treedef), so it is immutable: the
    constructor stores read-only int32 copies of the arrays, and hash and equality are by
    content (shapes and every array), fixed at construction. Two layouts of the same pattern
    are equal, share jit caches and get the same execution plans (`pallas_kernels.plans`).
    Build layouts with `BSR.from_dense`; direct construction checks lengths and ranges only.

    Raises:
      ValueError: if ``shape`` is not two positive ints, ``block_shape`` does not divide it,
        or an array is not 1D integer of the right length (nnz for indices and permutation,
        block columns + 1 for ``col_ptr``, block rows + 1 for ``row_ptr``) and range.
    """

    shape: tuple[int, int]
    block_shape: tuple[int, int]
    row_indices: np.ndarray
    col_indices: np.ndarray
    col_ptr: np.ndarray
    row_ptr: np.ndarray
    transpose_perm: np.ndarray

    def __post_init__(self) -> None:
        shape = _positive_int_pair(self.shape, "shape")
        bk, bn = _check_block_shape(self.block_shape, shape)
        kb, nb = shape[0] // bk, shape[1] // bn
        nnz = int(np.size(self.row_indices))  # a wrong rank is refused below
        # (length, largest allowed entry) of each array.
        specs = {
            "row_indices": (nnz, kb - 1),
            "col_indices": (nnz, nb - 1),
            "col_ptr": (nb + 1, nnz),
            "row_ptr": (kb + 1, nnz),
            "transpose_perm": (nnz, nnz - 1),
        }
        # Frozen dataclass: the constructor is the one place that may set fields.
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "block_shape", (bk, bn))
        for name in _LAYOUT_ARRAYS:
            array = _read_only_index_array(name, getattr(self, name), *specs[name])
            object.__setattr__(self, name, array)
        key = (shape, (bk, bn), _digest(*(getattr(self, n) for n in _LAYOUT_ARRAYS)))
        object.__setattr__(self, "_key", key)

    def __reduce__(self):
        # Copies and pickles go through the constructor, so they are read-only too.
        return type(self), (self.shape, self.block_shape) + tuple(
            getattr(self, n) for n in _LAYOUT_ARRAYS
        )

    def __hash__(self) -> int:
        return hash(self._key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BSRLayout) and (self is other or self._key == other._key)

    @property
    def grid(self) -> tuple[int, int]:
        """Number of block rows and block columns ``(K / bk, N / bn)``."""
        return self.shape[0] // self.block_shape[0], self.shape[1] // self.block_shape[1]

    @property
    def nnz_blocks(self) -> int:
        """Number of stored blocks."""
        return int(self.row_indices.shape[0])


@functools.partial(jax.tree_util.register_dataclass, data_fields=["values"], meta_fields=["layout"])
@dataclasses.dataclass(frozen=True)
class BSR:
    """Block-sparse weight ``W`` of shape ``(K, N)`` for ``Y = X @ W``.

    Attributes:
      values: float[nnz_blocks, bk, bn], the stored blocks in CSC order (see `BSRLayout`).
        The only pytree leaf: gradients, optimizers and checkpoints see just this array.
      layout: static `BSRLayout` (shape, block shape, block indices, pointers, transpose
        metadata).

    Build with `BSR.from_dense` outside jit (the number of blocks is data-dependent).
    """

    values: jax.Array
    layout: BSRLayout

    @classmethod
    def from_dense(cls, w: Any, mask: Any = None, *, block_shape: Sequence[int] = (32, 32)) -> BSR:
        """Stores the blocks of ``w * mask`` that hold at least one kept entry.

        Runs eagerly: ``w`` and ``mask`` must be concrete (not traced), because the number
        of stored blocks fixes array shapes.

        Args:
          w: float[K, N] dense weight.
          mask: bool[K, N] (or None: keep the nonzeros of ``w``). Entries outside the mask
            are stored as exact zeros inside kept blocks, so ``to_dense() == w * mask``.
          block_shape: ``(bk, bn)`` dividing ``(K, N)``.

        Returns:
          The BSR matrix, values in ``w``'s dtype.

        Raises:
          ValueError: if ``w`` is not 2D or not floating point, a kept entry is not finite,
            ``mask`` has another shape, ``block_shape`` is not two positive ints dividing
            ``(K, N)``, or the inputs are traced.
        """
        if _is_tracer(w) or _is_tracer(mask):
            raise ValueError(
                "BSR.from_dense needs concrete arrays (call it outside jax.jit): the number "
                "of nonzero blocks decides the shapes"
            )
        w = np.asarray(w)
        if w.ndim != 2:
            raise ValueError(f"w must be a 2D (K, N) array, got shape {w.shape}")
        mask = w != 0 if mask is None else np.asarray(mask)
        if mask.shape != w.shape:
            raise ValueError(f"mask shape {mask.shape} must equal w shape {w.shape}")
        _check_weights(w, mask)
        bk, bn = _check_block_shape(block_shape, w.shape)
        kb, nb = w.shape[0] // bk, w.shape[1] // bn
        w = np.where(mask.astype(bool), w, np.zeros((), w.dtype))
        kept = mask.astype(bool).reshape(kb, bk, nb, bn).any(axis=(1, 3))  # (kb, nb)
        cols, rows = np.nonzero(kept.T)  # sorted by column, then row: CSC order
        blocks = w.reshape(kb, bk, nb, bn).transpose(0, 2, 1, 3)  # (kb, nb, bk, bn)
        values = blocks[rows, cols] if len(rows) else np.zeros((0, bk, bn), w.dtype)
        col_ptr = np.concatenate([[0], np.cumsum(kept.sum(axis=0))]).astype(np.int32)
        row_ptr = np.concatenate([[0], np.cumsum(kept.sum(axis=1))]).astype(np.int32)
        transpose_perm = np.lexsort((cols, rows)).astype(np.int32)  # CSR order -> CSC slot
        layout = BSRLayout(
            shape=(int(w.shape[0]), int(w.shape[1])),
            block_shape=(bk, bn),
            row_indices=rows.astype(np.int32),
            col_indices=cols.astype(np.int32),
            col_ptr=col_ptr,
            row_ptr=row_ptr,
            transpose_perm=transpose_perm,
        )
        return cls(values=jnp.asarray(values), layout=layout)

    @property
    def shape(self) -> tuple[int, int]:
        """Dense shape ``(K, N)``."""
        return self.layout.shape

    @property
    def block_shape(self) -> tuple[int, int]:
        """Block shape ``(bk, bn)``."""
        return self.layout.block_shape

    @property
    def nnz_blocks(self) -> int:
        """Number of stored blocks."""
        return self.layout.nnz_blocks

    @property
    def dtype(self):
        """dtype of the stored values."""
        return self.values.dtype

    @property
    def density(self) -> float:
        """Fraction of blocks stored."""
        kb, nb = self.layout.grid
        return self.nnz_blocks / (kb * nb)

    @property
    def nbytes(self) -> int:
        """Bytes stored: values plus every int32 index array (CSC and transpose metadata)."""
        lay = self.layout
        index_arrays = (
            lay.row_indices,
            lay.col_indices,
            lay.col_ptr,
            lay.row_ptr,
            lay.transpose_perm,
        )
        return int(self.values.size * self.values.dtype.itemsize) + sum(
            int(a.nbytes) for a in index_arrays
        )

    def to_dense(self) -> jax.Array:
        """The dense ``(K, N)`` matrix (zeros outside stored blocks); jit-able."""
        kb, nb = self.layout.grid
        bk, bn = self.block_shape
        blocks = jnp.zeros((kb, nb, bk, bn), self.values.dtype)
        if self.nnz_blocks:
            blocks = blocks.at[self.layout.row_indices, self.layout.col_indices].set(self.values)
        return blocks.transpose(0, 2, 1, 3).reshape(self.shape)


def _index_bits(m: int) -> int:
    """Bits per packed index: ceil(log2 m) rounded up to a power of two so a byte holds an
    integer number of indices."""
    bits = max(1, math.ceil(math.log2(m)))
    return 1 << math.ceil(math.log2(bits))


def _check_nm(n: Any, m: Any) -> tuple[int, int]:
    for name, v in (("n", n), ("m", m)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if n > m:
        raise ValueError(f"n must be <= m for N:M sparsity, got n={n}, m={m}")
    if m > 128:
        raise ValueError(f"m must be <= 128 so group positions fit in int8, got m={m}")
    return int(n), int(m)


@functools.partial(jax.jit, static_argnames="bits")
def pack_indices(indices: jax.Array, bits: int) -> jax.Array:
    """Packs int8 group positions ``(R, N)`` along axis 0 into uint8, ``8 // bits`` a byte.

    ``R`` is padded with zeros up to a multiple of ``8 // bits``. Entry ``e`` of byte ``r``
    is ``indices[r * per_byte + e]`` at bit offset ``e * bits``.
    """
    per_byte = 8 // bits
    rows = indices.shape[0]
    pad = (-rows) % per_byte
    idx = jnp.pad(indices.astype(jnp.uint8), ((0, pad), (0, 0)))
    idx = idx.reshape(-1, per_byte, idx.shape[-1])
    shifts = (jnp.arange(per_byte, dtype=jnp.uint8) * bits)[None, :, None]
    return jnp.sum(idx << shifts, axis=1, dtype=jnp.uint32).astype(jnp.uint8)


@functools.partial(jax.jit, static_argnames=("bits", "rows"))
def unpack_indices(packed: jax.Array, bits: int, rows: int) -> jax.Array:
    """Inverse of `pack_indices`: uint8 ``(ceil(R / per_byte), N)`` -> int8 ``(R, N)``."""
    per_byte = 8 // bits
    shifts = (jnp.arange(per_byte, dtype=jnp.uint8) * bits)[None, :, None]
    mask = jnp.uint8((1 << bits) - 1)
    idx = (packed[:, None, :] >> shifts) & mask
    return idx.reshape(-1, packed.shape[-1])[:rows].astype(jnp.int8)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["values", "indices"],
    meta_fields=["shape", "n", "m", "packed"],
)
@dataclasses.dataclass(frozen=True)
class NM:
    """N:M sparse weight ``W`` of shape ``(K, N)``, compressed along the contracting axis K.

    Rows ``g*m .. g*m + m - 1`` of each column form group ``g``; the group keeps ``n``
    entries. Row ``g*n + s`` of ``values`` holds kept entry ``s`` (in increasing position)
    of group ``g``, and ``indices`` holds its position ``p`` in ``[0, m)``, so
    ``W[g*m + p, j] = values[g*n + s, j]``. Groups with fewer than ``n`` kept entries store
    explicit zeros at unused positions.

    Attributes:
      values: float[K * n / m, N].
      indices: int8[K * n / m, N], or uint8[ceil(K * n / m / per_byte), N] when ``packed``
        (``bits = 2**ceil(log2(ceil(log2 m)))`` bits per index, ``per_byte = 8 // bits``).
      shape: static ``(K, N)``.
      n, m: static N:M pattern.
      packed: static; whether ``indices`` is bit-packed.
    """

    values: jax.Array
    indices: jax.Array
    shape: tuple[int, int]
    n: int
    m: int
    packed: bool = False

    @classmethod
    def from_dense(cls, w: Any, mask: Any = None, *, n: int = 2, m: int = 4, packed: bool = False):
        """Compresses ``w * mask`` where ``mask`` is N:M along axis 0 (the K axis).

        Args:
          w: float[K, N].
          mask: bool[K, N] with at most ``n`` True per group of ``m`` rows in each column
            (None: the nonzeros of ``w``).
          n, m: the pattern; ``m`` divides K, ``n <= m <= 128``.
          packed: bit-pack the indices (2 bits each for 2:4) instead of int8.

        Returns:
          The NM matrix, values in ``w``'s dtype.

        Raises:
          ValueError: if shapes do not match or divide, ``n``/``m`` are invalid, a group
            keeps more than ``n`` entries, ``w`` is not floating point, or a kept entry is
            not finite.
        """
        n, m = _check_nm(n, m)
        if _is_tracer(w) or _is_tracer(mask):
            raise ValueError("NM.from_dense needs concrete arrays (call it outside jax.jit)")
        w = np.asarray(w)
        if w.ndim != 2:
            raise ValueError(f"w must be a 2D (K, N) array, got shape {w.shape}")
        mask = w != 0 if mask is None else np.asarray(mask).astype(bool)
        if mask.shape != w.shape:
            raise ValueError(f"mask shape {mask.shape} must equal w shape {w.shape}")
        _check_weights(w, mask)
        k, cols = w.shape
        if k % m:
            raise ValueError(f"m={m} must divide K={k} (the contracting axis of w {w.shape})")
        groups = mask.reshape(k // m, m, cols)
        kept = groups.sum(axis=1)
        if kept.max(initial=0) > n:
            g, j = np.unravel_index(int(np.argmax(kept)), kept.shape)
            raise ValueError(
                f"mask keeps {int(kept.max())} > n={n} entries in group {g} (rows "
                f"{g * m}..{g * m + m - 1}) of column {j}; it is not {n}:{m} along axis 0"
            )
        # Kept positions first (ascending), then unkept ones to fill up to n with zeros:
        # a stable sort on "not kept" gives exactly that order.
        order = np.argsort(~groups, axis=1, kind="stable")[:, :n, :]  # (k/m, n, cols)
        wg = np.where(groups, w.reshape(k // m, m, cols), np.zeros((), w.dtype))
        values = np.take_along_axis(wg, order, axis=1).reshape(k // m * n, cols)
        indices = jnp.asarray(order.reshape(k // m * n, cols).astype(np.int8))
        if packed:
            indices = pack_indices(indices, _index_bits(m))
        return cls(
            values=jnp.asarray(values),
            indices=indices,
            shape=(int(k), int(cols)),
            n=n,
            m=m,
            packed=bool(packed),
        )

    @property
    def dtype(self):
        """dtype of the stored values."""
        return self.values.dtype

    @property
    def index_bits(self) -> int:
        """Bits stored per index: 8 (int8) or the packed width."""
        return _index_bits(self.m) if self.packed else 8

    def int8_indices(self) -> jax.Array:
        """Positions as int8 ``(K * n / m, N)``, unpacking if needed."""
        if not self.packed:
            return self.indices
        return unpack_indices(self.indices, _index_bits(self.m), self.values.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes stored: values plus indices."""
        return int(self.values.size * self.values.dtype.itemsize) + int(
            self.indices.size * self.indices.dtype.itemsize
        )

    def to_dense(self) -> jax.Array:
        """The dense ``(K, N)`` matrix; jit-able.

        ``W[g*m + p, j] = sum_s values[g*n + s, j] * [indices[g*n + s, j] == p]``.
        """
        return nm_decompress(self.values, self.int8_indices(), self.n, self.m)


def nm_decompress(values: jax.Array, indices: jax.Array, n: int, m: int) -> jax.Array:
    """Rebuilds dense rows from N:M storage: ``(R*n/m, C)`` values + int8 positions ->
    ``(R, C)``, ``W[g*m + p, j] = sum_s values[g*n + s, j] * [indices[g*n + s, j] == p]``.

    Used by `NM.to_dense`, the XLA path and inside the Pallas kernel on a tile.
    """
    rows, cols = values.shape
    groups = rows // n
    vals = values.reshape(groups, n, cols)
    idx = indices.astype(jnp.int32).reshape(groups, n, cols)
    pos = jax.lax.broadcasted_iota(jnp.int32, (groups, m, cols), 1)
    dense = jnp.zeros((groups, m, cols), values.dtype)
    # n is small (2 for 2:4): an unrolled select-accumulate is one fused elementwise pass;
    # a broadcast-and-sum over n materializes n copies of W and was 20x slower on CPU.
    for s in range(n):
        dense = dense + jnp.where(idx[:, s : s + 1, :] == pos, vals[:, s : s + 1, :], 0)
    return dense.reshape(groups * m, cols)
