"""Pallas kernels (TPU, GPU) with plain-XLA CPU paths for block-sparse and N:M matmuls.

Formats (`formats`): `BSR` (block-sparse, static block layout) and `NM` (N:M along the
contracting axis), built eagerly with ``from_dense(w, mask, ...)``. Execution plans (`plans`):
what the XLA path and the kernels compute from a `BSRLayout`, cached by layout content.
Ops: `block_sparse_matmul` and `nm_matmul` with ``impl`` in ``('auto', 'xla', 'pallas',
'pallas_interpret')`` and gradients to the activations and the stored values; `*_reference`
are the dense jnp definitions. Traced-index layouts for sparse training (`dynamic`): a fixed
number of blocks per column (fan-in) or in total (COO) at positions held in int32 arrays, so
a mask update changes indices, never shapes; ``fan_in_*`` / ``coo_*`` matmuls with
gradients, conversions, selection and RigL-style updates.
"""

from pallas_kernels import block_sparse, dynamic, formats, nm, ops, plans
from pallas_kernels.dynamic import (
    coo_from_dense,
    coo_matmul,
    coo_matmul_reference,
    coo_select,
    coo_to_dense,
    coo_update,
    fan_in_from_dense,
    fan_in_matmul,
    fan_in_matmul_reference,
    fan_in_select,
    fan_in_to_dense,
    fan_in_update,
)
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
    "coo_from_dense",
    "coo_matmul",
    "coo_matmul_reference",
    "coo_select",
    "coo_to_dense",
    "coo_update",
    "dynamic",
    "fan_in_from_dense",
    "fan_in_matmul",
    "fan_in_matmul_reference",
    "fan_in_select",
    "fan_in_to_dense",
    "fan_in_update",
    "formats",
    "nm",
    "nm_matmul",
    "nm_matmul_reference",
    "ops",
    "plans",
]
