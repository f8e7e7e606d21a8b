"""sparsejax: sparse training in JAX as pure functions over pytrees and one optax transform."""

from sparsejax import (
    activations,
    algorithms,
    block_sparse,
    distributions,
    export,
    flops,
    masks,
    nn,
    nnx,
    posttrain,
    sae,
    schedules,
    scores,
    soups,
    transforms,
)

__all__ = [
    "activations",
    "algorithms",
    "block_sparse",
    "distributions",
    "export",
    "flops",
    "masks",
    "nn",
    "nnx",
    "posttrain",
    "sae",
    "schedules",
    "scores",
    "soups",
    "transforms",
]
