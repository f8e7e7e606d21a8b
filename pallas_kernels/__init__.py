"""Pallas kernels (TPU, GPU) with plain-XLA CPU paths for block-sparse and N:M matmuls.

Formats (`formats`): `BSR` (block-sparse, static block layout) and `NM` (N:M along the
contracting axis), built eagerly with ``from_dense(w, mask, ...)``. Execution plans (`plans`):
what the XLA path and the kernels compute from a `BSRLayout`, cached by layout content.
Ops: `block_sparse_matmul` and `nm_matmul` with ``impl`` in ``('auto', 'xla', 'pallas',
'pallas_interpret')`` and gradients to the activations and the stored values; `*_reference`
are the dense jnp definitions.
"""

from pallas_kernels import block_sparse, formats, nm, ops, plans
from pallas_kernels.formats import BSR, NM, BSRLayout, check_tpu_block_shape
from pallas_kernels.ops import (
    IMPLS,
    block_sparse_matmul,
    block_sparse_matmul_reference,
    nm_matmul,
    nm_matmul_reference,
)

__all__ = [
    "BSR",
    "BSRLayout",
    "IMPLS",
    "NM",
    "block_sparse",
    "block_sparse_matmul",
    "block_sparse_matmul_reference",
    "check_tpu_block_shape",
    "formats",
    "nm",
    "nm_matmul",
    "nm_matmul_reference",
    "ops",
    "plans",
]
